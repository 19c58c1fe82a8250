//! Thin wrappers over the x86-64 Linux system calls the agent makes.
//!
//! There is no libc: each wrapper issues `syscall` directly and turns the
//! kernel's `-errno` return into [`Errno`]. Wrappers take Rust types
//! (`&CStr`, slices) so that callers stay free of `unsafe`.

pub mod fs;
pub mod mem;
mod raw;
pub mod sock;

use alloc::ffi::CString;
use alloc::vec::Vec;
use core::ffi::CStr;
use core::ptr;
use raw::{syscall1, syscall2, syscall3, syscall4, syscall5};

/// A failed system call's error number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

/// Interrupted system call.
pub const EINTR: Errno = Errno(4);
/// Bad file descriptor.
pub const EBADF: Errno = Errno(9);
/// No child processes.
pub const ECHILD: Errno = Errno(10);
/// No such process.
pub const ESRCH: Errno = Errno(3);
/// Invalid argument.
pub const EINVAL: Errno = Errno(22);

/// Result of a system call.
pub type Result<T> = core::result::Result<T, Errno>;

/// System call numbers (x86-64).
mod nr {
    pub const READ: usize = 0;
    pub const WRITE: usize = 1;
    pub const CLOSE: usize = 3;
    pub const RT_SIGPROCMASK: usize = 14;
    pub const IOCTL: usize = 16;
    pub const DUP2: usize = 33;
    pub const GETPID: usize = 39;
    pub const SOCKET: usize = 41;
    pub const EXECVE: usize = 59;
    pub const EXIT: usize = 60;
    pub const WAIT4: usize = 61;
    pub const KILL: usize = 62;
    pub const CHDIR: usize = 80;
    pub const CHROOT: usize = 161;
    pub const SETUID: usize = 105;
    pub const SETGID: usize = 106;
    pub const SETSID: usize = 112;
    pub const SETGROUPS: usize = 116;
    pub const PRCTL: usize = 157;
    pub const SYNC: usize = 162;
    pub const MOUNT: usize = 165;
    pub const REBOOT: usize = 169;
    pub const SETHOSTNAME: usize = 170;
    pub const CLOCK_GETTIME: usize = 228;
    pub const OPENAT: usize = 257;
    pub const MKDIRAT: usize = 258;
    pub const PPOLL: usize = 271;
    pub const SIGNALFD4: usize = 289;
}

const AT_FDCWD: isize = -100;

/// Open for reading only.
pub const O_RDONLY: usize = 0;
/// Open for reading and writing.
pub const O_RDWR: usize = 2;
/// Close on exec.
pub const O_CLOEXEC: usize = 0o2_000_000;

/// Turns a raw return value into a result.
fn check(ret: isize) -> Result<usize> {
    if (-4095..0).contains(&ret) {
        // The range check keeps -ret within 1..=4095.
        Err(Errno(i32::try_from(-ret).unwrap_or(EINVAL.0)))
    } else {
        Ok(ret.cast_unsigned())
    }
}

/// A return value that is a file descriptor or pid: always below 2^31.
fn check_i32(ret: isize) -> Result<i32> {
    check(ret).map(|v| i32::try_from(v).unwrap_or(i32::MAX))
}

/// `read(2)`, retried on EINTR.
pub fn read(fd: i32, buf: &mut [u8]) -> Result<usize> {
    loop {
        // SAFETY: the kernel writes at most buf.len() bytes into buf, which
        // is a live, exclusively borrowed buffer.
        let ret = unsafe { syscall3(nr::READ, fd as usize, buf.as_mut_ptr() as usize, buf.len()) };
        match check(ret) {
            Err(EINTR) => continue,
            other => return other,
        }
    }
}

/// `write(2)`, retried on EINTR.
pub fn write(fd: i32, buf: &[u8]) -> Result<usize> {
    loop {
        // SAFETY: the kernel reads at most buf.len() bytes from buf, which
        // is a live borrowed buffer.
        let ret = unsafe { syscall3(nr::WRITE, fd as usize, buf.as_ptr() as usize, buf.len()) };
        match check(ret) {
            Err(EINTR) => continue,
            other => return other,
        }
    }
}

/// Writes all of `buf` (a console line is one `write` in practice).
pub fn write_all(fd: i32, mut buf: &[u8]) -> Result<()> {
    while !buf.is_empty() {
        let n = write(fd, buf)?;
        if n == 0 {
            return Err(EINVAL);
        }
        buf = &buf[n.min(buf.len())..];
    }
    Ok(())
}

