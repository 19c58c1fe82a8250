//! virtio-net (device type 1) backed by the userspace stack in
//! [`crate::usernet`]: the guest gets a NIC on a private network whose gateway
//! is the VMM, with no TAP device or privileges on the host.
//!
//! Features: VIRTIO_F_VERSION_1 and VIRTIO_NET_F_MAC only (no offloads, no
//! mergeable buffers): every frame travels behind a 12-byte
//! `virtio_net_hdr`, at most [`MAX_FRAME_LEN`] bytes long.
//! Queue 0 receives, queue 1 transmits; both are processed on the VMM's
//! event loop, where the stack, its host sockets and its timer live too.

mod handler;
pub mod queues;

use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::VIRTIO_NET_F_MAC;

use crate::devices::virtio::{
    feature, read_config_bytes, ActivateContext, ActivateError, VirtioDevice,
};
use crate::event_loop::{HandlerId, LoopHandle};
#[cfg(doc)]
use crate::usernet::MAX_FRAME_LEN;
use crate::usernet::{NetConfig, Stack};
use handler::{Backend, BackendSlot, NetHandler};

/// Size of each of the two queues.
pub const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 2] = [QUEUE_SIZE, QUEUE_SIZE];

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

/// Counters the device's runtime keeps for [`InboundHandle`] holders, so a
/// platform that hands over connections can tell when an instance is idle.
#[derive(Debug, Default)]
pub struct InboundStats {
    /// Connections the stack holds (inbound and outbound, any phase), as of
    /// the runtime's last pass.
    open: AtomicUsize,
    /// Handed-over connections the runtime has taken (or refused) so far.
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

/// The virtio-net device.
pub struct Net {
    mac: [u8; 6],
    acked_features: u64,
    slot: BackendSlot,
    wake: Arc<EventFd>,
    inbound: InboundHandle,
    published: Vec<(SocketAddr, u16)>,
    running: Option<(LoopHandle, HandlerId)>,
}

impl Net {
    /// A device for `config`; its published ports are bound here, so a
    /// port in use fails the VM's start rather than its first connection.
    pub fn new(config: &NetConfig) -> Result<Self, Error> {
        let stack = Stack::new(config)?;
        let published = stack.published();
        let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?);
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(InboundStats::default());
        Ok(Self {
            mac: config.mac,
            acked_features: 0,
            slot: Arc::new(Mutex::new(Some(Backend {
                stack,
                inbound: rx,
                stats: stats.clone(),
            }))),
            inbound: InboundHandle {
                tx,
                wake: wake.clone(),
                stats,
            },
            wake,
            published,
            running: None,
        })
    }

    /// A handle for handing accepted host connections to the guest.
    pub fn inbound(&self) -> InboundHandle {
        self.inbound.clone()
    }

    /// The bound host address of each `--publish` listener and its guest port.
    pub fn published(&self) -> &[(SocketAddr, u16)] {
        &self.published
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        feature(VIRTIO_F_VERSION_1) | feature(VIRTIO_NET_F_MAC)
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.mac, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // The MAC is read-only once VIRTIO_F_VERSION_1 is negotiated.
    }

    fn runtime(&self) -> Option<HandlerId> {
        self.running.as_ref().map(|(_, id)| *id)
    }

    /// The queues resume where they were and the guest keeps the MAC it
    /// read at probe time; the stack is this VMM's fresh one (its own
    /// `--publish` listeners, no connections), so a guest TCP connection
    /// from before the snapshot is answered with RST when it next sends.
    fn restore_runtime(&mut self, ctx: ActivateContext, extra: &[u8]) -> Result<(), ActivateError> {
        self.mac = <[u8; 6]>::try_from(extra).map_err(|_| {
            ActivateError::Backend(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "saved virtio-net state holds no MAC address",
            ))
        })?;
        self.activate(ctx)
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let ActivateContext {
            mem,
            queues,
            queue_events,
            interrupt,
            event_loop,
        } = ctx;
        let got = queues.len();
        let (Ok([rx, tx]), Ok([rx_evt, tx_evt])) =
            (<[_; 2]>::try_from(queues), <[_; 2]>::try_from(queue_events))
        else {
            return Err(ActivateError::QueueCount { expected: 2, got });
        };
        for (index, queue) in [&rx, &tx].into_iter().enumerate() {
            if !virtio_queue::QueueT::ready(queue) {
                return Err(ActivateError::InvalidQueue(index));
            }
        }
        let backend = self
            .slot
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| {
                ActivateError::Backend(std::io::Error::other(
                    "the previous activation has not stopped yet",
                ))
            })?;
        let handler = NetHandler {
            mem,
            rx,
            tx,
            rx_evt,
            tx_evt,
            interrupt,
            mac: self.mac,
            wake: self.wake.clone(),
            backend: Some(backend),
            slot: self.slot.clone(),
            timer_at: None,
            broken: false,
        };
        let id = event_loop
            .add(Box::new(handler))
            .map_err(|e| ActivateError::Backend(std::io::Error::other(e)))?;
        self.running = Some((event_loop, id));
        Ok(())
    }

    fn reset(&mut self) {
        if let Some((event_loop, id)) = self.running.take() {
            let _ = event_loop.remove(id);
        }
        self.acked_features = 0;
    }
}

#[cfg(test)]
mod tests;
