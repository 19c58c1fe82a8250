//! The host ↔ agent control protocol, defined once for both ends.
//!
//! The agent connects from the guest to the host over vsock
//! (`SOCK_STREAM`, CID [`HOST_CID`], port [`AGENT_PORT`]) and both sides
//! speak newline-terminated ASCII lines of at most [`MAX_LINE`] bytes
//! (newline included). A word is separated by exactly one space.
//!
//! | direction | line | meaning |
//! |---|---|---|
//! | agent → host | `HELLO <version>` | first line after connecting; [`VERSION`] |
//! | agent → host | `READY` | the entrypoint is ready (its `ready_port` accepts and its ready command exits 0, or it was exec'd) |
//! | agent → host | `EXIT status=<n>` / `EXIT signal=<n>` | the entrypoint ended; the VM restarts next |
//! | agent → host | `PONG <nonce>` | answer to `PING`, nonce echoed |
//! | agent → host | `RESUMED` | a `RESTORED` line was applied |
//! | host → agent | `PING <nonce>` | liveness check |
//! | host → agent | `RESTORED <unix-ns> <hex-entropy>` | the VM was restored from a snapshot: set the clock, mix entropy into the RNG |
//!
//! A nonce is 1 to [`MAX_NONCE`] printable ASCII bytes without spaces. The
//! entropy is 2 to `2 * MAX_ENTROPY` lowercase or uppercase hex digits (an
//! even count). Unknown or malformed lines are ignored by the agent (and
//! should be by the host), so either side may add messages later. A line
//! over [`MAX_LINE`] is dropped by the agent; the host closes the channel
//! ([`LineReader::overlong`]).
//!
//! With the VMM's hybrid vsock backend (`vmm --vsock uds=PATH`) the host end
//! is a Unix socket listening at `PATH_1024`.
//!
//! ```
//! use guest_agent::protocol::{AgentMsg, HostMsg};
//! use guest_agent::report::LineBuf;
//!
//! let line = LineBuf::<64>::line(HostMsg::Ping { nonce: b"42" });
//! assert_eq!(line.as_bytes(), b"PING 42\n");
//! assert_eq!(HostMsg::parse(b"PING 42"), Ok(HostMsg::Ping { nonce: b"42" }));
//! assert_eq!(AgentMsg::parse(b"HELLO 1"), Ok(AgentMsg::Hello { version: 1 }));
//! ```

use crate::config::parse_u32;
use crate::status::ExitStatus;
use core::fmt;

/// The host's vsock context id (VMADDR_CID_HOST).
pub const HOST_CID: u32 = 2;
/// The host port the agent connects to.
pub const AGENT_PORT: u32 = 1024;
/// Protocol version the agent announces in `HELLO`.
pub const VERSION: u32 = 1;
/// Longest line, newline included.
pub const MAX_LINE: usize = 256;
/// Longest `PING`/`PONG` nonce.
pub const MAX_NONCE: usize = 64;
/// Most entropy bytes in a `RESTORED` line.
pub const MAX_ENTROPY: usize = 64;

/// Why a line was not understood.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtocolError {
    /// The first word is not a known message.
    Unknown,
    /// A known message with missing, extra or malformed arguments.
    BadArgs,
    /// The line is longer than [`MAX_LINE`].
    TooLong,
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Unknown => "unknown message",
            Self::BadArgs => "malformed message arguments",
            Self::TooLong => "line too long",
        })
    }
}

/// What the agent sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentMsg<'a> {
    /// First line: the protocol version.
    Hello {
        /// [`VERSION`].
        version: u32,
    },
    /// The entrypoint is ready to serve.
    Ready,
    /// The entrypoint ended with this status.
    Exit(ExitStatus),
    /// Answer to a ping.
    Pong {
        /// The ping's nonce.
        nonce: &'a [u8],
    },
    /// A `RESTORED` line was applied.
    Resumed,
}

/// Entropy carried by `RESTORED`, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entropy {
    bytes: [u8; MAX_ENTROPY],
    len: usize,
}

impl Entropy {
    /// The decoded bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    /// Entropy from raw bytes (at most [`MAX_ENTROPY`] are kept).
    pub fn from_bytes(raw: &[u8]) -> Self {
        let len = raw.len().min(MAX_ENTROPY);
        let mut bytes = [0; MAX_ENTROPY];
        bytes[..len].copy_from_slice(&raw[..len]);
        Self { bytes, len }
    }
}