/// `openat(AT_FDCWD, path, flags | O_CLOEXEC)`.
pub fn open(path: &CStr, flags: usize) -> Result<i32> {
    // SAFETY: path is a NUL-terminated string that outlives the call; no
    // O_CREAT, so the mode argument is unused.
    let ret = unsafe {
        syscall4(
            nr::OPENAT,
            AT_FDCWD as usize,
            path.as_ptr() as usize,
            flags | O_CLOEXEC,
            0,
        )
    };
    check_i32(ret)
}

/// Creates or truncates `path` with `mode` and writes `data` to it.
pub fn write_file(path: &CStr, mode: u32, data: &[u8]) -> Result<()> {
    const O_WRONLY_CREAT_TRUNC: usize = 0o1 | 0o100 | 0o1000;
    // SAFETY: path is a NUL-terminated string that outlives the call; the
    // other arguments are plain integers.
    let ret = unsafe {
        syscall4(
            nr::OPENAT,
            AT_FDCWD as usize,
            path.as_ptr() as usize,
            O_WRONLY_CREAT_TRUNC | O_CLOEXEC,
            mode as usize,
        )
    };
    let fd = check_i32(ret)?;
    let written = write_all(fd, data);
    close(fd);
    written
}

/// `close(2)`; errors are meaningless for the read-only files the agent
/// closes, so they are dropped.
pub fn close(fd: i32) {
    // SAFETY: closing a descriptor touches no memory of this process.
    let _ = unsafe { syscall1(nr::CLOSE, fd as usize) };
}

/// Reads a whole file, at most `cap + 1` bytes, so that a caller
/// enforcing `cap` can tell "exactly cap" from "too long".
pub fn read_file(path: &CStr, cap: usize) -> Result<Vec<u8>> {
    let fd = open(path, O_RDONLY)?;
    let mut buf = Vec::new();
    let result = (|| {
        buf.try_reserve_exact(cap + 1).map_err(|_| EINVAL)?;
        buf.resize(cap + 1, 0);
        let mut len = 0;
        while len < buf.len() {
            let n = read(fd, &mut buf[len..])?;
            if n == 0 {
                break;
            }
            len += n;
        }
        buf.truncate(len);
        Ok(())
    })();
    close(fd);
    result.map(|()| buf)
}

/// `mkdirat(AT_FDCWD, path, mode)`.
pub fn mkdir(path: &CStr, mode: u32) -> Result<()> {
    // SAFETY: path is a NUL-terminated string that outlives the call.
    let ret = unsafe {
        syscall3(
            nr::MKDIRAT,
            AT_FDCWD as usize,
            path.as_ptr() as usize,
            mode as usize,
        )
    };
    check(ret).map(drop)
}

/// `mount(2)`.
pub fn mount(
    source: &CStr,
    target: &CStr,
    fstype: &CStr,
    flags: usize,
    data: Option<&CStr>,
) -> Result<()> {
    let data = data.map_or(ptr::null(), CStr::as_ptr);
    // SAFETY: the strings are NUL-terminated and outlive the call; data is
    // either one of them or NULL, which mount accepts.
    let ret = unsafe {
        syscall5(
            nr::MOUNT,
            source.as_ptr() as usize,
            target.as_ptr() as usize,
            fstype.as_ptr() as usize,
            flags,
            data as usize,
        )
    };
    check(ret).map(drop)
}

/// `sethostname(2)`.
pub fn sethostname(name: &[u8]) -> Result<()> {
    // SAFETY: the kernel reads name.len() bytes from a live slice.
    let ret = unsafe { syscall2(nr::SETHOSTNAME, name.as_ptr() as usize, name.len()) };
    check(ret).map(drop)
}

