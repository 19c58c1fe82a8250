//! virtio-net (device type 1) backed by the userspace network in
//! [`crate::usernet`]: the guest gets a NIC on a private network whose
//! gateway is the VMM, with no TAP device or privileges on the host.
//!
//! Features: VIRTIO_F_VERSION_1 and VIRTIO_NET_F_MAC only (no offloads, no
//! mergeable buffers): every frame travels behind a 12-byte
//! `virtio_net_hdr_v1`, at most [`MAX_FRAME_LEN`] bytes long.
//! Queue 0 receives, queue 1 transmits; both are processed on the VMM's
//! event loop, where the stack, its host sockets and its timer live too.
//!
//! [`device::Net`] is the [`VirtioDevice`](super::VirtioDevice); `handler.rs`
//! runs the queues and the stack on the event loop; [`queues`] moves frames
//! in and out of descriptor chains; [`persist`] is what a snapshot keeps.
//! [`InboundHandle`] hands host connections accepted elsewhere (the control
//! socket) to the stack.

pub mod device;
mod handler;
pub mod persist;
pub mod queues;
#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;

use std::net::TcpStream;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::event_loop::Ops;
#[cfg(doc)]
use crate::usernet::MAX_FRAME_LEN;
pub use device::Net;
use handler::{Backend, NOTIFY_INBOUND};

/// Size of each of the two queues.
pub const QUEUE_SIZE: u16 = 256;

/// Errors of the network device.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The userspace stack could not start (a published port could not be bound).
    #[error(transparent)]
    Stack(#[from] crate::usernet::Error),
}

/// Hands accepted host connections to the network device, on the event
/// loop's thread (the control socket's handler).
#[derive(Clone)]
pub struct InboundHandle {
    backend: Arc<Mutex<Backend>>,
}

impl InboundHandle {
    /// Forwards `stream` to `guest_port` in the guest, as `--publish` does
    /// for the connections it accepts itself. Call it while handling an
    /// event of another handler on the device's event loop (not from its
    /// `start`): the stack takes the connection now, and `ops` runs the
    /// device's handler at once to start it. A connection the stack refuses
    /// (too many open) is logged and closed; a device the driver has not
    /// started yet takes it when it starts.
    pub fn accept_inbound(&self, ops: &mut Ops<'_>, stream: TcpStream, guest_port: u16) {
        let handler = {
            let mut backend = lock(&self.backend);
            backend.taken += 1;
            if let Err(e) = backend.stack.accept_inbound(stream, guest_port) {
                tracing::warn!("virtio-net: inbound connection dropped: {e}");
            }
            backend.handler
        };
        if let Some(id) = handler {
            ops.notify(id, NOTIFY_INBOUND);
        }
    }

    /// `(open, taken)`: connections the stack holds now (inbound and
    /// outbound, any phase), and how many handed-over connections it has
    /// taken (or refused) so far. A caller that counts its own hand-overs
    /// knows `handed - taken` are still on their way.
    pub fn counts(&self) -> (usize, u64) {
        let backend = lock(&self.backend);
        (backend.stack.connections(), backend.taken)
    }
}

/// The backend is only ever used on the event-loop thread (and so never
/// contended); a panic there aborts the VMM, so a poisoned lock is not
/// left behind in practice.
fn lock(backend: &Mutex<Backend>) -> MutexGuard<'_, Backend> {
    backend.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests;
