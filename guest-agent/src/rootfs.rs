//! Booting from a disk root: the `little.root*` knobs and the switch-root
//! plan the agent runs before it starts the entrypoint.
//!
//! | parameter | meaning |
//! |---|---|
//! | `little.root=/dev/vdX` | mount this block device read-only as the image's root (unset: the initramfs stays the root) |
//! | `little.rootfstype=erofs\|ext4\|...` | its filesystem type (default `erofs`) |
//! | `little.overlay=tmpfs\|/dev/vdY` | where writes go: a tmpfs (default), or an ext4 scratch disk |
//!
//! The agent, still running from the initramfs that carries it and its
//! configuration, mounts the root read-only at `/.little/lower`, the
//! overlay's upper and work directories under `/.little/rw`, the overlay at
//! `/.little/root`, moves `/proc`, `/sys`, `/dev`, `/tmp` and `/run` into
//! it and makes it `/` (`MS_MOVE` onto `/`, then `chroot`, as `switch_root`
//! does). The image's filesystem is never written.

use alloc::ffi::CString;
use alloc::vec::Vec;

use crate::cmdline::{strip_quotes, Words};

/// `MS_RDONLY`.
pub const MS_RDONLY: usize = 1;
/// `MS_MOVE`.
pub const MS_MOVE: usize = 8192;
/// Longest accepted device path.
pub const MAX_DEVICE_LEN: usize = 64;

/// Where the image's root is mounted, read-only.
pub const LOWER: &str = "/.little/lower";
/// The overlay's writable filesystem (tmpfs or scratch disk).
pub const RW: &str = "/.little/rw";
/// The new root.
pub const NEW_ROOT: &str = "/.little/root";
/// Mounts the agent made in the initramfs that move into the new root.
pub const MOVED: [&str; 5] = ["/proc", "/sys", "/dev", "/tmp", "/run"];

/// Where the overlay's writes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overlay<'a> {
    /// A tmpfs: writes vanish with the VM.
    Tmpfs,
    /// An ext4-formatted scratch disk (`/dev/vdY`).
    Disk(&'a [u8]),
}

/// The disk-root knobs, borrowing from the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RootOptions<'a> {
    /// `little.root=`: the root device; `None` keeps the initramfs root.
    pub root: Option<&'a [u8]>,
    /// `little.rootfstype=`.
    pub fstype: &'a [u8],
    /// `little.overlay=`.
    pub overlay: Overlay<'a>,
}

impl Default for RootOptions<'_> {
    fn default() -> Self {
        Self {
            root: None,
            fstype: b"erofs",
            overlay: Overlay::Tmpfs,
        }
    }
}

/// A device path the agent accepts: `/dev/` and a plain name.
fn is_device(path: &[u8]) -> bool {
    path.len() <= MAX_DEVICE_LEN
        && path.strip_prefix(b"/dev/").is_some_and(|name| {
            !name.is_empty()
                && name
                    .iter()
                    .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'-' | b'_' | b'.'))
                && !name.windows(2).any(|w| w == b"..")
        })
}

