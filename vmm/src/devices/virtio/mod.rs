//! Virtio devices and their MMIO transport.
//!
//! A device implements [`VirtioDevice`]; [`transport::mmio::MmioTransport`]
//! exposes it to the guest as a virtio 1.x MMIO device announced on the
//! kernel command line (`virtio_mmio.device=4K@<addr>:<irq>`).
//!
//! Virtio constants come from the `virtio-bindings` crate (the Linux UAPI
//! headers); feature bits there are bit numbers, [`feature`] makes the mask.

pub mod block;
pub mod net;
pub mod persist;
pub mod transport;
pub mod vsock;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};

/// The feature mask of feature bit `bit` (virtio-bindings numbers bits).
///
/// ```
/// use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
/// assert_eq!(vmm::devices::virtio::feature(VIRTIO_F_VERSION_1), 1 << 32);
/// ```
pub const fn feature(bit: u32) -> u64 {
    1 << bit
}

/// A device's interrupt line: an irqfd plus the MMIO interrupt-status register.
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
    needs_reset: AtomicBool,
}

impl Interrupt {
    /// An interrupt line that fires `irqfd`.
    pub fn new(irqfd: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            irqfd,
            needs_reset: AtomicBool::new(false),
        }
    }

    /// Marks the device broken by the driver (a malformed descriptor chain,
    /// say): the transport shows NEEDS_RESET in the status register and the
    /// driver is told through a configuration interrupt (virtio 1.2, 2.1.2).
    pub fn set_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::SeqCst);
        let _ = self.trigger(VIRTIO_MMIO_INT_CONFIG);
    }

    /// Whether [`set_needs_reset`](Self::set_needs_reset) was called since the last reset.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    /// Clears the status and the needs-reset mark (device reset).
    pub fn reset(&self) {
        self.status.store(0, Ordering::SeqCst);
        self.needs_reset.store(false, Ordering::SeqCst);
    }

    /// Sets `bits` in the interrupt status and raises the line.
    pub fn trigger(&self, bits: u32) -> std::io::Result<()> {
        self.status.fetch_or(bits, Ordering::SeqCst);
        self.irqfd.write(1)
    }

    /// The current interrupt status.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Sets the status bits as saved in a snapshot (no interrupt raised).
    pub fn restore_status(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
    }

    /// Clears the acknowledged `bits`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }
}

/// Error a device returns when it cannot start with what the driver set up.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver configured a different number of queues than the device has.
    #[error("device expects {expected} queues, the driver set up {got}")]
    QueueCount {
        /// Queues the device has.
        expected: usize,
        /// Queues the driver made ready.
        got: usize,
    },
    /// A queue's rings are not valid in guest memory.
    #[error("virtqueue {0} is not valid in guest memory")]
    InvalidQueue(usize),
    /// The device backend failed to start.
    #[error("device backend failed to start")]
    Backend(#[source] std::io::Error),
}

/// What a device gets when the driver sets DRIVER_OK.
pub struct ActivateContext {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The configured queues, in index order.
    pub queues: Vec<Queue>,
    /// One notification eventfd per queue (the guest's QueueNotify writes).
    pub queue_events: Vec<EventFd>,
    /// The device's interrupt line.
    pub interrupt: std::sync::Arc<Interrupt>,
    /// The VMM's event loop: the device adds its queue-processing handler
    /// here and removes it on reset.
    pub event_loop: crate::event_loop::LoopHandle,
}

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    /// Virtio device ID (`virtio_bindings::virtio_ids`).
    fn device_type(&self) -> u32;
    /// Maximum size of each of the device's queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features the device offers.
    fn avail_features(&self) -> u64;
    /// Records the features the driver accepted (a subset of the offer).
    fn set_acked_features(&mut self, features: u64);
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device with the driver's queues.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;
    /// Stops the device and drops its queues (driver wrote status 0).
    fn reset(&mut self);

    /// The event-loop handler running the device's queues while it is
    /// active. A snapshot saves that handler's state
    /// ([`crate::event_loop::EventHandler::save`]); a device without one
    /// cannot be snapshotted while active.
    fn runtime(&self) -> Option<crate::event_loop::HandlerId> {
        None
    }

    /// Brings back the runtime of a device that was active when the
    /// snapshot was taken: `ctx.queues` carry the saved ring positions,
    /// `extra` is the device-specific part of what the runtime saved. By
    /// default the device simply activates with those queues.
    fn restore_runtime(&mut self, ctx: ActivateContext, extra: &[u8]) -> Result<(), ActivateError> {
        let _ = extra;
        self.activate(ctx)
    }
}

/// Copies the window `[offset, offset + data.len())` of `config` into `data`,
/// zero-filling what lies outside: how devices answer config-space reads.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(start..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}
