//! `little serve`: the daemon. Loads the apps from the state database,
//! serves them, answers the CLI on `<home>/little.sock`, runs the monitor
//! and the `/metrics` endpoint.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::api::{AppSpec, Request, Response};
use crate::app::{App, TICK};
use crate::cgroup::{self, Cgroups};
use crate::db::Db;
use crate::metrics::{render, Sample};
use crate::settings::Settings;
use crate::sync::lock;

/// Errors starting the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The state folder or socket could not be set up.
    #[error("cannot set up {0}")]
    Io(String, #[source] std::io::Error),
    /// The state database failed.
    #[error(transparent)]
    Db(#[from] crate::db::DbError),
    /// A required file is missing.
    #[error("{0} is missing ({1})")]
    Missing(String, &'static str),
}

/// The running daemon.
pub struct Daemon {
    settings: Arc<Settings>,
    db: Db,
    apps: Mutex<BTreeMap<String, Arc<App>>>,
    deploying: Mutex<()>,
    next_id: Arc<AtomicU64>,
}

impl Daemon {
    /// Opens the state, starts serving every stored app.
    pub fn open(settings: Settings) -> Result<Arc<Self>, DaemonError> {
        for (path, what) in [
            (&settings.kernel, "the guest kernel: guest-kernel/build.sh"),
            (&settings.vmm, "cargo build --release -p vmm"),
            (&settings.agent, "cargo build --release -p guest-agent"),
        ] {
            if !path.exists() {
                return Err(DaemonError::Missing(path.display().to_string(), what));
            }
        }
        let home = &settings.home.clone();
        std::fs::create_dir_all(home.join("apps"))
            .map_err(|e| DaemonError::Io(home.display().to_string(), e))?;
        let mut settings = settings;
        crate::process::become_subreaper()
            .map_err(|e| DaemonError::Io("PR_SET_CHILD_SUBREAPER".into(), e))?;
        if settings.jail {
            match Cgroups::open(&cgroup::tree_name(home)) {
                Ok(tree) => {
                    // Instances a killed daemon on this home left behind.
                    let killed = tree.kill_all();
                    if killed > 0 {
                        eprintln!("little: stopped {killed} vmm processes a previous daemon left");
                    }
                    settings.cgroups = Some(tree);
                }
                Err(e) => eprintln!(
                    "little: warning: instances run without cgroup limits: {}",
                    error_chain(&e)
                ),
            }
        }
        let db = Db::open(&home.join("state.redb"))?;
        let daemon = Arc::new(Self {
            settings: Arc::new(settings),
            db,
            apps: Mutex::new(BTreeMap::new()),
            deploying: Mutex::new(()),
            next_id: Arc::new(AtomicU64::new(1)),
        });
        // Before any other thread starts, so that every thread inherits
        // the blocked mask and only the waiter receives these signals.
        daemon.stop_on_signals();
        for record in daemon.db.list()? {
            let name = record.spec.name.clone();
            match App::start(record, daemon.settings.clone(), daemon.next_id.clone()) {
                Ok(app) => {
                    eprintln!("little: serving {name} on {}", app.listen);
                    lock(&daemon.apps).insert(name, app);
                }
                Err(e) => eprintln!("little: cannot serve {name}: {e}"),
            }
        }
        Ok(daemon)
    }

    /// Serves the API socket (blocking), with the monitor and, when given,
    /// the metrics endpoint on their own threads.
    pub fn serve(self: &Arc<Self>, metrics: Option<SocketAddr>) -> Result<(), DaemonError> {
        let sock = self.settings.socket();
        let sock_err = |e| DaemonError::Io(sock.display().to_string(), e);
        if sock.exists() {
            std::fs::remove_file(&sock).map_err(sock_err)?;
        }
        let listener = UnixListener::bind(&sock).map_err(sock_err)?;
        if let Some(addr) = metrics {
            let metrics_listener =
                TcpListener::bind(addr).map_err(|e| DaemonError::Io(addr.to_string(), e))?;
            let me = self.clone();
            std::thread::spawn(move || me.metrics_loop(metrics_listener));
        }
        let me = self.clone();
        std::thread::spawn(move || loop {
            let apps: Vec<Arc<App>> = lock(&me.apps).values().cloned().collect();
            for app in apps {
                app.tick();
            }
            std::thread::sleep(TICK);
        });
        eprintln!("little: listening on {}", sock.display());
        for stream in listener.incoming().flatten() {
            let me = self.clone();
            std::thread::spawn(move || me.client(stream));
        }
        Ok(())
    }

    /// SIGTERM, SIGINT and SIGHUP stop every instance and standby VMM,
    /// then end the process (a restarted daemon restores on demand again).
    fn stop_on_signals(self: &Arc<Self>) {
        // SAFETY: sigset_t is plain data that sigemptyset initializes.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid, exclusively borrowed sigset_t; the
        // signal numbers are valid. Blocking them in this thread before
        // the API threads start makes them pending for sigwait below
        // (threads spawned from here inherit the mask).
        let blocked = unsafe {
            libc::sigemptyset(&mut set);
            for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
                libc::sigaddset(&mut set, sig);
            }
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
        };
        if blocked != 0 {
            return;
        }
        let me = self.clone();
        std::thread::spawn(move || {
            let mut sig = 0;
            // SAFETY: `set` is initialized above and `sig` is a valid out
            // pointer for the duration of the call.
            unsafe { libc::sigwait(&set, &mut sig) };
            eprintln!("little: signal {sig}: stopping every instance");
            let apps: Vec<Arc<App>> = lock(&me.apps).values().cloned().collect();
            for app in apps {
                app.stop();
            }
            std::process::exit(0);
        });
    }

    fn client(&self, stream: UnixStream) {
        let Ok(mut writer) = stream.try_clone() else {
            return;
        };
        let mut line = String::new();
        if BufReader::new(Read::take(stream, 1 << 20))
            .read_line(&mut line)
            .is_err()
        {
            return;
        }
        let response = match serde_json::from_str::<Request>(&line) {
            Ok(request) => self.handle(request),
            Err(e) => Response::error(format!("malformed request: {e}")),
        };
        if let Ok(mut text) = serde_json::to_string(&response) {
            text.push('\n');
            let _ = writer.write_all(text.as_bytes());
        }
    }

    /// Runs one API request.
    pub fn handle(&self, request: Request) -> Response {
        match request {
            Request::Deploy(spec) => match self.deploy(spec) {
                Ok(status) => Response::ok(status),
                Err(e) => Response::error(e),
            },
            Request::Ps => {
                let apps: Vec<_> = lock(&self.apps).values().map(|a| a.status()).collect();
                Response::ok(serde_json::to_value(apps).unwrap_or_default())
            }
            Request::Logs { app } => match lock(&self.apps).get(&app) {
                Some(a) => Response::ok(serde_json::Value::String(logs(a))),
                None => Response::error(format!("no app named {app:?}")),
            },
            Request::Rm { app } => {
                let removed = lock(&self.apps).remove(&app);
                match removed {
                    Some(a) => {
                        a.stop();
                        if let Err(e) = self.db.remove(&app) {
                            return Response::error(error_chain(&e));
                        }
                        let _ = std::fs::remove_dir_all(&a.record.dir);
                        Response::ok(serde_json::Value::Null)
                    }
                    None => Response::error(format!("no app named {app:?}")),
                }
            }
        }
    }

    fn deploy(&self, spec: AppSpec) -> Result<serde_json::Value, String> {
        spec.validate()?;
        // One deploy at a time: boots are heavy and the store is shared.
        let _guard = lock(&self.deploying);
        let old = lock(&self.apps).remove(&spec.name);
        if let Some(old) = &old {
            old.stop();
        }
        let records = self.db.list().map_err(|e| error_chain(&e))?;
        let uid = crate::jail::app_user(&records, &spec.name, crate::jail::uid_base());
        let mut record =
            crate::deploy::deploy(&self.settings, &spec, uid).map_err(|e| error_chain(&e))?;
        // A redeploy keeps its port unless it names another.
        if let (Some(old), true) = (&old, spec.listen.ends_with(":0")) {
            record.listen = old.listen.to_string();
        }
        let app = App::start(record, self.settings.clone(), self.next_id.clone())
            .map_err(|e| format!("cannot listen on {}: {e}", spec.listen))?;
        let mut stored = app.record.clone();
        stored.listen = app.listen.to_string();
        self.db.put(&stored).map_err(|e| error_chain(&e))?;
        let status = app.status();
        lock(&self.apps).insert(spec.name, app);
        serde_json::to_value(status).map_err(|e| e.to_string())
    }

    fn metrics_loop(&self, listener: TcpListener) {
        for stream in listener.incoming().flatten() {
            let mut stream = stream;
            let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
            let mut buf = [0u8; 1024];
            let n = stream.read(&mut buf).unwrap_or(0);
            let request = String::from_utf8_lossy(&buf[..n]);
            let (status, body) = if request.starts_with("GET /metrics") {
                let apps: Vec<Arc<App>> = lock(&self.apps).values().cloned().collect();
                let samples: Vec<Sample<'_>> = apps
                    .iter()
                    .map(|a| Sample {
                        app: &a.record.spec.name,
                        metrics: &a.metrics,
                        instances: a.instance_count(),
                    })
                    .collect();
                ("200 OK", render(&samples))
            } else {
                ("404 Not Found", "try /metrics\n".to_owned())
            };
            let _ = write!(
                stream,
                "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
        }
    }
}

/// The app's console output: the first boot, then each instance's
/// (`<app>/logs/<boot|id>/console.log`).
fn logs(app: &App) -> String {
    let dir = crate::deploy::logs_dir(&app.record);
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    names.sort_by_key(|n| (n != "boot", n.parse::<u64>().unwrap_or(0)));
    let mut out = String::new();
    for name in names {
        let text =
            std::fs::read_to_string(dir.join(&name).join(crate::jail::CONSOLE)).unwrap_or_default();
        if text.is_empty() {
            continue;
        }
        out.push_str(&format!("==> {name} <==\n{text}"));
        if !text.ends_with('\n') {
            out.push('\n');
        }
    }
    out
}

pub use vmm_api::error_chain;
