//! The KVM virtual machine: guest memory slots, in-kernel irqchip and PIT.

use std::os::fd::{FromRawFd, IntoRawFd};

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::arch::x86_64::layout::{KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS};

/// Errors while creating the VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `/dev/kvm` does not exist.
    #[error("/dev/kvm does not exist: this host has no KVM (load kvm_intel/kvm_amd or enable nested virtualization)")]
    NoKvm,
    /// `/dev/kvm` exists but cannot be opened.
    #[error("no permission to open /dev/kvm: run as root or add this user to the 'kvm' group")]
    KvmPermission,
    /// Opening `/dev/kvm` failed otherwise.
    #[error("failed to open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// A KVM ioctl on the VM failed.
    #[error("KVM refused to {0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// Guest memory could not be mapped.
    #[error("failed to allocate guest memory")]
    Memory(#[source] vm_memory::mmap::FromRangesError),
    /// A memory region does not fit KVM's slot fields.
    #[error("guest memory region is too large for a KVM memory slot")]
    RegionTooLarge,
}

/// A VM with its guest memory registered.
pub struct Vm {
    /// The KVM system handle.
    pub kvm: Kvm,
    /// The VM file descriptor.
    pub fd: VmFd,
    /// Guest physical memory.
    pub mem: GuestMemoryMmap,
    /// Whether the in-kernel PIT exists (see [`Vm::without_pit`]).
    pub has_pit: bool,
}

/// Opens `/dev/kvm` (a jailed VMM uses the descriptor it opened before it
/// left the host's tree), mapping the common failures to clear errors.
pub fn open_kvm() -> Result<Kvm, Error> {
    match crate::jail::kvm_fd() {
        Some(fd) => {
            let fd = fd.try_clone_to_owned().map_err(|e| {
                Error::OpenKvm(kvm_ioctls::Error::new(
                    e.raw_os_error().unwrap_or(libc::EBADF),
                ))
            })?;
            // SAFETY: `fd` is a fresh duplicate of the open /dev/kvm
            // descriptor; the Kvm takes sole ownership of it.
            Ok(unsafe { Kvm::from_raw_fd(fd.into_raw_fd()) })
        }
        None => open_kvm_at("/dev/kvm"),
    }
}

/// Opens the KVM device at `path` (normally `/dev/kvm`).
pub fn open_kvm_at(path: &str) -> Result<Kvm, Error> {
    Kvm::new_with_path(std::ffi::CString::new(path).map_err(|_| Error::NoKvm)?).map_err(|e| match e
        .errno()
    {
        libc::ENOENT => Error::NoKvm,
        libc::EACCES | libc::EPERM => Error::KvmPermission,
        _ => Error::OpenKvm(e),
    })
}

impl Vm {
    /// Creates a VM over `mem` with an in-kernel irqchip and PIT.
    pub fn new(kvm: Kvm, mem: GuestMemoryMmap) -> Result<Self, Error> {
        let vm = Self::without_pit(kvm, mem)?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.fd
            .create_pit2(pit)
            .map_err(|e| Error::Kvm("create the in-kernel PIT", e))?;
        Ok(Self {
            has_pit: true,
            ..vm
        })
    }

    /// Creates a VM over `mem` with an in-kernel irqchip but no PIT. Linux
    /// needs the PIT only while booting (it then runs on the LAPIC timer and
    /// kvm-clock), and creating one costs a kernel thread: restored guests
    /// whose PIT is idle skip it, and their PIT port accesses reach the VMM,
    /// which ignores them.
    pub fn without_pit(kvm: Kvm, mem: GuestMemoryMmap) -> Result<Self, Error> {
        let fd = kvm.create_vm().map_err(|e| Error::Kvm("create a VM", e))?;
        for (slot, region) in mem.iter().enumerate() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|_| Error::RegionTooLarge)?;
            let desc = kvm_userspace_memory_region {
                slot: u32::try_from(slot).map_err(|_| Error::RegionTooLarge)?,
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: `host` is the start of a live mapping of `region.len()`
            // bytes owned by `mem`, which this `Vm` keeps alive for as long as
            // the VM fd (and so the slot) exists; slots do not overlap because
            // vm-memory rejects overlapping regions.
            unsafe { fd.set_user_memory_region(desc) }
                .map_err(|e| Error::Kvm("register guest memory", e))?;
        }
        let tss = usize::try_from(KVM_TSS_ADDRESS).map_err(|_| Error::RegionTooLarge)?;
        fd.set_tss_address(tss)
            .map_err(|e| Error::Kvm("set the TSS address", e))?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(|e| Error::Kvm("set the identity map address", e))?;
        fd.create_irq_chip()
            .map_err(|e| Error::Kvm("create the in-kernel irqchip", e))?;
        Ok(Self {
            kvm,
            fd,
            mem,
            has_pit: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_kvm_device_is_a_clear_error() {
        let e = open_kvm_at("/nonexistent/kvm").expect_err("no such device");
        assert!(matches!(e, Error::NoKvm));
        assert!(e.to_string().contains("/dev/kvm does not exist"));
    }
}
