//! little.cloud image tools: everything that turns user input into a root
//! filesystem a guest boots from.
//!
//! Today: [`initramfs`], the newc cpio archives the guest kernel unpacks into
//! its root, used to inject the guest agent and small test root filesystems.

pub mod initramfs;
