//! Decoding `wait4` statuses.

use core::fmt;

/// How a process ended, from a `wait4` status word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// It called `exit` with this code (`WIFEXITED`, `WEXITSTATUS`).
    Exited(u8),
    /// A signal killed it (`WIFSIGNALED`, `WTERMSIG`).
    Signaled(u8),
}

impl ExitStatus {
    /// Decodes a status word; `None` for the stopped/continued reports
    /// that only `WUNTRACED`/`WCONTINUED` waits produce.
    ///
    /// ```
    /// use guest_agent::status::ExitStatus;
    /// assert_eq!(ExitStatus::from_wait(3 << 8), Some(ExitStatus::Exited(3)));
    /// assert_eq!(ExitStatus::from_wait(9), Some(ExitStatus::Signaled(9)));
    /// ```
    pub fn from_wait(raw: i32) -> Option<Self> {
        let low = raw & 0x7f;
        let [_, high, ..] = raw.to_le_bytes();
        match low {
            0 => Some(Self::Exited(high)),
            // 0x7f marks a stopped child; 0xffff a continued one.
            0x7f => None,
            // The mask keeps `low` in 1..=0x7e here, which fits a u8.
            sig if raw & 0xffff != 0xffff => Some(Self::Signaled(sig.to_le_bytes()[0])),
            _ => None,
        }
    }

    /// The code a shell would report: the exit code, or 128 + the signal.
    pub fn code(self) -> u8 {
        match self {
            Self::Exited(code) => code,
            Self::Signaled(sig) => 128u8.saturating_add(sig),
        }
    }
}

impl fmt::Display for ExitStatus {
    /// `exited status=<code>` or `killed signal=<n>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exited(code) => write!(f, "exited status={code}"),
            Self::Signaled(sig) => write!(f, "killed signal={sig}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_exits_signals_and_core_dumps() {
        assert_eq!(ExitStatus::from_wait(0), Some(ExitStatus::Exited(0)));
        assert_eq!(ExitStatus::from_wait(0xff00), Some(ExitStatus::Exited(255)));
        assert_eq!(ExitStatus::from_wait(15), Some(ExitStatus::Signaled(15)));
        // SIGSEGV with the core-dump bit.
        assert_eq!(
            ExitStatus::from_wait(0x80 | 11),
            Some(ExitStatus::Signaled(11))
        );
        assert_eq!(
            ExitStatus::from_wait(0x7e),
            Some(ExitStatus::Signaled(0x7e))
        );
    }

    #[test]
    fn stopped_and_continued_are_not_exits() {
        assert_eq!(ExitStatus::from_wait((19 << 8) | 0x7f), None);
        assert_eq!(ExitStatus::from_wait(0xffff), None);
    }

    #[test]
    fn shell_codes() {
        assert_eq!(ExitStatus::Exited(3).code(), 3);
        assert_eq!(ExitStatus::Signaled(9).code(), 137);
        assert_eq!(ExitStatus::Signaled(127).code(), 255);
    }

    #[test]
    fn display_matches_the_console_contract() {
        assert_eq!(ExitStatus::Exited(0).to_string(), "exited status=0");
        assert_eq!(ExitStatus::Signaled(9).to_string(), "killed signal=9");
    }
}
