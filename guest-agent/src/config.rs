//! The agent configuration file, written by the host into the image
//! (default `/little/agent.conf`).
//!
//! # Format
//!
//! Byte-oriented (no UTF-8 requirement), one entry per line, lines end with
//! `\n` (a `\r` is an ordinary byte):
//!
//! ```text
//! # comment lines start with '#'; empty lines are ignored
//! arg=/bin/busybox          (repeatable, in argv order; at least one)
//! arg=sh
//! env=PATH=/usr/bin:/bin    (repeatable, KEY=VALUE; a later KEY wins)
//! cwd=/                     (absolute; default "/")
//! uid=0                     (decimal; default 0)
//! gid=0                     (decimal; default 0)
//! groups=10,20              (supplementary gids, comma separated; default none)
//! hostname=little           (1..=64 bytes; default "little")
//! verbose=0                 (0 or 1; default 0)
//! stop_grace_ms=1000        (SIGTERM-to-SIGKILL grace; default 1000, max 600000)
//! ready_port=8080           (1..=65535: READY once 127.0.0.1:port accepts; default: at exec)
//! ready_arg=/bin/sh         (repeatable, argv of the ready command, at most 64; see below)
//! ready_arg=-c
//! ready_arg=pg_isready -q
//! volume=pg:/var/lib/data   (repeatable, SERIAL:/path, at most 16; see crate::volume)
//! ```
//!
//! The ready command, when there is one, runs after `ready_port` accepts
//! (or at exec without one), as the entrypoint's user with its environment
//! and working directory, again and again until it exits 0: only then is
//! the entrypoint `READY` (a server may accept before it serves, as
//! PostgreSQL does while it starts up).
//!
//! A `volume=` value is the disk's serial (1 to 20 bytes of
//! `[A-Za-z0-9_-]`), a `:`, and the rest of the value as the guest path:
//! absolute, not `/`, without empty, `.` or `..` components. No two volumes
//! share a serial or a path.
//!
//! The key is everything before the first `=`; nothing is trimmed. Values
//! are escaped so that any byte string except NUL fits: `\\` is a
//! backslash, `\n` a newline, `\t` a tab, `\r` a carriage return and `\xHH`
//! any byte given as two hex digits. Any other escape, a NUL byte (raw or
//! `\x00`: exec strings cannot carry one), an unknown key or a repeated
//! scalar key is an error: the host and the agent ship together, so a
//! mismatch is a bug worth failing loudly on.
//!
//! The file is hostile input: it is capped at [`MAX_FILE_LEN`] bytes,
//! counts are capped, and every malformed input gives a [`ConfigError`],
//! never a panic.

use crate::volume::{Volume, MAX_VOLUMES};
use alloc::vec::Vec;
use core::fmt;

/// Largest accepted configuration file, in bytes.
pub const MAX_FILE_LEN: usize = 64 * 1024;
/// Most `arg=` lines.
pub const MAX_ARGS: usize = 1024;
/// Most `env=` lines.
pub const MAX_ENV: usize = 1024;
/// Most `ready_arg=` lines.
pub const MAX_READY_ARGS: usize = 64;
/// Most supplementary groups (the kernel's NGROUPS_MAX is 65536; real
/// images use a handful).
pub const MAX_GROUPS: usize = 64;
/// Longest hostname the kernel accepts (`__NEW_UTS_LEN`).
pub const MAX_HOSTNAME_LEN: usize = 64;
/// Largest `stop_grace_ms`.
pub const MAX_STOP_GRACE_MS: u32 = 600_000;
/// Default `stop_grace_ms`.
pub const DEFAULT_STOP_GRACE_MS: u32 = 1000;
/// Default hostname.
pub const DEFAULT_HOSTNAME: &[u8] = b"little";

/// What the agent runs and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The entrypoint's argv; `args[0]` is the program (looked up through
    /// `PATH` when it has no slash).
    pub args: Vec<Vec<u8>>,
    /// Environment entries, `KEY=VALUE`, in file order (duplicates kept;
    /// see [`crate::env::build_env`] for the merge).
    pub env: Vec<Vec<u8>>,
    /// Working directory of the entrypoint.
    pub cwd: Vec<u8>,
    /// User id the entrypoint runs as.
    pub uid: u32,
    /// Group id the entrypoint runs as.
    pub gid: u32,
    /// Supplementary group ids.
    pub groups: Vec<u32>,
    /// Hostname of the guest.
    pub hostname: Vec<u8>,
    /// Whether the agent prints progress and non-fatal errors.
    pub verbose: bool,
    /// How long processes get between SIGTERM and SIGKILL at shutdown.
    pub stop_grace_ms: u32,
    /// The entrypoint is ready once it accepts TCP on 127.0.0.1:port
    /// (reported to the host as `READY`); `None`: ready once exec'd.
    pub ready_port: Option<u16>,
    /// The ready command's argv (empty: none): run until it exits 0
    /// before `READY`.
    pub ready_cmd: Vec<Vec<u8>>,
    /// Persistent volumes, attached in this order.
    pub volumes: Vec<Volume>,
}

