//! One instance: a `vmm` process restored from an app's snapshot, and the
//! control connection the daemon hands accepted sockets over.
//!
//! A [`Standby`] is a `vmm --api-sock` started ahead of need with the
//! app's device flags (`--net`, its own `--vsock`, the read-only base image)
//! but no guest; [`Standby::restore`] sends it `restore <snapshot>` and
//! gives a running [`Instance`]. The agent in the restored guest reconnects
//! to the instance's `v.sock_1024`; a thread answers its `HELLO` with
//! `RESTORED <ns> <entropy>` (clock and entropy for the clone).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::db::AppRecord;
use crate::settings::Settings;
use crate::sync::lock;

/// How long a standby VMM may take to open its control socket. Starting
/// a process takes milliseconds; this only catches one that hangs, on a
/// host whose cores are busy with guests.
const STANDBY_START: Duration = Duration::from_secs(30);
/// How long a control command may take (a restore maps the snapshot). A
/// VMM that misses it is taken for dead and its connections are lost, so
/// it is far above what a loaded host needs (milliseconds).
const CONTROL_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors of an instance.
#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    /// The `vmm` process could not be started.
    #[error("cannot start {0}")]
    Spawn(String, #[source] std::io::Error),
    /// The standby VMM never opened its control socket.
    #[error("the standby vmm did not open its control socket within {0:?}")]
    NoControlSocket(Duration),
    /// Talking to the VMM's control socket failed (it died, most likely).
    #[error("control socket of instance {0}")]
    Control(u64, #[source] std::io::Error),
    /// The VMM refused a command.
    #[error("instance {0}: vmm answered {1:?}")]
    Refused(u64, String),
    /// The instance folder could not be prepared.
    #[error("cannot prepare {0}")]
    Dir(String, #[source] std::io::Error),
}

fn path_str(p: &Path) -> String {
    p.display().to_string()
}

/// Sends one command (with an optional descriptor) and reads the one-line
/// reply.
fn command(stream: &mut UnixStream, line: &str, fd: Option<&TcpStream>) -> std::io::Result<String> {
    let text = format!("{line}\n");
    match fd {
        Some(fd) => {
            let sent = stream
                .send_with_fd(text.as_bytes(), fd.as_raw_fd())
                .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
            if sent != text.len() {
                stream.write_all(&text.as_bytes()[sent..])?;
            }
        }
        None => stream.write_all(text.as_bytes())?,
    }
    let mut reply = Vec::with_capacity(64);
    let mut chunk = [0u8; 256];
    while !reply.contains(&b'\n') {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        reply.extend_from_slice(&chunk[..n]);
    }
    Ok(String::from_utf8_lossy(&reply).trim().to_owned())
}

fn connect_control(sock: &Path) -> std::io::Result<UnixStream> {
    // The socket file appears at bind(2), a moment before listen(2).
    let start = Instant::now();
    let stream = loop {
        match UnixStream::connect(sock) {
            Ok(s) => break s,
            Err(e)
                if start.elapsed() < Duration::from_secs(1)
                    && e.kind() == std::io::ErrorKind::ConnectionRefused =>
            {
                std::thread::sleep(Duration::from_micros(200));
            }
            Err(e) => return Err(e),
        }
    };
    stream.set_read_timeout(Some(CONTROL_TIMEOUT))?;
    stream.set_write_timeout(Some(CONTROL_TIMEOUT))?;
    Ok(stream)
}

/// A pre-spawned VMM waiting for `restore`.
pub struct Standby {
    id: u64,
    child: Child,
    dir: PathBuf,
    agent: UnixListener,
}

impl Standby {
    /// Starts a standby `vmm` for `app` in `<app dir>/i/<id>` and waits for
    /// its control socket.
    pub fn spawn(settings: &Settings, app: &AppRecord, id: u64) -> Result<Self, InstanceError> {
        let dir = app.dir.join("i").join(id.to_string());
        let dir_err = |e| InstanceError::Dir(path_str(&dir), e);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(dir_err)?;
        }
        std::fs::create_dir_all(&dir).map_err(dir_err)?;
        let agent = UnixListener::bind(dir.join("v.sock_1024")).map_err(dir_err)?;
        let api = dir.join("api.sock");
        let console = app.dir.join("logs").join(format!("{id}.log"));
        let child = Command::new(&settings.vmm)
            .arg("--api-sock")
            .arg(&api)
            .arg("--net")
            .arg("--vsock")
            .arg(format!("uds={}", path_str(&dir.join("v.sock"))))
            .arg("--drive")
            .arg(format!("path={},ro", path_str(&app.rootfs)))
            .arg("--console")
            .arg(&console)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| InstanceError::Spawn(path_str(&settings.vmm), e))?;
        let mut standby = Self {
            id,
            child,
            dir,
            agent,
        };
        let start = Instant::now();
        while !api.exists() {
            if start.elapsed() > STANDBY_START || !matches!(standby.child.try_wait(), Ok(None)) {
                standby.kill();
                return Err(InstanceError::NoControlSocket(STANDBY_START));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(standby)
    }

    /// Whether the process still waits.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Stops the process and removes its folder.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    /// Restores `snapshot` in this VMM: a running instance.
    pub fn restore(mut self, snapshot: &Path) -> Result<Instance, InstanceError> {
        let id = self.id;
        let api = self.dir.join("api.sock");
        let restored = (|| {
            let mut stream = connect_control(&api)?;
            let reply = command(
                &mut stream,
                &format!("restore {}", path_str(snapshot)),
                None,
            )?;
            Ok::<_, std::io::Error>((reply, connect_control(&api)?))
        })();
        let (reply, ctl) = match restored {
            Ok(r) => r,
            Err(e) => {
                self.kill();
                return Err(InstanceError::Control(id, e));
            }
        };
        if !reply.starts_with("ok running") {
            self.kill();
            return Err(InstanceError::Refused(id, reply));
        }
        let pid = self.child.id();
        let exited = Arc::new(AtomicBool::new(false));
        let agent = self.agent.try_clone().ok();
        if let Some(agent) = agent {
            let exited = exited.clone();
            std::thread::spawn(move || agent_channel(agent, exited));
        }
        Ok(Instance {
            id,
            pid,
            child: Mutex::new(self.child),
            dir: self.dir,
            ctl: Mutex::new(Some(ctl)),
            started: Instant::now(),
            handed: AtomicU64::new(0),
            pending: AtomicUsize::new(0),
            counts: Mutex::new((0, 0)),
            dead: AtomicBool::new(false),
            exited,
            idle_since: Mutex::new(None),
        })
    }
}

/// Answers the restored agent's `HELLO` with `RESTORED`, then watches for
/// `EXIT` (the entrypoint ended: the instance is finished). The agent
/// reconnects whenever its guest gets to it, which on a busy host may take
/// a while: the wait ends when it does or when the instance is stopped.
fn agent_channel(listener: UnixListener, exited: Arc<AtomicBool>) {
    let _ = listener.set_nonblocking(true);
    let stream = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if exited.load(Ordering::Acquire) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => return,
        }
    };
    let _ = stream.set_nonblocking(false);
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut lines = BufReader::new(stream);
    let mut line = String::new();
    while matches!(lines.read_line(&mut line), Ok(n) if n > 0) {
        if line.starts_with("HELLO") {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default();
            let mut entropy = [0u8; 16];
            if let Ok(mut random) = std::fs::File::open("/dev/urandom") {
                let _ = random.read_exact(&mut entropy);
            }
            let hex: String = entropy.iter().map(|b| format!("{b:02x}")).collect();
            let _ = writeln!(writer, "RESTORED {now} {hex}");
        } else if line.starts_with("EXIT") {
            exited.store(true, Ordering::Release);
        }
        line.clear();
    }
}

