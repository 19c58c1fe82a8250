//! little.cloud's virtual machine monitor.
//!
//! A small KVM VMM in the style of Firecracker: it boots an uncompressed
//! Linux `vmlinux` straight into 64-bit mode (no firmware, no decompressor)
//! with a serial console, an i8042 reset path and virtio-mmio devices.
//!
//! ```no_run
//! use vmm::{builder, config::VmConfig};
//!
//! let mut config = VmConfig::new("target/guest-kernel/vmlinux");
//! config.initrd = Some("initramfs.cpio".into());
//! config.mem_mib = 128;
//! let exit = builder::run(config).expect("guest boots");
//! println!("guest ended: {exit:?}");
//! ```

pub mod api;
pub mod arch;
pub mod builder;
pub mod cli;
pub mod config;
pub mod devices;
pub mod event_loop;
pub mod footprint;
pub mod host;
pub mod jail;
pub mod logging;
pub mod seccomp;
pub mod snapshot;
pub mod stop_signal;
pub mod usernet;
pub mod vmm;
pub mod vstate;

pub use vmm_api::error_chain;
