//! The logic of little.cloud's guest agent, the PID 1 of every microVM.
//!
//! This library is `no_std` (with `alloc`) so the same code runs in the
//! static, libc-free `guest-agent` binary and in host unit tests. It holds
//! the decisions; the binary holds the raw system calls. See the crate's
//! README for what the agent does at boot and at shutdown.

#![cfg_attr(not(test), no_std)]
// CONTRIBUTING.md: no unwrap() outside tests; tests may unwrap.
#![cfg_attr(test, allow(clippy::unwrap_used))]

extern crate alloc;

pub mod cmdline;
pub mod config;
pub mod dns;
pub mod env;
pub mod mounts;
pub mod protocol;
pub mod report;
pub mod rootfs;
pub mod signals;
pub mod status;
pub mod volume;
