//! The jail around every VMM the daemon starts: the deploy's first boot,
//! every standby and every restore.
//!
//! Each VMM's root is its own folder (`<app>/boot` or `<app>/i/<id>`),
//! which holds its sockets; the app's files are bound into it under fixed
//! names ([`ROOTFS`], [`SNAPSHOT`], …), read-only except its log folder.
//! When the daemon runs as root, every app gets its own uid and gid
//! ([`app_user`]) and the VMM runs as them; otherwise the VMM runs in a
//! user namespace as the daemon's user. The jail itself is built by the
//! VMM (`vmm --jail-root`, see `vmm_api::launch::Jail`).

use std::path::{Path, PathBuf};

use vmm_api::launch::{Bind, Console, Jail, Start, VmmArgs};

use crate::cgroup::{Cgroups, InstanceCgroup, Limits};
use crate::db::AppRecord;
use crate::vm;

/// The app's base image inside the jail.
pub const ROOTFS: &str = "/rootfs.erofs";
/// The app's snapshot inside the jail.
pub const SNAPSHOT: &str = "/app.snap";
/// The app's suspend file (a diff over [`SNAPSHOT`]) inside the jail of a
/// VMM that resumes it.
pub const SUSPENDED: &str = "/suspend.snap";
/// The guest kernel inside the first boot's jail.
pub const KERNEL: &str = "/vmlinux";
/// The app's initramfs inside the first boot's jail.
pub const INITRD: &str = "/agent.cpio";
/// The VMM's log folder inside the jail (its console file is in it).
pub const LOG_DIR: &str = "/log";
/// The console file's name in the log folder.
pub const CONSOLE: &str = "console.log";

/// The first uid and gid given to apps when the daemon runs as root
/// (`LITTLE_UID_BASE` overrides); app N gets base + N.
pub const DEFAULT_UID_BASE: u32 = 3_000_000;

/// Memory a VMM needs beside its guest's: its heap, the network stack's
/// buffers, page tables and the page cache of the files it reads.
pub const VMM_OVERHEAD_MIB: u64 = 96;

/// The most tasks (threads) a VMM may run: its vCPUs, event loop, control
/// and io_uring workers, with room to spare.
pub const MAX_TASKS: u64 = 128;

/// Errors of preparing a jail.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// A file or folder could not be given to the app's user.
    #[error("cannot give {0} to the app's user")]
    Chown(String, #[source] std::io::Error),
    /// The instance's cgroup could not be made.
    #[error("cannot make the instance's cgroup")]
    Cgroup(#[from] crate::cgroup::CgroupError),
}

/// Whether the daemon runs as root (and can give apps their own users).
pub fn running_as_root() -> bool {
    // SAFETY: geteuid cannot fail and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

/// The first uid for apps.
pub fn uid_base() -> u32 {
    std::env::var("LITTLE_UID_BASE")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|b| *b > 0)
        .unwrap_or(DEFAULT_UID_BASE)
}

/// The uid (and gid) for the app `name`: the one it had, else one past
/// the highest any app has or a deploy under way has `taken` (never
/// reused while an app holds it).
pub fn app_user(records: &[AppRecord], taken: &[u32], name: &str, base: u32) -> u32 {
    if let Some(r) = records
        .iter()
        .find(|r| r.spec.name == name && r.uid >= base)
    {
        return r.uid;
    }
    records
        .iter()
        .map(|r| r.uid)
        .chain(taken.iter().copied())
        .filter(|u| *u >= base)
        .max()
        .map_or(base, |u| u + 1)
}

/// Makes `path` belong to `uid:gid` (when the daemon is root and the app
/// has its own user) with `mode`.
///
/// A file that already is so is left alone: a change of owner or mode
/// changes its ctime even when the values stay the same, and a volume
/// being archived (`tar` checks ctime) gets a standby VMM meanwhile.
pub fn give(path: &Path, user: Option<(u32, u32)>, mode: u32) -> Result<(), JailError> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let err = |e| JailError::Chown(path.display().to_string(), e);
    let meta = std::fs::metadata(path).map_err(err)?;
    if let Some((uid, gid)) = user {
        if (meta.uid(), meta.gid()) != (uid, gid) {
            std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(err)?;
        }
    }
    if meta.mode() & 0o7777 != mode {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(err)?;
    }
    Ok(())
}

/// The user an app's VMMs run as: its own when the daemon is root,
/// `None` (a user namespace as the daemon's user) otherwise.
pub fn user_of(app: &AppRecord) -> Option<(u32, u32)> {
    (running_as_root() && app.uid > 0).then_some((app.uid, app.uid))
}

/// The limits of a VMM whose guest has `memory_mib`.
pub fn limits(memory_mib: u32) -> Limits {
    Limits {
        memory_bytes: (u64::from(memory_mib) + VMM_OVERHEAD_MIB) << 20,
        pids: MAX_TASKS,
        cpu_weight: 100,
    }
}

/// What one VMM's jail holds.
pub struct JailPlan<'a> {
    /// The app.
    pub app: &'a AppRecord,
    /// The VMM's folder (its root).
    pub root: &'a Path,
    /// Its log folder on the host.
    pub logs: &'a Path,
    /// The app's snapshot, for a VMM that restores it (or a diff over it).
    pub snapshot: Option<&'a Path>,
    /// The app's suspend file, for a VMM that resumes it.
    pub suspended: Option<&'a Path>,
    /// The cgroup name (unique per VMM).
    pub cgroup: String,
}

