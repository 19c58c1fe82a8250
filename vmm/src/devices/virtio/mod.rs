//! Virtio devices and their MMIO transport.
//!
//! A device implements [`VirtioDevice`]; [`transport::mmio::MmioTransport`]
//! exposes it to the guest as a virtio 1.x MMIO device announced on the
//! kernel command line (`virtio_mmio.device=4K@<addr>:<irq>`).
//!
//! Every device is a folder of the same shape:
//!
//! | file | what |
//! |---|---|
//! | `mod.rs` | its configuration and public types |
//! | `device.rs` | the [`VirtioDevice`]: features, config space, activation |
//! | `handler.rs` | the [`EventHandler`] that runs its queues on the event loop |
//! | `persist.rs` | what a snapshot keeps of its handler, with its own layout version |
//! | `tests.rs`, `<file>_tests.rs` | the tests of `mod.rs` and of `<file>.rs` |
//!
//! When the driver sets DRIVER_OK, the transport calls
//! [`VirtioDevice::activate`], puts the handler it returns on the event loop
//! and removes it when the driver resets the device. A snapshot asks the
//! transport, which asks that handler ([`EventHandler::save`]); a restore
//! hands the saved state to [`VirtioDevice::restore`].
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

use crate::event_loop::EventHandler;
use persist::DeviceState;

/// Most chains a handler takes off one queue per wakeup. A guest that keeps
/// a queue full would otherwise keep the event loop, and with it the other
/// devices and the control socket, to itself: past the budget the handler
/// signals its own queue eventfd and comes back after the loop's other work.
pub const DRAIN_BUDGET: usize = 256;

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
    /// Saved state the device cannot resume from.
    #[error(transparent)]
    State(#[from] persist::Error),
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
    /// Starts the device with the driver's queues: returns the handler that
    /// runs them, which the transport puts on the event loop. Its
    /// [`EventHandler::save`] gives a
    /// [`persist::RuntimeState`] for snapshots.
    fn activate(&mut self, ctx: ActivateContext) -> Result<Box<dyn EventHandler>, ActivateError>;
    /// Starts the handler of a device that was active when the snapshot
    /// was taken: `ctx.queues` carry the saved ring positions, `state` the
    /// rest of what its handler saved.
    fn restore(
        &mut self,
        ctx: ActivateContext,
        state: &DeviceState,
    ) -> Result<Box<dyn EventHandler>, ActivateError>;
    /// The driver reset the device (wrote status 0). The transport has
    /// already asked the loop to remove the device's handler.
    fn reset(&mut self);
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
