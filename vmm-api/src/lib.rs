//! The contract between little.cloud's platform and its `vmm` processes.
//!
//! Both ends build on this crate, so neither formats nor parses the other's
//! bytes by hand:
//!
//! - [`Command`] and [`Reply`]: the control socket's protocol (`vmm
//!   --api-sock PATH`), one line each way, each with `parse` and `Display`;
//! - [`Client`]: a blocking client of that socket, which can pass a TCP
//!   socket along with a command (SCM_RIGHTS);
//! - [`launch`]: the `vmm` command line, with the guest's devices as one
//!   value that the boot making a snapshot and every restore of it share;
//! - [`net::Rule`]: an outbound network rule (`A.B.C.D[/N][:PORT]`, a
//!   host-side destination), for `vmm --net-allow` and the platform.
//!
//! # The control protocol
//!
//! A client writes one command per line and reads one reply line for each;
//! a line is at most [`MAX_LINE`] bytes, newline included.
//!
//! | command | reply |
//! |---|---|
//! | `ping` | `ok pong` (`ok standby` from a standby VMM) |
//! | `pause` / `resume` | `ok` |
//! | `snapshot <path>` / `snapshot-diff <path>` | `ok state=<bytes> mem=<written>/<size> ms=<wall>` |
//! | `working-set <path>` | `ok pages=<n>` |
//! | `accept <guest_port>` + a TCP socket (SCM_RIGHTS) | `ok`: the network device now carries that connection to the guest port |
//! | `connections` | `ok open=<n> taken=<n>`: connections the network stack holds, and hand-overs taken so far |
//! | `quit` | `ok`, then the VMM exits 0 |
//! | `restore <snapshot> [<working-set>]` (standby VMM only) | `ok running <ms>` once the restored vCPUs run |
//!
//! A command that fails is answered `error <message>`.
//!
//! ```
//! use std::time::Duration;
//! use vmm_api::{Command, Reply};
//!
//! let command = Command::parse("accept 8080").expect("a valid command");
//! assert_eq!(command, Command::Accept { guest_port: 8080 });
//! assert_eq!(command.to_string(), "accept 8080");
//!
//! let reply = Reply::parse("ok running 2.500").expect("a valid reply");
//! assert_eq!(reply, Reply::Running { elapsed: Duration::from_micros(2500) });
//! assert!(reply.answers(&Command::Restore { snapshot: "app.snap".into(), working_set: None }));
//! ```

// Tests may unwrap; the library may not.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod client;
pub mod command;
pub mod launch;
pub mod net;
pub mod reply;

pub use client::{Client, ClientError};
pub use command::{Command, ParseCommandError};
pub use reply::{ParseReplyError, Reply};

/// Longest line on the control socket, newline included, either way.
pub const MAX_LINE: usize = 4096;

/// An error and its causes on one line, skipping a cause whose text the
/// message already contains (some libraries repeat their cause).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        source = cause.source();
    }
    msg
}
