//! Commands: what a client writes on the control socket.

use std::fmt;
use std::path::PathBuf;

/// One control command; its `Display` is the line on the wire (without the
/// newline).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// `ping`: is the VMM there?
    Ping,
    /// `pause`: stop every vCPU.
    Pause,
    /// `resume`: run every vCPU again.
    Resume,
    /// `snapshot <path>`: write a full snapshot (the VM pauses meanwhile).
    Snapshot {
        /// The snapshot file to write.
        path: PathBuf,
    },
    /// `snapshot-diff <path>`: write the pages changed since the restore of
    /// a full snapshot, on top of it.
    SnapshotDiff {
        /// The snapshot file to write.
        path: PathBuf,
    },
    /// `working-set <path>`: record the guest pages touched since the
    /// restore, for `vmm --working-set` to read ahead.
    WorkingSet {
        /// The working-set file to write.
        path: PathBuf,
    },
    /// `accept <guest_port>`: the network device takes the TCP socket passed
    /// along (SCM_RIGHTS) to the guest's port.
    Accept {
        /// The guest port (not 0).
        guest_port: u16,
    },
    /// `connections`: how many connections the network stack holds.
    Connections,
    /// `quit`: stop the VM; the VMM exits 0.
    Quit,
    /// `forbidden-syscall`: make a system call that no seccomp filter of
    /// the VMM allows. Only a `vmm` built with its test-only
    /// `fault-injection` feature does; any other answers with an error.
    /// Tests use it to see a VMM killed by its filter and the daemon
    /// recover.
    ForbiddenSyscall,
    /// `restore <snapshot> [<working-set>]`: what a standby VMM waits for.
    Restore {
        /// The snapshot to restore.
        snapshot: PathBuf,
        /// Pages to read ahead (a working-set file).
        working_set: Option<PathBuf>,
    },
}

/// Why a command line was not understood.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseCommandError {
    /// The line is blank.
    #[error("empty command")]
    Empty,
    /// The first word is no command.
    #[error(
        "unknown command {0:?} (ping, pause, resume, snapshot <path>, snapshot-diff <path>, working-set <path>, accept <guest_port>, connections, quit)"
    )]
    Unknown(String),
    /// A command that takes an argument came without it.
    #[error("{0} needs an argument ({0} {1})")]
    MissingArgument(&'static str, &'static str),
    /// `accept` with a port that is not a number from 1 to 65535.
    #[error("invalid guest port {0:?}")]
    InvalidPort(String),
}

