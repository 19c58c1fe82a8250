//! One instance: a `vmm` process restored from an app's snapshot, and the
//! control connection the daemon hands accepted sockets over.
//!
//! A [`Standby`] is a `vmm --api-sock` started ahead of need with the
//! app's devices ([`vm::devices`]: the read-only base image, a NIC, its own
//! vsock socket) and network policy ([`vm::net_policy`]: isolated, the
//! app's `--allow-host` rules) but no guest; [`Standby::restore`] sends it
//! [`Command::Restore`] and gives a running [`Instance`]. The agent in the
//! restored guest reconnects to the instance's [`vm::agent_socket`]; a
//! thread answers its [`AgentMsg::Hello`] with [`HostMsg::Restored`] (clock
//! and entropy for the clone).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use guest_agent::protocol::{AgentMsg, Entropy, HostMsg, LineReader, MAX_LINE};
use vmm_api::launch::{Start, VmmArgs};

use crate::cgroup::InstanceCgroup;
use crate::jail::{self, JailPlan};
use crate::process::{ProcessError, VmmProcess};
use vmm_api::{Client, ClientError, Command, Reply};

use crate::db::AppRecord;
use crate::settings::Settings;
use crate::sync::lock;
use crate::vm;

/// How long a standby VMM may take to open its control socket. Starting
/// a process takes milliseconds; this only catches one that hangs, on a
/// host whose cores are busy with guests.
const STANDBY_START: Duration = Duration::from_secs(30);
/// How long a control command may take (a restore maps the snapshot). A
/// VMM that misses it is taken for dead and its connections are lost, so
/// it is far above what a loaded host needs (milliseconds).
const CONTROL_TIMEOUT: Duration = Duration::from_secs(30);
/// How many 5 ms looks for the exit of an instance whose control socket
/// broke (its process closes the socket as it exits).
const DEATH_GRACE_POLLS: u32 = 40;

