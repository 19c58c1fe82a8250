//! What kind of KVM this VMM runs on.
//!
//! On a paging-based nested hypervisor (`kvm_pvm`), guest kernel code is
//! instruction-emulated and a few instructions cannot run at all; the VMM then
//! masks the matching CPUID features and boots the kernel with the matching
//! flags (see `docs/nested-kvm.md` and `guest-kernel/README.md`).

use std::path::Path;
use std::sync::OnceLock;

/// The kind of KVM underneath the VMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostKind {
    /// KVM on hardware virtualization (VMX/SVM).
    Hardware,
    /// A nested, paging-based KVM whose guest kernel mode is emulated.
    NestedEmulated,
}

impl HostKind {
    /// Detects the host kind once per process: `LITTLE_HOST_KIND=hardware|nested`
    /// overrides, otherwise the `kvm_pvm` module marks a nested host.
    pub fn detect() -> HostKind {
        static KIND: OnceLock<HostKind> = OnceLock::new();
        *KIND.get_or_init(|| {
            let kind = match std::env::var("LITTLE_HOST_KIND").as_deref() {
                Ok("nested") => HostKind::NestedEmulated,
                Ok("hardware") => HostKind::Hardware,
                _ if Path::new("/sys/module/kvm_pvm").exists() => HostKind::NestedEmulated,
                _ => HostKind::Hardware,
            };
            if kind == HostKind::NestedEmulated {
                tracing::info!(
                    "nested emulated KVM host (kvm_pvm): masking SMAP, POPCNT, CX16, XSAVE/AVX, \
                     ERMS/FSRM and hypercall PV features; guest kernel time is emulated"
                );
            }
            kind
        })
    }

    /// A short name for logs and benchmark reports.
    pub fn name(self) -> &'static str {
        match self {
            HostKind::Hardware => "hardware",
            HostKind::NestedEmulated => "nested-emulated",
        }
    }
}
