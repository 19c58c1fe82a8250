//! The filesystems PID 1 mounts, in order.

use core::ffi::CStr;

/// `MS_NOSUID`.
pub const MS_NOSUID: usize = 2;
/// `MS_NODEV`.
pub const MS_NODEV: usize = 4;
/// `MS_NOEXEC`.
pub const MS_NOEXEC: usize = 8;
/// `EBUSY`: the filesystem is already mounted there (devtmpfs when the
/// kernel mounted it itself).
pub const EBUSY: i32 = 16;
/// `EEXIST`, from `mkdir` on an existing directory.
pub const EEXIST: i32 = 17;

/// One `mount(2)` call, preceded by `mkdir(target, dir_mode)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mount {
    /// The step's name in reports, e.g. `mount /proc`.
    pub what: &'static str,
    /// Source (a label for virtual filesystems).
    pub source: &'static CStr,
    /// Mount point.
    pub target: &'static CStr,
    /// Filesystem type.
    pub fstype: &'static CStr,
    /// `MS_*` flags.
    pub flags: usize,
    /// Filesystem options.
    pub data: Option<&'static CStr>,
    /// Mode for creating the mount point if it is missing.
    pub dir_mode: u32,
    /// Whether a failure stops the boot; the others are reported in
    /// verbose mode and skipped.
    pub required: bool,
}

const HARDENED: usize = MS_NOSUID | MS_NODEV | MS_NOEXEC;

/// Mounted first: the command line and the rest of boot need `/proc`.
pub const PROC: Mount = Mount {
    what: "mount /proc",
    source: c"proc",
    target: c"/proc",
    fstype: c"proc",
    flags: HARDENED,
    data: None,
    dir_mode: 0o555,
    required: true,
};

/// `/dev`, also mounted early when the kernel gave init no console fds.
pub const DEV: Mount = Mount {
    what: "mount /dev",
    source: c"devtmpfs",
    target: c"/dev",
    fstype: c"devtmpfs",
    flags: MS_NOSUID,
    data: Some(c"mode=0755"),
    dir_mode: 0o755,
    required: true,
};

/// Mounted once the configuration is read, in this order.
pub const REST: [Mount; 6] = [
    Mount {
        what: "mount /sys",
        source: c"sysfs",
        target: c"/sys",
        fstype: c"sysfs",
        flags: HARDENED,
        data: None,
        dir_mode: 0o555,
        required: true,
    },
    DEV,
    Mount {
        what: "mount /dev/pts",
        source: c"devpts",
        target: c"/dev/pts",
        fstype: c"devpts",
        flags: MS_NOSUID | MS_NOEXEC,
        data: Some(c"newinstance,ptmxmode=0666,mode=0620,gid=5"),
        dir_mode: 0o755,
        required: false,
    },
    Mount {
        what: "mount /dev/shm",
        source: c"shm",
        target: c"/dev/shm",
        fstype: c"tmpfs",
        flags: MS_NOSUID | MS_NODEV,
        data: Some(c"mode=1777"),
        dir_mode: 0o1777,
        required: false,
    },
    Mount {
        what: "mount /tmp",
        source: c"tmpfs",
        target: c"/tmp",
        fstype: c"tmpfs",
        flags: MS_NOSUID | MS_NODEV,
        data: Some(c"mode=1777"),
        dir_mode: 0o1777,
        required: true,
    },
    Mount {
        what: "mount /run",
        source: c"tmpfs",
        target: c"/run",
        fstype: c"tmpfs",
        flags: MS_NOSUID | MS_NODEV,
        data: Some(c"mode=0755"),
        dir_mode: 0o755,
        required: true,
    },
];

/// Whether a `mount` errno counts as success.
pub fn mount_ok(errno: i32) -> bool {
    errno == EBUSY
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_are_mounted_before_children() {
        let all: Vec<&Mount> = core::iter::once(&PROC).chain(REST.iter()).collect();
        for (i, m) in all.iter().enumerate() {
            let target = m.target.to_bytes();
            for later in &all[i + 1..] {
                let parent = later.target.to_bytes();
                assert!(
                    !(target.starts_with(parent) && target.get(parent.len()) == Some(&b'/')),
                    "{:?} is mounted before its parent {:?}",
                    m.target,
                    later.target
                );
            }
        }
    }

    #[test]
    fn the_promised_mounts_are_there() {
        let expect: [(&CStr, &CStr); 7] = [
            (c"/proc", c"proc"),
            (c"/sys", c"sysfs"),
            (c"/dev", c"devtmpfs"),
            (c"/dev/pts", c"devpts"),
            (c"/dev/shm", c"tmpfs"),
            (c"/tmp", c"tmpfs"),
            (c"/run", c"tmpfs"),
        ];
        let all: Vec<(&CStr, &CStr)> = core::iter::once(&PROC)
            .chain(REST.iter())
            .map(|m| (m.target, m.fstype))
            .collect();
        assert_eq!(all, expect);
        let tmp = REST.iter().find(|m| m.target == c"/tmp").unwrap();
        assert_eq!(tmp.data, Some(c"mode=1777"));
    }

    #[test]
    fn only_ebusy_is_tolerated() {
        assert!(mount_ok(EBUSY));
        assert!(!mount_ok(19)); // ENODEV: filesystem not in the kernel
        assert!(!mount_ok(2));
    }
}
