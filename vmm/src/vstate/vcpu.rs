//! vCPU setup and the KVM_RUN loop.
//!
//! A vCPU thread only runs KVM_RUN and dispatches port/MMIO exits to the
//! buses; everything slow happens elsewhere.

use std::sync::atomic::{AtomicBool, Ordering};

use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::GuestMemoryMmap;

use crate::arch::x86_64::{cpuid, lapic, msr, regs};
use crate::devices::bus::Bus;
use crate::host::HostKind;
use crate::vstate::vm::Vm;

const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;

/// Errors while configuring or running a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The vCPU thread's seccomp filter could not be installed.
    #[error("vCPU thread seccomp filter")]
    Seccomp(#[source] crate::seccomp::Error),
    /// A KVM ioctl on the vCPU failed.
    #[error("KVM refused to {0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// Building the boot MSR list failed.
    #[error(transparent)]
    Msr(#[from] msr::Error),
    /// Writing boot structures failed.
    #[error(transparent)]
    Regs(#[from] regs::Error),
    /// KVM could not run the guest's instruction (emulation failure).
    #[error("vCPU {cpu}: KVM internal error (suberror {suberror}) at rip {rip:#x}: the guest ran an instruction this host's KVM cannot run")]
    Internal {
        /// vCPU index.
        cpu: u8,
        /// KVM's suberror code (1 = emulation failure).
        suberror: u32,
        /// Guest instruction pointer.
        rip: u64,
    },
    /// KVM_RUN failed to enter the guest.
    #[error("vCPU {cpu}: VM entry failed (hardware reason {reason:#x})")]
    FailEntry {
        /// vCPU index.
        cpu: u8,
        /// Hardware entry failure reason.
        reason: u64,
    },
    /// An exit the VMM does not handle.
    #[error("vCPU {cpu}: unexpected KVM exit {what}")]
    UnexpectedExit {
        /// vCPU index.
        cpu: u8,
        /// The exit.
        what: String,
    },
}

/// Why a vCPU stopped running.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The guest asked for a reset (i8042, triple fault or system event).
    Reset,
    /// The guest powered off.
    PowerOff,
    /// The VMM kicked the vCPU out of KVM_RUN (to pause it, say).
    Kicked,
}

/// One vCPU.
pub struct Vcpu {
    fd: VcpuFd,
    index: u8,
}

impl Vcpu {
    /// Creates vCPU `index` of `count` and sets CPUID, MSRs and LAPIC; the
    /// boot vCPU (index 0) also gets the 64-bit entry state for `entry`.
    pub fn new(vm: &Vm, index: u8, count: u8, entry: u64, host: HostKind) -> Result<Self, Error> {
        let fd = vm
            .fd
            .create_vcpu(u64::from(index))
            .map_err(|e| Error::Kvm("create a vCPU", e))?;
        let mut cpuid = vm
            .kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| Error::Kvm("report supported CPUID", e))?;
        cpuid::filter_cpuid(&mut cpuid, index, count, host);
        fd.set_cpuid2(&cpuid)
            .map_err(|e| Error::Kvm("set CPUID", e))?;
        let msrs = msr::boot_msrs()?;
        let written = fd.set_msrs(&msrs).map_err(|e| Error::Kvm("set MSRs", e))?;
        if written != msrs.as_slice().len() {
            tracing::debug!("vCPU {index}: KVM accepted {written} of the boot MSRs");
        }
        let mut lapic_state = fd
            .get_lapic()
            .map_err(|e| Error::Kvm("read the LAPIC", e))?;
        lapic::set_lint(&mut lapic_state);
        fd.set_lapic(&lapic_state)
            .map_err(|e| Error::Kvm("set the LAPIC", e))?;
        if index == 0 {
            Self::set_boot_state(&fd, &vm.mem, entry)?;
        }
        Ok(Self { fd, index })
    }

    fn set_boot_state(fd: &VcpuFd, mem: &GuestMemoryMmap, entry: u64) -> Result<(), Error> {
        let sregs = fd.get_sregs().map_err(|e| Error::Kvm("read sregs", e))?;
        let sregs = regs::boot_sregs(mem, sregs)?;
        fd.set_sregs(&sregs)
            .map_err(|e| Error::Kvm("set sregs", e))?;
        fd.set_regs(&regs::boot_regs(entry))
            .map_err(|e| Error::Kvm("set registers", e))?;
        fd.set_fpu(&regs::boot_fpu())
            .map_err(|e| Error::Kvm("set FPU state", e))?;
        Ok(())
    }

    /// The vCPU index.
    pub fn index(&self) -> u8 {
        self.index
    }

    /// The KVM vCPU handle.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// The vCPU's `kvm_run` page, for the kick handler.
    pub fn kvm_run_ptr(&mut self) -> *mut kvm_bindings::kvm_run {
        self.fd.get_kvm_run()
    }

    /// Re-enters KVM_RUN with `immediate_exit` set, so that KVM finishes the
    /// instruction of the last port/MMIO exit and the saved registers are
    /// consistent (KVM API, "immediate_exit").
    pub fn complete_pending_io(&mut self) -> Result<(), Error> {
        self.fd.set_kvm_immediate_exit(1);
        let r = self.fd.run().map(|_| ()).or_else(|e| {
            if e.errno() == libc::EINTR {
                Ok(())
            } else {
                Err(Error::Kvm("complete pending I/O", e))
            }
        });
        self.fd.set_kvm_immediate_exit(0);
        r
    }

    /// Wraps an already configured (restored) vCPU fd.
    pub fn from_fd(fd: VcpuFd, index: u8) -> Self {
        Self { fd, index }
    }

    /// Runs the guest until it resets, powers off or fails, or until a device
    /// sets `reset` (checked after every exit).
    pub fn run(&mut self, pio: &Bus, mmio: &Bus, reset: &AtomicBool) -> Result<StopReason, Error> {
        let cpu = self.index;
        loop {
            if reset.load(Ordering::Acquire) {
                return Ok(StopReason::Reset);
            }
            match self.fd.run() {
                Ok(VcpuExit::IoIn(port, data)) => {
                    if !pio.read(u64::from(port), data) {
                        data.fill(0xff);
                    }
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    pio.write(u64::from(port), data);
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    if !mmio.read(addr, data) {
                        data.fill(0);
                    }
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    mmio.write(addr, data);
                }
                Ok(VcpuExit::Shutdown) => return Ok(StopReason::Reset),
                Ok(VcpuExit::Hlt) => return Ok(StopReason::PowerOff),
                Ok(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, _)) => {
                    return Ok(StopReason::Reset)
                }
                Ok(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, _)) => {
                    return Ok(StopReason::PowerOff)
                }
                Ok(VcpuExit::InternalError) => {
                    // SAFETY: the last exit was KVM_EXIT_INTERNAL_ERROR, so
                    // the `internal` member of the kvm_run exit union is the
                    // one KVM filled in.
                    let suberror =
                        unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                    let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
                    return Err(Error::Internal { cpu, suberror, rip });
                }
                Ok(VcpuExit::FailEntry(reason, _)) => return Err(Error::FailEntry { cpu, reason }),
                Ok(VcpuExit::Intr) => {}
                Ok(other) => {
                    return Err(Error::UnexpectedExit {
                        cpu,
                        what: format!("{other:?}"),
                    })
                }
                Err(e) if e.errno() == libc::EINTR => {
                    self.fd.set_kvm_immediate_exit(0);
                    return Ok(StopReason::Kicked);
                }
                Err(e) if e.errno() == libc::EAGAIN => {}
                Err(e) => return Err(Error::Kvm("run the vCPU", e)),
            }
        }
    }
}
