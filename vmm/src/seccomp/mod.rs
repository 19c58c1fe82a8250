//! Seccomp-BPF allow-lists, one per thread kind, built with `seccompiler`
//! (the rust-vmm crate from Firecracker).
//!
//! | thread | filter |
//! |---|---|
//! | the VMM's main thread (standby wait, build or restore, event loop, control socket) and every thread it starts | [`ThreadKind::Vmm`]: files, sockets (Unix, IPv4, IPv6 only), KVM ioctls, io_uring, threads (no new processes), no `execve`, no `ptrace`, no mounts, no executable mappings |
//! | each vCPU thread, on top of the above | [`ThreadKind::Vcpu`]: KVM ioctls, I/O on descriptors it already has, the console file's rotation, memory and futexes; no sockets, no new threads |
//!
//! [`install`] puts the VMM filter on the calling thread (the main thread,
//! right after the jail, before any guest runs or a standby waits); the
//! threads it starts inherit it, and vCPU threads add theirs with
//! [`install_thread`] before their first `KVM_RUN`. A system call outside
//! the list kills the whole VMM (`SIGSYS`), which its parent sees as the
//! exit signal. `clone3` gets `ENOSYS` instead (its flags live in memory a
//! filter cannot read), so the C library falls back to `clone`, whose flags
//! are checked: only threads.

mod filters;

use std::sync::atomic::{AtomicU8, Ordering};

use seccompiler::{BpfProgram, SeccompAction};

pub use filters::ThreadKind;

/// Makes a system call that no filter here allows (`kexec_file_load`),
/// for tests of a VMM that does: under a filter the kernel kills the VMM
/// with `SIGSYS` before the call returns. Without a filter the call fails
/// (bad descriptors, no capability) and harms nothing. Only with the
/// test-only `fault-injection` feature; otherwise it does nothing. Returns
/// what to answer when the VMM lives on.
pub fn forbidden_syscall() -> String {
    #[cfg(feature = "fault-injection")]
    {
        // SAFETY: kexec_file_load with descriptors -1 and no command line
        // reads no memory of ours and fails with EBADF or EPERM; under a
        // filter it never runs.
        let r = unsafe { libc::syscall(libc::SYS_kexec_file_load, -1, -1, 0, 0, 0) };
        let e = std::io::Error::last_os_error();
        format!("kexec_file_load was not stopped by a seccomp filter (returned {r}: {e})")
    }
    #[cfg(not(feature = "fault-injection"))]
    {
        "forbidden-syscall: this vmm is built without the fault-injection feature".to_owned()
    }
}

/// Errors of building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The filter could not be compiled.
    #[error("cannot build the {0} seccomp filter")]
    Build(&'static str, #[source] seccompiler::BackendError),
    /// The kernel refused the filter.
    #[error("cannot install the {0} seccomp filter")]
    Install(&'static str, #[source] seccompiler::Error),
}

/// What a system call outside the list does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The kernel kills the VMM (the default).
    Kill,
    /// The call goes through and the kernel logs it (to the audit log or
    /// the kernel log): for finding what a new code path needs.
    Log,
}

const NONE: u8 = 0;
const KILL: u8 = 1;
const LOG: u8 = 2;

/// The mode the process filter was installed with (`NONE` before).
static INSTALLED: AtomicU8 = AtomicU8::new(NONE);

fn compile(kind: ThreadKind, mode: Mode) -> Result<Vec<BpfProgram>, Error> {
    let mismatch = match mode {
        Mode::Kill => SeccompAction::KillProcess,
        Mode::Log => SeccompAction::Log,
    };
    let allow: BpfProgram = filters::allow_list(kind, mismatch)
        .and_then(BpfProgram::try_from)
        .map_err(|e| Error::Build(kind.name(), e))?;
    let mut programs = vec![allow];
    if kind == ThreadKind::Vmm {
        let clone3: BpfProgram = filters::clone3_enosys()
            .and_then(BpfProgram::try_from)
            .map_err(|e| Error::Build("clone3", e))?;
        programs.push(clone3);
    }
    Ok(programs)
}

fn apply(kind: ThreadKind, programs: &[BpfProgram]) -> Result<(), Error> {
    for program in programs {
        seccompiler::apply_filter(program).map_err(|e| Error::Install(kind.name(), e))?;
    }
    Ok(())
}

/// Installs the VMM filter on the calling thread (and so on every thread
/// it starts from now on). Needs `no_new_privs` (the jail sets it) or
/// `CAP_SYS_ADMIN`; this sets `no_new_privs` itself.
pub fn install(mode: Mode) -> Result<(), Error> {
    let programs = compile(ThreadKind::Vmm, mode)?;
    apply(ThreadKind::Vmm, &programs)?;
    INSTALLED.store(
        match mode {
            Mode::Kill => KILL,
            Mode::Log => LOG,
        },
        Ordering::Release,
    );
    Ok(())
}

/// Adds the filter of `kind` to the calling thread when the process has
/// one ([`install`]); does nothing otherwise.
pub fn install_thread(kind: ThreadKind) -> Result<(), Error> {
    let mode = match INSTALLED.load(Ordering::Acquire) {
        KILL => Mode::Kill,
        LOG => Mode::Log,
        _ => return Ok(()),
    };
    let programs = compile(kind, mode)?;
    apply(kind, &programs)
}

/// Whether the process runs under a filter.
pub fn installed() -> bool {
    INSTALLED.load(Ordering::Acquire) != NONE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filter_compiles_in_both_modes() {
        for kind in [ThreadKind::Vmm, ThreadKind::Vcpu] {
            for mode in [Mode::Kill, Mode::Log] {
                let programs = compile(kind, mode).expect("compiles");
                assert!(programs.iter().all(|p| !p.is_empty()));
            }
        }
    }

    /// In a child process (the filter cannot be removed once on), the VMM
    /// filter lets ordinary work through, gives `clone3` ENOSYS and kills
    /// the process on `execve`.
    #[test]
    fn the_vmm_filter_allows_work_and_kills_on_exec() {
        // Compiled before the fork: the child allocates nothing.
        let programs = compile(ThreadKind::Vmm, Mode::Kill).expect("compiles");
        // SAFETY: the child makes only system calls (prctl, seccomp,
        // clone3, getpid, execv, _exit) on data prepared before the fork,
        // so no lock another test thread held at the fork is ever taken.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork");
        if pid == 0 {
            // SAFETY: prctl with integer arguments.
            unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
            if apply(ThreadKind::Vmm, &programs).is_err() {
                // SAFETY: _exit ends the child at once.
                unsafe { libc::_exit(3) };
            }
            // SAFETY: clone3 with a null argument: the filter answers
            // before the kernel reads it.
            let r = unsafe { libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0usize) };
            let errno = std::io::Error::last_os_error().raw_os_error();
            if r != -1 || errno != Some(libc::ENOSYS) {
                // SAFETY: _exit ends the child at once.
                unsafe { libc::_exit(4) };
            }
            // SAFETY: getpid is allowed and touches no memory.
            unsafe { libc::getpid() };
            let path = c"/bin/true";
            let argv = [path.as_ptr(), std::ptr::null()];
            // SAFETY: a valid path and a null-terminated argv; the
            // filter kills the process before the kernel runs it.
            unsafe { libc::execv(path.as_ptr(), argv.as_ptr()) };
            // SAFETY: _exit ends the child at once.
            unsafe { libc::_exit(5) };
        }
        let mut status = 0;
        // SAFETY: waits for the child forked above.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(
            libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS,
            "the child should die of SIGSYS, got status {status:#x}"
        );
    }
}
