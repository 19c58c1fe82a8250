//! What the agent tells the outside world.
//!
//! Today every report is one console line (`little-agent: ...`), written by
//! the binary's console reporter. Reporting to the host over vsock comes
//! later: it will consume the same [`Event`]s, so the call sites stay as
//! they are.

use crate::config::{write_escaped, ConfigError};
use crate::status::ExitStatus;
use crate::volume::Problem;
use core::fmt;

/// Prefix of every console line.
pub const PREFIX: &str = "little-agent: ";

/// Something worth reporting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event<'a> {
    /// The agent runs (the boot benchmark stops its clock at this line).
    Started,
    /// The entrypoint ended.
    EntrypointExited(ExitStatus),
    /// `execve` of the entrypoint failed; it exits 127.
    ExecFailed {
        /// The program as configured (`arg=` line 1).
        path: &'a [u8],
        /// The errno `execvp` would report.
        errno: i32,
    },
    /// A step failed and the agent restarts the VM.
    Fatal {
        /// The step, e.g. `mount /proc`.
        what: &'a str,
        /// Its errno.
        errno: i32,
    },
    /// The configuration file is unusable; the agent restarts the VM.
    BadConfig(ConfigError),
    /// A step failed and the agent carries on (verbose only).
    Skipped {
        /// The step.
        what: &'a str,
        /// Its errno.
        errno: i32,
    },
    /// A volume is mounted at its path (verbose only).
    VolumeAttached {
        /// The volume's disk serial.
        serial: &'a [u8],
        /// Where it is mounted.
        path: &'a [u8],
        /// Whether it was new and took the image's files at the path.
        filled: bool,
    },
    /// A volume could not be attached; the agent restarts the VM.
    VolumeFailed {
        /// The volume's disk serial.
        serial: &'a [u8],
        /// Where it was to be mounted.
        path: &'a [u8],
        /// What went wrong.
        problem: Problem,
    },
    /// Progress (verbose only): a step and its subject.
    Progress {
        /// The step.
        what: &'a str,
        /// What it applies to (a path, a signal number as text...).
        subject: &'a [u8],
    },
}

impl Event<'_> {
    /// Whether the line is printed without `verbose=1`.
    pub fn always_shown(&self) -> bool {
        !matches!(
            self,
            Self::Skipped { .. } | Self::Progress { .. } | Self::VolumeAttached { .. }
        )
    }
}

impl fmt::Display for Event<'_> {
    /// The console line, prefix included, newline excluded.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(PREFIX)?;
        match *self {
            Self::Started => f.write_str("started"),
            Self::EntrypointExited(status) => write!(f, "entrypoint {status}"),
            Self::ExecFailed { path, errno } => {
                f.write_str("exec ")?;
                write_escaped(f, path)?;
                write!(f, " failed: errno {errno}")
            }
            Self::Fatal { what, errno } => write!(f, "{what} failed: errno {errno}"),
            Self::BadConfig(err) => write!(f, "config failed: {err}"),
            Self::Skipped { what, errno } => write!(f, "{what} failed: errno {errno} (ignored)"),
            Self::VolumeAttached {
                serial,
                path,
                filled,
            } => {
                f.write_str("volume ")?;
                write_escaped(f, serial)?;
                f.write_str(" -> ")?;
                write_escaped(f, path)?;
                f.write_str(if filled {
                    " (filled from the image)"
                } else {
                    " (kept)"
                })
            }
            Self::VolumeFailed {
                serial,
                path,
                problem,
            } => {
                f.write_str("volume ")?;
                write_escaped(f, serial)?;
                f.write_str(" (")?;
                write_escaped(f, path)?;
                write!(f, "): {problem}")
            }
            Self::Progress { what, subject } => {
                write!(f, "{what} ")?;
                write_escaped(f, subject)
            }
        }
    }
}

/// A fixed-size line buffer for formatting without an allocator (the
/// panic handler and the exec child use it). Output past the capacity is
/// dropped, so a long path cannot make a report fail.
pub struct LineBuf<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> LineBuf<N> {
    /// An empty buffer.
    pub const fn new() -> Self {
        Self {
            buf: [0; N],
            len: 0,
        }
    }

