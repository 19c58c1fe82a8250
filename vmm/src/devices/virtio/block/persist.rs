//! What a snapshot keeps of an active virtio-blk device besides its queue.

use serde::{Deserialize, Serialize};

use crate::devices::virtio::persist::{check_version, Error};

/// Layout version of [`BlockState`]. Bump it, and the snapshot format
/// version, when a field changes.
pub const VERSION: u16 = 1;

/// The handler's state. Nothing but the layout version: every request is
/// either still on the avail ring (picked up again after a restore) or
/// already used, and the handler waits for in-flight I/O before a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// [`VERSION`] when saved.
    pub version: u16,
}

impl Default for BlockState {
    fn default() -> Self {
        Self { version: VERSION }
    }
}

impl BlockState {
    /// Refuses a state of another layout.
    pub fn check(&self) -> Result<(), Error> {
        check_version("virtio-blk", self.version, VERSION)
    }
}
