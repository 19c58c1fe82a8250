//! The running microVM: its vCPU threads, the device event loop on the
//! calling thread, pause/resume and snapshot saving ([`VmHandle`]), and how
//! it ends ([`GuestExit`]).
//!
//! [`crate::builder`] makes a [`BuiltVm`] (booted or restored);
//! [`BuiltVm::start`] starts its vCPUs; handlers such as the control socket
//! ([`crate::api`]) join its event loop through [`Vmm::add_handler`]; and
//! [`Vmm::run`] runs the loop until the guest ends.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use vm_memory::GuestMemoryMmap;
use vmm_api::Reply;
use vmm_sys_util::eventfd::EventFd;

use crate::devices::legacy::{LegacyDevices, SerialConsole};
use crate::devices::manager::DeviceManager;
use crate::devices::virtio::net::InboundHandle;
use crate::devices::virtio::transport::mmio::MmioTransport;
use crate::event_loop::{Event, EventHandler, EventLoop, Ops};
use crate::snapshot::{self, MicrovmState};
use crate::stop_signal::StopWatcher;
use crate::vstate::persist;
use crate::vstate::vcpu::{self, StopReason, Vcpu};
use crate::vstate::vcpu_thread::{VcpuContext, VcpuThread};
use crate::vstate::vm::Vm;