    /// The bytes written so far.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// Formats `line` and a newline; the newline survives truncation.
    pub fn line(line: impl fmt::Display) -> Self {
        let mut buf = Self::new();
        // Writing to a LineBuf never fails; truncation is silent.
        let _ = fmt::write(&mut buf, format_args!("{line}"));
        if N > 0 {
            buf.len = buf.len.min(N - 1);
            buf.buf[buf.len] = b'\n';
            buf.len += 1;
        }
        buf
    }
}

impl<const N: usize> Default for LineBuf<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> fmt::Write for LineBuf<N> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = N - self.len;
        let take = s.len().min(room);
        self.buf[self.len..self.len + take].copy_from_slice(&s.as_bytes()[..take]);
        self.len += take;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(event: Event<'_>) -> String {
        String::from_utf8(LineBuf::<256>::line(event).as_bytes().to_vec()).unwrap()
    }

    #[test]
    fn console_lines_match_the_contract() {
        assert_eq!(line(Event::Started), "little-agent: started\n");
        assert_eq!(
            line(Event::EntrypointExited(ExitStatus::Exited(3))),
            "little-agent: entrypoint exited status=3\n"
        );
        assert_eq!(
            line(Event::EntrypointExited(ExitStatus::Signaled(9))),
            "little-agent: entrypoint killed signal=9\n"
        );
        assert_eq!(
            line(Event::ExecFailed {
                path: b"/no\nsuch",
                errno: 2
            }),
            "little-agent: exec /no\\nsuch failed: errno 2\n"
        );
        assert_eq!(
            line(Event::Fatal {
                what: "mount /proc",
                errno: 19
            }),
            "little-agent: mount /proc failed: errno 19\n"
        );
        assert_eq!(
            line(Event::BadConfig(ConfigError::NoArgs)),
            "little-agent: config failed: no arg= line: nothing to run\n"
        );
        assert_eq!(
            line(Event::VolumeFailed {
                serial: b"vol0",
                path: b"/var/lib/postgresql/data",
                problem: Problem::NoDisk,
            }),
            "little-agent: volume vol0 (/var/lib/postgresql/data): no disk with this serial\n"
        );
        assert_eq!(
            line(Event::VolumeFailed {
                serial: b"vol0",
                path: b"/d\xff",
                problem: Problem::Step {
                    what: "mount",
                    errno: 22
                },
            }),
            "little-agent: volume vol0 (/d\\xff): mount failed: errno 22\n"
        );
        assert_eq!(
            line(Event::VolumeAttached {
                serial: b"vol0",
                path: b"/data",
                filled: true
            }),
            "little-agent: volume vol0 -> /data (filled from the image)\n"
        );
        assert_eq!(
            line(Event::VolumeAttached {
                serial: b"vol0",
                path: b"/data",
                filled: false
            }),
            "little-agent: volume vol0 -> /data (kept)\n"
        );
    }

    #[test]
    fn only_progress_and_skips_are_verbose() {
        assert!(Event::Started.always_shown());
        assert!(Event::Fatal {
            what: "x",
            errno: 1
        }
        .always_shown());
        assert!(!Event::Skipped {
            what: "x",
            errno: 1
        }
        .always_shown());
        assert!(!Event::Progress {
            what: "x",
            subject: b"y"
        }
        .always_shown());
        assert!(!Event::VolumeAttached {
            serial: b"v",
            path: b"/v",
            filled: false
        }
        .always_shown());
        assert!(Event::VolumeFailed {
            serial: b"v",
            path: b"/v",
            problem: Problem::NoDisk
        }
        .always_shown());
    }

    #[test]
    fn long_lines_are_cut_but_keep_their_newline() {
        let long = [b'a'; 100];
        let buf = LineBuf::<32>::line(Event::ExecFailed {
            path: &long,
            errno: 2,
        });
        assert_eq!(buf.as_bytes().len(), 32);
        assert_eq!(buf.as_bytes()[31], b'\n');
        assert!(buf.as_bytes().starts_with(b"little-agent: exec aaaa"));
    }
}