/// Why a configuration file was rejected. Line numbers start at 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigError {
    /// The file is larger than [`MAX_FILE_LEN`].
    TooLarge,
    /// A line is neither empty, a comment, nor `key=value`.
    MissingEquals {
        /// Line of the error.
        line: usize,
    },
    /// The key is not one this agent knows.
    UnknownKey {
        /// Line of the error.
        line: usize,
    },
    /// A key that takes one value appears twice.
    DuplicateKey {
        /// Line of the error.
        line: usize,
    },
    /// A backslash escape is not one of `\\ \n \t \r \xHH`.
    BadEscape {
        /// Line of the error.
        line: usize,
    },
    /// The line holds a NUL byte, raw or escaped.
    NulByte {
        /// Line of the error.
        line: usize,
    },
    /// The value is out of range or malformed for its key.
    BadValue {
        /// Line of the error.
        line: usize,
        /// The key whose value is bad.
        key: &'static str,
    },
    /// More entries than the cap for this key.
    TooMany {
        /// Line of the error.
        line: usize,
        /// The key that overflowed.
        key: &'static str,
    },
    /// A `volume=` line repeats an earlier volume's serial or path.
    DuplicateVolume {
        /// Line of the error.
        line: usize,
    },
    /// No `arg=` line: there is nothing to run.
    NoArgs,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooLarge => write!(f, "config file is larger than {MAX_FILE_LEN} bytes"),
            Self::MissingEquals { line } => write!(f, "line {line}: expected key=value"),
            Self::UnknownKey { line } => write!(f, "line {line}: unknown key"),
            Self::DuplicateKey { line } => write!(f, "line {line}: key given twice"),
            Self::BadEscape { line } => write!(f, "line {line}: invalid backslash escape"),
            Self::NulByte { line } => write!(f, "line {line}: NUL byte in value"),
            Self::BadValue { line, key } => write!(f, "line {line}: invalid value for {key}"),
            Self::TooMany { line, key } => write!(f, "line {line}: too many {key} entries"),
            Self::DuplicateVolume { line } => {
                write!(f, "line {line}: volume serial or path given twice")
            }
            Self::NoArgs => write!(f, "no arg= line: nothing to run"),
        }
    }
}

impl core::error::Error for ConfigError {}

impl Default for Config {
    fn default() -> Self {
        Self {
            args: Vec::new(),
            env: Vec::new(),
            cwd: b"/".to_vec(),
            uid: 0,
            gid: 0,
            groups: Vec::new(),
            hostname: DEFAULT_HOSTNAME.to_vec(),
            verbose: false,
            stop_grace_ms: DEFAULT_STOP_GRACE_MS,
            ready_port: None,
            ready_cmd: Vec::new(),
            volumes: Vec::new(),
        }
    }
}

/// Scalar keys, to detect repeats.
#[derive(Clone, Copy)]
enum Scalar {
    Cwd = 0,
    Uid,
    Gid,
    Groups,
    Hostname,
    Verbose,
    StopGrace,
    ReadyPort,
}

