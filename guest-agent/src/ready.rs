//! When the entrypoint is ready: its `ready_port` accepts, then its ready
//! command (`ready_arg=`) exits 0. Each step is retried until it passes;
//! how long to wait is the host's decision, not the agent's.

use crate::spawn::{spawn_on, ChildStack, Plan};
use crate::sys::{self, sock};
use guest_agent::signals::SIGKILL;
use guest_agent::status::ExitStatus;

/// Interval between probes of `ready_port`.
const PORT_PROBE_MS: u64 = 10;
/// First wait between runs of the ready command; doubled after each
/// failure up to [`COMMAND_RETRY_MAX_MS`].
const COMMAND_RETRY_FIRST_MS: u64 = 50;
/// Longest wait between runs of the ready command.
const COMMAND_RETRY_MAX_MS: u64 = 2_000;
/// A run of the ready command that takes longer is killed (and counts as
/// a failure): a probe that hangs must not stall readiness for good. It
/// is long because one run may legitimately take tens of seconds on an
/// emulated guest kernel (a database forks a backend to answer).
const COMMAND_LIMIT_MS: u64 = 300_000;

/// The ready command and its runs.
pub struct ReadyCommand {
    plan: Plan,
    stack: ChildStack,
    /// The run under way, and when it started.
    running: Option<(i32, u64)>,
    /// When the next run may start.
    next_at: u64,
    /// The wait after the next failure.
    delay: u64,
}

impl ReadyCommand {
    /// The command `plan` describes.
    pub fn new(plan: Plan) -> Self {
        Self {
            plan,
            stack: ChildStack::new(),
            running: None,
            next_at: 0,
            delay: COMMAND_RETRY_FIRST_MS,
        }
    }

    fn failed(&mut self, now: u64) {
        self.next_at = now.saturating_add(self.delay);
        self.delay = self.delay.saturating_mul(2).min(COMMAND_RETRY_MAX_MS);
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Not started, or given up (no host to tell).
    Idle,
    /// Waiting for the port to accept.
    Port,
    /// Running the ready command until it exits 0.
    Command,
    /// Ready (reported once).
    Ready,
}

/// The readiness checks of one entrypoint.
pub struct Readiness {
    port: Option<u16>,
    command: Option<ReadyCommand>,
    step: Step,
}

impl Readiness {
    /// Ready at exec: nothing to check.
    pub fn at_exec() -> Self {
        Self::new(None, None)
    }

    /// Ready once `port` accepts (if any), then once `command` exits 0 (if
    /// any).
    pub fn new(port: Option<u16>, command: Option<ReadyCommand>) -> Self {
        Self {
            port,
            command,
            step: Step::Idle,
        }
    }

    /// The entrypoint was exec'd: the checks start.
    pub fn start(&mut self) {
        self.step = Step::Port;
    }

    /// Stops checking (a run under way is reaped like any other child).
    pub fn abandon(&mut self) {
        if self.step != Step::Ready {
            self.step = Step::Idle;
        }
    }

    /// Runs the checks that are due; `true` exactly once, when the
    /// entrypoint becomes ready.
    pub fn check(&mut self) -> bool {
        if self.step == Step::Port {
            match self.port {
                Some(port) if !sock::tcp_accepts(port) => return false,
                _ => self.step = Step::Command,
            }
        }
        if self.step != Step::Command {
            return false;
        }
        let Some(command) = &mut self.command else {
            self.step = Step::Ready;
            return true;
        };
        let now = sys::monotonic_ms();
        match command.running {
            Some((pid, started)) if now.saturating_sub(started) >= COMMAND_LIMIT_MS => {
                // Its SIGCHLD then ends the run as a failure.
                let _ = sys::kill(pid, SIGKILL);
            }
            Some(_) => {}
            None if now >= command.next_at => match spawn_on(&command.plan, &mut command.stack) {
                Ok(pid) => command.running = Some((pid, now)),
                Err(_) => command.failed(now),
            },
            None => {}
        }
        false
    }

    /// The pid of the ready command's run under way.
    pub fn running(&self) -> Option<i32> {
        self.command.as_ref()?.running.map(|(pid, _)| pid)
    }

    /// The run under way ended with `status`; `true` exactly once, when
    /// that makes the entrypoint ready.
    pub fn exited(&mut self, status: Option<ExitStatus>) -> bool {
        let Some(command) = &mut self.command else {
            return false;
        };
        command.running = None;
        if self.step != Step::Command {
            return false;
        }
        if status == Some(ExitStatus::Exited(0)) {
            self.step = Step::Ready;
            return true;
        }
        command.failed(sys::monotonic_ms());
        false
    }

    /// How long the supervise loop may sleep before [`Readiness::check`]
    /// is due again (`None`: until a signal or the host).
    pub fn timeout(&self) -> Option<u64> {
        match self.step {
            Step::Port => Some(PORT_PROBE_MS),
            Step::Command => {
                let command = self.command.as_ref()?;
                let now = sys::monotonic_ms();
                Some(match command.running {
                    Some((_, started)) => {
                        started.saturating_add(COMMAND_LIMIT_MS).saturating_sub(now)
                    }
                    None => command.next_at.saturating_sub(now),
                })
            }
            Step::Idle | Step::Ready => None,
        }
    }
}
