//! Saving and restoring KVM state: every vCPU register file and the VM-wide
//! interrupt controllers, timer and clock.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// Most CPUID entries a snapshot may carry.
pub const MAX_CPUID_ENTRIES: usize = kvm_bindings::KVM_MAX_CPUID_ENTRIES;
/// Most MSRs a snapshot may carry.
pub const MAX_MSRS: usize = kvm_bindings::KVM_MAX_MSR_ENTRIES;

/// Errors while saving or restoring KVM state.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A KVM ioctl failed.
    #[error("KVM refused to {0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// A FAM list could not be built (too many entries).
    #[error("too many {0} in the saved state")]
    TooMany(&'static str),
    /// KVM accepted only part of the MSRs.
    #[error("KVM restored {set} of {total} MSRs")]
    PartialMsrs {
        /// MSRs KVM accepted.
        set: usize,
        /// MSRs in the snapshot.
        total: usize,
    },
}

/// One vCPU's complete state.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    /// The CPUID table the vCPU ran with.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Every MSR KVM would save.
    pub msrs: Vec<kvm_msr_entry>,
    /// General-purpose registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
    /// FPU/SSE (and, where enabled, extended) state.
    pub xsave: kvm_xsave,
    /// Extended control registers, where the host supports them.
    pub xcrs: Option<kvm_xcrs>,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
    /// Local APIC registers.
    pub lapic: kvm_lapic_state,
    /// Multiprocessing state (running, halted, waiting for SIPI).
    pub mp_state: kvm_mp_state,
    /// Pending exceptions, interrupts and NMIs.
    pub events: kvm_vcpu_events,
    /// TSC frequency in kHz, to keep the guest's clock rate on restore.
    pub tsc_khz: Option<u32>,
}

/// The VM-wide state: PIC, IOAPIC, PIT and kvm-clock.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    /// Master 8259.
    pub pic_master: kvm_irqchip,
    /// Slave 8259.
    pub pic_slave: kvm_irqchip,
    /// IOAPIC.
    pub ioapic: kvm_irqchip,
    /// 8254 PIT.
    pub pit: kvm_pit_state2,
    /// kvm-clock.
    pub clock: kvm_clock_data,
}

/// The MSRs KVM can save for this host's vCPUs.
pub fn saveable_msrs(kvm: &Kvm) -> Result<Vec<u32>, Error> {
    let list = kvm
        .get_msr_index_list()
        .map_err(|e| Error::Kvm("list MSRs", e))?;
    Ok(list.as_slice().to_vec())
}

/// Reads every MSR in `indices` that KVM accepts, skipping the ones it
/// refuses (KVM_GET_MSRS stops at the first it cannot read).
fn get_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, Error> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest: &[u32] = indices;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(MAX_MSRS)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| Error::TooMany("MSRs"))?;
        let read = fd
            .get_msrs(&mut msrs)
            .map_err(|e| Error::Kvm("read MSRs", e))?;
        out.extend_from_slice(&msrs.as_slice()[..read]);
        // Skip the MSR KVM refused, if any.
        let consumed = if read < chunk.len() { read + 1 } else { read };
        rest = &rest[consumed..];
    }
    Ok(out)
}

/// Saves a paused vCPU. `msr_indices` comes from [`saveable_msrs`];
/// `has_xcrs` is KVM's `KVM_CAP_XCRS`.
pub fn save_vcpu(fd: &VcpuFd, msr_indices: &[u32], has_xcrs: bool) -> Result<VcpuState, Error> {
    let mp_state = fd
        .get_mp_state()
        .map_err(|e| Error::Kvm("read the MP state", e))?;
    let regs = fd.get_regs().map_err(|e| Error::Kvm("read registers", e))?;
    let sregs = fd.get_sregs().map_err(|e| Error::Kvm("read sregs", e))?;
    let xsave = fd
        .get_xsave()
        .map_err(|e| Error::Kvm("read XSAVE state", e))?;
    let xcrs = if has_xcrs {
        Some(fd.get_xcrs().map_err(|e| Error::Kvm("read XCRs", e))?)
    } else {
        None
    };
    let debug_regs = fd
        .get_debug_regs()
        .map_err(|e| Error::Kvm("read debug registers", e))?;
    let lapic = fd
        .get_lapic()
        .map_err(|e| Error::Kvm("read the LAPIC", e))?;
    let msrs = get_msrs(fd, msr_indices)?;
    let events = fd
        .get_vcpu_events()
        .map_err(|e| Error::Kvm("read pending events", e))?;
    let cpuid = fd
        .get_cpuid2(MAX_CPUID_ENTRIES)
        .map_err(|e| Error::Kvm("read CPUID", e))?
        .as_slice()
        .to_vec();
    let tsc_khz = fd.get_tsc_khz().ok();
    Ok(VcpuState {
        cpuid,
        msrs,
        regs,
        sregs,
        xsave,
        xcrs,
        debug_regs,
        lapic,
        mp_state,
        events,
        tsc_khz,
    })
}