/// Sets IFF_UP on network interface `name` (e.g. `lo`).
pub fn interface_up(name: &[u8]) -> Result<()> {
    const AF_INET: usize = 2;
    const SOCK_DGRAM: usize = 2;
    const SOCK_CLOEXEC: usize = O_CLOEXEC;
    const SIOCGIFFLAGS: usize = 0x8913;
    const SIOCSIFFLAGS: usize = 0x8914;
    const IFF_UP: u16 = 1;
    const IFNAMSIZ: usize = 16;
    if name.len() >= IFNAMSIZ {
        return Err(EINVAL);
    }
    // struct ifreq: the name, then a union whose first member here is
    // `short ifr_flags`.
    let mut ifreq = [0u8; 40];
    ifreq[..name.len()].copy_from_slice(name);
    // SAFETY: socket() takes no pointers.
    let fd = check_i32(unsafe { syscall3(nr::SOCKET, AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0) })?;
    let result = (|| {
        // SAFETY: SIOCGIFFLAGS reads and writes a struct ifreq (40 bytes on
        // x86-64), which is what ifreq holds.
        check(unsafe {
            syscall3(
                nr::IOCTL,
                fd as usize,
                SIOCGIFFLAGS,
                ifreq.as_mut_ptr() as usize,
            )
        })?;
        let flags = u16::from_ne_bytes([ifreq[16], ifreq[17]]) | IFF_UP;
        ifreq[16..18].copy_from_slice(&flags.to_ne_bytes());
        // SAFETY: SIOCSIFFLAGS reads a struct ifreq, as above.
        check(unsafe {
            syscall3(
                nr::IOCTL,
                fd as usize,
                SIOCSIFFLAGS,
                ifreq.as_mut_ptr() as usize,
            )
        })
    })();
    close(fd);
    result.map(drop)
}

/// Makes the terminal on `fd` the caller's controlling terminal
/// (`TIOCSCTTY`, without stealing it from another session).
pub fn set_controlling_tty(fd: i32) -> Result<()> {
    const TIOCSCTTY: usize = 0x540e;
    // SAFETY: TIOCSCTTY takes an integer argument, no pointer.
    check(unsafe { syscall3(nr::IOCTL, fd as usize, TIOCSCTTY, 0) }).map(drop)
}

/// `getpid(2)`.
pub fn getpid() -> i32 {
    // SAFETY: getpid takes no arguments and cannot fail.
    let ret = unsafe { raw::syscall0(nr::GETPID) };
    check_i32(ret).unwrap_or(0)
}

/// `dup2(2)`.
pub fn dup2(old: i32, new: i32) -> Result<()> {
    // SAFETY: dup2 takes no pointers.
    check(unsafe { syscall2(nr::DUP2, old as usize, new as usize) }).map(drop)
}

/// How `sigprocmask` combines the new set with the current mask.
#[derive(Clone, Copy)]
pub enum MaskHow {
    /// Add to the mask.
    Block = 0,
    /// Replace the mask.
    Set = 2,
}

/// `rt_sigprocmask(2)` on a 64-bit kernel `sigset_t`.
pub fn sigprocmask(how: MaskHow, set: u64) -> Result<()> {
    // SAFETY: set lives on the stack for the call and is the 8-byte
    // sigset_t the size argument announces; the old set is not requested.
    let ret = unsafe {
        syscall4(
            nr::RT_SIGPROCMASK,
            how as usize,
            ptr::from_ref(&set) as usize,
            0,
            8,
        )
    };
    check(ret).map(drop)
}

/// A new close-on-exec signalfd for the signals in `set`.
pub fn signalfd(set: u64) -> Result<i32> {
    const SFD_CLOEXEC: usize = O_CLOEXEC;
    // SAFETY: set is the 8-byte sigset_t announced, read during the call.
    let ret = unsafe {
        syscall4(
            nr::SIGNALFD4,
            usize::MAX,
            ptr::from_ref(&set) as usize,
            8,
            SFD_CLOEXEC,
        )
    };
    check_i32(ret)
}

/// Reads pending signals from a signalfd into `signals`; returns how many.
/// Blocks until at least one is pending.
pub fn read_signals(fd: i32, signals: &mut [i32; 16]) -> Result<usize> {
    // struct signalfd_siginfo is 128 bytes; ssi_signo is its first u32.
    const SIGINFO_LEN: usize = 128;
    let mut buf = [0u8; SIGINFO_LEN * 16];
    let n = read(fd, &mut buf)? / SIGINFO_LEN;
    for (slot, info) in signals
        .iter_mut()
        .zip(buf.chunks_exact(SIGINFO_LEN))
        .take(n)
    {
        let signo = u32::from_ne_bytes([info[0], info[1], info[2], info[3]]);
        *slot = i32::try_from(signo).unwrap_or(0);
    }
    Ok(n)
}

