//! What a snapshot keeps of an active virtio-vsock device besides its three
//! queues.

use serde::{Deserialize, Serialize};

use crate::devices::virtio::persist::{check_version, Error};

/// Layout version of [`VsockState`]. Bump it, and the snapshot format
/// version, when a field changes.
pub const VERSION: u16 = 1;

/// The handler's state. Nothing but the layout version: streams are not
/// carried over (their host ends are Unix sockets of another VMM process),
/// a restore resets the guest's transport instead, and the guest CID comes
/// from the `--vsock` flags.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    /// [`VERSION`] when saved.
    pub version: u16,
}

impl Default for VsockState {
    fn default() -> Self {
        Self { version: VERSION }
    }
}

impl VsockState {
    /// Refuses a state of another layout.
    pub fn check(&self) -> Result<(), Error> {
        check_version("virtio-vsock", self.version, VERSION)
    }
}
