//! The jail a `vmm` puts itself in before a guest runs (`--jail-root`).
//!
//! In the spirit of Firecracker's jailer, but done by the VMM itself at the
//! top of `main`, while it has one thread and has opened nothing:
//!
//! 1. join the given cgroups (the caller sized them);
//! 2. without `--jail-user`, enter a new user namespace that maps the
//!    caller's uid and gid to 0 (so an unprivileged caller can build the
//!    jail); then new mount, PID, IPC and UTS namespaces;
//! 3. fork: the parent writes the child's pid to stdout and exits 0; the
//!    child is PID 1 of its PID namespace and becomes the VMM;
//! 4. close every inherited descriptor but stdio, mount the binds and a
//!    private `/proc` under the root, open `/dev/kvm`, `pivot_root` into
//!    the root and detach the host's tree;
//! 5. set rlimits, drop to the jail's uid and gid with no supplementary
//!    groups and no capabilities, and set `no_new_privs`.
//!
//! The guest's first instruction, and a standby VMM's wait for work, come
//! after all of this, so it costs nothing on the wake path. What the VMM
//! opens later (snapshot, drives, sockets) it opens by its path inside the
//! jail, with the jail's uid.

mod sys;

use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;
use std::sync::OnceLock;

/// Errors of building the jail.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The root is not a folder.
    #[error("the jail root {0} is not a folder")]
    Root(PathBuf),
    /// A `--jail-bind` is malformed.
    #[error("{0:?} is not HOST=JAIL with an absolute JAIL path without `..`")]
    BindSpec(String),
    /// A `--jail-user` is malformed.
    #[error("{0:?} is not UID:GID")]
    UserSpec(String),
    /// A step failed.
    #[error("cannot {0}")]
    Step(String, #[source] std::io::Error),
}

fn step(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |e| Error::Step(what, e)
}

/// A host path to show inside the jail (`HOST=JAIL`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BindSpec {
    /// The file or folder on the host.
    pub host: PathBuf,
    /// Its absolute path inside the jail.
    pub jail: PathBuf,
}

impl FromStr for BindSpec {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = || Error::BindSpec(s.to_owned());
        let (host, jail) = s.rsplit_once('=').ok_or_else(bad)?;
        let jail = PathBuf::from(jail);
        let plain = jail
            .components()
            .skip(1)
            .all(|c| matches!(c, Component::Normal(_)));
        if host.is_empty() || !jail.is_absolute() || !plain || jail == Path::new("/") {
            return Err(bad());
        }
        Ok(Self {
            host: host.into(),
            jail,
        })
    }
}

/// The user and group the VMM runs as (`UID:GID`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct User {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

impl FromStr for User {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = || Error::UserSpec(s.to_owned());
        let (uid, gid) = s.split_once(':').ok_or_else(bad)?;
        let user = Self {
            uid: uid.parse().map_err(|_| bad())?,
            gid: gid.parse().map_err(|_| bad())?,
        };
        if user.uid == 0 || user.gid == 0 {
            return Err(bad());
        }
        Ok(user)
    }
}

/// What the jail holds.
#[derive(Clone, Debug, Default)]
pub struct Config {
    /// The folder that becomes `/`.
    pub root: PathBuf,
    /// Run as this user; `None`: a user namespace, as root inside it.
    pub user: Option<User>,
    /// cgroup folders to join.
    pub cgroups: Vec<PathBuf>,
    /// Read-write binds.
    pub binds: Vec<BindSpec>,
    /// Read-only binds.
    pub binds_ro: Vec<BindSpec>,
}

/// The most file descriptors a jailed VMM may hold: its network stack's
/// connections (1024 at most) with room for its devices and sockets.
pub const MAX_FILES: u64 = 2048;

static KVM: OnceLock<OwnedFd> = OnceLock::new();
static PAGEMAP: OnceLock<std::fs::File> = OnceLock::new();

/// `/dev/kvm`, opened before the VMM left the host's tree; `None` when it
/// is not jailed.
pub fn kvm_fd() -> Option<BorrowedFd<'static>> {
    KVM.get().map(|fd| fd.as_fd())
}

/// `/proc/self/pagemap` (which a diff snapshot reads), opened before the
/// VMM changed its user: the kernel then makes the process non-dumpable,
/// and its `/proc/self` files root's. `None` when it is not jailed.
pub fn pagemap() -> Option<&'static std::fs::File> {
    PAGEMAP.get()
}

