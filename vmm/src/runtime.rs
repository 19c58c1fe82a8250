//! A running microVM: vCPU threads, the device event loop on the calling
//! thread, the control socket, console input, and snapshot creation.

use std::collections::VecDeque;
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmm_api::{Command, Reply, MAX_LINE};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::builder::{BuiltVm, Error, GuestExit};
use crate::devices::legacy::i8042::{I8042State, I8042};
use crate::devices::legacy::serial::{SerialConsole, SerialConsoleState};
use crate::devices::virtio::net::InboundHandle;
use crate::devices::virtio::transport::mmio::MmioTransport;
use crate::event_loop::{Event, EventHandler, Ops};
use crate::snapshot::working_set::WorkingSet;
use crate::snapshot::{self, MicrovmState};
use crate::vstate::persist;
use crate::vstate::vcpu::{self, StopReason};
use crate::vstate::vcpu_thread::{VcpuContext, VcpuThread};
use crate::vstate::vm::Vm;

/// The legacy devices, kept for snapshots and console input.
pub struct LegacyDevices {
    /// COM1.
    pub serial: Arc<Mutex<SerialConsole>>,
    /// The i8042 reset controller.
    pub i8042: Arc<Mutex<I8042>>,
}

/// Saved legacy device state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LegacyState {
    /// COM1.
    pub serial: SerialConsoleState,
    /// The i8042.
    pub i8042: I8042State,
}

/// How the VMM runs besides the guest itself.
#[derive(Debug, Default)]
pub struct RunOptions {
    /// Listen for control commands on this Unix socket.
    pub api_sock: Option<PathBuf>,
    /// An already bound control socket (standby mode) to keep serving.
    pub api_listener: Option<UnixListener>,
    /// Told `ok running <ms>` once the vCPUs run (the standby client).
    pub notify: Option<UnixStream>,
    /// Forward the VMM's stdin to the guest's serial console.
    pub console_input: bool,
    /// Log (at info level) when the vCPUs start, with the setup time.
    pub started: Option<Instant>,
    /// When the standby client asked for the restore.
    pub restore_requested: Option<Instant>,
}

/// Standby: a VMM process started ahead of need, waiting for a snapshot.
pub mod standby {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::path::{Path, PathBuf};

    use vmm_api::{Command, Reply, MAX_LINE};

    use crate::builder::Error;

    /// What a standby VMM was asked to restore.
    pub type Request = (PathBuf, Option<PathBuf>, UnixListener, UnixStream);

    /// Binds `sock`, answers `ping` and waits for a client to send
    /// [`Command::Restore`]. Returns the snapshot and working-set paths, the
    /// listener (to keep serving control commands) and the client (told
    /// [`Reply::Running`] once restored).
    pub fn wait_for_restore(sock: &Path) -> Result<Request, Error> {
        let name = sock.display().to_string();
        let listener = super::bind_api(sock)?;
        listener
            .set_nonblocking(false)
            .map_err(|e| Error::ApiSocket(name.clone(), e))?;
        loop {
            let (mut client, _) = listener
                .accept()
                .map_err(|e| Error::ApiSocket(name.clone(), e))?;
            let mut line = String::new();
            let read = BufReader::new(Read::take(&client, MAX_LINE as u64)).read_line(&mut line);
            let reply = match read.map(|_| Command::parse(&line)) {
                Ok(Ok(Command::Restore {
                    snapshot,
                    working_set,
                })) => {
                    listener
                        .set_nonblocking(true)
                        .map_err(|e| Error::ApiSocket(name.clone(), e))?;
                    return Ok((snapshot, working_set, listener, client));
                }
                Ok(Ok(Command::Ping)) => Reply::Standby,
                _ => Reply::Error("standby: expected `restore <snapshot>`".into()),
            };
            let _ = writeln!(client, "{reply}");
        }
    }
}

/// What the control socket and the exit watcher share.
pub struct VmHandle {
    vm: Arc<Vm>,
    vcpus: Vec<VcpuThread>,
    legacy: LegacyDevices,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    paused: Mutex<bool>,
    carried_pit: Option<kvm_bindings::kvm_pit_state2>,
    base: Option<crate::snapshot::BaseImage>,
    /// MSRs to save, shared with the vCPU threads; fetched by the first snapshot.
    msr_indices: Arc<OnceLock<Vec<u32>>>,
}