/// Restores a freshly created vCPU from `state`.
pub fn restore_vcpu(fd: &VcpuFd, state: &VcpuState) -> Result<(), Error> {
    let cpuid = CpuId::from_entries(&state.cpuid).map_err(|_| Error::TooMany("CPUID entries"))?;
    fd.set_cpuid2(&cpuid)
        .map_err(|e| Error::Kvm("set CPUID", e))?;
    if let Some(khz) = state.tsc_khz {
        // Scaling may be unsupported; the guest then sees the host's rate.
        if fd.get_tsc_khz().ok() != Some(khz) {
            if let Err(e) = fd.set_tsc_khz(khz) {
                tracing::debug!("cannot set TSC frequency to {khz} kHz: {e}");
            }
        }
    }
    fd.set_mp_state(state.mp_state)
        .map_err(|e| Error::Kvm("set the MP state", e))?;
    fd.set_regs(&state.regs)
        .map_err(|e| Error::Kvm("set registers", e))?;
    fd.set_sregs(&state.sregs)
        .map_err(|e| Error::Kvm("set sregs", e))?;
    // SAFETY: the xsave area comes from KVM_GET_XSAVE on a vCPU with the
    // same CPUID (restored above), so it is sized and laid out for it.
    unsafe { fd.set_xsave(&state.xsave) }.map_err(|e| Error::Kvm("set XSAVE state", e))?;
    if let Some(xcrs) = &state.xcrs {
        fd.set_xcrs(xcrs).map_err(|e| Error::Kvm("set XCRs", e))?;
    }
    fd.set_debug_regs(&state.debug_regs)
        .map_err(|e| Error::Kvm("set debug registers", e))?;
    fd.set_lapic(&state.lapic)
        .map_err(|e| Error::Kvm("set the LAPIC", e))?;
    for chunk in state.msrs.chunks(MAX_MSRS) {
        let msrs = Msrs::from_entries(chunk).map_err(|_| Error::TooMany("MSRs"))?;
        let set = fd.set_msrs(&msrs).map_err(|e| Error::Kvm("set MSRs", e))?;
        if set != chunk.len() {
            return Err(Error::PartialMsrs {
                set,
                total: chunk.len(),
            });
        }
    }
    fd.set_vcpu_events(&state.events)
        .map_err(|e| Error::Kvm("set pending events", e))?;
    Ok(())
}

fn get_chip(fd: &VmFd, chip_id: u32) -> Result<kvm_irqchip, Error> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    fd.get_irqchip(&mut chip)
        .map_err(|e| Error::Kvm("read the irqchip", e))?;
    Ok(chip)
}

/// Whether a saved PIT is doing anything a guest could depend on: channel 0
/// in a periodic mode (rate generator or square wave).
pub fn pit_active(pit: &kvm_pit_state2) -> bool {
    let ch0 = &pit.channels[0];
    matches!(ch0.mode, 2 | 3) && ch0.count != 0
}

/// Saves the VM-wide state of a paused VM. Without an in-kernel PIT,
/// `carried_pit` (the state the VM was restored with) is saved instead.
pub fn save_vm(fd: &VmFd, carried_pit: Option<&kvm_pit_state2>) -> Result<VmState, Error> {
    let mut clock = fd
        .get_clock()
        .map_err(|e| Error::Kvm("read kvm-clock", e))?;
    // Only the time itself is restorable; flags describe the host's clock.
    clock.flags = 0;
    Ok(VmState {
        pic_master: get_chip(fd, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: get_chip(fd, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: get_chip(fd, KVM_IRQCHIP_IOAPIC)?,
        pit: match carried_pit {
            Some(pit) => *pit,
            None => fd.get_pit2().map_err(|e| Error::Kvm("read the PIT", e))?,
        },
        clock,
    })
}

/// Restores the VM-wide state into a VM created with an irqchip (and a
/// PIT when `has_pit`).
pub fn restore_vm(fd: &VmFd, state: &VmState, has_pit: bool) -> Result<(), Error> {
    if has_pit {
        fd.set_pit2(&state.pit)
            .map_err(|e| Error::Kvm("set the PIT", e))?;
    }
    let mut clock = state.clock;
    clock.flags = 0;
    fd.set_clock(&clock)
        .map_err(|e| Error::Kvm("set kvm-clock", e))?;
    for (chip, what) in [
        (&state.pic_master, "set the master PIC"),
        (&state.pic_slave, "set the slave PIC"),
        (&state.ioapic, "set the IOAPIC"),
    ] {
        fd.set_irqchip(chip).map_err(|e| Error::Kvm(what, e))?;
    }
    Ok(())
}