/// Errors of an instance.
#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    /// The `vmm` process could not be started.
    #[error("cannot start the vmm")]
    Spawn(#[from] ProcessError),
    /// Its jail could not be prepared.
    #[error("cannot prepare the jail")]
    Jail(#[from] jail::JailError),
    /// The cold boot of an app whose volumes moved on since its snapshot
    /// failed.
    #[error("the cold boot with the app's volumes failed")]
    ColdBoot(#[source] Box<crate::deploy::DeployError>),
    /// The standby VMM never opened its control socket.
    #[error("the standby vmm did not open its control socket within {0:?}")]
    NoControlSocket(Duration),
    /// A control command failed: the VMM refused it, or died.
    #[error("control socket of instance {0}")]
    Control(u64, #[source] ClientError),
    /// The instance folder could not be prepared.
    #[error("cannot prepare {0}")]
    Dir(String, #[source] std::io::Error),
    /// The restored guest's agent did not apply `RESTORED` (clock and
    /// RNG): its VMM died, its channel ended or the ceiling passed; it
    /// gets no connection.
    #[error("instance {0}: the guest agent did not acknowledge RESTORED (gave up after {1:?})")]
    NotResumed(u64, Duration),
}

/// How long a restored guest's agent may take to reconnect and apply
/// `RESTORED` (clock set, RNG reseeded) before the instance gets its
/// first connection: a ceiling that only catches a guest that never gets
/// there (an emulated guest on a loaded host takes seconds).
const RESUME_TIMEOUT: Duration = Duration::from_secs(60);

fn path_str(p: &Path) -> String {
    p.display().to_string()
}

/// A pre-spawned VMM waiting for `restore`.
pub struct Standby {
    id: u64,
    process: VmmProcess,
    dir: PathBuf,
    agent: UnixListener,
    /// The snapshot's path as the VMM sees it.
    snapshot: PathBuf,
    /// The host file it restores (device and inode, taken at the start):
    /// a standby whose file has since been replaced is stale.
    source: Option<(u64, u64)>,
    cgroup: Option<InstanceCgroup>,
}

/// A file's device and inode.
fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

impl Standby {
    /// Its number (and its log folder's name).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Starts a standby `vmm` for `app` in `<app dir>/i/<id>` (its jail's
    /// root when jailed) and waits for its control socket. It restores the
    /// app's snapshot, or `suspended`, a suspend's diff over it.
    pub fn spawn(
        settings: &Settings,
        app: &AppRecord,
        id: u64,
        suspended: Option<&Path>,
    ) -> Result<Self, InstanceError> {
        let dir = app.dir.join("i").join(id.to_string());
        let logs = app.dir.join("logs").join(id.to_string());
        let dir_err = |e| InstanceError::Dir(path_str(&dir), e);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(dir_err)?;
        }
        crate::home::create_dir_all(&dir).map_err(dir_err)?;
        crate::home::create_dir_all(&logs).map_err(dir_err)?;
        let agent = UnixListener::bind(vm::agent_socket(&dir)).map_err(dir_err)?;
        let args = VmmArgs {
            start: Start::Standby,
            devices: vm::devices(&app.rootfs, &app.volume_files, &dir),
            net_policy: vm::net_policy(&app.spec),
            api_sock: Some(vm::api_socket(&dir)),
            console: vm::console(logs.join(jail::CONSOLE)),
            jail: None,
        };
        let restored = suspended.unwrap_or(&app.snapshot);
        let source = file_id(restored);
        let (args, snapshot, cgroup) = if settings.jail {
            let plan = JailPlan {
                app,
                root: &dir,
                logs: &logs,
                snapshot: Some(&app.snapshot),
                suspended,
                cgroup: format!("{}-{id}", app.spec.name),
            };
            let (args, cgroup) = plan.confine(args, settings.cgroups.as_ref())?;
            let inside = if suspended.is_some() {
                jail::SUSPENDED
            } else {
                jail::SNAPSHOT
            };
            (args, PathBuf::from(inside), cgroup)
        } else {
            (args, restored.to_owned(), None)
        };
        let process = VmmProcess::spawn(&settings.vmm, &args, false);
        let process = match process {
            Ok(p) => p,
            Err(e) => {
                drop(cgroup);
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e.into());
            }
        };
        let mut standby = Self {
            id,
            process,
            dir,
            agent,
            snapshot,
            source,
            cgroup,
        };
        let api = vm::api_socket(&standby.dir);
        let start = Instant::now();
        while !api.exists() {
            if start.elapsed() > STANDBY_START || !matches!(standby.process.try_wait(), Ok(None)) {
                standby.kill();
                return Err(InstanceError::NoControlSocket(STANDBY_START));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(standby)
    }

    /// Whether it restores `path` as that file is now (not one it has
    /// since been replaced by).
    pub fn restores(&self, path: &Path) -> bool {
        self.source.is_some() && self.source == file_id(path)
    }

    /// Whether the process still waits.
    pub fn alive(&mut self) -> bool {
        matches!(self.process.try_wait(), Ok(None))
    }

    /// Stops the process and removes its folder and cgroup.
    pub fn kill(&mut self) {
        let _ = self.process.kill_and_wait();
        if let Some(group) = &self.cgroup {
            group.remove();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    /// Restores the app's snapshot in this VMM: a running instance.
    pub fn restore(mut self) -> Result<Instance, InstanceError> {
        let id = self.id;
        let api = vm::api_socket(&self.dir);
        let restore = Command::Restore {
            snapshot: self.snapshot.clone(),
            working_set: None,
        };
        // The restoring connection is told when the vCPUs run; commands go
        // over a second one.
        let restored = Client::connect(&api, CONTROL_TIMEOUT)
            .and_then(|mut client| client.send(&restore))
            .and_then(|reply| Ok((reply, Client::connect(&api, CONTROL_TIMEOUT)?)));
        let (restored_in, ctl) = match restored {
            Ok((Reply::Running { elapsed }, ctl)) => (elapsed, ctl),
            Ok((_, ctl)) => (Duration::ZERO, ctl),
            Err(e) => {
                self.kill();
                return Err(InstanceError::Control(id, e));
            }
        };
        let pid = self.process.id();
        let exited = Arc::new(AtomicBool::new(false));
        // Clone safety: no connection before the guest has set its clock
        // and reseeded its RNG, so two instances of one snapshot never
        // answer with the same "random" bytes.
        let resumed_at = Instant::now();
        let (resumed, acked) = mpsc::sync_channel(1);
        match self.agent.try_clone() {
            Ok(agent) => {
                let exited = exited.clone();
                std::thread::spawn(move || agent_channel(agent, exited, resumed));
            }
            Err(e) => {
                self.kill();
                return Err(InstanceError::Dir(path_str(&self.dir), e));
            }
        }
        // Watched in slices, so a VMM that dies meanwhile or a channel that
        // ends fails the wake at once, not after the ceiling.
        loop {
            match acked.recv_timeout(Duration::from_millis(50)) {
                Ok(()) => break,
                Err(mpsc::RecvTimeoutError::Timeout)
                    if self.alive() && resumed_at.elapsed() < RESUME_TIMEOUT => {}
                Err(_) => {
                    exited.store(true, Ordering::Release);
                    self.kill();
                    return Err(InstanceError::NotResumed(id, resumed_at.elapsed()));
                }
            }
        }
        Ok(Instance {
            id,
            pid,
            process: Mutex::new(self.process),
            cgroup: self.cgroup,
            death: Mutex::new(None),
            dir: self.dir,
            ctl: Mutex::new(Some(ctl)),
            started: Instant::now(),
            restored_in,
            resumed_in: resumed_at.elapsed(),
            handed: AtomicU64::new(0),
            pending: AtomicUsize::new(0),
            counts: Mutex::new((0, 0)),
            dead: AtomicBool::new(false),
            exited,
            idle_since: Mutex::new(None),
        })
    }
}

/// Answers the restored agent's `HELLO` with `RESTORED`, tells `resumed`
/// when the agent says `RESUMED` (it applied it), then watches for `EXIT`
/// (the entrypoint ended: the instance is finished); other lines are
/// ignored, as the protocol asks. The agent reconnects whenever its guest
/// gets to it, which on a busy host may take a while: the wait ends when
/// it does or when the instance is stopped.
fn agent_channel(listener: UnixListener, exited: Arc<AtomicBool>, resumed: SyncSender<()>) {
    let _ = listener.set_nonblocking(true);
    let mut stream = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if exited.load(Ordering::Acquire) {
                    return;
                }
                // Woken at once by the agent's connection (it is on the
                // wake path), else now and then to see if the instance
                // was stopped.
                let mut fd = libc::pollfd {
                    fd: listener.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: poll(2) on one pollfd that lives on this stack
                // for the call; the listener's fd is open.
                unsafe { libc::poll(&mut fd, 1, 100) };
            }
            Err(_) => return,
        }
    };
    let _ = stream.set_nonblocking(false);
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut lines = LineReader::new();
    loop {
        match stream.read(lines.spare()) {
            Ok(0) => return,
            Ok(n) => lines.filled(n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        }
        while let Some(line) = lines.next_line() {
            match line.map(AgentMsg::parse) {
                Ok(Ok(AgentMsg::Hello { .. })) => {
                    let _ = writeln!(writer, "{}", restored_now());
                }
                Ok(Ok(AgentMsg::Resumed)) => {
                    let _ = resumed.try_send(());
                }
                Ok(Ok(AgentMsg::Exit(_))) => exited.store(true, Ordering::Release),
                _ => {}
            }
        }
        if lines.overlong() {
            // No agent sends such a line: the guest is not to be listened
            // to, and draining it would only spend the daemon's time.
            eprintln!("little: an agent sent a line over {MAX_LINE} bytes: channel closed");
            return;
        }
    }
}

/// `RESTORED` with the host's clock and fresh entropy for the clone.
fn restored_now() -> HostMsg<'static> {
    let unix_ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or_default();
    let mut entropy = [0u8; 16];
    if let Ok(mut random) = std::fs::File::open("/dev/urandom") {
        let _ = random.read_exact(&mut entropy);
    }
    HostMsg::Restored {
        unix_ns,
        entropy: Entropy::from_bytes(&entropy),
    }
}

/// A running instance.
pub struct Instance {
    /// Its number.
    pub id: u64,
    /// Its `vmm` process.
    pub pid: u32,
    process: Mutex<VmmProcess>,
    cgroup: Option<InstanceCgroup>,
    /// Why it died, once it has.
    death: Mutex<Option<String>>,
    dir: PathBuf,
    ctl: Mutex<Option<Client>>,
    /// When it was restored.
    pub started: Instant,
    /// The VMM's `restore` command → its vCPUs running, as it reported.
    pub restored_in: Duration,
    /// The vCPUs running → its agent applied `RESTORED`: what clone
    /// safety adds to a wake.
    pub resumed_in: Duration,
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
        let result = self.control(&Command::Accept { guest_port: port }, Some(stream));
        if result.is_ok() {
            self.handed.fetch_add(1, Ordering::AcqRel);
        }
        self.pending.fetch_sub(1, Ordering::AcqRel);
        result.map(|_| ())
    }

    /// Asks the VMM how many connections it holds.
    pub fn refresh(&self) -> Result<usize, InstanceError> {
        match self.control(&Command::Connections, None)? {
            Reply::Connections { open, taken } => {
                *lock(&self.counts) = (open, taken);
                Ok(self.load())
            }
            other => Err(InstanceError::Control(
                self.id,
                ClientError::Unexpected(other),
            )),
        }
    }

    fn control(&self, command: &Command, fd: Option<&TcpStream>) -> Result<Reply, InstanceError> {
        let mut ctl = lock(&self.ctl);
        let Some(client) = ctl.as_mut() else {
            let gone = std::io::Error::from(std::io::ErrorKind::NotConnected);
            return Err(InstanceError::Control(self.id, gone.into()));
        };
        let result = match fd {
            Some(fd) => client.send_with_fd(command, fd),
            None => client.send(command),
        };
        result.map_err(|e| {
            if e.breaks_connection() {
                // A half-read reply would desynchronize later commands.
                *ctl = None;
                self.dead.store(true, Ordering::Release);
            }
            InstanceError::Control(self.id, e)
        })
    }

    /// Whether it still runs (its process lives, its entrypoint did not
    /// exit, its control socket works).
    pub fn alive(&self) -> bool {
        if self.dead.load(Ordering::Acquire) || self.exited.load(Ordering::Acquire) {
            return false;
        }
        let Some(reason) = self.exit_reason() else {
            return true;
        };
        lock(&self.death).get_or_insert(reason);
        self.dead.store(true, Ordering::Release);
        false
    }

    /// Why its process ended (the OOM killer, or its exit: a signal such
    /// as seccomp's `SIGSYS`, or a status), once it has.
    fn exit_reason(&self) -> Option<String> {
        let ended = match lock(&self.process).try_wait() {
            Ok(None) => return None,
            Ok(Some(exit)) => exit.to_string(),
            Err(e) => e.to_string(),
        };
        Some(match &self.cgroup {
            Some(group) if group.oom_kills() > 0 => format!(
                "out of memory: it reached its cgroup's limit of {} MiB",
                group.memory_limit().unwrap_or(0) >> 20
            ),
            _ => ended,
        })
    }

    /// Why it died (its exit, the OOM killer, seccomp), once it has; a
    /// live instance whose control socket failed says so.
    pub fn death(&self) -> Option<String> {
        if let Some(death) = lock(&self.death).clone() {
            return Some(death);
        }
        if !self.dead.load(Ordering::Acquire) {
            return None;
        }
        // A dying process closes its sockets a moment before it can be
        // reaped: give it that moment, so the reason is its exit.
        for _ in 0..DEATH_GRACE_POLLS {
            if let Some(reason) = self.exit_reason() {
                return Some(lock(&self.death).get_or_insert(reason).clone());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Some("its control socket failed".to_owned())
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

    /// Its folder (its jail's root when jailed).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The first half of a suspend: pauses the VM, whose vCPUs stay
    /// stopped from here on, and has the VMM write a diff snapshot (the
    /// pages changed since the app's snapshot was mapped) to `path` (as
    /// the VMM names it) once no disk I/O is in flight. Its volumes then
    /// hold exactly what the snapshot saw, until it runs again, which it
    /// never does: [`kill`](Self::kill) it next. The VMM's reply says what
    /// it wrote and how long that took.
    pub fn pause_and_snapshot(&self, path: &Path) -> Result<Reply, InstanceError> {
        self.control(&Command::Pause, None)?;
        self.control(
            &Command::SnapshotDiff {
                path: path.to_owned(),
            },
            None,
        )
    }

    /// Stops it: `quit` on the control socket, SIGKILL if it has not exited
    /// 200 ms later; reaps the process and removes its folder.
    pub fn kill(&self) {
        self.dead.store(true, Ordering::Release);
        self.exited.store(true, Ordering::Release);
        if let Some(mut ctl) = lock(&self.ctl).take() {
            let _ = ctl.set_timeout(Duration::from_millis(200));
            let _ = ctl.send(&Command::Quit);
        }
        let mut process = lock(&self.process);
        let start = Instant::now();
        while matches!(process.try_wait(), Ok(None)) {
            if start.elapsed() > Duration::from_millis(200) {
                let _ = process.kill_and_wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        if let Some(group) = &self.cgroup {
            group.remove();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::UnixStream;

    use guest_agent::protocol::HostMsg;

    use super::*;

    /// The restored agent's side of the channel: `HELLO` gets a `RESTORED`
    /// line the agent parses (clock near now, 16 bytes of entropy); a
    /// malformed line is ignored; `RESUMED` is passed on; `EXIT`
    /// finishes the instance.
    #[test]
    fn the_agent_channel_answers_hello_and_notes_resumed_and_exit() {
        let dir = tempfile::tempdir().unwrap();
        let sock = vm::agent_socket(dir.path());
        let listener = UnixListener::bind(&sock).unwrap();
        let exited = Arc::new(AtomicBool::new(false));
        let (resumed, acked) = mpsc::sync_channel(1);
        let channel = {
            let exited = exited.clone();
            std::thread::spawn(move || agent_channel(listener, exited, resumed))
        };
        let mut agent = UnixStream::connect(&sock).unwrap();
        agent
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        agent.write_all(b"HELLO 1\n").unwrap();
        let mut line = String::new();
        BufReader::new(&agent).read_line(&mut line).unwrap();
        assert!(line.len() < MAX_LINE && line.ends_with('\n'), "{line:?}");
        let Ok(HostMsg::Restored { unix_ns, entropy }) = HostMsg::parse(line.as_bytes()) else {
            panic!("the agent cannot parse {line:?}");
        };
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        assert!(u128::from(unix_ns) <= now.as_nanos());
        assert!(now.as_nanos() - u128::from(unix_ns) < 60_000_000_000);
        assert_eq!(entropy.as_bytes().len(), 16);

        // Lines are handled in order: once the second HELLO is answered,
        // the malformed EXIT before it was seen and ignored.
        agent.write_all(b"EXIT whenever\nHELLO 1\n").unwrap();
        let mut again = String::new();
        BufReader::new(&agent).read_line(&mut again).unwrap();
        assert!(again.starts_with("RESTORED "), "{again:?}");
        assert!(!exited.load(Ordering::Acquire));
        assert!(acked.try_recv().is_err(), "no RESUMED yet");
        agent.write_all(b"RESUMED\n").unwrap();
        acked
            .recv_timeout(Duration::from_secs(10))
            .expect("RESUMED passed on");
        agent.write_all(b"EXIT status=0\n").unwrap();
        let start = Instant::now();
        while !exited.load(Ordering::Acquire) {
            assert!(start.elapsed() < Duration::from_secs(10), "EXIT not seen");
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(agent);
        channel.join().unwrap();
    }

    /// Writes up to `total` bytes without a newline until the peer stops
    /// reading; returns how many it took.
    fn flood(mut to: UnixStream, total: usize) -> usize {
        let chunk = vec![b'x'; 64 * 1024];
        let mut sent = 0;
        while sent < total {
            match to.write(&chunk) {
                Ok(n) => sent += n,
                Err(_) => break,
            }
        }
        sent
    }

    /// A guest that sends 64 MiB without a newline is cut off: the channel
    /// closes instead of draining it, long before all of it is written.
    #[test]
    fn an_agent_line_over_max_line_closes_the_channel() {
        let dir = tempfile::tempdir().unwrap();
        let sock = vm::agent_socket(dir.path());
        let listener = UnixListener::bind(&sock).unwrap();
        let exited = Arc::new(AtomicBool::new(false));
        let (resumed, _acked) = mpsc::sync_channel(1);
        let channel = {
            let exited = exited.clone();
            std::thread::spawn(move || agent_channel(listener, exited, resumed))
        };
        let agent = UnixStream::connect(&sock).unwrap();
        let total = 64 << 20;
        let sent = std::thread::spawn(move || flood(agent, total));
        channel.join().unwrap();
        let sent = sent.join().unwrap();
        assert!(sent < total, "the whole 64 MiB was read: {sent} bytes");
        assert!(!exited.load(Ordering::Acquire));
    }
}