/// Errors while running a VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A host resource of the running VM could not be set up.
    #[error("failed to set up {0}")]
    Device(&'static str, #[source] std::io::Error),
    /// A vCPU failed while running.
    #[error(transparent)]
    Vcpu(#[from] vcpu::Error),
    /// A vCPU thread could not be started or controlled.
    #[error(transparent)]
    VcpuThread(#[from] crate::vstate::vcpu_thread::Error),
    /// Every vCPU thread ended without a reason.
    #[error("all vCPU threads ended unexpectedly")]
    VcpusGone,
    /// The device event loop failed.
    #[error("device event loop failed")]
    EventLoop(#[source] crate::event_loop::Error),
    /// SIGINT and SIGTERM could not be routed to the event loop.
    #[error(transparent)]
    StopSignal(#[from] crate::stop_signal::StopSignalError),
}

/// How a guest ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestExit {
    /// The guest rebooted (the agent's normal way to end).
    Reset,
    /// The guest powered off or halted for good.
    PowerOff,
    /// The control socket asked the VMM to quit, or SIGINT or SIGTERM
    /// did.
    Quit,
}

/// A VM with kernel, boot structures, devices and vCPUs in place, not yet
/// running: everything the VMM does before the first KVM_RUN.
pub struct BuiltVm {
    pub(crate) vm: Vm,
    pub(crate) vcpus: Vec<Vcpu>,
    pub(crate) devices: DeviceManager,
    pub(crate) event_loop: EventLoop,
    pub(crate) reset: Arc<AtomicBool>,
    pub(crate) legacy: LegacyDevices,
    /// The saved PIT state of a restored VM that runs without a PIT.
    pub(crate) carried_pit: Option<kvm_bindings::kvm_pit_state2>,
    /// The full snapshot a restored VM's memory is mapped from.
    pub(crate) base: Option<crate::snapshot::BaseImage>,
    /// The image pages a restore mapped from a diff snapshot over the base:
    /// the guest's own since the base, though `/proc/self/pagemap` counts
    /// them as file pages until they are written.
    pub(crate) mapped_diff: Vec<(u64, u64)>,
    /// Hands host connections to the network device (the control socket's
    /// `accept` command), when the VM has one.
    pub(crate) inbound: Option<InboundHandle>,
}

/// How the VMM runs besides the guest itself.
#[derive(Debug, Default)]
pub struct RunOptions {
    /// Told [`Reply::Running`] once the vCPUs run (the standby client).
    pub notify: Option<UnixStream>,
    /// Forward the VMM's stdin to the guest's serial console.
    pub console_input: bool,
    /// Log (at info level) when the vCPUs start, with the setup time.
    pub started: Option<Instant>,
    /// When the standby client asked for the restore.
    pub restore_requested: Option<Instant>,
}

/// The running VM as its handlers see it: the control socket pauses,
/// resumes, snapshots and stops it through this.
pub struct VmHandle {
    vm: Arc<Vm>,
    outcome: Outcome,
    vcpus: Vec<VcpuThread>,
    legacy: LegacyDevices,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    paused: Mutex<bool>,
    carried_pit: Option<kvm_bindings::kvm_pit_state2>,
    base: Option<crate::snapshot::BaseImage>,
    mapped_diff: Vec<(u64, u64)>,
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
    /// Guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.vm.mem
    }

    /// Ends the VM with `exit` once the event loop stops (the caller stops
    /// it); the first outcome wins.
    pub fn finish(&self, exit: GuestExit) {
        set_outcome(&self.outcome, Ok(exit));
    }

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

    /// Whether the vCPUs are paused.
    pub fn is_paused(&self) -> bool {
        *self.paused.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes a snapshot of the paused VM to `path` (atomically, through a
    /// temporary file); `ops` reaches the device runtimes on the loop, which
    /// must be quiescent.
    pub fn save_paused(
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
        let legacy = self.legacy.save();
        let saved = start.elapsed();
        let mut state = MicrovmState::new(&self.vm.mem, vm, vcpus, legacy, virtio);
        let (state_bytes, mem_written, mem_len) = match base {
            None => snapshot::write(path, &state, &self.vm.mem)?,
            Some(base) => {
                let written = snapshot::memory::dirty_pages(&self.vm.mem)
                    .map_err(|e| snapshot::Error::Memory(path.display().to_string(), e))?;
                let runs = snapshot::memory::join_gaps(
                    snapshot::memory::union_runs(&written, &self.mapped_diff),
                    snapshot::memory::DIFF_JOIN_GAP,
                );
                state.dirty = snapshot::memory::bound_runs(runs, snapshot::memory::MAX_DIFF_RUNS);
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

impl BuiltVm {
    /// The VM and its device manager (to attach more devices before running).
    pub fn devices(&mut self) -> (&Vm, &mut DeviceManager) {
        (&self.vm, &mut self.devices)
    }

    /// Starts one thread per vCPU; the device event loop runs on this
    /// thread in [`Vmm::run`].
    pub fn start(self, options: RunOptions) -> Result<Vmm, Error> {
        start(self, options)
    }

    /// Starts the VM and runs it until the guest resets, powers off or
    /// fails.
    pub fn run(self, options: RunOptions) -> Result<GuestExit, Error> {
        self.start(options)?.run()
    }
}

fn start(built: BuiltVm, options: RunOptions) -> Result<Vmm, Error> {
    let BuiltVm {
        vm,
        vcpus,
        devices,
        event_loop,
        reset,
        legacy,
        carried_pit,
        base,
        mapped_diff,
        inbound,
    } = built;
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
    let stopped = outcome.clone();
    loop_handle
        .add(Box::new(StopWatcher::new(Box::new(move || {
            set_outcome(&stopped, Ok(GuestExit::Quit));
        }))?))
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
        outcome,
        vcpus: threads,
        legacy,
        transports: devices.transports().to_vec(),
        paused: Mutex::new(false),
        carried_pit,
        base,
        mapped_diff,
        msr_indices,
    });
    Ok(Vmm {
        event_loop,
        handle,
        inbound,
    })
}

/// A started VM: its vCPUs run; its event loop runs in [`Vmm::run`].
pub struct Vmm {
    event_loop: EventLoop,
    handle: Arc<VmHandle>,
    inbound: Option<InboundHandle>,
}

impl Vmm {
    /// What handlers use to pause, snapshot or stop the VM.
    pub fn handle(&self) -> &Arc<VmHandle> {
        &self.handle
    }

    /// Hands host connections to the network device, when the VM has one.
    pub fn inbound(&self) -> Option<&InboundHandle> {
        self.inbound.as_ref()
    }

    /// Adds a handler (the control socket, say) to the event loop.
    pub fn add_handler(&self, handler: Box<dyn EventHandler>) -> Result<(), Error> {
        self.event_loop
            .handle()
            .add(handler)
            .map(|_| ())
            .map_err(Error::EventLoop)
    }

    /// Runs the device event loop on this thread until the guest resets,
    /// powers off or fails, or a handler finishes the VM.
    pub fn run(mut self) -> Result<GuestExit, Error> {
        // The VM runs: give back what start-up (or restore) used and an
        // idle VMM does not need.
        match crate::footprint::release_startup_memory() {
            Ok(bytes) => tracing::debug!("released {} KiB of start-up stack", bytes >> 10),
            Err(e) => tracing::debug!("start-up memory not released: {e}"),
        }
        self.event_loop.run().map_err(Error::EventLoop)?;
        let result = lock(&self.handle.outcome).take();
        match result {
            Some(Ok(exit)) => Ok(exit),
            Some(Err(e)) => Err(Error::Vcpu(e)),
            None => Err(Error::VcpusGone),
        }
    }
}
