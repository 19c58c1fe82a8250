//! What the user asks the VMM to boot, validated before anything is created.

use std::io::Write;
use std::path::PathBuf;

use crate::arch::x86_64::layout::CMDLINE_MAX_SIZE;
use crate::arch::x86_64::mptable::MAX_CPUS;

/// Smallest guest memory a Linux microVM boots in, in MiB.
pub const MIN_MEM_MIB: u64 = 16;
/// Largest guest memory accepted, in MiB (1 TiB).
pub const MAX_MEM_MIB: u64 = 1 << 20;

/// Where the guest's serial console goes.
pub enum ConsoleOutput {
    /// The VMM's standard output.
    Stdout,
    /// Discarded.
    Null,
    /// A file (created or truncated, mode 0600), renamed to `PATH.1` when
    /// it reaches `max_bytes` (0: no cap) and started again
    /// ([`ConsoleLog`](crate::devices::legacy::console_log::ConsoleLog)).
    File {
        /// The file.
        path: PathBuf,
        /// Its cap in bytes; 0 for none.
        max_bytes: u64,
    },
    /// Any writer (tests, the platform daemon).
    Writer(Box<dyn Write + Send>),
}

impl std::fmt::Debug for ConsoleOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConsoleOutput::Stdout => f.write_str("stdout"),
            ConsoleOutput::Null => f.write_str("null"),
            ConsoleOutput::File { path, max_bytes } => {
                write!(f, "file {} (cap {max_bytes} bytes)", path.display())
            }
            ConsoleOutput::Writer(_) => f.write_str("writer"),
        }
    }
}

/// A VM to boot.
#[derive(Debug)]
pub struct VmConfig {
    /// Uncompressed ELF vmlinux.
    pub kernel: PathBuf,
    /// Optional initramfs (cpio, optionally compressed as the kernel supports).
    pub initrd: Option<PathBuf>,
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Extra kernel command-line arguments, appended after the VMM's own.
    pub cmdline_extra: String,
    /// Replace the VMM's default kernel arguments instead of appending to them.
    pub cmdline_replace: bool,
    /// Serial console destination.
    pub console: ConsoleOutput,
    /// A virtio-vsock device (`None`: no vsock).
    pub vsock: Option<crate::devices::virtio::vsock::VsockConfig>,
    /// A virtio-net device on the userspace network (`None`: no network).
    pub net: Option<crate::usernet::NetConfig>,
    /// virtio-blk disks, in order: the guest sees /dev/vda, /dev/vdb, ...
    pub drives: Vec<crate::devices::virtio::block::BlockConfig>,
}

/// Errors in a [`VmConfig`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// Guest memory below the minimum or above the maximum.
    #[error("guest memory must be between {MIN_MEM_MIB} MiB and {MAX_MEM_MIB} MiB, got {0} MiB")]
    Memory(u64),
    /// vCPU count out of range.
    #[error("vCPU count must be between 1 and {MAX_CPUS}, got {0}")]
    Vcpus(u8),
    /// Command line too long or with bytes a kernel command line cannot hold.
    #[error(
        "kernel command line extras must be printable ASCII and under {CMDLINE_MAX_SIZE} bytes"
    )]
    Cmdline,
}

impl VmConfig {
    /// A config booting `kernel` with defaults: 128 MiB, 1 vCPU, console on stdout.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            kernel: kernel.into(),
            initrd: None,
            mem_mib: 128,
            vcpus: 1,
            cmdline_extra: String::new(),
            cmdline_replace: false,
            console: ConsoleOutput::Stdout,
            vsock: None,
            net: None,
            drives: Vec::new(),
        }
    }

    /// Checks the ranges that do not need the files or KVM.
    pub fn validate(&self) -> Result<(), Error> {
        if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&self.mem_mib) {
            return Err(Error::Memory(self.mem_mib));
        }
        if self.vcpus == 0 || self.vcpus > MAX_CPUS {
            return Err(Error::Vcpus(self.vcpus));
        }
        if self.cmdline_extra.len() >= CMDLINE_MAX_SIZE
            || !self
                .cmdline_extra
                .bytes()
                .all(|b| b.is_ascii_graphic() || b == b' ')
        {
            return Err(Error::Cmdline);
        }
        Ok(())
    }
}

/// What to restore and how to wire it.
pub struct RestoreConfig {
    /// The snapshot file.
    pub snapshot: PathBuf,
    /// Where the guest's serial console goes.
    pub console: ConsoleOutput,
    /// The network, as when the snapshot was taken (same device list).
    pub net: Option<crate::usernet::NetConfig>,
    /// Disks, in the order they had when the snapshot was taken.
    pub drives: Vec<crate::devices::virtio::block::BlockConfig>,
    /// The vsock device (its socket path may differ per restore).
    pub vsock: Option<crate::devices::virtio::vsock::VsockConfig>,
    /// Pages to map ahead of use, recorded with the `working-set` command.
    pub working_set: Option<PathBuf>,
}

impl RestoreConfig {
    /// Restores `snapshot` with no virtio devices, console on stdout.
    pub fn new(snapshot: impl Into<PathBuf>) -> Self {
        Self {
            snapshot: snapshot.into(),
            console: ConsoleOutput::Stdout,
            net: None,
            drives: Vec::new(),
            vsock: None,
            working_set: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert_eq!(VmConfig::new("/k").validate(), Ok(()));
    }

    #[test]
    fn ranges_are_enforced() {
        let mut c = VmConfig::new("/k");
        c.mem_mib = 8;
        assert_eq!(c.validate(), Err(Error::Memory(8)));
        c.mem_mib = MAX_MEM_MIB + 1;
        assert_eq!(c.validate(), Err(Error::Memory(MAX_MEM_MIB + 1)));
        c.mem_mib = 64;
        c.vcpus = 0;
        assert_eq!(c.validate(), Err(Error::Vcpus(0)));
        c.vcpus = MAX_CPUS + 1;
        assert_eq!(c.validate(), Err(Error::Vcpus(MAX_CPUS + 1)));
    }

    #[test]
    fn cmdline_extras_are_checked() {
        let mut c = VmConfig::new("/k");
        c.cmdline_extra = "init=/bin/sh quiet".into();
        assert_eq!(c.validate(), Ok(()));
        c.cmdline_extra = "a\nb".into();
        assert_eq!(c.validate(), Err(Error::Cmdline));
        c.cmdline_extra = "x".repeat(CMDLINE_MAX_SIZE);
        assert_eq!(c.validate(), Err(Error::Cmdline));
    }
}
