//! little.cloud's platform: the `little` daemon and its CLI.
//!
//! `little deploy` imports an OCI image ([`image_tools`]), boots it once in
//! a `vmm` with the agent's `ready_port=` set to the app's port, and
//! snapshots it as soon as the agent reports `READY` ([`deploy`]). `little
//! serve` ([`daemon`]) listens on every app's host port ([`app`]); a
//! connection goes to a running instance with a free concurrency slot, or
//! wakes one by restoring the snapshot in a pre-spawned standby `vmm`
//! ([`instance`]). The accepted socket itself is passed to the instance's
//! VMM (`accept <guest_port>` with SCM_RIGHTS on its control socket), so no
//! byte is copied by the daemon. The VMM's command line and control socket
//! come from [`vmm_api`]; every VM of an app gets the devices of [`vm`].
//! Every VMM is jailed ([`jail`]: its own root, namespaces, an unprivileged
//! user, a cgroup from [`cgroup`]) and tracked as a [`process`] the daemon
//! reaps. Idle instances are stopped after the app's idle timeout. Apps live in an embedded database ([`db`]), so a
//! restarted daemon serves them again; counters are exported in the
//! Prometheus text format ([`metrics`]). The CLI talks to the daemon with
//! one JSON line each way over a Unix socket ([`api`]).

// CONTRIBUTING.md: no unwrap() outside tests; tests may unwrap.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod api;
pub mod app;
pub mod appfile;
pub mod cgroup;
pub mod daemon;
pub mod db;
pub mod deploy;
pub mod fill;
pub mod home;
pub mod instance;
pub mod jail;
pub mod logs;
pub mod metrics;
pub mod peer;
pub mod process;
pub mod settings;
pub mod suspend;
mod sync;
pub mod vm;
pub mod volume;