impl JailPlan<'_> {
    /// Turns `args`, a command line with host paths (the base image, the
    /// sockets in [`Self::root`], the console in [`Self::logs`], a boot's
    /// kernel and initramfs), into the same VMM jailed: those files bound
    /// in under fixed names and named by them. Prepares the folders and the
    /// agent socket (owned by the app's user, 0700 and 0600) and the
    /// cgroup, which is returned to be removed when the VMM is gone.
    pub fn confine(
        self,
        mut args: VmmArgs,
        cgroups: Option<&Cgroups>,
    ) -> Result<(VmmArgs, Option<InstanceCgroup>), JailError> {
        let user = user_of(self.app);
        give(self.root, user, 0o700)?;
        give(self.logs, user, 0o700)?;
        give(&vm::agent_socket(self.root), user, 0o600)?;
        let group = cgroups
            .map(|c| c.create(&self.cgroup, limits(self.app.spec.memory_mib)))
            .transpose()?;
        let bind = |host: &Path, jail: &str, read_only| Bind {
            host: host.to_owned(),
            jail: jail.into(),
            read_only,
        };
        let mut binds = vec![
            bind(&self.app.rootfs, ROOTFS, true),
            bind(self.logs, LOG_DIR, false),
        ];
        if let Some(snapshot) = self.snapshot {
            binds.push(bind(snapshot, SNAPSHOT, true));
        }
        if let Some(suspended) = self.suspended {
            binds.push(bind(suspended, SUSPENDED, true));
        }
        if let Start::Boot(boot) = &mut args.start {
            binds.push(bind(&boot.kernel, KERNEL, true));
            boot.kernel = KERNEL.into();
            if let Some(initrd) = &mut boot.initrd {
                binds.push(bind(initrd, INITRD, true));
                *initrd = INITRD.into();
            }
        }
        // Volumes read-write, each its app's alone.
        let mut volumes = Vec::new();
        for (i, file) in self.app.volume_files.iter().enumerate() {
            give(file, user, 0o600)?;
            let inside = volume(i);
            binds.push(bind(file, &inside, false));
            volumes.push(PathBuf::from(inside));
        }
        let root = Path::new("/");
        args.devices = vm::devices(Path::new(ROOTFS), &volumes, root);
        if args.api_sock.is_some() {
            args.api_sock = Some(vm::api_socket(root));
        }
        if let Console::File { path, .. } = &mut args.console {
            *path = console();
        }
        args.jail = Some(Jail {
            root: self.root.to_owned(),
            user,
            cgroups: group.as_ref().map(|g| g.dirs()).unwrap_or_default(),
            binds,
        });
        Ok((args, group))
    }
}

/// Where the `i`-th volume's image is inside the jail.
pub fn volume(i: usize) -> String {
    format!("/vol{i}.ext4")
}

/// The console file inside the jail.
pub fn console() -> PathBuf {
    Path::new(LOG_DIR).join(CONSOLE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::AppSpec;

    fn record(name: &str, uid: u32) -> AppRecord {
        AppRecord {
            spec: serde_json::from_value::<AppSpec>(serde_json::json!({
                "name": name, "image": "i", "port": 80, "listen": "127.0.0.1:0",
                "memory_mib": 128, "concurrency": 1, "min": 0, "max": 1,
                "idle_timeout_ms": 1000, "env": [],
            }))
            .unwrap(),
            listen: String::new(),
            dir: PathBuf::new(),
            snapshot: PathBuf::new(),
            rootfs: PathBuf::new(),
            deployed_unix: 0,
            uid,
            volume_files: vec![],
        }
    }

    #[test]
    fn every_app_gets_its_own_user_and_keeps_it() {
        let base = 3_000_000;
        assert_eq!(app_user(&[], &[], "a", base), base);
        let apps = [record("a", base), record("b", base + 1), record("old", 0)];
        assert_eq!(app_user(&apps, &[], "a", base), base);
        assert_eq!(app_user(&apps, &[], "b", base), base + 1);
        assert_eq!(app_user(&apps, &[], "c", base), base + 2);
        assert_eq!(app_user(&apps, &[], "old", base), base + 2);
        // A deploy under way holds its uid before it is in the database.
        assert_eq!(app_user(&apps, &[base + 2], "c", base), base + 3);
        assert_eq!(app_user(&apps, &[base + 7], "a", base), base);
    }

    #[test]
    fn giving_a_file_what_it_has_leaves_its_ctime() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vol.ext4");
        std::fs::write(&path, b"x").unwrap();
        give(&path, None, 0o600).unwrap();
        let ctime = |p: &Path| {
            let m = std::fs::metadata(p).unwrap();
            (m.ctime(), m.ctime_nsec(), m.mode() & 0o777)
        };
        let before = ctime(&path);
        std::thread::sleep(std::time::Duration::from_millis(20));
        let me = (
            std::fs::metadata(&path).unwrap().uid(),
            std::fs::metadata(&path).unwrap().gid(),
        );
        give(&path, Some(me), 0o600).unwrap();
        assert_eq!(ctime(&path), before, "nothing to change, nothing changed");
        give(&path, None, 0o640).unwrap();
        assert_eq!(ctime(&path).2, 0o640);
    }

    #[test]
    fn limits_leave_room_for_the_vmm() {
        let l = limits(128);
        assert_eq!(l.memory_bytes, (128 + VMM_OVERHEAD_MIB) << 20);
        assert_eq!(l.pids, MAX_TASKS);
    }
}
