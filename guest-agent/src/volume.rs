//! Persistent volumes: the `volume=` entries of the configuration and the
//! decisions the agent makes while attaching them.
//!
//! The host attaches each volume as a virtio-blk disk holding an ext4
//! filesystem, with the volume's name as the disk's serial (virtio
//! `GET_ID`, `/sys/block/vdX/serial` in the guest), and writes one
//! `volume=SERIAL:/guest/path` line per volume. After the root switch and
//! before the entrypoint starts, the agent, for each volume in file order:
//!
//! 1. finds the `vd*` disk whose serial is `SERIAL`;
//! 2. mounts it (ext4, `MS_NOATIME`) on `/run/little/volumes/SERIAL`;
//! 3. if the volume's root holds nothing but `lost+found`, copies what the
//!    image has at the path into it (Docker's rule for a new volume), the
//!    root taking the owner and mode of the image's directory, and syncs
//!    the volume;
//! 4. creates the path (`mkdir -p`, parents 0755) and moves the mount there
//!    (`MS_MOVE`).
//!
//! A volume nested in another one must come after it in the file.

use alloc::vec::Vec;
use core::ffi::CStr;
use core::fmt;

/// Most `volume=` lines.
pub const MAX_VOLUMES: usize = 16;
/// Longest serial: the virtio-blk `GET_ID` field is 20 bytes.
pub const MAX_SERIAL_LEN: usize = 20;
/// Longest guest path, terminating NUL excluded (`PATH_MAX` - 1).
pub const MAX_PATH_LEN: usize = 4095;
/// Longest name in a directory (`NAME_MAX`).
pub const NAME_MAX: usize = 255;
/// Deepest directory nesting the copy follows below the volume's root.
pub const MAX_DEPTH: usize = 64;
/// Where each volume is mounted before it moves to its path.
pub const STAGING: &str = "/run/little/volumes";
/// The directory `mkfs.ext4` leaves in a new filesystem.
pub const LOST_AND_FOUND: &[u8] = b"lost+found";

/// One `volume=SERIAL:/guest/path` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    /// The disk's virtio serial: 1 to [`MAX_SERIAL_LEN`] bytes of
    /// `[A-Za-z0-9_-]`.
    pub serial: Vec<u8>,
    /// Where the volume appears in the guest: absolute, not `/`, without
    /// empty, `.` or `..` components.
    pub path: Vec<u8>,
}

impl Volume {
    /// Parses the value of a `volume=` line: the serial, `:`, the path
    /// (the rest of the value, so a path may hold `:`).
    ///
    /// ```
    /// use guest_agent::volume::Volume;
    /// let v = Volume::parse(b"pg-data:/var/lib/postgresql/data").unwrap();
    /// assert_eq!(v.serial, b"pg-data");
    /// assert_eq!(v.path, b"/var/lib/postgresql/data");
    /// assert_eq!(Volume::parse(b"pg-data:relative"), None);
    /// ```
    pub fn parse(value: &[u8]) -> Option<Self> {
        let colon = value.iter().position(|&b| b == b':')?;
        let (serial, path) = (&value[..colon], &value[colon + 1..]);
        (is_serial(serial) && is_path(path)).then(|| Self {
            serial: serial.to_vec(),
            path: path.to_vec(),
        })
    }

    /// The staging mount point, `/run/little/volumes/SERIAL`.
    pub fn staging(&self) -> Vec<u8> {
        [STAGING.as_bytes(), b"/", &self.serial].concat()
    }
}

/// Whether `serial` is a valid volume serial.
pub fn is_serial(serial: &[u8]) -> bool {
    (1..=MAX_SERIAL_LEN).contains(&serial.len())
        && serial
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Whether `path` is a valid volume path: absolute, at most
/// [`MAX_PATH_LEN`] bytes, not the root, every component a real name.
pub fn is_path(path: &[u8]) -> bool {
    path.len() <= MAX_PATH_LEN
        && path.len() > 1
        && path[0] == b'/'
        && path[1..]
            .split(|&b| b == b'/')
            .all(|part| !part.is_empty() && part != b"." && part != b".." && part.len() <= NAME_MAX)
}

/// The directories `mkdir -p path` creates, outermost first: for
/// `/a/b/c`, `/a`, `/a/b` and `/a/b/c`.
pub fn prefixes(path: &[u8]) -> impl Iterator<Item = &[u8]> {
    (1..=path.len())
        .filter(move |&end| end == path.len() || path[end] == b'/')
        .map(move |end| &path[..end])
}

/// Whether the contents of a `/sys/block/vdX/serial` file name `serial`.
/// The kernel ends the value with a newline; a serial shorter than the
/// 20-byte field may also carry NUL padding.
pub fn serial_matches(contents: &[u8], serial: &[u8]) -> bool {
    let end = contents
        .iter()
        .rposition(|&b| b != b'\n' && b != 0)
        .map_or(0, |i| i + 1);
    &contents[..end] == serial
}

/// Whether a block device name is a virtio-blk disk (`vda`, `vdab`, ...),
/// not a partition.
pub fn is_virtio_disk(name: &[u8]) -> bool {
    name.len() > 2 && name.starts_with(b"vd") && name[2..].iter().all(u8::is_ascii_lowercase)
}

/// Whether a directory entry leaves a volume's root "new": `.`, `..` and
/// `lost+found`.
pub fn counts_as_empty(name: &[u8]) -> bool {
    name == b"." || name == b".." || name == LOST_AND_FOUND
}

/// What a directory entry is, from its `st_mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A directory: created, filled, then given its owner, mode and times.
    Dir,
    /// A regular file: its bytes are copied.
    File,
    /// A symbolic link: its target is copied, never followed.
    Symlink,
    /// A FIFO, socket, character or block device: recreated with `mknod`.
    Special,
}

