//! virtio-vsock with a Firecracker-compatible hybrid Unix-socket backend.
//!
//! `vmm --vsock uds=PATH[,cid=N]` gives the guest a vsock device with
//! context id N (default 3). The VMM listens on `PATH`:
//!
//! - host → guest: connect to `PATH`, write `CONNECT <port>\n`, read
//!   `OK <host_port>\n` once the guest accepted (the socket closes if the
//!   guest refused), then talk;
//! - guest → host: a guest connection to host port P (CID 2) is relayed
//!   to a Unix socket listening at `PATH_P`, and refused if there is none.
//!
//! The little.cloud agent connects to port 1024 at boot
//! (`guest_agent::protocol`).
//!
//! | file | what |
//! |---|---|
//! | `device.rs` | the virtio device: config space, the bound socket, activation |
//! | `handler.rs` | its event-loop handler: queues to and from the muxer |
//! | `persist.rs` | what a snapshot keeps of the handler |
//! | `packet.rs` | `virtio_vsock_hdr`, TX parsing and validation, RX writing |
//! | `connection.rs` | one stream: state and credit in both directions |
//! | `muxer.rs` | the Unix-socket backend: listener, `CONNECT`, streams |
//! | `unix.rs` | non-blocking Unix connect |

pub mod connection;
pub mod device;
mod handler;
pub mod muxer;
pub mod packet;
pub mod persist;
mod unix;

use std::path::PathBuf;
use std::str::FromStr;

pub use device::Vsock;

/// The guest context id unless `cid=` says otherwise.
pub const DEFAULT_GUEST_CID: u64 = 3;

/// Errors of the vsock device's setup and configuration.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The `--vsock` value is malformed.
    #[error("invalid --vsock value {0:?}: expected uds=PATH[,cid=N]")]
    Syntax(String),
    /// The guest cid is reserved (0, 1, 2, and `u32::MAX` = VMADDR_CID_ANY).
    #[error("guest cid {0} is reserved: use 3 or more, below 4294967295")]
    Cid(u64),
    /// The socket path is empty, or too long for the `_<port>` suffix.
    #[error("vsock socket path {0:?} must be non-empty and at most 90 bytes")]
    Path(PathBuf),
    /// The host socket could not be bound.
    #[error("cannot listen on vsock socket {0}")]
    Bind(PathBuf, #[source] std::io::Error),
}

/// Where the vsock device's host side lives and the guest's address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsockConfig {
    /// Unix socket the VMM listens on; `<uds_path>_<port>` for
    /// guest-initiated streams.
    pub uds_path: PathBuf,
    /// The guest's context id.
    pub guest_cid: u64,
}

/// Longest socket path: `sun_path` holds 107 bytes, and `_4294967295`
/// must still fit after it.
const MAX_PATH_LEN: usize = 90;

impl VsockConfig {
    /// Checks the cid and path.
    pub fn validate(&self) -> Result<(), Error> {
        if self.guest_cid <= 2 || self.guest_cid >= u64::from(u32::MAX) {
            return Err(Error::Cid(self.guest_cid));
        }
        let len = self.uds_path.as_os_str().len();
        if len == 0 || len > MAX_PATH_LEN {
            return Err(Error::Path(self.uds_path.clone()));
        }
        Ok(())
    }
}

impl FromStr for VsockConfig {
    type Err = Error;

    /// Parses `uds=PATH[,cid=N]` (keys in any order).
    ///
    /// ```
    /// use vmm::devices::virtio::vsock::VsockConfig;
    /// let c: VsockConfig = "uds=/tmp/v.sock,cid=7".parse().unwrap();
    /// assert_eq!(c.uds_path.to_str(), Some("/tmp/v.sock"));
    /// assert_eq!(c.guest_cid, 7);
    /// ```
    fn from_str(s: &str) -> Result<Self, Error> {
        let syntax = || Error::Syntax(s.to_owned());
        let mut uds = None;
        let mut cid = None;
        for part in s.split(',') {
            let (key, value) = part.split_once('=').ok_or_else(syntax)?;
            match key {
                "uds" if uds.is_none() => uds = Some(PathBuf::from(value)),
                "cid" if cid.is_none() => cid = Some(value.parse().map_err(|_| syntax())?),
                _ => return Err(syntax()),
            }
        }
        let config = Self {
            uds_path: uds.ok_or_else(syntax)?,
            guest_cid: cid.unwrap_or(DEFAULT_GUEST_CID),
        };
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_flag() {
        let c: VsockConfig = "uds=/tmp/a".parse().unwrap();
        assert_eq!(c.guest_cid, DEFAULT_GUEST_CID);
        let c: VsockConfig = "cid=42,uds=/tmp/a".parse().unwrap();
        assert_eq!((c.guest_cid, c.uds_path), (42, PathBuf::from("/tmp/a")));
        for bad in [
            "",
            "uds",
            "cid=3",
            "uds=/a,cid=x",
            "uds=/a,uds=/b",
            "uds=/a,x=1",
        ] {
            assert!(
                matches!(bad.parse::<VsockConfig>(), Err(Error::Syntax(_))),
                "{bad}"
            );
        }
        for cid in ["0", "1", "2", "4294967295"] {
            assert!(matches!(
                format!("uds=/a,cid={cid}").parse::<VsockConfig>(),
                Err(Error::Cid(_))
            ));
        }
        assert!(matches!(
            format!("uds={}", "x".repeat(91)).parse::<VsockConfig>(),
            Err(Error::Path(_))
        ));
        assert!(matches!("uds=".parse::<VsockConfig>(), Err(Error::Path(_))));
    }
}
