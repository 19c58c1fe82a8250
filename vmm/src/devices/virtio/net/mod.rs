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

use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

pub use device::Net;
#[cfg(doc)]
use crate::usernet::MAX_FRAME_LEN;

/// Size of each of the two queues.
pub const QUEUE_SIZE: u16 = 256;

/// Errors of the network device.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The userspace stack could not start (a published port could not be bound).
    #[error(transparent)]
    Stack(#[from] crate::usernet::Error),
    /// The eventfd for handing over inbound connections could not be created.
    #[error("failed to create the inbound-connection eventfd")]
    EventFd(#[source] std::io::Error),
    /// The device's event-loop handler is gone (the VM is shutting down).
    #[error("the network device is not running")]
    Stopped,
}

/// Hands accepted host connections to a running network device, from any
/// thread (the platform's control socket, say).
#[derive(Clone)]
pub struct InboundHandle {
    tx: Sender<(TcpStream, u16)>,
    wake: Arc<EventFd>,
    stats: Arc<InboundStats>,
}

/// Counters the device's handler keeps for [`InboundHandle`] holders, so a
/// platform that hands over connections can tell when an instance is idle.
#[derive(Debug, Default)]
pub struct InboundStats {
    /// Connections the stack holds (inbound and outbound, any phase), as of
    /// the handler's last pass.
    open: AtomicUsize,
    /// Handed-over connections the handler has taken (or refused) so far.
    taken: AtomicU64,
}

impl InboundStats {
    pub(super) fn record(&self, open: usize, taken: u64) {
        self.open.store(open, Ordering::Release);
        self.taken.fetch_add(taken, Ordering::AcqRel);
    }
}

impl InboundHandle {
    /// Forwards `stream` to `guest_port` in the guest, as `--publish` does
    /// for the connections it accepts itself.
    pub fn accept_inbound(&self, stream: TcpStream, guest_port: u16) -> Result<(), Error> {
        self.tx
            .send((stream, guest_port))
            .map_err(|_| Error::Stopped)?;
        self.wake.write(1).map_err(|_| Error::Stopped)
    }

    /// `(open, taken)`: connections the stack holds now, and how many
    /// handed-over connections it has taken so far. A caller that counts
    /// its own hand-overs knows `handed - taken` are still queued.
    pub fn counts(&self) -> (usize, u64) {
        (
            self.stats.open.load(Ordering::Acquire),
            self.stats.taken.load(Ordering::Acquire),
        )
    }
}