impl Kind {
    /// The kind for `st_mode`, or `None` for a type Linux does not have.
    pub fn from_mode(mode: u32) -> Option<Self> {
        match mode & S_IFMT {
            S_IFDIR => Some(Self::Dir),
            S_IFREG => Some(Self::File),
            S_IFLNK => Some(Self::Symlink),
            S_IFIFO | S_IFCHR | S_IFBLK | S_IFSOCK => Some(Self::Special),
            _ => None,
        }
    }
}

/// File type bits of `st_mode`.
pub const S_IFMT: u32 = 0o170_000;
/// Directory.
pub const S_IFDIR: u32 = 0o040_000;
/// Regular file.
pub const S_IFREG: u32 = 0o100_000;
/// Symbolic link.
pub const S_IFLNK: u32 = 0o120_000;
/// FIFO.
pub const S_IFIFO: u32 = 0o010_000;
/// Character device.
pub const S_IFCHR: u32 = 0o020_000;
/// Block device.
pub const S_IFBLK: u32 = 0o060_000;
/// Socket.
pub const S_IFSOCK: u32 = 0o140_000;
/// Permission bits, setuid, setgid and sticky included.
pub const S_IPERM: u32 = 0o7777;

/// One entry of a `getdents64` buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dirent<'a> {
    /// The entry's name (not `.`-filtered).
    pub name: &'a CStr,
}

/// The entries of a `getdents64` buffer (`struct linux_dirent64`: `u64
/// d_ino`, `i64 d_off`, `u16 d_reclen`, `u8 d_type`, then the
/// NUL-terminated name, padded to `d_reclen`). A malformed record ends
/// the iteration with `Err`.
pub struct Dirents<'a>(pub &'a [u8]);

/// A `getdents64` record that does not fit its buffer or has no
/// NUL-terminated name of at most [`NAME_MAX`] bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadDirent;

impl<'a> Iterator for Dirents<'a> {
    type Item = Result<Dirent<'a>, BadDirent>;

    fn next(&mut self) -> Option<Self::Item> {
        const NAME_AT: usize = 19;
        if self.0.is_empty() {
            return None;
        }
        let record = self
            .0
            .get(16..18)
            .map(|b| usize::from(u16::from_ne_bytes([b[0], b[1]])))
            .filter(|&len| len > NAME_AT && len <= self.0.len())
            .and_then(|len| {
                let name = &self.0[NAME_AT..len];
                let nul = name.iter().position(|&b| b == 0)?;
                let name = CStr::from_bytes_with_nul(&name[..=nul]).ok()?;
                (nul <= NAME_MAX).then_some((len, name))
            });
        match record {
            Some((len, name)) => {
                self.0 = &self.0[len..];
                Some(Ok(Dirent { name }))
            }
            None => {
                self.0 = &[];
                Some(Err(BadDirent))
            }
        }
    }
}