/// Builds the jail and returns inside it, as the jailed VMM. The process
/// that called it prints the VMM's pid and exits in `enter`, never
/// returning. Must run before the VMM starts a thread.
pub fn enter(config: &Config) -> Result<(), Error> {
    if !config.root.is_dir() {
        return Err(Error::Root(config.root.clone()));
    }
    // Facts from the host's /sys, read while it is still visible.
    crate::host::HostKind::detect();
    let pid = std::process::id().to_string();
    for cgroup in &config.cgroups {
        std::fs::write(cgroup.join("cgroup.procs"), &pid)
            .map_err(step(format!("join the cgroup {}", cgroup.display())))?;
    }
    if config.user.is_none() {
        let (uid, gid) = sys::ids();
        sys::unshare(libc::CLONE_NEWUSER).map_err(step("enter a user namespace"))?;
        std::fs::write("/proc/self/setgroups", "deny").map_err(step("deny setgroups"))?;
        std::fs::write("/proc/self/uid_map", format!("0 {uid} 1")).map_err(step("map the uid"))?;
        std::fs::write("/proc/self/gid_map", format!("0 {gid} 1")).map_err(step("map the gid"))?;
    }
    sys::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS)
        .map_err(step("enter new mount, PID, IPC and UTS namespaces"))?;
    match sys::fork().map_err(step("fork the jailed vmm"))? {
        sys::Forked::Parent(child) => {
            let mut out = std::io::stdout().lock();
            let code = match writeln!(out, "{child}").and_then(|()| out.flush()) {
                Ok(()) => 0,
                Err(_) => 1,
            };
            std::process::exit(code);
        }
        sys::Forked::Child => {}
    }
    sys::close_from(3).map_err(step("close inherited descriptors"))?;
    build_root(config)?;
    let kvm = sys::open_rw(Path::new("/dev/kvm")).map_err(step("open /dev/kvm"))?;
    let _ = KVM.set(kvm);
    pivot(&config.root)?;
    let pagemap =
        std::fs::File::open("/proc/self/pagemap").map_err(step("open /proc/self/pagemap"))?;
    let _ = PAGEMAP.set(pagemap);
    sys::sethostname("little").map_err(step("set the host name"))?;
    sys::setrlimit(libc::RLIMIT_NOFILE, MAX_FILES).map_err(step("limit open files"))?;
    sys::setrlimit(libc::RLIMIT_CORE, 0).map_err(step("disable core dumps"))?;
    sys::drop_bounding_set().map_err(step("drop the capability bounding set"))?;
    if let Some(user) = config.user {
        sys::become_user(user.uid, user.gid)
            .map_err(step(format!("become {}:{}", user.uid, user.gid)))?;
    }
    sys::clear_capabilities().map_err(step("drop capabilities"))?;
    sys::no_new_privs().map_err(step("set no_new_privs"))?;
    Ok(())
}

/// In the new mount namespace: stops propagation to the host, makes the
/// root a mount point, mounts every bind and a `/proc` for the new PID
/// namespace under it.
fn build_root(config: &Config) -> Result<(), Error> {
    let root = &config.root;
    sys::mount(None, Path::new("/"), None, libc::MS_REC | libc::MS_PRIVATE)
        .map_err(step("make the host's mounts private"))?;
    sys::mount(Some(root), root, None, libc::MS_BIND)
        .map_err(step(format!("bind {} onto itself", root.display())))?;
    let hardening = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    let binds = config
        .binds
        .iter()
        .map(|b| (b, 0))
        .chain(config.binds_ro.iter().map(|b| (b, libc::MS_RDONLY)));
    for (bind, ro) in binds {
        let target = inside(root, &bind.jail);
        let what = || format!("bind {} at {}", bind.host.display(), bind.jail.display());
        make_target(&bind.host, &target).map_err(step(what()))?;
        sys::mount(Some(&bind.host), &target, None, libc::MS_BIND).map_err(step(what()))?;
        sys::mount(
            None,
            &target,
            None,
            libc::MS_BIND | libc::MS_REMOUNT | hardening | ro,
        )
        .map_err(step(what()))?;
    }
    let proc = root.join("proc");
    std::fs::create_dir_all(&proc).map_err(step("create /proc"))?;
    sys::mount(
        Some(Path::new("proc")),
        &proc,
        Some("proc"),
        hardening | libc::MS_RDONLY,
    )
    .map_err(step("mount /proc"))?;
    Ok(())
}

/// `path` (absolute, checked by [`BindSpec`]) under `root`.
fn inside(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

/// Creates the mount point for `host` at `target`: a folder for a folder,
/// an empty file otherwise, and the folders above it.
fn make_target(host: &Path, target: &Path) -> std::io::Result<()> {
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent)?;
    }
    if std::fs::metadata(host)?.is_dir() {
        std::fs::create_dir_all(target)
    } else {
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(target)
            .map(drop)
    }
}

/// Makes `root` the process's `/` and detaches the host's tree.
fn pivot(root: &Path) -> Result<(), Error> {
    std::env::set_current_dir(root).map_err(step("enter the jail root"))?;
    sys::pivot_root(Path::new("."), Path::new(".")).map_err(step("pivot_root"))?;
    sys::detach(Path::new(".")).map_err(step("detach the host's tree"))?;
    std::env::set_current_dir("/").map_err(step("enter /"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binds_and_users_parse_and_reject_garbage() {
        let bind: BindSpec = "/a/b=c=/log".parse().expect("a valid bind");
        assert_eq!(bind.host, Path::new("/a/b=c"));
        assert_eq!(bind.jail, Path::new("/log"));
        for bad in ["", "/a", "/a=", "/a=log", "/a=/", "/a=/x/../y", "=/x"] {
            assert!(bad.parse::<BindSpec>().is_err(), "{bad:?}");
        }
        let user: User = "3000001:3000002".parse().expect("a valid user");
        assert_eq!((user.uid, user.gid), (3000001, 3000002));
        for bad in ["", "1", "0:5", "5:0", "a:b", "1:2:3"] {
            assert!(bad.parse::<User>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_root_that_is_not_a_folder_is_refused_before_anything_changes() {
        let config = Config {
            root: "/nonexistent/jail".into(),
            ..Config::default()
        };
        assert!(matches!(enter(&config), Err(Error::Root(_))));
    }
}
