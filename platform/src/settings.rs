//! Where the platform finds its tools and keeps its files.

use std::path::PathBuf;

use crate::cgroup::Cgroups;

/// Where the daemon finds its tools and keeps its files.
#[derive(Clone, Debug)]
pub struct Settings {
    /// State folder: database, image store, apps, socket.
    pub home: PathBuf,
    /// The guest kernel (uncompressed vmlinux).
    pub kernel: PathBuf,
    /// The `vmm` binary.
    pub vmm: PathBuf,
    /// The guest agent binary (static).
    pub agent: PathBuf,
    /// Standby VMMs kept per app (pre-spawned, no guest) for fast wakes.
    pub standby: usize,
    /// Jail every VMM (namespaces, its own root, an unprivileged user, no
    /// capabilities, a cgroup); off only for debugging.
    pub jail: bool,
    /// The daemon's cgroup tree (set by the daemon when jailing).
    pub cgroups: Option<Cgroups>,
}

impl Settings {
    /// The daemon's API socket.
    pub fn socket(&self) -> PathBuf {
        self.home.join("little.sock")
    }
}
