//! Waiting on the entrypoint: reaping, forwarding signals, and the final
//! SIGTERM/SIGKILL round.

use crate::console::Console;
use crate::sys::sock::{self, PollFd, POLLIN};
use crate::sys::{self, Errno, MaskHow, ECHILD, ESRCH};
use crate::vsock::HostLink;
use guest_agent::report::Event;
use guest_agent::signals::{action, Action, Scope, HANDLED, SIGKILL, SIGTERM};
use guest_agent::status::ExitStatus;

/// The agent's signal source.
pub struct Signals {
    fd: i32,
}

impl Signals {
    /// Blocks the handled signals and opens a signalfd for them. Must run
    /// before the entrypoint starts so that no SIGCHLD is lost.
    pub fn open() -> sys::Result<Self> {
        sys::sigprocmask(MaskHow::Block, HANDLED)?;
        Ok(Self {
            fd: sys::signalfd(HANDLED)?,
        })
    }
}

/// What one round of `wait4(-1, WNOHANG)` found.
struct Reaped {
    entrypoint: Option<ExitStatus>,
    /// The ready command's run ended (with this status, if a normal one).
    ready_command: Option<Option<ExitStatus>>,
    no_children: bool,
}

/// Collects every exited child; notes the entrypoint's status and the
/// ready command's (`ready_command`: the pid of its run, if one is under
/// way).
fn reap(entrypoint: i32, ready_command: Option<i32>, console: Console) -> Reaped {
    let mut reaped = Reaped {
        entrypoint: None,
        ready_command: None,
        no_children: false,
    };
    loop {
        match sys::wait4(-1, true) {
            Ok(Some((pid, raw))) => {
                if pid == entrypoint {
                    reaped.entrypoint = ExitStatus::from_wait(raw);
                } else if Some(pid) == ready_command {
                    reaped.ready_command = Some(ExitStatus::from_wait(raw));
                }
            }
            Ok(None) => return reaped,
            Err(ECHILD) => {
                reaped.no_children = true;
                return reaped;
            }
            Err(Errno(errno)) => {
                let _ = console.report(Event::Skipped {
                    what: "wait4",
                    errno,
                });
                return reaped;
            }
        }
    }
}

/// Runs until the entrypoint (`pid`) exits, forwarding termination
/// signals to its process group and reaping every zombie on the way.
/// With a host channel in `link` it also answers the host and reports
/// readiness, polling the channel beside the signalfd.
pub fn wait_entrypoint(
    signals: &Signals,
    pid: i32,
    console: Console,
    link: &mut HostLink,
) -> sys::Result<ExitStatus> {
    // A SIGCHLD raised before the signalfd read is still pending, but reap
    // once anyway: it costs one call and covers an exec failure that ended
    // the child while we were suspended in vfork.
    if let Some(status) = reap(pid, None, console).entrypoint {
        return Ok(status);
    }
    // Still running after vfork returned: the exec succeeded.
    link.started();
    let mut batch = [0i32; 16];
    loop {
        if link.active() {
            let mut fds = [
                PollFd {
                    fd: signals.fd,
                    events: POLLIN,
                    revents: 0,
                },
                link.pollfd(),
            ];
            sock::poll(&mut fds, link.timeout())?;
            if fds[1].revents != 0 {
                link.readable();
            }
            link.tick();
            if fds[0].revents == 0 {
                continue;
            }
        }
        let n = sys::read_signals(signals.fd, &mut batch)?;
        for &signo in &batch[..n] {
            match action(signo, Some(pid)) {
                Action::Reap => {
                    let reaped = reap(pid, link.ready_command(), console);
                    if let Some(status) = reaped.entrypoint {
                        return Ok(status);
                    }
                    if let Some(status) = reaped.ready_command {
                        link.ready_command_exited(status);
                    }
                }
                Action::Forward { target } => {
                    // The group is gone if the entrypoint moved its own
                    // process elsewhere; fall back to the process.
                    if sys::kill(target, signo) == Err(ESRCH) {
                        let _ = sys::kill(pid, signo);
                    }
                }
                Action::Ignore => {}
            }
        }
    }
}

/// SIGTERM to `scope`, up to `grace_ms` for it to go, then SIGKILL.
pub fn stop(signals: &Signals, scope: Scope, grace_ms: u32, console: Console) {
    let target = scope.target();
    if sys::kill(target, SIGTERM) == Err(ESRCH) {
        // Nobody left to stop; still collect any zombie.
        reap(0, None, console);
        return;
    }
    let deadline = sys::monotonic_ms().saturating_add(u64::from(grace_ms));
    let mut batch = [0i32; 16];
    loop {
        if reap(0, None, console).no_children {
            return;
        }
        let now = sys::monotonic_ms();
        if now >= deadline {
            break;
        }
        if let Ok(true) = sys::poll_readable(signals.fd, deadline - now) {
            // Drain so the next poll waits for new signals only.
            let _ = sys::read_signals(signals.fd, &mut batch);
        }
    }
    let _ = console.report(Event::Progress {
        what: "grace period over, sending",
        subject: b"SIGKILL",
    });
    let _ = sys::kill(target, SIGKILL);
    reap(0, None, console);
}