impl Config {
    /// Parses a configuration file.
    ///
    /// ```
    /// let c = guest_agent::config::Config::parse(b"arg=/bin/echo\narg=a\\tb\nuid=1000\n").unwrap();
    /// assert_eq!(c.args, [b"/bin/echo".to_vec(), b"a\tb".to_vec()]);
    /// assert_eq!(c.uid, 1000);
    /// assert_eq!(c.cwd, b"/");
    /// ```
    pub fn parse(file: &[u8]) -> Result<Self, ConfigError> {
        if file.len() > MAX_FILE_LEN {
            return Err(ConfigError::TooLarge);
        }
        let mut config = Self::default();
        let mut seen = [false; 8];
        for (index, raw) in file.split(|&b| b == b'\n').enumerate() {
            let line = index + 1;
            if raw.is_empty() || raw[0] == b'#' {
                continue;
            }
            let eq = raw
                .iter()
                .position(|&b| b == b'=')
                .ok_or(ConfigError::MissingEquals { line })?;
            let (key, escaped) = (&raw[..eq], &raw[eq + 1..]);
            let value = unescape(escaped, line)?;
            let mut scalar = |which: Scalar| {
                let slot = &mut seen[which as usize];
                if *slot {
                    return Err(ConfigError::DuplicateKey { line });
                }
                *slot = true;
                Ok(())
            };
            match key {
                b"arg" => {
                    if config.args.len() == MAX_ARGS {
                        return Err(ConfigError::TooMany { line, key: "arg" });
                    }
                    if config.args.is_empty() && value.is_empty() {
                        return Err(ConfigError::BadValue { line, key: "arg" });
                    }
                    config.args.push(value);
                }
                b"env" => {
                    if config.env.len() == MAX_ENV {
                        return Err(ConfigError::TooMany { line, key: "env" });
                    }
                    // A key is required: "=x" or "x" cannot be looked up.
                    match value.iter().position(|&b| b == b'=') {
                        Some(i) if i > 0 => config.env.push(value),
                        _ => return Err(ConfigError::BadValue { line, key: "env" }),
                    }
                }
                b"cwd" => {
                    scalar(Scalar::Cwd)?;
                    if value.first() != Some(&b'/') {
                        return Err(ConfigError::BadValue { line, key: "cwd" });
                    }
                    config.cwd = value;
                }
                b"uid" => {
                    scalar(Scalar::Uid)?;
                    config.uid =
                        parse_id(&value).ok_or(ConfigError::BadValue { line, key: "uid" })?;
                }
                b"gid" => {
                    scalar(Scalar::Gid)?;
                    config.gid =
                        parse_id(&value).ok_or(ConfigError::BadValue { line, key: "gid" })?;
                }
                b"groups" => {
                    scalar(Scalar::Groups)?;
                    config.groups = parse_groups(&value, line)?;
                }
                b"hostname" => {
                    scalar(Scalar::Hostname)?;
                    if value.is_empty() || value.len() > MAX_HOSTNAME_LEN {
                        return Err(ConfigError::BadValue {
                            line,
                            key: "hostname",
                        });
                    }
                    config.hostname = value;
                }
                b"verbose" => {
                    scalar(Scalar::Verbose)?;
                    config.verbose = match value.as_slice() {
                        b"0" => false,
                        b"1" => true,
                        _ => {
                            return Err(ConfigError::BadValue {
                                line,
                                key: "verbose",
                            })
                        }
                    };
                }
                b"stop_grace_ms" => {
                    scalar(Scalar::StopGrace)?;
                    config.stop_grace_ms = parse_u32(&value)
                        .filter(|&ms| ms <= MAX_STOP_GRACE_MS)
                        .ok_or(ConfigError::BadValue {
                            line,
                            key: "stop_grace_ms",
                        })?;
                }
                b"ready_port" => {
                    scalar(Scalar::ReadyPort)?;
                    let port = parse_u32(&value)
                        .and_then(|p| u16::try_from(p).ok())
                        .filter(|&p| p != 0)
                        .ok_or(ConfigError::BadValue {
                            line,
                            key: "ready_port",
                        })?;
                    config.ready_port = Some(port);
                }
                b"ready_arg" => {
                    if config.ready_cmd.len() == MAX_READY_ARGS {
                        return Err(ConfigError::TooMany {
                            line,
                            key: "ready_arg",
                        });
                    }
                    config.ready_cmd.push(value);
                }
                b"volume" => {
                    if config.volumes.len() == MAX_VOLUMES {
                        return Err(ConfigError::TooMany {
                            line,
                            key: "volume",
                        });
                    }
                    let volume = Volume::parse(&value).ok_or(ConfigError::BadValue {
                        line,
                        key: "volume",
                    })?;
                    if config
                        .volumes
                        .iter()
                        .any(|v| v.serial == volume.serial || v.path == volume.path)
                    {
                        return Err(ConfigError::DuplicateVolume { line });
                    }
                    config.volumes.push(volume);
                }
                _ => return Err(ConfigError::UnknownKey { line }),
            }
        }
        if config.args.is_empty() {
            return Err(ConfigError::NoArgs);
        }
        Ok(config)
    }

