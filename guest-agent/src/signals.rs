//! Which signals the agent takes, and what it does with each.
//!
//! The agent blocks the signals it cares about and reads them from a
//! signalfd. Blocking matters for PID 1: the kernel drops signals whose
//! disposition is SIG_DFL for init, but a blocked signal stays pending and
//! reaches the signalfd.

/// Hangup.
pub const SIGHUP: i32 = 1;
/// Interrupt (Ctrl-C).
pub const SIGINT: i32 = 2;
/// Quit.
pub const SIGQUIT: i32 = 3;
/// Kill (cannot be caught).
pub const SIGKILL: i32 = 9;
/// User signal 1.
pub const SIGUSR1: i32 = 10;
/// User signal 2.
pub const SIGUSR2: i32 = 12;
/// Termination request.
pub const SIGTERM: i32 = 15;
/// A child changed state.
pub const SIGCHLD: i32 = 17;

/// Signals passed on to the entrypoint's process group.
pub const FORWARDED: [i32; 6] = [SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2];

/// The kernel `sigset_t` (64 bits on x86-64) holding `signals`.
pub const fn mask(signals: &[i32]) -> u64 {
    let mut set = 0u64;
    let mut i = 0;
    while i < signals.len() {
        set |= 1 << (signals[i] - 1);
        i += 1;
    }
    set
}

/// Everything the agent blocks and reads from its signalfd.
pub const HANDLED: u64 = mask(&FORWARDED) | mask(&[SIGCHLD]);

/// What to do with a signal read from the signalfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Collect exited children with `wait4(-1, WNOHANG)`.
    Reap,
    /// `kill(target, signal)`: a negative target is a process group.
    Forward {
        /// The `kill` pid argument.
        target: i32,
    },
    /// Nothing to do.
    Ignore,
}

/// Decides what a signal means while the entrypoint (`entrypoint`, the
/// leader of its own session and process group) may still run; `None`
/// once it has exited, when termination signals are the agent's own
/// business.
pub fn action(signo: i32, entrypoint: Option<i32>) -> Action {
    match (signo, entrypoint) {
        (SIGCHLD, _) => Action::Reap,
        (sig, Some(pid)) if pid > 0 && FORWARDED.contains(&sig) => Action::Forward { target: -pid },
        _ => Action::Ignore,
    }
}

/// Who gets SIGTERM and then SIGKILL once the entrypoint has exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Every process but the agent: `kill(-1)`, right for PID 1 only.
    Everyone,
    /// The entrypoint's process group: for the host test mode, where
    /// `kill(-1)` would hit the user's other processes.
    Group(i32),
}

impl Scope {
    /// The `kill` pid argument.
    pub fn target(self) -> i32 {
        match self {
            Self::Everyone => -1,
            Self::Group(pgid) => -pgid,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_use_bit_signo_minus_one() {
        assert_eq!(mask(&[SIGHUP]), 1);
        assert_eq!(mask(&[SIGCHLD]), 1 << 16);
        assert_eq!(HANDLED.count_ones(), 7);
        assert_eq!(HANDLED & mask(&[SIGKILL]), 0);
    }

    #[test]
    fn termination_signals_go_to_the_entrypoint_group() {
        for sig in FORWARDED {
            assert_eq!(action(sig, Some(42)), Action::Forward { target: -42 });
        }
        assert_eq!(action(SIGCHLD, Some(42)), Action::Reap);
        assert_eq!(action(SIGKILL, Some(42)), Action::Ignore);
        assert_eq!(action(28, Some(42)), Action::Ignore);
    }

    #[test]
    fn after_the_entrypoint_exits_only_reaping_remains() {
        assert_eq!(action(SIGTERM, None), Action::Ignore);
        assert_eq!(action(SIGCHLD, None), Action::Reap);
        // A bogus pid never turns into kill(0) or kill(-1).
        assert_eq!(action(SIGTERM, Some(0)), Action::Ignore);
        assert_eq!(action(SIGTERM, Some(-1)), Action::Ignore);
    }

    #[test]
    fn shutdown_scopes() {
        assert_eq!(Scope::Everyone.target(), -1);
        assert_eq!(Scope::Group(42).target(), -42);
    }
}
