//! Attaching the configured volumes at boot and detaching them at
//! shutdown; the rules are in [`guest_agent::volume`].

use crate::console::Console;
use crate::copy_tree::{fill, Outcome};
use crate::sys::fs::{getdents64, openat, Dir, ENAMETOOLONG, O_DIRECTORY};
use crate::sys::{self, Errno, EINVAL, O_RDONLY};
use alloc::ffi::CString;
use alloc::vec::Vec;
use guest_agent::mounts::EEXIST;
use guest_agent::report::Event;
use guest_agent::volume::{is_virtio_disk, prefixes, serial_matches, Dirents, Problem, Volume};

/// `MS_NOATIME`.
const MS_NOATIME: usize = 1024;
/// `MS_MOVE`.
const MS_MOVE: usize = 8192;
/// A `/sys/block/vdX/serial` value is at most 20 bytes and a newline.
const SERIAL_FILE_CAP: usize = 64;

/// Attaches `volumes` in order; stops at the first failure, which names
/// the volume.
pub fn attach_all(volumes: &[Volume], console: Console) -> Result<(), (&Volume, Problem)> {
    for volume in volumes {
        let filled = attach(volume).map_err(|problem| (volume, problem))?;
        let _ = console.report(Event::VolumeAttached {
            serial: &volume.serial,
            path: &volume.path,
            filled,
        });
    }
    Ok(())
}

fn step(what: &'static str) -> impl Fn(Errno) -> Problem {
    move |Errno(errno)| Problem::Step { what, errno }
}

fn c_string(bytes: &[u8]) -> Result<CString, Problem> {
    CString::new(bytes).map_err(|_| step("path")(EINVAL))
}

/// Finds, mounts, fills if new, and moves one volume into place; returns
/// whether it was filled from the image.
fn attach(volume: &Volume) -> Result<bool, Problem> {
    let device = find_disk(&volume.serial)?.ok_or(Problem::NoDisk)?;
    let staging = volume.staging();
    mkdir_p(&staging, 0o700).map_err(step("mkdir staging"))?;
    let staging = c_string(&staging)?;
    sys::mount(&c_string(&device)?, &staging, c"ext4", MS_NOATIME, None)
        .map_err(step("mount ext4"))?;
    let path = c_string(&volume.path)?;
    let filled = fill(&path, &staging).map_err(step("copy from the image"))? == Outcome::Filled;
    mkdir_p(&volume.path, 0o755).map_err(step("mkdir"))?;
    sys::mount(&staging, &path, c"", MS_MOVE, None).map_err(step("move mount"))?;
    Ok(filled)
}

/// The `/dev/vdX` whose virtio serial is `serial`, if any.
fn find_disk(serial: &[u8]) -> Result<Option<Vec<u8>>, Problem> {
    let scan = step("scan /sys/block");
    let dir = openat(Dir::Cwd, c"/sys/block", O_RDONLY | O_DIRECTORY, 0).map_err(&scan)?;
    let mut buf = [0u8; 4096];
    loop {
        let n = getdents64(&dir, &mut buf).map_err(&scan)?;
        if n == 0 {
            return Ok(None);
        }
        for entry in Dirents(&buf[..n]) {
            let name = entry.map_err(|_| scan(sys::fs::EIO))?.name.to_bytes();
            if !is_virtio_disk(name) {
                continue;
            }
            let file = c_string(&[b"/sys/block/", name, b"/serial"].concat())?;
            // A disk without a serial (GET_ID unsupported) fails the read.
            if let Ok(contents) = sys::read_file(&file, SERIAL_FILE_CAP) {
                if serial_matches(&contents, serial) {
                    return Ok(Some([b"/dev/", name].concat()));
                }
            }
        }
    }
}

/// `mkdir -p path`: parents get `0755`, the last directory `mode`
/// (existing ones are left as they are).
fn mkdir_p(path: &[u8], mode: u32) -> sys::Result<()> {
    for prefix in prefixes(path) {
        let dir = CString::new(prefix).map_err(|_| ENAMETOOLONG)?;
        let mode = if prefix.len() == path.len() {
            mode
        } else {
            0o755
        };
        match sys::mkdir(&dir, mode) {
            Err(Errno(errno)) if errno != EEXIST => return Err(Errno(errno)),
            _ => {}
        }
    }
    Ok(())
}

/// Unmounts the volumes, innermost last-attached first, so their file
/// systems are clean and on disk before the restart. A volume still busy
/// (a process that outlived the stop round) is synced instead.
pub fn detach_all(volumes: &[Volume], console: Console) {
    for volume in volumes.iter().rev() {
        let Ok(path) = CString::new(&volume.path[..]) else {
            continue;
        };
        if let Err(Errno(errno)) = sys::fs::umount(&path) {
            let _ = console.report(Event::Skipped {
                what: "unmount volume",
                errno,
            });
            if let Ok(fd) = openat(Dir::Cwd, &path, O_RDONLY | O_DIRECTORY, 0) {
                let _ = sys::fs::syncfs(&fd);
            }
        }
    }
}