/// Why a volume could not be attached; the boot stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Problem {
    /// No `vd*` disk has this serial.
    NoDisk,
    /// A system call failed.
    Step {
        /// The step, e.g. `mount`.
        what: &'static str,
        /// Its errno.
        errno: i32,
    },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoDisk => f.write_str("no disk with this serial"),
            Self::Step { what, errno } => write!(f, "{what} failed: errno {errno}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_splits_at_the_first_colon() {
        let v = Volume::parse(b"a_B-9:/srv/x:y").unwrap();
        assert_eq!(v.serial, b"a_B-9");
        assert_eq!(v.path, b"/srv/x:y");
        assert_eq!(v.staging(), b"/run/little/volumes/a_B-9");
        let longest = Volume::parse(b"abcdefghij0123456789:/d").unwrap();
        assert_eq!(longest.serial.len(), MAX_SERIAL_LEN);
    }

    #[test]
    fn parse_rejects_bad_serials_and_paths() {
        for bad in [
            &b"noseparator"[..],
            b":/data",
            b"vol0:",
            b"abcdefghij0123456789x:/d",
            b"vol.0:/d",
            b"vol 0:/d",
            b"vol/0:/d",
            b"vol0:data",
            b"vol0:/",
            b"vol0://data",
            b"vol0:/data/",
            b"vol0:/a//b",
            b"vol0:/a/./b",
            b"vol0:/a/../b",
            b"vol0:/..",
        ] {
            assert_eq!(Volume::parse(bad), None, "{bad:?}");
        }
        let long_name = [b"v:/".as_slice(), &[b'n'; NAME_MAX + 1]].concat();
        assert_eq!(Volume::parse(&long_name), None);
        let mut long_path = b"v:".to_vec();
        while long_path.len() <= MAX_PATH_LEN + 2 {
            long_path.extend_from_slice(b"/abcdefg");
        }
        assert_eq!(Volume::parse(&long_path), None);
        // Dots inside names are names.
        assert!(Volume::parse(b"v:/a/..b/.c/...").is_some());
    }

    #[test]
    fn prefixes_are_outermost_first() {
        let all: Vec<&[u8]> = prefixes(b"/var/lib/pg").collect();
        assert_eq!(all, [&b"/var"[..], b"/var/lib", b"/var/lib/pg"]);
        let one: Vec<&[u8]> = prefixes(b"/d").collect();
        assert_eq!(one, [&b"/d"[..]]);
    }

    #[test]
    fn serials_match_after_trimming_newline_and_padding() {
        assert!(serial_matches(b"vol0\n", b"vol0"));
        assert!(serial_matches(b"vol0\0\0\0\n", b"vol0"));
        assert!(serial_matches(b"vol0", b"vol0"));
        assert!(!serial_matches(b"vol01\n", b"vol0"));
        assert!(!serial_matches(b"vol\n", b"vol0"));
        assert!(!serial_matches(b" vol0\n", b"vol0"));
        assert!(!serial_matches(b"\n", b"vol0"));
    }

    #[test]
    fn only_whole_virtio_disks_are_scanned() {
        assert!(is_virtio_disk(b"vda"));
        assert!(is_virtio_disk(b"vdab"));
        assert!(!is_virtio_disk(b"vda1"));
        assert!(!is_virtio_disk(b"vd"));
        assert!(!is_virtio_disk(b"sda"));
        assert!(!is_virtio_disk(b"loop0"));
    }

    #[test]
    fn a_new_volume_holds_only_lost_and_found() {
        assert!(counts_as_empty(b"."));
        assert!(counts_as_empty(b".."));
        assert!(counts_as_empty(b"lost+found"));
        assert!(!counts_as_empty(b"PG_VERSION"));
        assert!(!counts_as_empty(b"lost+found2"));
    }

    #[test]
    fn kinds_come_from_the_type_bits() {
        assert_eq!(Kind::from_mode(0o040_755), Some(Kind::Dir));
        assert_eq!(Kind::from_mode(0o106_755), Some(Kind::File));
        assert_eq!(Kind::from_mode(0o120_777), Some(Kind::Symlink));
        for special in [0o010_644, 0o020_600, 0o060_660, 0o140_755] {
            assert_eq!(Kind::from_mode(special), Some(Kind::Special));
        }
        assert_eq!(Kind::from_mode(0o170_000), None);
        assert_eq!(Kind::from_mode(0o644), None);
    }

    fn record(name: &[u8]) -> Vec<u8> {
        let len = (19 + name.len() + 1).next_multiple_of(8);
        let mut r = vec![0u8; len];
        r[16..18].copy_from_slice(&u16::try_from(len).unwrap().to_ne_bytes());
        r[19..19 + name.len()].copy_from_slice(name);
        r
    }

    #[test]
    fn dirents_parse_and_stop_at_garbage() {
        let mut buf = record(b".");
        buf.extend(record(b"lost+found"));
        buf.extend(record(&[b'x'; NAME_MAX]));
        let names: Vec<Vec<u8>> = Dirents(&buf)
            .map(|d| d.unwrap().name.to_bytes().to_vec())
            .collect();
        assert_eq!(
            names,
            [b".".to_vec(), b"lost+found".to_vec(), vec![b'x'; 255]]
        );

        // A record longer than the buffer, one too short for a name, one
        // without a NUL, and a name over NAME_MAX each end the walk.
        let mut overlong = record(b"a");
        overlong[16] = 200;
        let mut short = record(b"a");
        short[16..18].copy_from_slice(&19u16.to_ne_bytes());
        let mut unterminated = record(b"abcd");
        let n = unterminated.len();
        unterminated[19..n].fill(b'z');
        let too_long = record(&[b'y'; NAME_MAX + 1]);
        for bad in [overlong, short, unterminated, too_long, vec![0u8; 10]] {
            let mut buf = record(b"ok");
            buf.extend(bad);
            let items: Vec<_> = Dirents(&buf).collect();
            assert_eq!(items.len(), 2);
            assert!(items[0].is_ok());
            assert_eq!(items[1], Err(BadDirent));
        }
    }

    #[test]
    fn problems_read_as_sentences() {
        assert_eq!(Problem::NoDisk.to_string(), "no disk with this serial");
        assert_eq!(
            Problem::Step {
                what: "mount",
                errno: 22
            }
            .to_string(),
            "mount failed: errno 22"
        );
    }
}