/// What the host sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostMsg<'a> {
    /// Liveness check; the agent answers `PONG` with the same nonce.
    Ping {
        /// Opaque token.
        nonce: &'a [u8],
    },
    /// The VM was restored from a snapshot.
    Restored {
        /// Wall-clock time to set, in nanoseconds since the Unix epoch.
        unix_ns: u64,
        /// Fresh entropy for the guest RNG.
        entropy: Entropy,
    },
}

fn split_word(line: &[u8]) -> (&[u8], Option<&[u8]>) {
    match line.iter().position(|&b| b == b' ') {
        Some(i) => (&line[..i], Some(&line[i + 1..])),
        None => (line, None),
    }
}

fn nonce(arg: Option<&[u8]>) -> Result<&[u8], ProtocolError> {
    match arg {
        Some(n) if !n.is_empty() && n.len() <= MAX_NONCE && n.iter().all(u8::is_ascii_graphic) => {
            Ok(n)
        }
        _ => Err(ProtocolError::BadArgs),
    }
}

fn parse_u64(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |acc, &b| {
        if b.is_ascii_digit() {
            acc.checked_mul(10)?.checked_add(u64::from(b - b'0'))
        } else {
            None
        }
    })
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn parse_exit(arg: &[u8]) -> Option<ExitStatus> {
    let eq = arg.iter().position(|&b| b == b'=')?;
    let value = u8::try_from(parse_u32(&arg[eq + 1..])?).ok()?;
    match &arg[..eq] {
        b"status" => Some(ExitStatus::Exited(value)),
        b"signal" => Some(ExitStatus::Signaled(value)),
        _ => None,
    }
}

/// Strips one trailing newline, if any, and enforces [`MAX_LINE`].
fn body(line: &[u8]) -> Result<&[u8], ProtocolError> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    if line.len() >= MAX_LINE {
        return Err(ProtocolError::TooLong);
    }
    Ok(line)
}

impl<'a> AgentMsg<'a> {
    /// Parses one line (with or without its newline); the host side uses it.
    pub fn parse(line: &'a [u8]) -> Result<Self, ProtocolError> {
        let (word, arg) = split_word(body(line)?);
        match (word, arg) {
            (b"HELLO", Some(v)) => parse_u32(v)
                .map(|version| Self::Hello { version })
                .ok_or(ProtocolError::BadArgs),
            (b"READY", None) => Ok(Self::Ready),
            (b"RESUMED", None) => Ok(Self::Resumed),
            (b"EXIT", Some(a)) => parse_exit(a).map(Self::Exit).ok_or(ProtocolError::BadArgs),
            (b"PONG", a) => nonce(a).map(|nonce| Self::Pong { nonce }),
            (b"HELLO" | b"READY" | b"RESUMED" | b"EXIT", _) => Err(ProtocolError::BadArgs),
            _ => Err(ProtocolError::Unknown),
        }
    }
}

impl fmt::Display for AgentMsg<'_> {
    /// The line without its newline.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Hello { version } => write!(f, "HELLO {version}"),
            Self::Ready => f.write_str("READY"),
            Self::Resumed => f.write_str("RESUMED"),
            Self::Exit(ExitStatus::Exited(code)) => write!(f, "EXIT status={code}"),
            Self::Exit(ExitStatus::Signaled(sig)) => write!(f, "EXIT signal={sig}"),
            Self::Pong { nonce } => write_token(f, "PONG ", nonce),
        }
    }
}

fn write_token(f: &mut fmt::Formatter<'_>, word: &str, token: &[u8]) -> fmt::Result {
    f.write_str(word)?;
    for &b in token {
        // Tokens are parsed as printable ASCII; anything else is replaced so
        // the output stays one line.
        let c = if b.is_ascii_graphic() { b } else { b'?' };
        fmt::Write::write_char(f, char::from(c))?;
    }
    Ok(())
}

