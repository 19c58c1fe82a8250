//! KVM state: the VM and its vCPUs.

pub mod kick;
pub mod persist;
pub mod vcpu;
pub mod vcpu_thread;
pub mod vm;