fn is_fstype(t: &[u8]) -> bool {
    (1..=16).contains(&t.len())
        && t.iter()
            .all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

impl<'a> RootOptions<'a> {
    /// Parses the command line. As with the other knobs, a malformed value
    /// is ignored and the previous one (or the default) stays; the last
    /// occurrence wins.
    ///
    /// ```
    /// use guest_agent::rootfs::{Overlay, RootOptions};
    /// let o = RootOptions::parse(b"quiet little.root=/dev/vda little.rootfstype=ext4 little.overlay=/dev/vdc");
    /// assert_eq!(o.root, Some(&b"/dev/vda"[..]));
    /// assert_eq!(o.fstype, b"ext4");
    /// assert_eq!(o.overlay, Overlay::Disk(b"/dev/vdc"));
    /// ```
    pub fn parse(cmdline: &'a [u8]) -> Self {
        let mut o = Self::default();
        for word in Words(cmdline) {
            let Some(i) = word.iter().position(|&b| b == b'=') else {
                continue;
            };
            let (key, value) = (&word[..i], strip_quotes(&word[i + 1..]));
            match key {
                b"little.root" if is_device(value) => o.root = Some(value),
                b"little.rootfstype" if is_fstype(value) => o.fstype = value,
                b"little.overlay" if value == b"tmpfs" => o.overlay = Overlay::Tmpfs,
                b"little.overlay" if is_device(value) => o.overlay = Overlay::Disk(value),
                _ => {}
            }
        }
        o
    }

    /// The switch-root steps, or `None` when the initramfs stays the root.
    pub fn plan(&self) -> Option<Vec<Step>> {
        let root = self.root?;
        let c = |s: &[u8]| CString::new(s).ok();
        let join = |a: &str, b: &str| c([a.as_bytes(), b.as_bytes()].concat().as_slice());
        let mut steps = Vec::new();
        for dir in ["/.little", LOWER, RW, NEW_ROOT] {
            steps.push(Step::Mkdir(c(dir.as_bytes())?));
        }
        steps.push(Step::Mount(MountStep {
            what: "mount root",
            source: c(root)?,
            target: c(LOWER.as_bytes())?,
            fstype: c(self.fstype)?,
            flags: MS_RDONLY,
            data: None,
        }));
        steps.push(Step::Mount(match self.overlay {
            Overlay::Tmpfs => MountStep {
                what: "mount overlay tmpfs",
                source: c(b"tmpfs")?,
                target: c(RW.as_bytes())?,
                fstype: c(b"tmpfs")?,
                flags: 0,
                data: Some(c(b"mode=0755")?),
            },
            Overlay::Disk(dev) => MountStep {
                what: "mount overlay disk",
                source: c(dev)?,
                target: c(RW.as_bytes())?,
                fstype: c(b"ext4")?,
                flags: 0,
                data: None,
            },
        }));
        steps.push(Step::Mkdir(join(RW, "/upper")?));
        steps.push(Step::Mkdir(join(RW, "/work")?));
        let options = [
            "lowerdir=",
            LOWER,
            ",upperdir=",
            RW,
            "/upper,workdir=",
            RW,
            "/work",
        ]
        .concat();
        steps.push(Step::Mount(MountStep {
            what: "mount overlay",
            source: c(b"overlay")?,
            target: c(NEW_ROOT.as_bytes())?,
            fstype: c(b"overlay")?,
            flags: 0,
            data: Some(c(options.as_bytes())?),
        }));
        for (dir, what) in MOVED.iter().zip([
            "move /proc",
            "move /sys",
            "move /dev",
            "move /tmp",
            "move /run",
        ]) {
            steps.push(Step::Mkdir(join(NEW_ROOT, dir)?));
            steps.push(Step::Mount(MountStep {
                what,
                source: c(dir.as_bytes())?,
                target: join(NEW_ROOT, dir)?,
                fstype: c(b"")?,
                flags: MS_MOVE,
                data: None,
            }));
        }
        steps.push(Step::Chdir(c(NEW_ROOT.as_bytes())?));
        steps.push(Step::Mount(MountStep {
            what: "switch root",
            source: c(b".")?,
            target: c(b"/")?,
            fstype: c(b"")?,
            flags: MS_MOVE,
            data: None,
        }));
        steps.push(Step::Chroot(c(b".")?));
        steps.push(Step::Chdir(c(b"/")?));
        Some(steps)
    }
}

/// One `mount(2)` of the plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountStep {
    /// The step's name in reports.
    pub what: &'static str,
    /// Source device or label.
    pub source: CString,
    /// Mount point.
    pub target: CString,
    /// Filesystem type (empty for `MS_MOVE`).
    pub fstype: CString,
    /// `MS_*` flags.
    pub flags: usize,
    /// Filesystem options.
    pub data: Option<CString>,
}

