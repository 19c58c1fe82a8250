//! The `*at` file system calls the volume code makes: walking, creating
//! and stamping files relative to directory descriptors, so that no path
//! is resolved twice and no symbolic link is followed by accident.

use super::raw::{syscall1, syscall2, syscall3, syscall4, syscall5};
use super::{check, check_i32, close, Errno, Result, AT_FDCWD, O_CLOEXEC};
use core::ffi::CStr;
use core::ptr;

mod nr {
    pub const FCHMOD: usize = 91;
    pub const FCHOWN: usize = 93;
    pub const UMOUNT2: usize = 166;
    pub const GETDENTS64: usize = 217;
    pub const OPENAT: usize = 257;
    pub const MKDIRAT: usize = 258;
    pub const MKNODAT: usize = 259;
    pub const FCHOWNAT: usize = 260;
    pub const NEWFSTATAT: usize = 262;
    pub const SYMLINKAT: usize = 266;
    pub const READLINKAT: usize = 267;
    pub const FCHMODAT: usize = 268;
    pub const UTIMENSAT: usize = 280;
    pub const SYNCFS: usize = 306;
}

/// Open for writing only.
pub const O_WRONLY: usize = 1;
/// Create the file if it does not exist.
pub const O_CREAT: usize = 0o100;
/// With `O_CREAT`: fail if the file exists.
pub const O_EXCL: usize = 0o200;
/// Fail unless the path is a directory.
pub const O_DIRECTORY: usize = 0o200_000;
/// Fail if the last component is a symbolic link.
pub const O_NOFOLLOW: usize = 0o400_000;
/// Act on a symbolic link itself.
pub const AT_SYMLINK_NOFOLLOW: usize = 0x100;
/// Act on the descriptor itself when the path is empty.
pub const AT_EMPTY_PATH: usize = 0x1000;

/// No such file or directory.
pub const ENOENT: Errno = Errno(2);
/// I/O error; also used for malformed kernel output.
pub const EIO: Errno = Errno(5);
/// Too many levels of nesting.
pub const ELOOP: Errno = Errno(40);
/// A name or path too long.
pub const ENAMETOOLONG: Errno = Errno(36);
/// A value that does not fit (a device number over 32 bits).
pub const EOVERFLOW: Errno = Errno(75);

/// A file descriptor this process owns; closed on drop.
#[derive(Debug)]
pub struct Fd(i32);

impl Fd {
    /// The raw descriptor, for calls relative to it.
    pub fn raw(&self) -> i32 {
        self.0
    }
}

impl Drop for Fd {
    fn drop(&mut self) {
        close(self.0);
    }
}

/// A directory to resolve a relative path against.
#[derive(Clone, Copy)]
pub enum Dir<'a> {
    /// The current working directory (`AT_FDCWD`).
    Cwd,
    /// An open directory.
    Fd(&'a Fd),
}

impl Dir<'_> {
    fn raw(self) -> usize {
        match self {
            Self::Cwd => AT_FDCWD as usize,
            Self::Fd(fd) => fd.0 as usize,
        }
    }
}

/// `openat(dir, path, flags | O_CLOEXEC, mode)`.
pub fn openat(dir: Dir<'_>, path: &CStr, flags: usize, mode: u32) -> Result<Fd> {
    // SAFETY: path is NUL-terminated and outlives the call; the rest are
    // integers.
    let ret = unsafe {
        syscall4(
            nr::OPENAT,
            dir.raw(),
            path.as_ptr() as usize,
            flags | O_CLOEXEC,
            mode as usize,
        )
    };
    check_i32(ret).map(Fd)
}

/// `getdents64(2)`: fills `buf` with `struct linux_dirent64` records;
/// returns the bytes used, 0 at the end of the directory.
pub fn getdents64(dir: &Fd, buf: &mut [u8]) -> Result<usize> {
    // SAFETY: the kernel writes at most buf.len() bytes into buf, a live,
    // exclusively borrowed buffer.
    let ret = unsafe {
        syscall3(
            nr::GETDENTS64,
            dir.0 as usize,
            buf.as_mut_ptr() as usize,
            buf.len(),
        )
    };
    check(ret)
}

/// A point in time as `struct timespec`: seconds and nanoseconds.
pub type Timespec = [i64; 2];

/// The parts of `struct stat` the agent uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// Type and permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Device number of a device node (the kernel's 32-bit encoding).
    pub rdev: u64,
    /// Last access.
    pub atime: Timespec,
    /// Last modification.
    pub mtime: Timespec,
}

/// `newfstatat(dir, path, &stat, flags)`.
pub fn fstatat(dir: Dir<'_>, path: &CStr, flags: usize) -> Result<Stat> {
    // x86-64 `struct stat` is 144 bytes.
    let mut raw = [0u8; 144];
    // SAFETY: raw is a live 144-byte buffer, the size of the struct stat
    // the kernel writes; path is NUL-terminated.
    let ret = unsafe {
        syscall4(
            nr::NEWFSTATAT,
            dir.raw(),
            path.as_ptr() as usize,
            raw.as_mut_ptr() as usize,
            flags,
        )
    };
    check(ret)?;
    let u32_at = |at: usize| u32::from_ne_bytes([raw[at], raw[at + 1], raw[at + 2], raw[at + 3]]);
    let u64_at = |at: usize| u64::from(u32_at(at)) | (u64::from(u32_at(at + 4)) << 32);
    let i64_at = |at: usize| u64_at(at).cast_signed();
    Ok(Stat {
        mode: u32_at(24),
        uid: u32_at(28),
        gid: u32_at(32),
        rdev: u64_at(40),
        atime: [i64_at(72), i64_at(80)],
        mtime: [i64_at(88), i64_at(96)],
    })
}

