//! `little serve`: the daemon. Claims its home (one daemon per home),
//! loads the apps from the state database, serves them, answers the CLI
//! on `<home>/little.sock` (its own uid and root only), runs the monitor
//! and the `/metrics` endpoint.

use std::collections::BTreeMap;
use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::api::{self, AppSpec, Request, RequestError, Response};
use crate::app::{App, TICK};
use crate::cgroup::{self, Cgroups};
use crate::db::Db;
use crate::home::{self, HomeLock};
use crate::logs::Logs;
use crate::metrics::{render, Sample};
use crate::peer;
use crate::settings::Settings;
use crate::sync::lock;
use crate::volume::Volumes;

/// How long a client may take to send its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How often `logs --follow` looks for new output.
const FOLLOW_POLL: Duration = Duration::from_millis(200);

/// Errors starting the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The home is another daemon's, or could not be claimed.
    #[error(transparent)]
    Home(#[from] home::HomeError),
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

/// What a deploy under way has taken: its app's name (the map's key), the
/// app's user and the volumes it mounts, so that deploys of different
/// apps run side by side and never take one uid or one volume twice.
struct Claim {
    uid: u32,
    volumes: Vec<String>,
}

/// Gives a deploy's [`Claim`] back when the deploy ends, however it ends.
struct Claimed<'a> {
    claims: &'a Mutex<BTreeMap<String, Claim>>,
    app: String,
}

impl Drop for Claimed<'_> {
    fn drop(&mut self) {
        lock(self.claims).remove(&self.app);
    }
}

/// The running daemon.
pub struct Daemon {
    settings: Arc<Settings>,
    db: Db,
    apps: Mutex<BTreeMap<String, Arc<App>>>,
    /// Held for the short steps that check and take names, users and
    /// volumes (a deploy's claim, volume commands), never for a boot.
    deploying: Mutex<()>,
    /// The deploys under way, by app: what each has taken before it is in
    /// the database.
    claims: Mutex<BTreeMap<String, Claim>>,
    next_id: Arc<AtomicU64>,
    /// This daemon's claim on its home, held for its life.
    _home: HomeLock,
    /// The uid the API answers (besides root).
    uid: u32,
}

/// The first instance id of a daemon serving `records`: after every id
/// that has a log, so that instance ids go on from the last daemon's and a
/// new instance never writes over an old one's log.
fn first_instance_id(records: &[crate::db::AppRecord]) -> u64 {
    records
        .iter()
        .map(|r| crate::logs::highest_id(&crate::deploy::logs_dir(r)))
        .max()
        .unwrap_or(0)
        + 1
}

