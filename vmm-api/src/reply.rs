//! Replies: the one line the VMM writes for each command.

use std::fmt::{self, Write as _};
use std::time::Duration;

use crate::{Command, MAX_LINE};

/// One reply; its `Display` is the line on the wire (without the newline),
/// never longer than [`MAX_LINE`] with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// `ok`: done (`pause`, `resume`, `accept`, `quit`).
    Ok,
    /// `ok pong`: a running VMM answers `ping`.
    Pong,
    /// `ok standby`: a standby VMM answers `ping`.
    Standby,
    /// `ok state=<bytes> mem=<written>/<size> ms=<wall>`: a snapshot is written.
    Snapshot {
        /// Bytes of serialized VM and device state.
        state_bytes: u64,
        /// Bytes of guest memory written (the pages that are not zero).
        mem_written: u64,
        /// Size of the guest memory image, holes included.
        mem_len: u64,
        /// Wall time from the pause to the file in place (to the microsecond).
        elapsed: Duration,
    },
    /// `ok pages=<n>`: a working set is recorded.
    WorkingSet {
        /// Guest pages in it.
        pages: u64,
    },
    /// `ok open=<n> taken=<n>`: the network stack's connections.
    Connections {
        /// Connections it holds now.
        open: usize,
        /// Hand-overs (`accept`) it has taken so far.
        taken: u64,
    },
    /// `ok running <ms>`: a standby VMM's restored vCPUs run.
    Running {
        /// Time from the `restore` command to the vCPUs running (to the
        /// microsecond).
        elapsed: Duration,
    },
    /// `error <message>`: the command failed.
    Error(String),
}

/// Why a reply line was not understood.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseReplyError {
    /// The line is [`MAX_LINE`] bytes or longer.
    #[error("the reply is longer than {max} bytes", max = MAX_LINE - 1)]
    TooLong,
    /// Neither an `ok` nor an `error` reply the VMM writes.
    #[error("unknown reply {0:?}")]
    Unknown(String),
    /// A known reply with a missing or malformed value.
    #[error("malformed reply {0:?}")]
    Malformed(String),
}

impl Reply {
    /// Parses one line (surrounding whitespace, the newline included, is
    /// ignored). Any input gives a reply or an error, never a panic.
    pub fn parse(line: &str) -> Result<Self, ParseReplyError> {
        let line = line.trim();
        if line.len() >= MAX_LINE {
            return Err(ParseReplyError::TooLong);
        }
        if line == "error" {
            return Ok(Self::Error(String::new()));
        }
        if let Some(message) = line.strip_prefix("error ") {
            return Ok(Self::Error(message.to_owned()));
        }
        let words: Vec<&str> = match line.strip_prefix("ok") {
            Some("") => return Ok(Self::Ok),
            Some(rest) if rest.starts_with(' ') => rest.split_whitespace().collect(),
            _ => return Err(ParseReplyError::Unknown(line.to_owned())),
        };
        let malformed = || ParseReplyError::Malformed(line.to_owned());
        let value = |word: &str, key: &str| word.strip_prefix(key)?.parse::<u64>().ok();
        match words.as_slice() {
            ["pong"] => Ok(Self::Pong),
            ["standby"] => Ok(Self::Standby),
            ["running", ms] => Ok(Self::Running {
                elapsed: millis(ms).ok_or_else(malformed)?,
            }),
            [pages] if pages.starts_with("pages=") => Ok(Self::WorkingSet {
                pages: value(pages, "pages=").ok_or_else(malformed)?,
            }),
            [open, taken] if open.starts_with("open=") => Ok(Self::Connections {
                open: value(open, "open=")
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or_else(malformed)?,
                taken: value(taken, "taken=").ok_or_else(malformed)?,
            }),
            [state, mem, ms] if state.starts_with("state=") => {
                let (written, len) = mem
                    .strip_prefix("mem=")
                    .and_then(|m| m.split_once('/'))
                    .ok_or_else(malformed)?;
                Ok(Self::Snapshot {
                    state_bytes: value(state, "state=").ok_or_else(malformed)?,
                    mem_written: written.parse().map_err(|_| malformed())?,
                    mem_len: len.parse().map_err(|_| malformed())?,
                    elapsed: ms
                        .strip_prefix("ms=")
                        .and_then(millis)
                        .ok_or_else(malformed)?,
                })
            }
            _ => Err(ParseReplyError::Unknown(line.to_owned())),
        }
    }

    /// Whether this is a reply the VMM gives to `command` (an error
    /// answers any command).
    pub fn answers(&self, command: &Command) -> bool {
        matches!(
            (command, self),
            (_, Self::Error(_))
                | (Command::Ping, Self::Pong | Self::Standby)
                | (
                    Command::Pause | Command::Resume | Command::Accept { .. } | Command::Quit,
                    Self::Ok
                )
                | (
                    Command::Snapshot { .. } | Command::SnapshotDiff { .. },
                    Self::Snapshot { .. }
                )
                | (Command::WorkingSet { .. }, Self::WorkingSet { .. })
                | (Command::Connections, Self::Connections { .. })
                | (Command::Restore { .. }, Self::Running { .. })
        )
    }
}

/// A non-negative, finite count of milliseconds, to the microsecond
/// (saturating at `u64::MAX` of them, some 585,000 years).
fn millis(text: &str) -> Option<Duration> {
    let ms = text.parse::<f64>().ok()?;
    let exact = Duration::try_from_secs_f64(ms / 1e3).ok()?;
    let micros = (exact.as_nanos() + 500) / 1000;
    Some(Duration::from_micros(
        u64::try_from(micros).unwrap_or(u64::MAX),
    ))
}

