//! The allow-lists themselves.

use std::collections::BTreeMap;

use seccompiler::{
    BackendError, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Which allow-list a thread gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread and the threads it starts.
    Vmm,
    /// A vCPU thread (on top of [`ThreadKind::Vmm`]).
    Vcpu,
}

impl ThreadKind {
    /// A short name for errors.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vmm => "vmm",
            ThreadKind::Vcpu => "vcpu",
        }
    }
}

const ARCH: TargetArch = TargetArch::x86_64;

/// The ioctl type byte of every KVM request (`KVMIO`).
const KVMIO: u64 = 0xAE;

/// Terminal and descriptor ioctls the standard library and the logger use.
const FILE_IOCTLS: [u64; 5] = [
    0x5401, // TCGETS (isatty)
    0x5413, // TIOCGWINSZ
    0x541B, // FIONREAD
    0x5421, // FIONBIO (set_nonblocking)
    0x5451, // FIOCLEX
];

/// Calls any thread may make, without conditions.
const COMMON: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_lseek,
    libc::SYS_close,
    libc::SYS_openat,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_fcntl,
    libc::SYS_ftruncate,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_munmap,
    libc::SYS_madvise,
    libc::SYS_mremap,
    libc::SYS_brk,
    libc::SYS_futex,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_tgkill,
    libc::SYS_sched_yield,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_clock_gettime,
    libc::SYS_gettimeofday,
    libc::SYS_getrandom,
    libc::SYS_io_uring_enter,
    libc::SYS_rseq,
];

/// What only the VMM's main thread and its helpers make, without
/// conditions.
const VMM_ONLY: &[i64] = &[
    libc::SYS_rt_sigaction,
    libc::SYS_set_robust_list,
    libc::SYS_sched_getaffinity,
    libc::SYS_prlimit64,
    libc::SYS_getrlimit,
    libc::SYS_eventfd2,
    libc::SYS_pipe2,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_getdents64,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_fallocate,
    libc::SYS_fadvise64,
    libc::SYS_copy_file_range,
    libc::SYS_fchmod,
    libc::SYS_chmod,
    libc::SYS_fchmodat,
    libc::SYS_mincore,
    libc::SYS_sysinfo,
    libc::SYS_uname,
    libc::SYS_getcwd,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_register,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_shutdown,
    libc::SYS_clone3,
];

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, BackendError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Qword, op, value)
}

fn rule(conditions: Vec<SeccompCondition>) -> Result<SeccompRule, BackendError> {
    SeccompRule::new(conditions)
}

/// `ioctl` on KVM requests, and (for the VMM) the file ioctls.
fn ioctl_rules(kind: ThreadKind) -> Result<Vec<SeccompRule>, BackendError> {
    let mut rules = vec![rule(vec![cond(
        1,
        SeccompCmpOp::MaskedEq(0xFF00),
        KVMIO << 8,
    )?])?];
    if kind == ThreadKind::Vmm {
        for request in FILE_IOCTLS {
            rules.push(rule(vec![cond(1, SeccompCmpOp::Eq, request)?])?);
        }
    }
    Ok(rules)
}

/// `mmap` and `mprotect` without `PROT_EXEC`.
fn no_exec() -> Result<Vec<SeccompRule>, BackendError> {
    let prot_exec = u64::try_from(libc::PROT_EXEC).unwrap_or(4);
    Ok(vec![rule(vec![cond(
        2,
        SeccompCmpOp::MaskedEq(prot_exec),
        0,
    )?])?])
}

/// Sockets of the families the VMM uses: Unix (control, vsock), IPv4 and
/// IPv6 (the guest's outbound connections and DNS).
fn socket_rules() -> Result<Vec<SeccompRule>, BackendError> {
    [libc::AF_UNIX, libc::AF_INET, libc::AF_INET6]
        .into_iter()
        .map(|family| {
            let family = u64::try_from(family).unwrap_or(u64::MAX);
            rule(vec![cond(0, SeccompCmpOp::Eq, family)?])
        })
        .collect()
}

/// `clone` for threads only (`CLONE_THREAD` set): no new processes.
fn thread_clone() -> Result<Vec<SeccompRule>, BackendError> {
    let thread = u64::try_from(libc::CLONE_THREAD).unwrap_or(0x10000);
    Ok(vec![rule(vec![cond(
        0,
        SeccompCmpOp::MaskedEq(thread),
        thread,
    )?])?])
}

/// `prctl` to name a thread or read its name, and to set `no_new_privs`
/// (before a thread adds its own filter).
fn prctl_rules(kind: ThreadKind) -> Result<Vec<SeccompRule>, BackendError> {
    let options: &[libc::c_int] = match kind {
        ThreadKind::Vmm => &[
            libc::PR_SET_NAME,
            libc::PR_GET_NAME,
            libc::PR_SET_NO_NEW_PRIVS,
        ],
        ThreadKind::Vcpu => &[libc::PR_SET_NO_NEW_PRIVS],
    };
    options
        .iter()
        .map(|option| {
            let option = u64::try_from(*option).unwrap_or(u64::MAX);
            rule(vec![cond(0, SeccompCmpOp::Eq, option)?])
        })
        .collect()
}

/// `seccomp(SECCOMP_SET_MODE_FILTER)`: a thread adding a filter can only
/// restrict itself further.
fn add_filter() -> Result<Vec<SeccompRule>, BackendError> {
    let set_filter = u64::from(libc::SECCOMP_SET_MODE_FILTER);
    Ok(vec![rule(vec![cond(0, SeccompCmpOp::Eq, set_filter)?])?])
}

/// The allow-list of `kind`; anything else gets `mismatch`.
pub fn allow_list(
    kind: ThreadKind,
    mismatch: SeccompAction,
) -> Result<SeccompFilter, BackendError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for call in COMMON {
        rules.insert(*call, Vec::new());
    }
    rules.insert(libc::SYS_ioctl, ioctl_rules(kind)?);
    rules.insert(libc::SYS_mmap, no_exec()?);
    rules.insert(libc::SYS_mprotect, no_exec()?);
    if kind == ThreadKind::Vmm {
        for call in VMM_ONLY {
            rules.insert(*call, Vec::new());
        }
        rules.insert(libc::SYS_socket, socket_rules()?);
        rules.insert(libc::SYS_clone, thread_clone()?);
    }
    rules.insert(libc::SYS_prctl, prctl_rules(kind)?);
    rules.insert(libc::SYS_seccomp, add_filter()?);
    SeccompFilter::new(rules, mismatch, SeccompAction::Allow, ARCH)
}

/// A filter that answers `clone3` with `ENOSYS` and lets everything else
/// through (to the allow-list).
pub fn clone3_enosys() -> Result<SeccompFilter, BackendError> {
    let enosys = u32::try_from(libc::ENOSYS).unwrap_or(38);
    SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(enosys),
        ARCH,
    )
}
