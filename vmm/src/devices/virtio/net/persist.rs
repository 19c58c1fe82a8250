//! What a snapshot keeps of an active virtio-net device besides its two
//! queues.

use serde::{Deserialize, Serialize};

use crate::devices::virtio::persist::{check_version, Error};

/// Layout version of [`NetState`]. Bump it, and the snapshot format
/// version, when a field changes.
pub const VERSION: u16 = 1;

/// The handler's state: the MAC the guest read at probe time. The stack
/// (smoltcp and its host sockets) is not saved: a restore starts a fresh one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    /// [`VERSION`] when saved.
    pub version: u16,
    /// The guest's MAC address.
    pub mac: [u8; 6],
}

impl NetState {
    /// The state of a handler serving `mac`.
    pub fn new(mac: [u8; 6]) -> Self {
        Self {
            version: VERSION,
            mac,
        }
    }

    /// Refuses a state of another layout.
    pub fn check(&self) -> Result<(), Error> {
        check_version("virtio-net", self.version, VERSION)
    }
}