/// `fstat` of an open descriptor (`newfstatat(fd, "", AT_EMPTY_PATH)`).
pub fn fstat(fd: &Fd) -> Result<Stat> {
    fstatat(Dir::Fd(fd), c"", AT_EMPTY_PATH)
}

/// `mkdirat(2)`.
pub fn mkdirat(dir: Dir<'_>, path: &CStr, mode: u32) -> Result<()> {
    // SAFETY: path is NUL-terminated and outlives the call.
    let ret = unsafe {
        syscall3(
            nr::MKDIRAT,
            dir.raw(),
            path.as_ptr() as usize,
            mode as usize,
        )
    };
    check(ret).map(drop)
}

/// `mknodat(2)`; `dev` in the kernel's 32-bit encoding (as `stat`
/// reports it).
pub fn mknodat(dir: Dir<'_>, path: &CStr, mode: u32, dev: u64) -> Result<()> {
    let dev = u32::try_from(dev).map_err(|_| EOVERFLOW)?;
    // SAFETY: path is NUL-terminated and outlives the call.
    let ret = unsafe {
        syscall4(
            nr::MKNODAT,
            dir.raw(),
            path.as_ptr() as usize,
            mode as usize,
            dev as usize,
        )
    };
    check(ret).map(drop)
}

/// `symlinkat(target, dir, path)`.
pub fn symlinkat(target: &CStr, dir: Dir<'_>, path: &CStr) -> Result<()> {
    // SAFETY: both strings are NUL-terminated and outlive the call.
    let ret = unsafe {
        syscall3(
            nr::SYMLINKAT,
            target.as_ptr() as usize,
            dir.raw(),
            path.as_ptr() as usize,
        )
    };
    check(ret).map(drop)
}

/// `readlinkat(2)` into `buf`; returns the target's length (not
/// NUL-terminated; a full buffer may mean truncation).
pub fn readlinkat(dir: Dir<'_>, path: &CStr, buf: &mut [u8]) -> Result<usize> {
    // SAFETY: the kernel writes at most buf.len() bytes into buf, a live,
    // exclusively borrowed buffer; path is NUL-terminated.
    let ret = unsafe {
        syscall4(
            nr::READLINKAT,
            dir.raw(),
            path.as_ptr() as usize,
            buf.as_mut_ptr() as usize,
            buf.len(),
        )
    };
    check(ret)
}

/// `fchownat(2)`.
pub fn fchownat(dir: Dir<'_>, path: &CStr, uid: u32, gid: u32, flags: usize) -> Result<()> {
    // SAFETY: path is NUL-terminated and outlives the call; the rest are
    // integers.
    let ret = unsafe {
        syscall5(
            nr::FCHOWNAT,
            dir.raw(),
            path.as_ptr() as usize,
            uid as usize,
            gid as usize,
            flags,
        )
    };
    check(ret).map(drop)
}

/// `fchmodat(dir, path, mode, 0)`; follows a symbolic link, so callers
/// use it on what they created themselves.
pub fn fchmodat(dir: Dir<'_>, path: &CStr, mode: u32) -> Result<()> {
    // SAFETY: path is NUL-terminated and outlives the call.
    let ret = unsafe {
        syscall3(
            nr::FCHMODAT,
            dir.raw(),
            path.as_ptr() as usize,
            mode as usize,
        )
    };
    check(ret).map(drop)
}

/// `fchown(2)`.
pub fn fchown(fd: &Fd, uid: u32, gid: u32) -> Result<()> {
    // SAFETY: fchown takes no pointers.
    check(unsafe { syscall3(nr::FCHOWN, fd.0 as usize, uid as usize, gid as usize) }).map(drop)
}

/// `fchmod(2)`.
pub fn fchmod(fd: &Fd, mode: u32) -> Result<()> {
    // SAFETY: fchmod takes no pointers.
    check(unsafe { syscall2(nr::FCHMOD, fd.0 as usize, mode as usize) }).map(drop)
}

/// `utimensat(dir, path, [atime, mtime], flags)`; `path` `None` stamps
/// `dir` itself (`futimens`).
pub fn utimensat(
    dir: Dir<'_>,
    path: Option<&CStr>,
    times: [Timespec; 2],
    flags: usize,
) -> Result<()> {
    let path = path.map_or(ptr::null(), CStr::as_ptr);
    // SAFETY: times is a live array of two struct timespec (two i64
    // each), read during the call; path is NUL-terminated or NULL, which
    // utimensat takes as "dir itself".
    let ret = unsafe {
        syscall4(
            nr::UTIMENSAT,
            dir.raw(),
            path as usize,
            times.as_ptr() as usize,
            flags,
        )
    };
    check(ret).map(drop)
}

/// `syncfs(2)`: writes out the file system holding `fd`.
pub fn syncfs(fd: &Fd) -> Result<()> {
    // SAFETY: syncfs takes no pointers.
    check(unsafe { syscall1(nr::SYNCFS, fd.0 as usize) }).map(drop)
}

/// `umount2(path, 0)`.
pub fn umount(path: &CStr) -> Result<()> {
    // SAFETY: path is NUL-terminated and outlives the call.
    check(unsafe { syscall2(nr::UMOUNT2, path.as_ptr() as usize, 0) }).map(drop)
}
