//! Thin wrappers over the system calls the jail makes: each turns a C
//! return code into an `io::Result` and holds the only `unsafe` of the jail.

use std::ffi::CString;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

fn cstr(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a path holds a NUL byte"))
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn check_long(ret: libc::c_long) -> io::Result<()> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `unshare(2)` with `CLONE_*` flags.
pub fn unshare(flags: libc::c_int) -> io::Result<()> {
    // SAFETY: unshare takes flags only and changes this process's
    // namespaces; it touches no memory of ours.
    check(unsafe { libc::unshare(flags) })
}

/// What [`fork`] returned in this process.
pub enum Forked {
    /// This is the parent; the child has this pid.
    Parent(libc::pid_t),
    /// This is the child.
    Child,
}

/// `fork(2)`. The caller must be single-threaded (the jail is entered
/// before the VMM starts any thread), so the child's copy of every lock
/// is consistent.
pub fn fork() -> io::Result<Forked> {
    // SAFETY: the process has one thread (the jail runs first in main), so
    // no lock can be held by a thread that does not exist in the child.
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(Forked::Child),
        pid => Ok(Forked::Parent(pid)),
    }
}

/// `mount(2)`; `None` passes a null pointer.
pub fn mount(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
) -> io::Result<()> {
    let source = source.map(cstr).transpose()?;
    let target = cstr(target)?;
    let fstype = fstype
        .map(|t| CString::new(t).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput)))
        .transpose()?;
    let ptr = |s: &Option<CString>| s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
    // SAFETY: every pointer is null or a NUL-terminated string that lives
    // until the call returns; no mount data is passed.
    check(unsafe {
        libc::mount(
            ptr(&source),
            target.as_ptr(),
            ptr(&fstype),
            flags,
            std::ptr::null(),
        )
    })
}

/// `pivot_root(new_root, put_old)`.
pub fn pivot_root(new_root: &Path, put_old: &Path) -> io::Result<()> {
    let new_root = cstr(new_root)?;
    let put_old = cstr(put_old)?;
    // SAFETY: both arguments are NUL-terminated strings that outlive the
    // call; pivot_root reads them only.
    check_long(unsafe { libc::syscall(libc::SYS_pivot_root, new_root.as_ptr(), put_old.as_ptr()) })
}

/// `umount2(target, MNT_DETACH)`.
pub fn detach(target: &Path) -> io::Result<()> {
    let target = cstr(target)?;
    // SAFETY: `target` is a NUL-terminated string that outlives the call.
    check(unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) })
}

/// Closes every file descriptor from `first` up.
pub fn close_from(first: u32) -> io::Result<()> {
    // SAFETY: close_range only closes descriptors; the caller owns none
    // above `first` that it still uses (nothing is open yet but stdio).
    check_long(unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, 0u32) })
}

/// Opens `path` read-write, close-on-exec.
pub fn open_rw(path: &Path) -> io::Result<OwnedFd> {
    let path = cstr(path)?;
    // SAFETY: `path` is a NUL-terminated string that outlives the call.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: open just returned this descriptor and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `sethostname(2)`.
pub fn sethostname(name: &str) -> io::Result<()> {
    // SAFETY: the pointer and length describe `name`'s bytes, which
    // outlive the call; sethostname only reads them.
    check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) })
}

/// `setrlimit(2)` with the same soft and hard limit.
pub fn setrlimit(resource: libc::__rlimit_resource_t, limit: u64) -> io::Result<()> {
    let rlim = libc::rlimit {
        rlim_cur: limit,
        rlim_max: limit,
    };
    // SAFETY: `rlim` is a valid rlimit that outlives the call.
    check(unsafe { libc::setrlimit(resource, &rlim) })
}

/// Drops every supplementary group, then sets the real, effective and
/// saved group and user ids.
pub fn become_user(uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: a zero-length list; setgroups reads nothing.
    check(unsafe { libc::setgroups(0, std::ptr::null()) })?;
    // SAFETY: plain integer arguments.
    check(unsafe { libc::setresgid(gid, gid, gid) })?;
    // SAFETY: plain integer arguments.
    check(unsafe { libc::setresuid(uid, uid, uid) })
}

/// Drops every capability from the bounding set (needs `CAP_SETPCAP`:
/// call it before giving up root).
pub fn drop_bounding_set() -> io::Result<()> {
    for cap in 0..64 {
        // SAFETY: prctl with integer arguments only.
        let ret = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
        if ret == -1 {
            let err = io::Error::last_os_error();
            // EINVAL: past the kernel's last capability.
            if err.raw_os_error() == Some(libc::EINVAL) {
                break;
            }
            return Err(err);
        }
    }
    Ok(())
}

/// Clears the ambient, effective, permitted and inheritable capabilities.
pub fn clear_capabilities() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    check(unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    })?;
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let header = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [Data::default(); 2];
    // SAFETY: capset reads a version-3 header and the two data structs
    // that version takes; both live until the call returns.
    check_long(unsafe {
        libc::syscall(libc::SYS_capset, std::ptr::from_ref(&header), data.as_ptr())
    })
}

/// `prctl(PR_SET_NO_NEW_PRIVS, 1)`.
pub fn no_new_privs() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })
}

/// This process's real user and group ids.
pub fn ids() -> (u32, u32) {
    // SAFETY: getuid and getgid cannot fail and touch no memory.
    unsafe { (libc::getuid(), libc::getgid()) }
}