    /// Writes the configuration in the file format, one key per line,
    /// defaults included; [`Config::parse`] reads it back unchanged. The
    /// host side can use this to write the file.
    pub fn write_to(&self, out: &mut impl fmt::Write) -> fmt::Result {
        for arg in &self.args {
            write_entry(out, "arg", arg)?;
        }
        for env in &self.env {
            write_entry(out, "env", env)?;
        }
        write_entry(out, "cwd", &self.cwd)?;
        writeln!(out, "uid={}", self.uid)?;
        writeln!(out, "gid={}", self.gid)?;
        out.write_str("groups=")?;
        for (i, group) in self.groups.iter().enumerate() {
            if i > 0 {
                out.write_char(',')?;
            }
            write!(out, "{group}")?;
        }
        out.write_char('\n')?;
        write_entry(out, "hostname", &self.hostname)?;
        writeln!(out, "verbose={}", u8::from(self.verbose))?;
        writeln!(out, "stop_grace_ms={}", self.stop_grace_ms)?;
        if let Some(port) = self.ready_port {
            writeln!(out, "ready_port={port}")?;
        }
        for arg in &self.ready_cmd {
            write_entry(out, "ready_arg", arg)?;
        }
        for volume in &self.volumes {
            write_entry(
                out,
                "volume",
                &[&volume.serial[..], b":", &volume.path].concat(),
            )?;
        }
        Ok(())
    }
}

/// Writes one `key=value` line, the value escaped: how the host appends
/// entries to a configuration it did not parse.
pub fn write_entry(out: &mut impl fmt::Write, key: &str, value: &[u8]) -> fmt::Result {
    out.write_str(key)?;
    out.write_char('=')?;
    write_escaped(out, value)?;
    out.write_char('\n')
}

/// Writes `value` escaped for the file format: backslash and control bytes
/// become escapes, and so does every byte outside printable ASCII so the
/// output is plain ASCII whatever the input.
pub fn write_escaped(out: &mut impl fmt::Write, value: &[u8]) -> fmt::Result {
    for &b in value {
        match b {
            b'\\' => out.write_str("\\\\")?,
            b'\n' => out.write_str("\\n")?,
            b'\t' => out.write_str("\\t")?,
            b'\r' => out.write_str("\\r")?,
            0x20..=0x7e => out.write_char(char::from(b))?,
            _ => write!(out, "\\x{b:02x}")?,
        }
    }
    Ok(())
}

/// Decodes the escapes of one value.
fn unescape(escaped: &[u8], line: usize) -> Result<Vec<u8>, ConfigError> {
    let mut out = Vec::with_capacity(escaped.len());
    let mut bytes = escaped.iter().copied();
    while let Some(b) = bytes.next() {
        let decoded = if b == b'\\' {
            match bytes.next() {
                Some(b'\\') => b'\\',
                Some(b'n') => b'\n',
                Some(b't') => b'\t',
                Some(b'r') => b'\r',
                Some(b'x') => {
                    let hi = bytes.next().and_then(hex_digit);
                    let lo = bytes.next().and_then(hex_digit);
                    match (hi, lo) {
                        (Some(hi), Some(lo)) => (hi << 4) | lo,
                        _ => return Err(ConfigError::BadEscape { line }),
                    }
                }
                _ => return Err(ConfigError::BadEscape { line }),
            }
        } else {
            b
        };
        if decoded == 0 {
            return Err(ConfigError::NulByte { line });
        }
        out.push(decoded);
    }
    Ok(out)
}

fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Parses a plain decimal `u32`: digits only, no sign, no spaces.
pub fn parse_u32(digits: &[u8]) -> Option<u32> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u32, |acc, &b| {
        if b.is_ascii_digit() {
            acc.checked_mul(10)?.checked_add(u32::from(b - b'0'))
        } else {
            None
        }
    })
}

/// A user or group id: `u32::MAX` is `(uid_t)-1`, which the kernel reads
/// as "leave unchanged", so it is refused.
fn parse_id(digits: &[u8]) -> Option<u32> {
    parse_u32(digits).filter(|&id| id != u32::MAX)
}

fn parse_groups(value: &[u8], line: usize) -> Result<Vec<u32>, ConfigError> {
    let mut groups = Vec::new();
    if value.is_empty() {
        return Ok(groups);
    }
    for item in value.split(|&b| b == b',') {
        if groups.len() == MAX_GROUPS {
            return Err(ConfigError::TooMany {
                line,
                key: "groups",
            });
        }
        groups.push(parse_id(item).ok_or(ConfigError::BadValue {
            line,
            key: "groups",
        })?);
    }
    Ok(groups)
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
