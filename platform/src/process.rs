//! A `vmm` process the daemon started, jailed or not.
//!
//! A jailed `vmm` forks the real VMM into its new PID namespace, prints its
//! pid and exits (see `vmm_api::launch::Jail`). The daemon is a child
//! subreaper ([`become_subreaper`]), so that VMM becomes the daemon's own
//! child: it is waited for and killed by pid like any child, and its pid
//! cannot be reused while the daemon has not reaped it.
//!
//! Every `vmm` started here is registered until it is reaped, so that
//! [`stop_all`] can stop them all when the daemon stops, those of a deploy
//! or a wake still in flight included.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::{Mutex, PoisonError, RwLock};

use vmm_api::launch::VmmArgs;

/// Errors of starting a `vmm`.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The program could not be started.
    #[error("cannot start {0}")]
    Spawn(String, #[source] std::io::Error),
    /// The jail could not be built; the text is the `vmm`'s stderr.
    #[error("the vmm could not jail itself: {0}")]
    Jail(String),
    /// Waiting for or signalling the process failed.
    #[error("cannot wait for the vmm")]
    Wait(#[source] std::io::Error),
    /// The daemon is stopping: no more VMMs start.
    #[error("the daemon is stopping")]
    Stopping,
}

/// Held shared while a `vmm` starts and exclusively by [`stop_all`]; true
/// once that has run, when no more start.
static STARTING: RwLock<bool> = RwLock::new(false);
/// The pids of the `vmm`s started here and not yet reaped.
static LIVE: Mutex<BTreeSet<libc::pid_t>> = Mutex::new(BTreeSet::new());

fn live() -> std::sync::MutexGuard<'static, BTreeSet<libc::pid_t>> {
    LIVE.lock().unwrap_or_else(PoisonError::into_inner)
}

/// SIGKILLs every `vmm` started here that is not reaped yet, once those
/// being started are registered, and refuses to start more: for a daemon
/// about to exit, whose deploys and wakes may still be under way.
pub fn stop_all() -> usize {
    let mut stopping = STARTING.write().unwrap_or_else(PoisonError::into_inner);
    *stopping = true;
    let pids = live();
    for &pid in pids.iter() {
        // SAFETY: kill(2) with the pid of a child not yet reaped (its pid
        // cannot belong to another process) and a valid signal number.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    pids.len()
}

/// How a process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// It exited with this code.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
}

impl Exit {
    fn from_status(status: libc::c_int) -> Self {
        if libc::WIFSIGNALED(status) {
            Exit::Signal(libc::WTERMSIG(status))
        } else {
            Exit::Code(libc::WEXITSTATUS(status))
        }
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exited with code {c}"),
            Exit::Signal(libc::SIGSYS) => {
                write!(
                    f,
                    "killed by seccomp (a system call outside its allow-list)"
                )
            }
            Exit::Signal(libc::SIGKILL) => write!(f, "killed (SIGKILL)"),
            Exit::Signal(s) => write!(f, "killed by signal {s}"),
        }
    }
}

/// Makes this process the reaper of its orphaned descendants (the jailed
/// VMMs, once the process that forked each has exited).
pub fn become_subreaper() -> std::io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A running (or ended, not yet reaped) `vmm`.
#[derive(Debug)]
pub struct VmmProcess {
    pid: libc::pid_t,
    exit: Option<Exit>,
    stderr: Option<std::fs::File>,
}

impl VmmProcess {
    /// Starts `vmm` with `args`, stdin and stdout closed. With a jail, waits
    /// until the jailed VMM exists (the jail is built before it runs a
    /// guest) and returns it; the caller must be a subreaper. With
    /// `keep_stderr`, [`Self::stderr`] reads what the VMM writes there.
    pub fn spawn(vmm: &Path, args: &VmmArgs, keep_stderr: bool) -> Result<Self, ProcessError> {
        let stopping = STARTING.read().unwrap_or_else(PoisonError::into_inner);
        if *stopping {
            return Err(ProcessError::Stopping);
        }
        let process = Self::start(vmm, args, keep_stderr)?;
        live().insert(process.pid);
        Ok(process)
    }