/// Milliseconds with three decimals, as the VMM has always written them.
struct Millis(Duration);

impl fmt::Display for Millis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.3}", self.0.as_secs_f64() * 1e3)
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ok => f.write_str("ok"),
            Self::Pong => f.write_str("ok pong"),
            Self::Standby => f.write_str("ok standby"),
            Self::Snapshot {
                state_bytes,
                mem_written,
                mem_len,
                elapsed,
            } => write!(
                f,
                "ok state={state_bytes} mem={mem_written}/{mem_len} ms={}",
                Millis(*elapsed)
            ),
            Self::WorkingSet { pages } => write!(f, "ok pages={pages}"),
            Self::Connections { open, taken } => write!(f, "ok open={open} taken={taken}"),
            Self::Running { elapsed } => write!(f, "ok running {}", Millis(*elapsed)),
            Self::Error(message) if message.is_empty() => f.write_str("error"),
            Self::Error(message) => {
                f.write_str("error ")?;
                // One line that fits: a message is cut at MAX_LINE and its
                // line breaks become spaces.
                let mut room = MAX_LINE - "error \n".len();
                for c in message.chars() {
                    let Some(left) = room.checked_sub(c.len_utf8()) else {
                        break;
                    };
                    room = left;
                    f.write_char(if c.is_control() { ' ' } else { c })?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<(Reply, &'static str)> {
        vec![
            (Reply::Ok, "ok"),
            (Reply::Pong, "ok pong"),
            (Reply::Standby, "ok standby"),
            (
                Reply::Snapshot {
                    state_bytes: 41_234,
                    mem_written: 9_175_040,
                    mem_len: 67_108_864,
                    elapsed: Duration::from_micros(12_345),
                },
                "ok state=41234 mem=9175040/67108864 ms=12.345",
            ),
            (Reply::WorkingSet { pages: 812 }, "ok pages=812"),
            (
                Reply::Connections { open: 3, taken: 17 },
                "ok open=3 taken=17",
            ),
            (
                Reply::Running {
                    elapsed: Duration::from_micros(1_250),
                },
                "ok running 1.250",
            ),
            (
                Reply::Error("a snapshot is already in progress".into()),
                "error a snapshot is already in progress",
            ),
        ]
    }

    #[test]
    fn every_reply_formats_as_the_vmm_writes_it_and_parses_back() {
        for (reply, line) in all() {
            assert_eq!(reply.to_string(), line);
            assert_eq!(Reply::parse(line), Ok(reply.clone()), "{line:?}");
            assert_eq!(Reply::parse(&format!("{line}\n")), Ok(reply), "{line:?}");
        }
    }

    #[test]
    fn wall_times_keep_three_decimals() {
        let reply = Reply::parse("ok running 0.5").expect("valid");
        assert_eq!(reply.to_string(), "ok running 0.500");
        let reply = Reply::parse("ok state=1 mem=2/3 ms=1234.5678").expect("valid");
        assert_eq!(reply.to_string(), "ok state=1 mem=2/3 ms=1234.568");
    }

    #[test]
    fn the_longest_wall_time_formats_to_a_reply_that_parses() {
        let longest = Reply::Running {
            elapsed: Duration::from_micros(u64::MAX),
        };
        // Milliseconds as f64 lose the last microseconds here: the reply
        // saturates instead of failing.
        let again = Reply::parse(&longest.to_string());
        assert!(matches!(again, Ok(Reply::Running { .. })), "{again:?}");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let long = "ok ".to_owned() + &"x".repeat(MAX_LINE);
        for line in [
            "",
            "okay",
            "ok pong extra",
            "ok running",
            "ok running -1",
            "ok running NaN",
            "ok running inf",
            "ok running 1e300",
            "ok pages=",
            "ok pages",
            "ok pages=-1",
            "ok pages=18446744073709551616",
            "ok open=1",
            "ok open=1 taken=x",
            "ok open=x taken=1",
            "ok state=1 mem=2 ms=3",
            "ok state=1 mem=2/ ms=3",
            "ok state=1 mem=2/3 ms=",
            "ok state=1 mem=2/3 wall=3",
            "ok state=1",
            "ok \u{0}\u{ffff}",
            "ERROR boom",
            "\u{1b}[31mok",
            long.as_str(),
        ] {
            assert!(Reply::parse(line).is_err(), "{line:?} must not parse");
        }
        assert_eq!(Reply::parse(&long), Err(ParseReplyError::TooLong));
    }

    #[test]
    fn an_error_message_stays_on_one_line_that_fits() {
        let reply = Reply::Error("first\nsecond".into());
        assert_eq!(reply.to_string(), "error first second");
        let reply = Reply::Error("é".repeat(MAX_LINE));
        let line = reply.to_string();
        assert!(line.len() < MAX_LINE, "{} bytes", line.len());
        assert!(matches!(Reply::parse(&line), Ok(Reply::Error(_))));
        assert_eq!(Reply::parse("error"), Ok(Reply::Error(String::new())));
        assert_eq!(Reply::Error(String::new()).to_string(), "error");
    }

    #[test]
    fn replies_answer_their_commands_only() {
        let snapshot = Command::Snapshot { path: "s".into() };
        let stats = Reply::Snapshot {
            state_bytes: 1,
            mem_written: 2,
            mem_len: 3,
            elapsed: Duration::ZERO,
        };
        assert!(stats.answers(&snapshot));
        assert!(!Reply::Ok.answers(&snapshot));
        assert!(Reply::Ok.answers(&Command::Quit));
        assert!(Reply::Standby.answers(&Command::Ping));
        assert!(!Reply::Pong.answers(&Command::Connections));
        assert!(Reply::Error("no".into()).answers(&Command::Connections));
    }
}