/// A running instance.
pub struct Instance {
    /// Its number.
    pub id: u64,
    /// Its `vmm` process.
    pub pid: u32,
    child: Mutex<Child>,
    dir: PathBuf,
    ctl: Mutex<Option<UnixStream>>,
    /// When it was restored.
    pub started: Instant,
    /// Connections handed over so far.
    handed: AtomicU64,
    /// Connections being handed over right now (slots reserved).
    pending: AtomicUsize,
    /// The VMM's last `connections` answer: (open, taken).
    counts: Mutex<(usize, u64)>,
    dead: AtomicBool,
    exited: Arc<AtomicBool>,
    /// Since when it has had no connection.
    pub idle_since: Mutex<Option<Instant>>,
}

impl Instance {
    /// Connections it carries or is about to: the VMM's open count as last
    /// polled, plus those handed over since that it has not taken yet, plus
    /// reservations.
    pub fn load(&self) -> usize {
        let (open, taken) = *lock(&self.counts);
        let queued = self.handed.load(Ordering::Acquire).saturating_sub(taken);
        open + usize::try_from(queued).unwrap_or(usize::MAX) + self.pending.load(Ordering::Acquire)
    }

    /// Reserves a slot for a hand-over.
    pub fn reserve(&self) {
        self.pending.fetch_add(1, Ordering::AcqRel);
    }