    fn start(vmm: &Path, args: &VmmArgs, keep_stderr: bool) -> Result<Self, ProcessError> {
        let jailed = args.jail.is_some();
        let mut command = args.command(vmm);
        command
            .stdin(Stdio::null())
            .stdout(if jailed {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stderr(if keep_stderr || jailed {
                Stdio::piped()
            } else {
                Stdio::null()
            });
        let mut child = command
            .spawn()
            .map_err(|e| ProcessError::Spawn(vmm.display().to_string(), e))?;
        let stderr = child.stderr.take().map(pipe_file);
        if !jailed {
            let pid = libc::pid_t::try_from(child.id()).map_err(|_| {
                ProcessError::Wait(std::io::Error::from(std::io::ErrorKind::InvalidData))
            })?;
            // The Child is dropped without waiting: this handle reaps it.
            return Ok(Self {
                pid,
                exit: None,
                stderr: stderr.filter(|_| keep_stderr),
            });
        }
        Self::adopt(child, stderr, keep_stderr)
    }

    /// Takes over a child this process started (it must not be waited for
    /// elsewhere).
    pub fn from_child(child: &Child) -> Self {
        let pid = libc::pid_t::try_from(child.id()).unwrap_or(libc::pid_t::MAX);
        live().insert(pid);
        Self {
            pid,
            exit: None,
            stderr: None,
        }
    }

    /// Reads the jailed VMM's pid from the jailing process, which then
    /// exits; the VMM is this process's child from then on.
    fn adopt(
        mut keeper: Child,
        stderr: Option<std::fs::File>,
        keep_stderr: bool,
    ) -> Result<Self, ProcessError> {
        let mut line = String::new();
        if let Some(out) = keeper.stdout.take() {
            // A pid is a few digits: read no more than a line of them.
            let _ = BufReader::new(out.take(32)).read_line(&mut line);
        }
        let status = keeper.wait().map_err(ProcessError::Wait)?;
        match line.trim().parse::<libc::pid_t>() {
            Ok(pid) if status.success() && pid > 0 => Ok(Self {
                pid,
                exit: None,
                stderr: stderr.filter(|_| keep_stderr),
            }),
            _ => {
                let mut text = String::new();
                if let Some(err) = stderr {
                    let _ = err.take(64 * 1024).read_to_string(&mut text);
                }
                Err(ProcessError::Jail(format!("{status}: {}", text.trim())))
            }
        }
    }

    /// The VMM's pid (on the host).
    pub fn id(&self) -> u32 {
        self.pid.unsigned_abs()
    }

    /// Its stderr, when kept.
    pub fn stderr(&mut self) -> Option<&mut std::fs::File> {
        self.stderr.as_mut()
    }

    /// How it ended, if it has; reaps it.
    pub fn try_wait(&mut self) -> Result<Option<Exit>, ProcessError> {
        self.wait_flags(libc::WNOHANG)
    }

    /// Waits for it to end; reaps it.
    pub fn wait(&mut self) -> Result<Exit, ProcessError> {
        loop {
            if let Some(exit) = self.wait_flags(0)? {
                return Ok(exit);
            }
        }
    }

    fn wait_flags(&mut self, flags: libc::c_int) -> Result<Option<Exit>, ProcessError> {
        if let Some(exit) = self.exit {
            return Ok(Some(exit));
        }
        let mut status: libc::c_int = 0;
        // SAFETY: waitpid writes the status into `status`, a valid c_int
        // this call borrows exclusively.
        match unsafe { libc::waitpid(self.pid, &mut status, flags) } {
            0 => Ok(None),
            -1 => {
                let err = std::io::Error::last_os_error();
                if err.kind() == std::io::ErrorKind::Interrupted {
                    return Ok(None);
                }
                Err(ProcessError::Wait(err))
            }
            _ => {
                let exit = Exit::from_status(status);
                self.exit = Some(exit);
                live().remove(&self.pid);
                Ok(Some(exit))
            }
        }
    }

    /// SIGKILLs it, unless it was already reaped (its pid may then belong
    /// to another process).
    pub fn kill(&mut self) {
        if self.exit.is_none() {
            // SAFETY: kill(2) with our unreaped child's pid and a valid
            // signal number touches no memory.
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
        }
    }

    /// Kills it and waits for it.
    pub fn kill_and_wait(&mut self) -> Option<Exit> {
        self.kill();
        self.wait().ok()
    }
}

impl Drop for VmmProcess {
    fn drop(&mut self) {
        if self.exit.is_none() {
            let _ = self.kill_and_wait();
        }
    }
}

fn pipe_file(pipe: std::process::ChildStderr) -> std::fs::File {
    std::fs::File::from(std::os::fd::OwnedFd::from(pipe))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_api::launch::{Console, Devices, Jail, Start};

    fn args(jail: Option<Jail>) -> VmmArgs {
        VmmArgs {
            start: Start::Standby,
            devices: Devices::default(),
            net_policy: vmm_api::launch::NetPolicy::default(),
            api_sock: Some("/api.sock".into()),
            console: Console::Null,
            jail,
        }
    }

    #[test]
    fn an_unjailed_process_is_waited_for_and_killed_by_pid() {
        // `sleep` ignores the vmm arguments' meaning but not their count:
        // use sh to run a long sleep whatever they are.
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("fake-vmm");
        std::fs::write(&script, "#!/bin/sh\nexec sleep 600\n").unwrap();
        std::process::Command::new("chmod")
            .arg("+x")
            .arg(&script)
            .status()
            .unwrap();
        let mut p = VmmProcess::spawn(&script, &args(None), false).unwrap();
        assert_eq!(p.try_wait().unwrap(), None);
        assert_eq!(p.kill_and_wait(), Some(Exit::Signal(libc::SIGKILL)));
        assert_eq!(p.try_wait().unwrap(), Some(Exit::Signal(libc::SIGKILL)));
    }

    #[test]
    fn a_failed_jail_reports_the_vmm_stderr() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("fake-vmm");
        std::fs::write(
            &script,
            "#!/bin/sh\necho 'vmm: error: no jail' >&2\nexit 1\n",
        )
        .unwrap();
        std::process::Command::new("chmod")
            .arg("+x")
            .arg(&script)
            .status()
            .unwrap();
        let jail = Jail {
            root: dir.path().into(),
            user: None,
            cgroups: vec![],
            binds: vec![],
        };
        let err = VmmProcess::spawn(&script, &args(Some(jail)), false).unwrap_err();
        assert!(err.to_string().contains("no jail"), "{err}");
    }

    #[test]
    fn exits_say_what_happened() {
        assert_eq!(Exit::Code(3).to_string(), "exited with code 3");
        assert!(Exit::Signal(libc::SIGSYS).to_string().contains("seccomp"));
    }
}