impl<'a> HostMsg<'a> {
    /// Parses one line (with or without its newline); the agent uses it.
    pub fn parse(line: &'a [u8]) -> Result<Self, ProtocolError> {
        let (word, arg) = split_word(body(line)?);
        match word {
            b"PING" => nonce(arg).map(|nonce| Self::Ping { nonce }),
            b"RESTORED" => {
                let (ns, hex) = split_word(arg.ok_or(ProtocolError::BadArgs)?);
                let unix_ns = parse_u64(ns).ok_or(ProtocolError::BadArgs)?;
                let hex = hex.ok_or(ProtocolError::BadArgs)?;
                if hex.is_empty() || hex.len() % 2 != 0 || hex.len() > 2 * MAX_ENTROPY {
                    return Err(ProtocolError::BadArgs);
                }
                let mut bytes = [0u8; MAX_ENTROPY];
                for (out, pair) in bytes.iter_mut().zip(hex.chunks_exact(2)) {
                    let hi = hex_value(pair[0]).ok_or(ProtocolError::BadArgs)?;
                    let lo = hex_value(pair[1]).ok_or(ProtocolError::BadArgs)?;
                    *out = (hi << 4) | lo;
                }
                Ok(Self::Restored {
                    unix_ns,
                    entropy: Entropy {
                        bytes,
                        len: hex.len() / 2,
                    },
                })
            }
            _ => Err(ProtocolError::Unknown),
        }
    }
}

impl fmt::Display for HostMsg<'_> {
    /// The line without its newline.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Ping { nonce } => write_token(f, "PING ", nonce),
            Self::Restored { unix_ns, entropy } => {
                write!(f, "RESTORED {unix_ns} ")?;
                for b in entropy.as_bytes() {
                    write!(f, "{b:02x}")?;
                }
                Ok(())
            }
        }
    }
}

/// Splits a byte stream into lines without allocating: bytes go in with
/// [`push`](Self::push), whole lines come out of [`next_line`](Self::next_line).
/// A line longer than [`MAX_LINE`] is dropped up to its newline and
/// reported once as [`ProtocolError::TooLong`].
pub struct LineReader {
    buf: [u8; MAX_LINE],
    len: usize,
    /// Start of the unread part of `buf`.
    start: usize,
    /// Inside an overlong line: drop bytes up to the next newline.
    skipping: bool,
}

impl Default for LineReader {
    fn default() -> Self {
        Self::new()
    }
}

impl LineReader {
    /// An empty reader.
    pub const fn new() -> Self {
        Self {
            buf: [0; MAX_LINE],
            len: 0,
            start: 0,
            skipping: false,
        }
    }

    /// Space for the next read: call [`filled`](Self::filled) with the count.
    pub fn spare(&mut self) -> &mut [u8] {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.len, 0);
            self.len -= self.start;
            self.start = 0;
        }
        if self.len == MAX_LINE {
            // A full buffer without a newline: the line is too long.
            self.len = 0;
            self.skipping = true;
        }
        &mut self.buf[self.len..]
    }

    /// Records that `n` bytes were written into [`spare`](Self::spare).
    pub fn filled(&mut self, n: usize) {
        self.len = (self.len + n).min(MAX_LINE);
    }

    /// Copies `bytes` in, as many as fit; returns how many were taken.
    pub fn push(&mut self, bytes: &[u8]) -> usize {
        let spare = self.spare();
        let n = spare.len().min(bytes.len());
        spare[..n].copy_from_slice(&bytes[..n]);
        self.filled(n);
        n
    }

    /// Whether the stream is inside a line longer than [`MAX_LINE`]:
    /// [`MAX_LINE`] bytes came without a newline. Asked once
    /// [`next_line`](Self::next_line) has returned `None`, it tells a
    /// reader that will not drain a misbehaving peer (the host) to close
    /// the connection; the reader's memory is the same either way.
    pub fn overlong(&self) -> bool {
        let full = self.start == 0 && self.len == MAX_LINE;
        self.skipping || (full && !self.buf.contains(&b'\n'))
    }

    /// The next complete line, without its newline.
    pub fn next_line(&mut self) -> Option<Result<&[u8], ProtocolError>> {
        let pending = &self.buf[self.start..self.len];
        let nl = pending.iter().position(|&b| b == b'\n')?;
        let line_start = self.start;
        self.start += nl + 1;
        if self.skipping {
            self.skipping = false;
            return Some(Err(ProtocolError::TooLong));
        }
        Some(Ok(&self.buf[line_start..line_start + nl]))
    }
}

#[cfg(test)]
#[path = "protocol_tests.rs"]
mod tests;