/// Waits up to `timeout_ms` for `fd` to become readable; returns whether
/// it is. Interruptions count as "not yet".
pub fn poll_readable(fd: i32, timeout_ms: u64) -> Result<bool> {
    const POLLIN: u16 = 1;
    // struct pollfd { int fd; short events; short revents; }
    let mut pollfd = [0u8; 8];
    pollfd[..4].copy_from_slice(&fd.to_ne_bytes());
    pollfd[4..6].copy_from_slice(&POLLIN.to_ne_bytes());
    let timespec: [u64; 2] = [timeout_ms / 1000, (timeout_ms % 1000) * 1_000_000];
    // SAFETY: pollfd is one struct pollfd (8 bytes, 4-byte fields at the
    // right offsets, written back by the kernel), timespec is a live struct
    // timespec; no signal mask is passed.
    let ret = unsafe {
        syscall5(
            nr::PPOLL,
            pollfd.as_mut_ptr() as usize,
            1,
            timespec.as_ptr() as usize,
            0,
            8,
        )
    };
    match check(ret) {
        Ok(n) => Ok(n > 0),
        Err(EINTR) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Monotonic clock in milliseconds.
pub fn monotonic_ms() -> u64 {
    const CLOCK_MONOTONIC: usize = 1;
    let mut ts = [0u64; 2];
    // SAFETY: ts is a live struct timespec (two 64-bit fields) the kernel
    // fills in.
    let ret = unsafe { syscall2(nr::CLOCK_GETTIME, CLOCK_MONOTONIC, ts.as_mut_ptr() as usize) };
    if check(ret).is_err() {
        return 0;
    }
    ts[0].saturating_mul(1000).saturating_add(ts[1] / 1_000_000)
}

/// `wait4(pid, &status, options, NULL)`: `Ok(None)` when WNOHANG found no
/// exited child, else the child's pid and raw status.
pub fn wait4(pid: i32, nohang: bool) -> Result<Option<(i32, i32)>> {
    const WNOHANG: usize = 1;
    let mut status: i32 = 0;
    loop {
        // SAFETY: status is a live int the kernel writes; no rusage.
        let ret = unsafe {
            syscall4(
                nr::WAIT4,
                pid as usize,
                ptr::from_mut(&mut status) as usize,
                if nohang { WNOHANG } else { 0 },
                0,
            )
        };
        match check_i32(ret) {
            Ok(0) => return Ok(None),
            Ok(pid) => return Ok(Some((pid, status))),
            Err(EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// `kill(2)`.
pub fn kill(pid: i32, signal: i32) -> Result<()> {
    // SAFETY: kill takes no pointers.
    check(unsafe { syscall2(nr::KILL, pid as usize, signal as usize) }).map(drop)
}

/// `setsid(2)`.
pub fn setsid() -> Result<()> {
    // SAFETY: setsid takes no arguments.
    check(unsafe { raw::syscall0(nr::SETSID) }).map(drop)
}

/// `setgroups(2)`.
pub fn setgroups(groups: &[u32]) -> Result<()> {
    // SAFETY: the kernel reads groups.len() gid_t (u32) values from a live
    // slice.
    check(unsafe { syscall2(nr::SETGROUPS, groups.len(), groups.as_ptr() as usize) }).map(drop)
}

/// `setgid(2)`.
pub fn setgid(gid: u32) -> Result<()> {
    // SAFETY: setgid takes no pointers.
    check(unsafe { syscall1(nr::SETGID, gid as usize) }).map(drop)
}

/// `setuid(2)`.
pub fn setuid(uid: u32) -> Result<()> {
    // SAFETY: setuid takes no pointers.
    check(unsafe { syscall1(nr::SETUID, uid as usize) }).map(drop)
}

/// `chdir(2)`.
pub fn chdir(path: &CStr) -> Result<()> {
    // SAFETY: path is NUL-terminated and outlives the call.
    check(unsafe { syscall1(nr::CHDIR, path.as_ptr() as usize) }).map(drop)
}

/// `chroot(2)`.
pub fn chroot(path: &CStr) -> Result<()> {
    // SAFETY: path is NUL-terminated and outlives the call.
    check(unsafe { syscall1(nr::CHROOT, path.as_ptr() as usize) }).map(drop)
}

/// Makes this process a child subreaper (`PR_SET_CHILD_SUBREAPER`), so
/// that orphans are reparented to it, as they are to PID 1.
pub fn set_child_subreaper() -> Result<()> {
    const PR_SET_CHILD_SUBREAPER: usize = 36;
    // SAFETY: this prctl option takes an integer, no pointer.
    check(unsafe { syscall2(nr::PRCTL, PR_SET_CHILD_SUBREAPER, 1) }).map(drop)
}

/// A NULL-terminated array of C strings, as `execve` wants for argv and
/// envp. The pointers point into `strings`, whose heap buffers never move
/// while `self` lives.
pub struct CStrArray {
    strings: Vec<CString>,
    ptrs: Vec<*const u8>,
}

impl CStrArray {
    /// Builds the array; fails on an interior NUL byte.
    pub fn new<'a>(items: impl IntoIterator<Item = &'a [u8]>) -> Result<Self> {
        let strings = items
            .into_iter()
            .map(|item| CString::new(item).map_err(|_| EINVAL))
            .collect::<Result<Vec<_>>>()?;
        let mut ptrs: Vec<*const u8> = strings.iter().map(|s| s.as_ptr().cast()).collect();
        ptrs.push(ptr::null());
        Ok(Self { strings, ptrs })
    }

    /// The strings, without the terminating NULL.
    pub fn strings(&self) -> &[CString] {
        &self.strings
    }
}

/// `execve(2)`; returns only on failure.
pub fn execve(path: &CStr, argv: &CStrArray, envp: &CStrArray) -> Errno {
    // SAFETY: path is NUL-terminated; argv.ptrs and envp.ptrs are
    // NULL-terminated arrays of pointers to NUL-terminated strings owned by
    // the arrays, all alive for the call (CStrArray's invariant).
    let ret = unsafe {
        syscall3(
            nr::EXECVE,
            path.as_ptr() as usize,
            argv.ptrs.as_ptr() as usize,
            envp.ptrs.as_ptr() as usize,
        )
    };
    check(ret).err().unwrap_or(EINVAL)
}

/// `exit(2)` of the calling thread (the vfork child must not use
/// `exit_group`-style teardown of anything it shares).
pub fn exit(code: u8) -> ! {
    // SAFETY: exit never returns and touches no memory.
    unsafe { raw::exit(nr::EXIT, usize::from(code)) }
}

/// `sync(2)`.
pub fn sync() {
    // SAFETY: sync takes no arguments.
    let _ = unsafe { raw::syscall0(nr::SYNC) };
}

/// `reboot(LINUX_REBOOT_CMD_RESTART)`; returns only on failure.
pub fn reboot_restart() -> Errno {
    const MAGIC1: usize = 0xfee1_dead;
    const MAGIC2: usize = 672_274_793;
    const CMD_RESTART: usize = 0x0123_4567;
    // SAFETY: the RESTART command takes no pointer argument.
    let ret = unsafe { syscall4(nr::REBOOT, MAGIC1, MAGIC2, CMD_RESTART, 0) };
    check(ret).err().unwrap_or(EINVAL)
}

/// Starts `entry(arg)` in a new process that shares this one's memory
/// and runs on `stack`, suspending the caller until the child calls
/// `execve` or exits (`clone(CLONE_VM | CLONE_VFORK | SIGCHLD)`, what
/// `posix_spawn` does). This skips copying the page tables and the
/// copy-on-write faults of `fork`, which cost hundreds of milliseconds on
/// an emulated guest.
///
/// `entry` must not return, must not allocate, and may write only to its
/// own stack: the parent's heap and data are shared and the parent's
/// registers and stack frames are trusted to be intact when it resumes.
pub fn spawn_vfork(entry: extern "C" fn(usize) -> !, arg: usize, stack: &mut [u8]) -> Result<i32> {
    const CLONE_VM: usize = 0x100;
    const CLONE_VFORK: usize = 0x4000;
    const SIGCHLD: usize = 17;
    let top = (stack.as_mut_ptr() as usize + stack.len()) & !15;
    // SAFETY: upheld by `raw::clone_vfork`'s contract: `top` is the
    // 16-byte aligned end of a buffer borrowed mutably for this call, so
    // nobody else uses it, and the child is done with it (exec'd or
    // exited) before the call returns, as CLONE_VFORK suspends the parent
    // until then; `entry` never returns.
    let ret = unsafe { raw::clone_vfork(CLONE_VM | CLONE_VFORK | SIGCHLD, top, entry, arg) };
    check_i32(ret)
}