/// Statistics of one snapshot.
#[derive(Clone, Copy, Debug)]
pub struct SnapshotStats {
    /// Bytes of serialized state.
    pub state_bytes: u64,
    /// Bytes of guest memory written (non-zero pages).
    pub mem_written: u64,
    /// Size of the guest memory image (holes included).
    pub mem_len: u64,
    /// Wall time from pause to the file in place.
    pub elapsed: Duration,
}

/// Errors of the control operations.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Pausing, saving or resuming a vCPU failed.
    #[error(transparent)]
    Vcpu(#[from] crate::vstate::vcpu_thread::Error),
    /// Reading VM state failed.
    #[error(transparent)]
    Persist(#[from] persist::Error),
    /// Writing the snapshot failed.
    #[error(transparent)]
    Snapshot(#[from] snapshot::Error),
    /// An active device whose handler cannot be saved.
    #[error(transparent)]
    Device(#[from] crate::devices::virtio::transport::mmio::SaveError),
    /// A diff snapshot of a VM that was not restored from a snapshot.
    #[error("a diff snapshot needs a VM restored from a full snapshot (its base)")]
    NoBase,
    /// Devices kept I/O in flight for too long.
    #[error("devices did not finish their in-flight I/O within {0:?}")]
    NotQuiescent(Duration),
}

impl VmHandle {
    /// Pauses every vCPU (idempotent).
    pub fn pause(&self) -> Result<(), ControlError> {
        let mut paused = self.paused.lock().unwrap_or_else(|e| e.into_inner());
        for vcpu in &self.vcpus {
            vcpu.pause()?;
        }
        *paused = true;
        Ok(())
    }

    /// Resumes every vCPU (idempotent).
    pub fn resume(&self) {
        let mut paused = self.paused.lock().unwrap_or_else(|e| e.into_inner());
        for vcpu in &self.vcpus {
            vcpu.resume();
        }
        *paused = false;
    }

    fn is_paused(&self) -> bool {
        *self.paused.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes a snapshot of the paused VM to `path` (atomically, through a
    /// temporary file); `ops` reaches the device runtimes on the loop, which
    /// must be quiescent.
    fn save_paused(
        &self,
        path: &Path,
        start: Instant,
        diff: bool,
        ops: &mut Ops<'_>,
    ) -> Result<SnapshotStats, ControlError> {
        let base = match (diff, &self.base) {
            (false, _) => None,
            (true, Some(base)) => Some(base.clone()),
            (true, None) => return Err(ControlError::NoBase),
        };
        let mut virtio = Vec::with_capacity(self.transports.len());
        for transport in &self.transports {
            virtio.push(lock(transport).save(ops)?);
        }
        if self.msr_indices.get().is_none() {
            let _ = self.msr_indices.set(persist::saveable_msrs(&self.vm.kvm)?);
        }
        let vcpus = self
            .vcpus
            .iter()
            .map(VcpuThread::save)
            .collect::<Result<Vec<_>, _>>()?;
        let carried = if self.vm.has_pit {
            None
        } else {
            self.carried_pit.as_ref()
        };
        let vm = persist::save_vm(&self.vm.fd, carried)?;
        let legacy = LegacyState {
            serial: lock(&self.legacy.serial).save(),
            i8042: lock(&self.legacy.i8042).save(),
        };
        let saved = start.elapsed();
        let mut state = MicrovmState::new(&self.vm.mem, vm, vcpus, legacy, virtio);
        let (state_bytes, mem_written, mem_len) = match base {
            None => snapshot::write(path, &state, &self.vm.mem)?,
            Some(base) => {
                state.dirty = snapshot::memory::dirty_pages(&self.vm.mem)
                    .map_err(|e| snapshot::Error::Memory(path.display().to_string(), e))?;
                state.base = Some(base);
                snapshot::write_diff(path, &state, &self.vm.mem)?
            }
        };
        tracing::debug!(
            "snapshot: paused and saved state in {:?}, file written in {:?}",
            saved,
            start.elapsed() - saved
        );
        Ok(SnapshotStats {
            state_bytes,
            mem_written,
            mem_len,
            elapsed: start.elapsed(),
        })
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

type Outcome = Arc<Mutex<Option<Result<GuestExit, vcpu::Error>>>>;

fn set_outcome(outcome: &Outcome, value: Result<GuestExit, vcpu::Error>) {
    lock(outcome).get_or_insert(value);
}

/// Ends the loop with the first vCPU outcome.
struct ExitWatcher {
    wake: EventFd,
    results: mpsc::Receiver<Result<StopReason, vcpu::Error>>,
    outcome: Outcome,
}

impl EventHandler for ExitWatcher {
    fn start(&mut self, ops: &mut Ops<'_>) {
        ops.watch(self.wake.as_raw_fd(), 0, libc::POLLIN as u32);
    }

    fn handle(&mut self, _event: Event, ops: &mut Ops<'_>) {
        let _ = self.wake.read();
        if let Ok(result) = self.results.try_recv() {
            let exit = result.map(|r| match r {
                StopReason::Reset => GuestExit::Reset,
                StopReason::PowerOff | StopReason::Kicked => GuestExit::PowerOff,
            });
            set_outcome(&self.outcome, exit);
            ops.stop_loop();
        }
    }
}

/// Feeds the VMM's stdin to the guest's serial console.
struct ConsoleInput {
    serial: Arc<Mutex<SerialConsole>>,
}

const STDIN_TOKEN: u32 = 0;
const STDIN_RETRY: u32 = 1;

impl EventHandler for ConsoleInput {
    fn start(&mut self, ops: &mut Ops<'_>) {
        ops.watch(libc::STDIN_FILENO, STDIN_TOKEN, libc::POLLIN as u32);
    }

    fn handle(&mut self, event: Event, ops: &mut Ops<'_>) {
        if let Event::Timer { token: STDIN_RETRY } = event {
            ops.watch(libc::STDIN_FILENO, STDIN_TOKEN, libc::POLLIN as u32);
            return;
        }
        let room = lock(&self.serial).input_room().min(64);
        if room == 0 {
            // The guest has not drained its FIFO: try again shortly.
            ops.unwatch(STDIN_TOKEN);
            ops.timer(STDIN_RETRY, Duration::from_millis(5));
            return;
        }
        let mut buf = [0u8; 64];
        match std::io::stdin().lock().read(&mut buf[..room]) {
            Ok(0) | Err(_) => ops.unwatch(STDIN_TOKEN),
            Ok(n) => {
                lock(&self.serial).enqueue_input(&buf[..n]);
            }
        }
    }
}

/// The control socket: one [`Command`] per line, one [`Reply`] line each
/// (the protocol is [`vmm_api`]'s).
struct ApiServer {
    listener: UnixListener,
    clients: Vec<Option<ApiClient>>,
    handle: Arc<VmHandle>,
    inbound: Option<InboundHandle>,
    outcome: Outcome,
    pending: Option<PendingSnapshot>,
}

/// One control connection: its socket, unparsed input and the file
/// descriptors passed with it (SCM_RIGHTS), oldest first.
type ApiClient = (UnixStream, Vec<u8>, VecDeque<std::fs::File>);

/// Most descriptors a client may pass ahead of its `accept` commands.
const MAX_PASSED_FDS: usize = 64;

/// A snapshot waiting for device I/O to drain (vCPUs already paused).
struct PendingSnapshot {
    slot: usize,
    path: PathBuf,
    start: Instant,
    was_paused: bool,
    diff: bool,
}

/// How long a snapshot waits for in-flight device I/O.
const QUIESCE_TIMEOUT: Duration = Duration::from_secs(5);
const SNAPSHOT_TIMER: u32 = u32::MAX - 1;

/// Most simultaneous control clients.
const MAX_CLIENTS: usize = 16;
const LISTENER_TOKEN: u32 = u32::MAX;

impl ApiServer {
    /// Runs a pending snapshot if the devices are quiescent (or gives up
    /// after [`QUIESCE_TIMEOUT`]); returns the client slot and reply when done.
    fn try_finish_snapshot(&mut self, ops: &mut Ops<'_>) -> Option<(usize, Reply)> {
        let pending = self.pending.as_ref()?;
        let result = if ops.all_quiescent() {
            self.handle
                .save_paused(&pending.path, pending.start, pending.diff, ops)
        } else if pending.start.elapsed() < QUIESCE_TIMEOUT {
            ops.timer(SNAPSHOT_TIMER, Duration::from_millis(1));
            return None;
        } else {
            Err(ControlError::NotQuiescent(QUIESCE_TIMEOUT))
        };
        let pending = self.pending.take()?;
        if !pending.was_paused {
            self.handle.resume();
        }
        let reply = match result {
            Ok(s) => Reply::Snapshot {
                state_bytes: s.state_bytes,
                mem_written: s.mem_written,
                mem_len: s.mem_len,
                elapsed: s.elapsed,
            },
            Err(e) => refusal(&e),
        };
        Some((pending.slot, reply))
    }

    fn reply(&mut self, slot: usize, reply: &Reply) {
        if let Some(Some((stream, ..))) = self.clients.get_mut(slot) {
            // Replies are short; a client that does not read is dropped.
            let _ = stream.set_nonblocking(false);
            let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
            let _ = stream.write_all(format!("{reply}\n").as_bytes());
            let _ = stream.set_nonblocking(true);
        }
    }

    /// Runs one command; `None` when the reply comes later (a snapshot
    /// waiting for devices).
    fn execute(&mut self, slot: usize, command: Command, ops: &mut Ops<'_>) -> Option<Reply> {
        Some(match command {
            Command::Ping => Reply::Pong,
            Command::Pause => match self.handle.pause() {
                Ok(()) => Reply::Ok,
                Err(e) => Reply::Error(e.to_string()),
            },
            Command::Resume => {
                self.handle.resume();
                Reply::Ok
            }
            Command::WorkingSet { path } => {
                match WorkingSet::record(&self.handle.vm.mem).and_then(|ws| {
                    ws.save(&path)?;
                    Ok(ws.pages())
                }) {
                    Ok(pages) => Reply::WorkingSet { pages },
                    Err(e) => refusal(&e),
                }
            }
            Command::Snapshot { .. } | Command::SnapshotDiff { .. } if self.pending.is_some() => {
                Reply::Error("a snapshot is already in progress".into())
            }
            Command::Snapshot { path } => return self.snapshot(slot, path, false, ops),
            Command::SnapshotDiff { path } => return self.snapshot(slot, path, true, ops),
            Command::Accept { guest_port } => self.accept(slot, guest_port, ops),
            Command::Connections => match &self.inbound {
                Some(inbound) => {
                    let (open, taken) = inbound.counts();
                    Reply::Connections { open, taken }
                }
                None => Reply::Error("the VM has no network device".into()),
            },
            Command::Quit => {
                set_outcome(&self.outcome, Ok(GuestExit::Quit));
                ops.stop_loop();
                Reply::Ok
            }
            Command::Restore { .. } => Reply::Error(
                "restore: this vmm already runs a guest (only a standby vmm restores)".into(),
            ),
        })
    }

    /// Pauses the VM and writes a snapshot once the devices are quiescent;
    /// `None` while they are not.
    fn snapshot(
        &mut self,
        slot: usize,
        path: PathBuf,
        diff: bool,
        ops: &mut Ops<'_>,
    ) -> Option<Reply> {
        let start = Instant::now();
        let was_paused = self.handle.is_paused();
        if let Err(e) = self.handle.pause() {
            return Some(refusal(&e));
        }
        self.pending = Some(PendingSnapshot {
            slot,
            path,
            start,
            was_paused,
            diff,
        });
        self.try_finish_snapshot(ops).map(|(_, reply)| reply)
    }

    /// `accept <guest_port>`: hands the oldest descriptor this client passed
    /// to the network device, through `ops` on this loop. Only TCP sockets
    /// are taken.
    fn accept(&mut self, slot: usize, port: u16, ops: &mut Ops<'_>) -> Reply {
        let Some(Some((_, _, fds))) = self.clients.get_mut(slot) else {
            return Reply::Error("no client".into());
        };
        let Some(file) = fds.pop_front() else {
            return Reply::Error("accept needs a TCP socket passed with SCM_RIGHTS".into());
        };
        let Some(stream) = connected_tcp(file) else {
            return Reply::Error("the passed descriptor is not a connected TCP socket".into());
        };
        match &self.inbound {
            Some(inbound) => {
                inbound.accept_inbound(ops, stream, port);
                Reply::Ok
            }
            None => Reply::Error("the VM has no network device".into()),
        }
    }

    fn serve(&mut self, slot: usize, ops: &mut Ops<'_>) {
        let Some(Some((stream, buf, fds))) = self.clients.get_mut(slot) else {
            return;
        };
        let mut chunk = [0u8; 1024];
        let mut too_many_fds = false;
        let closed = match stream.recv_with_fd(&mut chunk) {
            Ok((0, _)) => true,
            Ok((n, file)) => {
                buf.extend_from_slice(&chunk[..n]);
                if let Some(file) = file {
                    too_many_fds = fds.len() >= MAX_PASSED_FDS;
                    fds.push_back(file);
                }
                false
            }
            Err(e) => e.errno() != libc::EAGAIN && e.errno() != libc::EINTR,
        };
        let mut lines = Vec::new();
        let mut too_long = too_many_fds;
        if let Some(Some((_, buf, _))) = self.clients.get_mut(slot) {
            while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=pos).collect();
                lines.push(String::from_utf8_lossy(&line).trim().to_owned());
            }
            too_long |= buf.len() > MAX_LINE;
        }
        let mut out = Vec::new();
        for line in lines.iter().filter(|l| !l.is_empty()) {
            let reply = match Command::parse(line) {
                Ok(command) => self.execute(slot, command, ops),
                Err(e) => Some(Reply::Error(e.to_string())),
            };
            out.extend(reply);
        }
        if too_long {
            out.push(Reply::Error("command too long".into()));
        }
        for reply in &out {
            self.reply(slot, reply);
        }
        if closed || too_long {
            ops.unwatch(u32::try_from(slot).unwrap_or(0));
            if let Some(entry) = self.clients.get_mut(slot) {
                *entry = None;
            }
        }
    }
}

/// A descriptor passed over the control socket, if it is a connected TCP
/// socket (anything else would have the network stack read a file or a
/// listener as if it were a client).
fn connected_tcp(file: std::fs::File) -> Option<std::net::TcpStream> {
    let stream = std::net::TcpStream::from(std::os::fd::OwnedFd::from(file));
    stream.peer_addr().is_ok().then_some(stream)
}

/// The reply to a command that failed with `e`.
fn refusal(e: &dyn std::error::Error) -> Reply {
    Reply::Error(error_chain(e))
}

/// An error and its causes on one line, skipping a cause whose text the
/// message already contains (some libraries repeat their cause).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        source = cause.source();
    }
    msg
}

impl EventHandler for ApiServer {
    fn start(&mut self, ops: &mut Ops<'_>) {
        ops.watch(
            self.listener.as_raw_fd(),
            LISTENER_TOKEN,
            libc::POLLIN as u32,
        );
    }

    fn handle(&mut self, event: Event, ops: &mut Ops<'_>) {
        if let Event::Timer {
            token: SNAPSHOT_TIMER,
        } = event
        {
            if let Some((slot, reply)) = self.try_finish_snapshot(ops) {
                self.reply(slot, &reply);
            }
            return;
        }
        let Event::Ready { token, .. } = event else {
            return;
        };
        if token != LISTENER_TOKEN {
            self.serve(usize::try_from(token).unwrap_or(usize::MAX), ops);
            return;
        }
        while let Ok((stream, _)) = self.listener.accept() {
            let Some(slot) = self.clients.iter().position(Option::is_none).or_else(|| {
                (self.clients.len() < MAX_CLIENTS).then(|| {
                    self.clients.push(None);
                    self.clients.len() - 1
                })
            }) else {
                continue;
            };
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let fd = stream.as_raw_fd();
            self.clients[slot] = Some((stream, Vec::new(), VecDeque::new()));
            ops.watch(fd, u32::try_from(slot).unwrap_or(0), libc::POLLIN as u32);
        }
    }
}

/// Binds the control socket, replacing a stale socket file.
fn bind_api(path: &Path) -> Result<UnixListener, Error> {
    let name = path.display().to_string();
    if path.exists() {
        std::fs::remove_file(path).map_err(|e| Error::ApiSocket(name.clone(), e))?;
    }
    let listener = UnixListener::bind(path).map_err(|e| Error::ApiSocket(name.clone(), e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::ApiSocket(name, e))?;
    Ok(listener)
}

/// Runs a built (booted or restored) VM until it ends.
pub fn run(built: BuiltVm, options: RunOptions) -> Result<GuestExit, Error> {
    let BuiltVm {
        vm,
        vcpus,
        devices,
        mut event_loop,
        reset,
        legacy,
        carried_pit,
        base,
        inbound,
    } = built;
    let api = match options.api_listener {
        Some(listener) => Some(listener),
        None => options.api_sock.as_deref().map(bind_api).transpose()?,
    };
    let (tx, rx) = mpsc::channel::<Result<StopReason, vcpu::Error>>();
    let wake =
        EventFd::new(libc::EFD_NONBLOCK).map_err(|e| Error::Device("the exit eventfd", e))?;
    let outcome: Outcome = Arc::new(Mutex::new(None));
    let loop_handle = event_loop.handle();
    loop_handle
        .add(Box::new(ExitWatcher {
            wake: wake
                .try_clone()
                .map_err(|e| Error::Device("the exit eventfd", e))?,
            results: rx,
            outcome: outcome.clone(),
        }))
        .map_err(Error::EventLoop)?;
    if options.console_input {
        loop_handle
            .add(Box::new(ConsoleInput {
                serial: legacy.serial.clone(),
            }))
            .map_err(Error::EventLoop)?;
    }

    let msr_indices = Arc::new(OnceLock::new());
    let has_xcrs = vm.kvm.check_extension(kvm_ioctls::Cap::Xcrs);
    let vm = Arc::new(vm);
    let mut threads = Vec::with_capacity(vcpus.len());
    for vcpu in vcpus {
        let ctx = VcpuContext {
            pio: devices.pio.clone(),
            mmio: devices.mmio.clone(),
            reset: reset.clone(),
            msr_indices: msr_indices.clone(),
            has_xcrs,
        };
        let (tx, wake, reset, vm) = (
            tx.clone(),
            wake.try_clone()
                .map_err(|e| Error::Device("the exit eventfd", e))?,
            reset.clone(),
            vm.clone(),
        );
        threads.push(VcpuThread::spawn(vcpu, ctx, move |r| {
            // A reset seen by one vCPU ends the VM for all of them.
            if matches!(r, Ok(StopReason::Reset)) {
                reset.store(true, Ordering::Release);
            }
            let _ = tx.send(r);
            let _ = wake.write(1);
            // The thread kept the VM (and the guest memory KVM maps) alive
            // for as long as it could enter the guest.
            drop(vm);
        })?);
    }
    drop(tx);
    if let Some(started) = options.started {
        tracing::info!(
            "vCPUs running {:.3} ms after vmm start",
            started.elapsed().as_secs_f64() * 1e3
        );
    }
    if let Some(mut client) = options.notify {
        let since = options.restore_requested.unwrap_or_else(Instant::now);
        let running = Reply::Running {
            elapsed: since.elapsed(),
        };
        let _ = writeln!(client, "{running}");
    }
    let handle = Arc::new(VmHandle {
        vm,
        vcpus: threads,
        legacy,
        transports: devices.transports().to_vec(),
        paused: Mutex::new(false),
        carried_pit,
        base,
        msr_indices,
    });
    if let Some(listener) = api {
        loop_handle
            .add(Box::new(ApiServer {
                listener,
                clients: Vec::new(),
                handle: handle.clone(),
                inbound,
                outcome: outcome.clone(),
                pending: None,
            }))
            .map_err(Error::EventLoop)?;
    }
    // The VM runs: give back what start-up (or restore) used and an idle
    // VMM does not need.
    match crate::footprint::release_startup_memory() {
        Ok(bytes) => tracing::debug!("released {} KiB of start-up stack", bytes >> 10),
        Err(e) => tracing::debug!("start-up memory not released: {e}"),
    }
    event_loop.run().map_err(Error::EventLoop)?;
    if let Some(path) = &options.api_sock {
        let _ = std::fs::remove_file(path);
    }
    let result = lock(&outcome).take();
    match result {
        Some(Ok(exit)) => Ok(exit),
        Some(Err(e)) => Err(Error::Vcpu(e)),
        None => Err(Error::VcpusGone),
    }
}

/// Opens a snapshot target for writing (used by [`snapshot::write`]).
pub(crate) fn create_file(path: &Path) -> std::io::Result<std::fs::File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    use vmm_sys_util::sock_ctrl_msg::ScmSocket;

    use super::connected_tcp;

    /// What the platform does: pass an accepted TCP socket with an
    /// `accept` line; the VMM side gets the line and a working socket.
    #[test]
    fn a_tcp_socket_passed_with_scm_rights_arrives_connected() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (accepted, _) = listener.accept().expect("accept");
        let (platform, vmm) = UnixStream::pair().expect("pair");
        platform
            .send_with_fd(&b"accept 8080\n"[..], accepted.as_raw_fd())
            .expect("send");
        drop(accepted);
        let mut buf = [0u8; 64];
        let (n, file) = vmm.recv_with_fd(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"accept 8080\n");
        let mut stream = connected_tcp(file.expect("a descriptor came along")).expect("tcp");
        stream.write_all(b"hello").expect("write");
        drop(stream);
        let mut got = String::new();
        client.read_to_string(&mut got).expect("read");
        assert_eq!(got, "hello", "the client sees the VMM's copy, then EOF");
    }

    /// A standby VMM answers `ping`, refuses anything but `restore`, and
    /// hands back what a `restore` asked for with the client to tell.
    #[test]
    fn standby_waits_for_restore() {
        use std::time::Duration;
        use vmm_api::{Client, ClientError, Command, Reply};

        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("api.sock");
        let waiter = {
            let sock = sock.clone();
            std::thread::spawn(move || super::standby::wait_for_restore(&sock))
        };
        let connect = || {
            while !sock.exists() {
                std::thread::sleep(Duration::from_millis(1));
            }
            Client::connect(&sock, Duration::from_secs(10)).expect("connect")
        };
        assert_eq!(
            connect().send(&Command::Ping).expect("ping"),
            Reply::Standby
        );
        match connect().send(&Command::Connections) {
            Err(ClientError::Refused(message)) => assert!(message.contains("restore")),
            other => panic!("a standby vmm only restores: {other:?}"),
        }
        let mut client = connect();
        let restorer = std::thread::spawn(move || {
            client.send(&Command::Restore {
                snapshot: "/a/app.snap".into(),
                working_set: Some("/a/app.ws".into()),
            })
        });
        let (snapshot, working_set, _listener, mut notify) =
            waiter.join().expect("no panic").expect("restore requested");
        assert_eq!(snapshot, std::path::Path::new("/a/app.snap"));
        assert_eq!(working_set.as_deref(), Some("/a/app.ws".as_ref()));
        let running = Reply::Running {
            elapsed: Duration::from_millis(2),
        };
        writeln!(notify, "{running}").expect("tell the client");
        assert_eq!(
            restorer.join().expect("no panic").expect("running"),
            running
        );
    }

    #[test]
    fn files_and_listeners_are_not_taken_as_connections() {
        let file = tempfile::tempfile().expect("tempfile");
        assert!(connected_tcp(file).is_none());
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let fd = std::os::fd::OwnedFd::from(listener);
        assert!(connected_tcp(std::fs::File::from(fd)).is_none());
    }
}