    /// Hands `stream` to the guest's `port` (a slot was reserved). On
    /// error the caller still owns `stream` and may try elsewhere.
    pub fn hand_over(&self, stream: &TcpStream, port: u16) -> Result<(), InstanceError> {
        let result = self.control(&format!("accept {port}"), Some(stream));
        if result.is_ok() {
            self.handed.fetch_add(1, Ordering::AcqRel);
        }
        self.pending.fetch_sub(1, Ordering::AcqRel);
        result.map(|_| ())
    }

    /// Asks the VMM how many connections it holds.
    pub fn refresh(&self) -> Result<usize, InstanceError> {
        let reply = self.control("connections", None)?;
        let mut open = None;
        let mut taken = None;
        for word in reply.split_whitespace() {
            if let Some(v) = word.strip_prefix("open=") {
                open = v.parse().ok();
            } else if let Some(v) = word.strip_prefix("taken=") {
                taken = v.parse().ok();
            }
        }
        match (open, taken) {
            (Some(open), Some(taken)) => {
                *lock(&self.counts) = (open, taken);
                Ok(self.load())
            }
            _ => Err(InstanceError::Refused(self.id, reply)),
        }
    }

    fn control(&self, line: &str, fd: Option<&TcpStream>) -> Result<String, InstanceError> {
        let mut ctl = lock(&self.ctl);
        let Some(stream) = ctl.as_mut() else {
            return Err(InstanceError::Control(
                self.id,
                std::io::ErrorKind::NotConnected.into(),
            ));
        };
        match command(stream, line, fd) {
            Ok(reply) if reply.starts_with("ok") => Ok(reply),
            Ok(reply) => Err(InstanceError::Refused(self.id, reply)),
            Err(e) => {
                // A half-read reply would desynchronize later commands.
                *ctl = None;
                self.dead.store(true, Ordering::Release);
                Err(InstanceError::Control(self.id, e))
            }
        }
    }

    /// Whether it still runs (its process lives, its entrypoint did not
    /// exit, its control socket works).
    pub fn alive(&self) -> bool {
        if self.dead.load(Ordering::Acquire) || self.exited.load(Ordering::Acquire) {
            return false;
        }
        let running = matches!(lock(&self.child).try_wait(), Ok(None));
        if !running {
            self.dead.store(true, Ordering::Release);
        }
        running
    }

    /// Marks it unusable (a failed hand-over).
    pub fn mark_dead(&self) {
        self.dead.store(true, Ordering::Release);
    }

    /// Resident memory of its process, KiB (0 once gone).
    pub fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            })
            .unwrap_or(0)
    }

    /// Stops it: `quit` on the control socket, SIGKILL if it has not exited
    /// 200 ms later; reaps the process and removes its folder.
    pub fn kill(&self) {
        self.dead.store(true, Ordering::Release);
        self.exited.store(true, Ordering::Release);
        if let Some(mut ctl) = lock(&self.ctl).take() {
            let _ = ctl.set_read_timeout(Some(Duration::from_millis(200)));
            let _ = command(&mut ctl, "quit", None);
        }
        let mut child = lock(&self.child);
        let start = Instant::now();
        while matches!(child.try_wait(), Ok(None)) {
            if start.elapsed() > Duration::from_millis(200) {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
