//! One thread per vCPU, which the VMM can pause (saving the vCPU's state),
//! resume, or let run until the guest ends.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;

use crate::devices::bus::Bus;
use crate::vstate::kick;
use crate::vstate::persist::{self, VcpuState};
use crate::vstate::vcpu::{self, StopReason, Vcpu};

/// Errors while controlling a vCPU thread.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The thread could not be started or the kick handler installed.
    #[error("failed to start a vCPU thread")]
    Spawn(#[source] std::io::Error),
    /// The kick signal could not be sent.
    #[error("failed to kick a vCPU thread")]
    Kick(#[source] std::io::Error),
    /// The vCPU ended (guest exit or failure) before it could pause.
    #[error("the vCPU thread has ended")]
    Gone,
    /// Saving the vCPU's state failed.
    #[error("failed to save vCPU state")]
    Save(#[source] persist::Error),
    /// A save was asked before the MSR list was fetched.
    #[error("the MSR list was not fetched before saving the vCPU")]
    NoMsrList,
    /// A save was asked of a running vCPU.
    #[error("the vCPU must be paused before it is saved")]
    NotPaused,
    /// Completing the pending I/O before a save failed.
    #[error(transparent)]
    Vcpu(#[from] vcpu::Error),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Request {
    Run,
    Pause,
    Save,
}

struct Ctl {
    request: Request,
    paused: bool,
    ended: bool,
    saved: Option<Result<VcpuState, Error>>,
}

struct Shared {
    ctl: Mutex<Ctl>,
    cond: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Ctl> {
        self.ctl.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Everything a vCPU thread runs with.
pub struct VcpuContext {
    /// Port I/O bus.
    pub pio: Bus,
    /// MMIO bus.
    pub mmio: Bus,
    /// Set by the i8042 (or another vCPU) when the guest resets.
    pub reset: Arc<AtomicBool>,
    /// MSRs to save, fetched from KVM by the first snapshot (not on the
    /// restore path, which never needs them).
    pub msr_indices: Arc<OnceLock<Vec<u32>>>,
    /// Whether KVM saves extended control registers (KVM_CAP_XCRS).
    pub has_xcrs: bool,
}

/// A running vCPU thread.
pub struct VcpuThread {
    shared: Arc<Shared>,
    pthread: libc::pthread_t,
    join: Option<JoinHandle<()>>,
}

impl VcpuThread {
    /// Starts `vcpu` on its own thread; `on_exit` gets the final outcome
    /// when the guest resets, powers off or fails.
    pub fn spawn(
        mut vcpu: Vcpu,
        ctx: VcpuContext,
        on_exit: impl FnOnce(Result<StopReason, vcpu::Error>) + Send + 'static,
    ) -> Result<Self, Error> {
        kick::install_handler().map_err(Error::Spawn)?;
        let shared = Arc::new(Shared {
            ctl: Mutex::new(Ctl {
                request: Request::Run,
                paused: false,
                ended: false,
                saved: None,
            }),
            cond: Condvar::new(),
        });
        let thread_shared = shared.clone();
        let join = std::thread::Builder::new()
            .name(format!("vcpu{}", vcpu.index()))
            .spawn(move || {
                if let Err(e) = crate::seccomp::install_thread(crate::seccomp::ThreadKind::Vcpu) {
                    {
                        let mut ctl = thread_shared.lock();
                        ctl.ended = true;
                        thread_shared.cond.notify_all();
                    }
                    on_exit(Err(vcpu::Error::Seccomp(e)));
                    return;
                }
                kick::register_current(vcpu.kvm_run_ptr());
                let outcome = run_loop(&mut vcpu, &ctx, &thread_shared);
                kick::unregister_current();
                {
                    let mut ctl = thread_shared.lock();
                    ctl.ended = true;
                    thread_shared.cond.notify_all();
                }
                on_exit(outcome);
            })
            .map_err(Error::Spawn)?;
        use std::os::unix::thread::JoinHandleExt;
        let pthread = join.as_pthread_t();
        Ok(Self {
            shared,
            pthread,
            join: Some(join),
        })
    }

    fn wait_until(&self, mut done: impl FnMut(&mut Ctl) -> bool) -> Result<(), Error> {
        let mut ctl = self.shared.lock();
        loop {
            if done(&mut ctl) {
                return Ok(());
            }
            if ctl.ended {
                return Err(Error::Gone);
            }
            ctl = self
                .shared
                .cond
                .wait(ctl)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Stops the vCPU outside KVM_RUN, its last port/MMIO access completed.
    pub fn pause(&self) -> Result<(), Error> {
        {
            let mut ctl = self.shared.lock();
            if ctl.ended {
                return Err(Error::Gone);
            }
            if ctl.request == Request::Pause && ctl.paused {
                return Ok(());
            }
            ctl.request = Request::Pause;
        }
        kick::kick(self.pthread).map_err(Error::Kick)?;
        self.wait_until(|ctl| ctl.paused)
    }

    /// Saves a paused vCPU's state (on its own thread).
    pub fn save(&self) -> Result<VcpuState, Error> {
        {
            let mut ctl = self.shared.lock();
            if !ctl.paused {
                return Err(Error::NotPaused);
            }
            ctl.saved = None;
            ctl.request = Request::Save;
            self.shared.cond.notify_all();
        }
        let mut saved = None;
        self.wait_until(|ctl| {
            saved = ctl.saved.take();
            saved.is_some()
        })?;
        saved.unwrap_or(Err(Error::Gone))
    }

    /// Lets a paused vCPU run again.
    pub fn resume(&self) {
        let mut ctl = self.shared.lock();
        ctl.request = Request::Run;
        self.shared.cond.notify_all();
    }
}

impl Drop for VcpuThread {
    fn drop(&mut self) {
        // The thread owns its vCPU; it ends with the guest or the process.
        drop(self.join.take());
    }
}

fn run_loop(
    vcpu: &mut Vcpu,
    ctx: &VcpuContext,
    shared: &Shared,
) -> Result<StopReason, vcpu::Error> {
    loop {
        if shared.lock().request != Request::Run {
            // Finish the last exit's instruction so the state is consistent.
            vcpu.complete_pending_io()?;
            let mut ctl = shared.lock();
            ctl.paused = true;
            shared.cond.notify_all();
            loop {
                match ctl.request {
                    Request::Run => break,
                    Request::Save => {
                        drop(ctl);
                        let saved =
                            ctx.msr_indices
                                .get()
                                .ok_or(Error::NoMsrList)
                                .and_then(|msrs| {
                                    persist::save_vcpu(vcpu.fd(), msrs, ctx.has_xcrs)
                                        .map_err(Error::Save)
                                });
                        ctl = shared.lock();
                        ctl.saved = Some(saved);
                        ctl.request = Request::Pause;
                        shared.cond.notify_all();
                    }
                    Request::Pause => {
                        ctl = shared.cond.wait(ctl).unwrap_or_else(|e| e.into_inner());
                    }
                }
            }
            ctl.paused = false;
            continue;
        }
        match vcpu.run(&ctx.pio, &ctx.mmio, &ctx.reset) {
            Ok(StopReason::Kicked) => continue,
            other => return other,
        }
    }
}