/// One system call of the switch-root plan, run in order; any failure but
/// an existing directory stops the boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// `mkdir(path, 0755)`; `EEXIST` is fine.
    Mkdir(CString),
    /// `mount(2)`.
    Mount(MountStep),
    /// `chdir(2)`.
    Chdir(CString),
    /// `chroot(2)`.
    Chroot(CString),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_the_knob_the_initramfs_stays_root() {
        let o = RootOptions::parse(b"console=ttyS0 root=/dev/vda little.overlay=tmpfs");
        assert_eq!(o.root, None);
        assert_eq!(o.plan(), None);
    }

    #[test]
    fn knobs_parse_and_last_wins() {
        let o = RootOptions::parse(
            b"little.root=/dev/vdb little.root=/dev/vda little.rootfstype=\"ext4\" little.overlay=/dev/vdc little.overlay=tmpfs",
        );
        assert_eq!(o.root, Some(&b"/dev/vda"[..]));
        assert_eq!(o.fstype, b"ext4");
        assert_eq!(o.overlay, Overlay::Tmpfs);
        assert_eq!(RootOptions::parse(b"little.root=/dev/vda").fstype, b"erofs");
    }

    #[test]
    fn malformed_values_are_ignored() {
        for bad in [
            &b"little.root=vda"[..],
            b"little.root=/dev/",
            b"little.root=/etc/passwd",
            b"little.root=/dev/../etc/x",
            b"little.root=\"/dev/vd a\"",
            b"little.root",
        ] {
            assert_eq!(RootOptions::parse(bad).root, None, "{bad:?}");
        }
        let long = [b"little.root=/dev/".as_slice(), &[b'a'; MAX_DEVICE_LEN]].concat();
        assert_eq!(RootOptions::parse(&long).root, None);
        let o =
            RootOptions::parse(b"little.rootfstype=EXT4 little.rootfstype=e,x little.overlay=/tmp");
        assert_eq!(o.fstype, b"erofs");
        assert_eq!(o.overlay, Overlay::Tmpfs);
    }

    fn mounts(steps: &[Step]) -> Vec<&MountStep> {
        steps
            .iter()
            .filter_map(|s| match s {
                Step::Mount(m) => Some(m),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn plan_mounts_root_read_only_and_switches() {
        let o = RootOptions::parse(b"little.root=/dev/vda little.rootfstype=erofs");
        let steps = o.plan().unwrap();
        let m = mounts(&steps);
        assert_eq!(m[0].source.as_bytes(), b"/dev/vda");
        assert_eq!(m[0].target.as_bytes(), LOWER.as_bytes());
        assert_eq!(m[0].fstype.as_bytes(), b"erofs");
        assert_eq!(m[0].flags, MS_RDONLY);
        assert_eq!(m[1].fstype.as_bytes(), b"tmpfs");
        assert_eq!(m[2].fstype.as_bytes(), b"overlay");
        assert_eq!(
            m[2].data.as_ref().unwrap().as_bytes(),
            b"lowerdir=/.little/lower,upperdir=/.little/rw/upper,workdir=/.little/rw/work"
        );
        // Only the root is read-only; every mount the agent made moves.
        let moved: Vec<&[u8]> = m
            .iter()
            .filter(|m| m.flags == MS_MOVE && m.target.as_bytes() != b"/")
            .map(|m| m.source.as_bytes())
            .collect();
        assert_eq!(moved, [&b"/proc"[..], b"/sys", b"/dev", b"/tmp", b"/run"]);
        // The tail is the switch_root dance.
        let n = steps.len();
        assert_eq!(steps[n - 4], Step::Chdir(CString::new(NEW_ROOT).unwrap()));
        assert!(
            matches!(&steps[n - 3], Step::Mount(m) if m.flags == MS_MOVE && m.target.as_bytes() == b"/")
        );
        assert_eq!(steps[n - 2], Step::Chroot(CString::new(".").unwrap()));
        assert_eq!(steps[n - 1], Step::Chdir(CString::new("/").unwrap()));
        // Every directory is made before something is mounted on it.
        for m in &m {
            if m.target.as_bytes() == b"/" {
                continue;
            }
            let made = steps
                .iter()
                .position(|s| *s == Step::Mkdir(m.target.clone()))
                .unwrap();
            let used = steps
                .iter()
                .position(|s| *s == Step::Mount((*m).clone()))
                .unwrap();
            assert!(made < used, "{:?}", m.target);
        }
    }

    #[test]
    fn plan_uses_an_ext4_scratch_disk() {
        let o = RootOptions::parse(b"little.root=/dev/vda little.overlay=/dev/vdc");
        let steps = o.plan().unwrap();
        let m = mounts(&steps);
        assert_eq!(m[1].source.as_bytes(), b"/dev/vdc");
        assert_eq!(m[1].fstype.as_bytes(), b"ext4");
        assert_eq!(m[1].flags, 0);
    }
}
