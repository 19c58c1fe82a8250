//! Filling a new volume from the image (Docker's rule): when the volume's
//! root holds nothing but `lost+found`, what the image has at the volume's
//! path is copied into it, and the root takes the owner and mode of the
//! image's directory.
//!
//! The copy keeps each entry's type (directories, regular files, symbolic
//! links, FIFOs, sockets and device nodes), owner, mode (setuid, setgid
//! and sticky included, applied after the owner since `chown` clears
//! them) and access and modification times. Hard links become separate
//! copies; extended attributes are not copied. The walk goes through
//! directory descriptors, never follows a symbolic link below the source
//! directory, and stops with `ELOOP` past [`MAX_DEPTH`] levels. The same
//! function runs at boot and in the host test mode `--copy-tree`.

use crate::sys::fs::{
    self, fchmodat, fchownat, fstat, fstatat, getdents64, mkdirat, mknodat, openat, readlinkat,
    symlinkat, utimensat, Dir, Fd, Stat, AT_SYMLINK_NOFOLLOW, EIO, ELOOP, ENAMETOOLONG, ENOENT,
    O_CREAT, O_DIRECTORY, O_EXCL, O_NOFOLLOW, O_WRONLY,
};
use crate::sys::{self, Result, O_RDONLY};
use alloc::vec;
use core::ffi::CStr;
use guest_agent::volume::{counts_as_empty, Dirents, Kind, MAX_DEPTH, S_IFMT, S_IPERM};

/// Bytes per `read`/`write` of a file's contents.
const COPY_CHUNK: usize = 64 * 1024;
/// Bytes per `getdents64`; one buffer per directory level, on the stack.
const DIRENT_BUF: usize = 4096;
/// Longest symbolic link target (`PATH_MAX` with its NUL).
const LINK_MAX: usize = 4096;

/// What [`fill`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The volume was new; the image's files are in it and on its disk.
    Filled,
    /// The volume already holds data; nothing was copied.
    NotEmpty,
    /// The image has nothing at the path; the volume is left as it is.
    NoSource,
}

/// Copies the directory `src` into the directory `dst` if `dst` holds
/// nothing but `lost+found`, then syncs `dst`'s file system.
pub fn fill(src: &CStr, dst: &CStr) -> Result<Outcome> {
    let dst = openat(Dir::Cwd, dst, O_RDONLY | O_DIRECTORY, 0)?;
    if !is_new(&dst)? {
        return Ok(Outcome::NotEmpty);
    }
    let src = match openat(Dir::Cwd, src, O_RDONLY | O_DIRECTORY, 0) {
        Err(ENOENT) => return Ok(Outcome::NoSource),
        other => other?,
    };
    let root = fstat(&src)?;
    let mut chunk = vec![0u8; COPY_CHUNK];
    copy_children(&src, &dst, 0, &mut chunk)?;
    fs::fchown(&dst, root.uid, root.gid)?;
    fs::fchmod(&dst, root.mode & S_IPERM)?;
    utimensat(Dir::Fd(&dst), None, [root.atime, root.mtime], 0)?;
    // The host may end the VM without a shutdown: the copy must be on the
    // disk before anything else runs.
    fs::syncfs(&dst)?;
    Ok(Outcome::Filled)
}

/// Whether the directory holds nothing but `lost+found`.
fn is_new(dir: &Fd) -> Result<bool> {
    let mut buf = [0u8; DIRENT_BUF];
    loop {
        let n = getdents64(dir, &mut buf)?;
        if n == 0 {
            return Ok(true);
        }
        for entry in Dirents(&buf[..n]) {
            if !counts_as_empty(entry.map_err(|_| EIO)?.name.to_bytes()) {
                return Ok(false);
            }
        }
    }
}

/// Copies every entry of `src` into `dst`; `depth` counts the directory
/// levels below the root.
fn copy_children(src: &Fd, dst: &Fd, depth: usize, chunk: &mut [u8]) -> Result<()> {
    let mut buf = [0u8; DIRENT_BUF];
    loop {
        let n = getdents64(src, &mut buf)?;
        if n == 0 {
            return Ok(());
        }
        for entry in Dirents(&buf[..n]) {
            let name = entry.map_err(|_| EIO)?.name;
            if matches!(name.to_bytes(), b"." | b"..") {
                continue;
            }
            copy_entry(src, dst, name, depth, chunk)?;
        }
    }
}

/// Copies `name` from `src` to `dst`, then gives the copy the source's
/// owner, mode and times (a directory's last, after its children).
fn copy_entry(src: &Fd, dst: &Fd, name: &CStr, depth: usize, chunk: &mut [u8]) -> Result<()> {
    let (from, to) = (Dir::Fd(src), Dir::Fd(dst));
    let stat = fstatat(from, name, AT_SYMLINK_NOFOLLOW)?;
    let kind = Kind::from_mode(stat.mode).ok_or(EIO)?;
    match kind {
        Kind::Dir => {
            if depth >= MAX_DEPTH {
                return Err(ELOOP);
            }
            mkdirat(to, name, 0o700)?;
            let sub_src = openat(from, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW, 0)?;
            let sub_dst = openat(to, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW, 0)?;
            copy_children(&sub_src, &sub_dst, depth + 1, chunk)?;
        }
        Kind::File => {
            let input = openat(from, name, O_RDONLY | O_NOFOLLOW, 0)?;
            let output = openat(to, name, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW, 0o600)?;
            copy_bytes(&input, &output, chunk)?;
        }
        Kind::Symlink => {
            let mut target = [0u8; LINK_MAX];
            let len = readlinkat(from, name, &mut target[..LINK_MAX - 1])?;
            if len >= LINK_MAX - 1 {
                return Err(ENAMETOOLONG);
            }
            let target = CStr::from_bytes_until_nul(&target[..=len]).map_err(|_| EIO)?;
            symlinkat(target, to, name)?;
        }
        Kind::Special => mknodat(to, name, (stat.mode & S_IFMT) | 0o600, stat.rdev)?,
    }
    stamp(to, name, kind, &stat)
}

/// Owner, then mode (not for a symbolic link: Linux ignores its mode),
/// then times, which nothing after this changes.
fn stamp(dir: Dir<'_>, name: &CStr, kind: Kind, stat: &Stat) -> Result<()> {
    fchownat(dir, name, stat.uid, stat.gid, AT_SYMLINK_NOFOLLOW)?;
    if kind != Kind::Symlink {
        fchmodat(dir, name, stat.mode & S_IPERM)?;
    }
    utimensat(
        dir,
        Some(name),
        [stat.atime, stat.mtime],
        AT_SYMLINK_NOFOLLOW,
    )
}

fn copy_bytes(input: &Fd, output: &Fd, chunk: &mut [u8]) -> Result<()> {
    loop {
        let n = sys::read(input.raw(), chunk)?;
        if n == 0 {
            return Ok(());
        }
        sys::write_all(output.raw(), &chunk[..n])?;
    }
}
