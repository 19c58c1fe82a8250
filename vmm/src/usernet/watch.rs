//! What the stack and its DNS forwarder share with the event loop: the
//! watch changes they queue for their host fds, and the tokens those fds
//! are known by.

use std::os::fd::RawFd;

use crate::event_loop::Token;

/// Tokens below this belong to the device handler.
pub const FIRST_TOKEN: Token = 16;

/// A change to the set of host fds the event loop watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WatchRequest {
    /// Watch `fd` for `events` under `token`.
    Watch {
        /// The host fd.
        fd: RawFd,
        /// Its token.
        token: Token,
        /// Poll events.
        events: u32,
    },
    /// Stop watching `token`.
    Unwatch {
        /// The token.
        token: Token,
    },
}

/// Hands out event tokens from [`FIRST_TOKEN`] up, wrapping around.
#[derive(Debug)]
pub(super) struct Tokens {
    next: Token,
}

impl Default for Tokens {
    fn default() -> Self {
        Self { next: FIRST_TOKEN }
    }
}

impl Tokens {
    /// The next token.
    pub(super) fn next(&mut self) -> Token {
        let t = self.next;
        self.next = self.next.checked_add(1).unwrap_or(FIRST_TOKEN);
        t
    }
}