impl Command {
    /// Parses one line (surrounding whitespace, the newline included, is
    /// ignored). A path is the rest of the line; `restore` takes one or two
    /// words. Words after the arguments a command takes are ignored, as the
    /// VMM always has.
    pub fn parse(line: &str) -> Result<Self, ParseCommandError> {
        let line = line.trim();
        let (word, arg) = line.split_once(' ').unwrap_or((line, ""));
        let arg = arg.trim();
        let path = |command, usage| {
            if arg.is_empty() {
                Err(ParseCommandError::MissingArgument(command, usage))
            } else {
                Ok(PathBuf::from(arg))
            }
        };
        Ok(match word {
            "" => return Err(ParseCommandError::Empty),
            "ping" => Self::Ping,
            "pause" => Self::Pause,
            "resume" => Self::Resume,
            "snapshot" => Self::Snapshot {
                path: path("snapshot", "<path>")?,
            },
            "snapshot-diff" => Self::SnapshotDiff {
                path: path("snapshot-diff", "<path>")?,
            },
            "working-set" => Self::WorkingSet {
                path: path("working-set", "<path>")?,
            },
            "accept" => match arg.parse::<u16>() {
                Ok(guest_port @ 1..) => Self::Accept { guest_port },
                _ => return Err(ParseCommandError::InvalidPort(arg.to_owned())),
            },
            "connections" => Self::Connections,
            "quit" => Self::Quit,
            "forbidden-syscall" => Self::ForbiddenSyscall,
            "restore" => {
                let mut words = arg.split_whitespace();
                let snapshot = words.next().ok_or(ParseCommandError::MissingArgument(
                    "restore",
                    "<snapshot> [<working-set>]",
                ))?;
                Self::Restore {
                    snapshot: PathBuf::from(snapshot),
                    working_set: words.next().map(PathBuf::from),
                }
            }
            other => return Err(ParseCommandError::Unknown(other.to_owned())),
        })
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ping => f.write_str("ping"),
            Self::Pause => f.write_str("pause"),
            Self::Resume => f.write_str("resume"),
            Self::Snapshot { path } => write!(f, "snapshot {}", path.display()),
            Self::SnapshotDiff { path } => write!(f, "snapshot-diff {}", path.display()),
            Self::WorkingSet { path } => write!(f, "working-set {}", path.display()),
            Self::Accept { guest_port } => write!(f, "accept {guest_port}"),
            Self::Connections => f.write_str("connections"),
            Self::Quit => f.write_str("quit"),
            Self::ForbiddenSyscall => f.write_str("forbidden-syscall"),
            Self::Restore {
                snapshot,
                working_set: None,
            } => write!(f, "restore {}", snapshot.display()),
            Self::Restore {
                snapshot,
                working_set: Some(ws),
            } => write!(f, "restore {} {}", snapshot.display(), ws.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<Command> {
        vec![
            Command::Ping,
            Command::Pause,
            Command::Resume,
            Command::Snapshot {
                path: "/tmp/app.snap".into(),
            },
            Command::SnapshotDiff {
                path: "/tmp/app.diff".into(),
            },
            Command::WorkingSet {
                path: "/tmp/app.ws".into(),
            },
            Command::Accept { guest_port: 8080 },
            Command::Connections,
            Command::Quit,
            Command::ForbiddenSyscall,
            Command::Restore {
                snapshot: "/a/app.snap".into(),
                working_set: None,
            },
            Command::Restore {
                snapshot: "/a/app.snap".into(),
                working_set: Some("/a/app.ws".into()),
            },
        ]
    }

    #[test]
    fn every_command_round_trips() {
        for command in all() {
            let line = command.to_string();
            assert_eq!(Command::parse(&line), Ok(command.clone()), "{line:?}");
            assert_eq!(
                Command::parse(&format!("{line}\n")),
                Ok(command),
                "{line:?}"
            );
        }
    }

    #[test]
    fn the_lines_are_the_ones_the_vmm_has_always_read() {
        let lines: Vec<String> = all().iter().map(Command::to_string).collect();
        assert_eq!(
            lines,
            [
                "ping",
                "pause",
                "resume",
                "snapshot /tmp/app.snap",
                "snapshot-diff /tmp/app.diff",
                "working-set /tmp/app.ws",
                "accept 8080",
                "connections",
                "quit",
                "forbidden-syscall",
                "restore /a/app.snap",
                "restore /a/app.snap /a/app.ws",
            ]
        );
    }

    #[test]
    fn a_snapshot_path_is_the_rest_of_the_line() {
        assert_eq!(
            Command::parse("snapshot  /tmp/my app.snap  "),
            Ok(Command::Snapshot {
                path: "/tmp/my app.snap".into()
            })
        );
    }

    #[test]
    fn missing_or_bad_arguments_are_named() {
        for (line, error) in [
            ("", ParseCommandError::Empty),
            ("   \n", ParseCommandError::Empty),
            (
                "snapshot",
                ParseCommandError::MissingArgument("snapshot", "<path>"),
            ),
            (
                "working-set   ",
                ParseCommandError::MissingArgument("working-set", "<path>"),
            ),
            (
                "restore",
                ParseCommandError::MissingArgument("restore", "<snapshot> [<working-set>]"),
            ),
            ("accept", ParseCommandError::InvalidPort(String::new())),
            ("accept 0", ParseCommandError::InvalidPort("0".into())),
            (
                "accept 65536",
                ParseCommandError::InvalidPort("65536".into()),
            ),
            ("accept http", ParseCommandError::InvalidPort("http".into())),
            ("reboot now", ParseCommandError::Unknown("reboot".into())),
            ("PING", ParseCommandError::Unknown("PING".into())),
        ] {
            assert_eq!(Command::parse(line), Err(error), "{line:?}");
        }
    }

    #[test]
    fn the_unknown_command_message_lists_the_commands() {
        let error = Command::parse("reboot").expect_err("no such command");
        assert_eq!(
            error.to_string(),
            "unknown command \"reboot\" (ping, pause, resume, snapshot <path>, snapshot-diff <path>, working-set <path>, accept <guest_port>, connections, quit)"
        );
    }
}