impl Daemon {
    /// Claims the home, opens the state, starts serving every stored app.
    ///
    /// The claim comes first: a second daemon on a home stops here, before
    /// it kills the first one's VMMs or touches its files.
    pub fn open(settings: Settings) -> Result<Arc<Self>, DaemonError> {
        let claim = HomeLock::claim(&settings.home)?;
        home::private_umask();
        for (path, what) in [
            (&settings.kernel, "the guest kernel: guest-kernel/build.sh"),
            (&settings.vmm, "cargo build --release -p vmm"),
            (&settings.agent, "cargo build --release -p guest-agent"),
        ] {
            if !path.exists() {
                return Err(DaemonError::Missing(path.display().to_string(), what));
            }
        }
        let apps = settings.home.join("apps");
        home::create_dir_all(&apps).map_err(|e| DaemonError::Io(apps.display().to_string(), e))?;
        let mut settings = settings;
        crate::process::become_subreaper()
            .map_err(|e| DaemonError::Io("PR_SET_CHILD_SUBREAPER".into(), e))?;
        if settings.jail {
            match Cgroups::open(&cgroup::tree_name(&settings.home)) {
                Ok(tree) => {
                    // Instances a killed daemon on this home left behind
                    // (found by their cgroup, never by their command line).
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
        let db = Db::open(&settings.home.join("state.redb"))?;
        let daemon = Arc::new(Self {
            settings: Arc::new(settings),
            db,
            apps: Mutex::new(BTreeMap::new()),
            deploying: Mutex::new(()),
            claims: Mutex::new(BTreeMap::new()),
            next_id: Arc::new(AtomicU64::new(1)),
            _home: claim,
            uid: peer::my_uid(),
        });
        // Before any other thread starts, so that every thread inherits
        // the blocked mask and only the waiter receives these signals.
        daemon.stop_on_signals();
        let records = daemon.db.list()?;
        daemon
            .next_id
            .store(first_instance_id(&records), Ordering::Relaxed);
        for record in records {
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
        // A socket left by a daemon that died: this one holds the home.
        if sock.exists() {
            std::fs::remove_file(&sock).map_err(sock_err)?;
        }
        let listener = UnixListener::bind(&sock).map_err(sock_err)?;
        std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(home::FILE_MODE))
            .map_err(sock_err)?;
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
    /// and the VMM of any deploy in flight, then end the process (a
    /// restarted daemon restores on demand again).
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
            // A deploy's boot or a wake under way: its VMM goes too.
            let stopped = crate::process::stop_all();
            if stopped > 0 {
                eprintln!(
                    "little: stopped {stopped} more vmm processes (deploys or wakes under way)"
                );
            }
            if let Some(tree) = &me.settings.cgroups {
                tree.remove();
            }
            std::process::exit(0);
        });
    }

    /// Answers one connection: checks who it is, reads one request
    /// (bounded in size and time), answers it.
    fn client(&self, stream: UnixStream) {
        let peer = match peer::peer_cred(&stream) {
            Ok(peer) => peer,
            Err(e) => {
                eprintln!("little: refused an API connection: no peer credentials: {e}");
                return;
            }
        };
        if !peer::may_use(peer.uid, self.uid) {
            eprintln!(
                "little: refused an API connection from uid {} (pid {})",
                peer.uid, peer.pid
            );
            let refusal = format!(
                "permission denied: this daemon answers uid {} and root, not uid {}",
                self.uid, peer.uid
            );
            reply(&stream, &Response::error(refusal));
            return;
        }
        let _ = stream.set_read_timeout(Some(REQUEST_TIMEOUT));
        let request = match api::read_request(&mut BufReader::new(&stream)) {
            Ok(request) => request,
            Err(RequestError::Empty) => return,
            Err(e) => {
                reply(&stream, &Response::error(error_chain(&e)));
                return;
            }
        };
        let _ = stream.set_read_timeout(None);
        match request {
            Request::Logs { app, follow } => self.logs(&stream, &app, follow),
            Request::VolumeExport { name } => self.export(&stream, &name),
            request => {
                reply(&stream, &self.handle(request));
            }
        }
    }

    /// Runs one API request that has a one-line answer.
    fn handle(&self, request: Request) -> Response {
        match request {
            Request::Deploy {
                spec,
                registry_auth,
            } => match self.deploy(spec, registry_auth.map(|s| s.0)) {
                Ok(status) => Response::ok(status),
                Err(e) => Response::error(e),
            },
            Request::Ps { show_env } => {
                let apps: Vec<_> = lock(&self.apps)
                    .values()
                    .map(|a| {
                        let mut status = a.status();
                        if !show_env {
                            status.spec.env = api::mask_env(&status.spec.env);
                        }
                        status
                    })
                    .collect();
                Response::ok(serde_json::to_value(apps).unwrap_or_default())
            }
            Request::Logs { .. } | Request::VolumeExport { .. } => {
                Response::error("logs and exports are streamed on their own connection")
            }
            Request::VolumeImport { name, archive } => {
                let _guard = lock(&self.deploying);
                let scratch = self.settings.home.join("tmp");
                let imported = self.volume_held(&name, || {
                    self.volumes()
                        .import(&name, &archive, &scratch)
                        .map_err(|e| error_chain(&e))
                });
                match imported {
                    Ok((volume, held)) => Response::ok(
                        serde_json::to_value(api::Exported {
                            volume,
                            bytes: 0,
                            held,
                        })
                        .unwrap_or_default(),
                    ),
                    Err(e) => Response::error(e),
                }
            }
            Request::VolumeCreate { name, size } => {
                let _guard = lock(&self.deploying);
                match self.volumes().create(&name, size) {
                    Ok(info) => Response::ok(serde_json::to_value(info).unwrap_or_default()),
                    Err(e) => Response::error(error_chain(&e)),
                }
            }
            Request::VolumeLs => {
                let listed = self.volume_users().and_then(|users| {
                    self.volumes()
                        .list(|name| users.get(name).cloned())
                        .map_err(|e| error_chain(&e))
                });
                match listed {
                    Ok(list) => Response::ok(serde_json::to_value(list).unwrap_or_default()),
                    Err(e) => Response::error(e),
                }
            }
            Request::VolumeRm { name } => {
                let _guard = lock(&self.deploying);
                let removed = self.volume_users().and_then(|users| {
                    self.volumes()
                        .remove(&name, users.get(&name).cloned())
                        .map_err(|e| error_chain(&e))
                });
                match removed {
                    Ok(()) => Response::ok(serde_json::Value::Null),
                    Err(e) => Response::error(e),
                }
            }
            Request::Scale { app, scale } => match self.scale(&app, &scale) {
                Ok(status) => Response::ok(status),
                Err(e) => Response::error(e),
            },
            Request::Rm { app } => {
                if lock(&self.claims).contains_key(&app) {
                    return Response::error(format!(
                        "a deploy of {app:?} is under way: remove it once it is done"
                    ));
                }
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

    /// Streams `app`'s console output after an `ok` line; with `follow`,
    /// keeps streaming until the client hangs up or the app is removed
    /// (a redeploy, which takes the app out of service while it boots,
    /// is followed through).
    fn logs(&self, stream: &UnixStream, app: &str, follow: bool) {
        let Some(dir) = lock(&self.apps)
            .get(app)
            .map(|a| crate::deploy::logs_dir(&a.record))
        else {
            reply(stream, &Response::error(format!("no app named {app:?}")));
            return;
        };
        if !reply(stream, &Response::ok(serde_json::Value::Null)) {
            return;
        }
        let mut out = stream;
        let mut logs = Logs::new(dir);
        loop {
            if logs.poll(&mut out).is_err() {
                return;
            }
            let kept = lock(&self.apps).contains_key(app) || self.db.contains(app).unwrap_or(false);
            if !follow || !kept {
                let _ = logs.finish(&mut out);
                return;
            }
            std::thread::sleep(FOLLOW_POLL);
            if peer::hung_up(stream) {
                return;
            }
        }
    }

    /// Runs `f` while the app that mounts volume `name` (if any) is held
    /// with no instance running ([`App::hold`]); with the app and how
    /// many of its instances were suspended for it.
    fn volume_held<T>(
        &self,
        name: &str,
        f: impl FnOnce() -> Result<T, String>,
    ) -> Result<(T, Option<(String, usize)>), String> {
        let user = self.volume_users()?.get(name).cloned();
        if let Some(user) = user
            .as_ref()
            .filter(|a| lock(&self.claims).contains_key(*a))
        {
            return Err(format!(
                "app {user:?}, which mounts volume {name:?}, is being deployed: try again once it is done"
            ));
        }
        let app = user.as_ref().and_then(|a| lock(&self.apps).get(a).cloned());
        match (user, app) {
            (Some(user), Some(app)) => {
                let (out, stopped) = app.hold(f);
                Ok((out?, Some((user, stopped))))
            }
            _ => Ok((f()?, None)),
        }
    }

    /// Streams volume `name` as an archive (`volume-export`), made in the
    /// home's scratch folder while its app is held, then removed.
    fn export(&self, stream: &UnixStream, name: &str) {
        // Held while the archive is made, not while a client reads it.
        let guard = lock(&self.deploying);
        let scratch = self.settings.home.join("tmp");
        let archive = scratch.join(format!("export-{name}-{}.tar", std::process::id()));
        let made = crate::home::create_dir_all(&scratch)
            .map_err(|e| format!("cannot make {}: {e}", scratch.display()))
            .and_then(|()| {
                self.volume_held(name, || {
                    let _ = std::fs::remove_file(&archive);
                    self.volumes()
                        .export(name, &archive)
                        .and_then(|()| self.volumes().info(name, None))
                        .map_err(|e| error_chain(&e))
                })
            });
        let opened = made.and_then(|(volume, held)| {
            let file = std::fs::File::open(&archive)
                .map_err(|e| format!("cannot read {}: {e}", archive.display()))?;
            let bytes = file.metadata().map(|m| m.len()).unwrap_or(0);
            Ok((
                file,
                api::Exported {
                    volume,
                    bytes,
                    held,
                },
            ))
        });
        let _ = std::fs::remove_file(&archive);
        drop(guard);
        match opened {
            Ok((mut file, exported)) => {
                let data = serde_json::to_value(exported).unwrap_or_default();
                if reply(stream, &Response::ok(data)) {
                    let mut out = stream;
                    let _ = std::io::copy(&mut file, &mut out);
                }
            }
            Err(e) => {
                reply(stream, &Response::error(e));
            }
        }
    }

    fn volumes(&self) -> Volumes {
        Volumes::new(&self.settings.home)
    }

    /// Which app mounts each volume in use, from the stored apps (an
    /// unreadable database is an error, never "unused").
    /// Deploys under way count as users of the volumes they mount.
    fn volume_users(&self) -> Result<BTreeMap<String, String>, String> {
        let records = self.db.list().map_err(|e| error_chain(&e))?;
        let mut users: BTreeMap<String, String> = records
            .into_iter()
            .flat_map(|r| {
                let app = r.spec.name;
                r.spec
                    .volumes
                    .into_iter()
                    .map(move |v| (v.name, app.clone()))
            })
            .collect();
        for (app, claim) in lock(&self.claims).iter() {
            for volume in &claim.volumes {
                users.insert(volume.clone(), app.clone());
            }
        }
        Ok(users)
    }

    /// The image files of `spec`'s volumes, once each is checked to exist,
    /// to hold ext4 and to be no other app's.
    fn volume_files(&self, spec: &AppSpec) -> Result<Vec<PathBuf>, String> {
        let volumes = self.volumes();
        let users = self.volume_users()?;
        spec.volumes
            .iter()
            .map(|m| {
                if let Some(app) = users.get(&m.name).filter(|app| **app != spec.name) {
                    return Err(format!(
                        "volume {:?} is mounted by app {app:?}: two apps cannot share a volume read-write",
                        m.name
                    ));
                }
                volumes.open(&m.name).map_err(|e| error_chain(&e))
            })
            .collect()
    }

    fn deploy(
        &self,
        spec: AppSpec,
        registry_auth: Option<String>,
    ) -> Result<serde_json::Value, String> {
        spec.validate()?;
        let (_claimed, volume_files, uid) = self.claim(&spec)?;
        let old = lock(&self.apps).remove(&spec.name);
        if let Some(old) = &old {
            old.stop();
        }
        let mut record =
            crate::deploy::deploy(&self.settings, &spec, uid, volume_files, registry_auth)
                .map_err(|e| error_chain(&e))?;
        // A redeploy keeps its port unless it names another.
        if let (Some(old), true) = (&old, spec.listen.ends_with(":0")) {
            record.listen = old.listen.to_string();
        }
        let app = App::start(record, self.settings.clone(), self.next_id.clone())
            .map_err(|e| format!("cannot listen on {}: {e}", spec.listen))?;
        let mut stored = app.record.clone();
        stored.listen = app.listen.to_string();
        self.db.put(&stored).map_err(|e| error_chain(&e))?;
        let mut status = app.status();
        status.spec.env = api::mask_env(&status.spec.env);
        lock(&self.apps).insert(spec.name, app);
        serde_json::to_value(status).map_err(|e| e.to_string())
    }

    /// Takes `spec`'s name, user and volumes for its deploy (refused while
    /// another deploy of that app is under way, or when a volume is
    /// another app's), so that deploys of other apps run meanwhile.
    fn claim(&self, spec: &AppSpec) -> Result<(Claimed<'_>, Vec<PathBuf>, u32), String> {
        let _guard = lock(&self.deploying);
        if lock(&self.claims).contains_key(&spec.name) {
            return Err(format!(
                "a deploy of {:?} is under way: try again once it is done",
                spec.name
            ));
        }
        let volume_files = self.volume_files(spec)?;
        let records = self.db.list().map_err(|e| error_chain(&e))?;
        let mut claims = lock(&self.claims);
        let taken: Vec<u32> = claims.values().map(|c| c.uid).collect();
        let uid = crate::jail::app_user(&records, &taken, &spec.name, crate::jail::uid_base());
        claims.insert(
            spec.name.clone(),
            Claim {
                uid,
                volumes: spec.volumes.iter().map(|v| v.name.clone()).collect(),
            },
        );
        let claimed = Claimed {
            claims: &self.claims,
            app: spec.name.clone(),
        };
        Ok((claimed, volume_files, uid))
    }

    /// Changes `name`'s scaling settings while it serves: checked as a
    /// deploy's, stored, then applied.
    fn scale(&self, name: &str, scale: &api::Scale) -> Result<serde_json::Value, String> {
        if scale.is_empty() {
            return Err(
                "nothing to change: give --min, --max, --concurrency or --idle-timeout".into(),
            );
        }
        let app = lock(&self.apps)
            .get(name)
            .cloned()
            .ok_or_else(|| format!("no app named {name:?}"))?;
        app.rescale(scale, |spec| {
            let mut stored = app.record.clone();
            stored.spec = spec.clone();
            stored.listen = app.listen.to_string();
            self.db.put(&stored).map_err(|e| error_chain(&e))
        })?;
        let mut status = app.status();
        status.spec.env = api::mask_env(&status.spec.env);
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

/// Writes `response` as one line; false when the client is gone.
fn reply(mut stream: &UnixStream, response: &Response) -> bool {
    let Ok(mut text) = serde_json::to_string(response) else {
        return false;
    };
    text.push('\n');
    stream.write_all(text.as_bytes()).is_ok()
}

pub use vmm_api::error_chain;

#[cfg(test)]
#[path = "daemon_tests.rs"]
mod tests;
