//! Virtio 1.x over MMIO (virtio spec 1.2, section 4.2.2): the register file
//! the guest driver programs, queue setup, and device activation. The
//! transport puts an activated device's handler on the event loop, removes
//! it on reset, and is what a snapshot asks for the device's state.

use std::sync::Arc;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::{
    VIRTIO_MMIO_CONFIG, VIRTIO_MMIO_CONFIG_GENERATION, VIRTIO_MMIO_DEVICE_FEATURES,
    VIRTIO_MMIO_DEVICE_FEATURES_SEL, VIRTIO_MMIO_DEVICE_ID, VIRTIO_MMIO_DRIVER_FEATURES,
    VIRTIO_MMIO_DRIVER_FEATURES_SEL, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INTERRUPT_STATUS,
    VIRTIO_MMIO_MAGIC_VALUE, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, VIRTIO_MMIO_QUEUE_AVAIL_LOW,
    VIRTIO_MMIO_QUEUE_DESC_HIGH, VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_NOTIFY,
    VIRTIO_MMIO_QUEUE_NUM, VIRTIO_MMIO_QUEUE_NUM_MAX, VIRTIO_MMIO_QUEUE_READY,
    VIRTIO_MMIO_QUEUE_SEL, VIRTIO_MMIO_QUEUE_USED_HIGH, VIRTIO_MMIO_QUEUE_USED_LOW,
    VIRTIO_MMIO_STATUS, VIRTIO_MMIO_VENDOR_ID, VIRTIO_MMIO_VERSION,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::BusDevice;
use crate::devices::virtio::persist::{RuntimeState, SavedQueue, TransportState};
use crate::devices::virtio::{
    feature, ActivateContext, ActivateError, Interrupt, VirtioDevice, VIRTIO_MMIO_INT_CONFIG,
};
use crate::event_loop::{HandlerId, LoopHandle, Ops};

/// Size of one device's MMIO window.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// Offset of the QueueNotify register (where ioeventfds are attached).
pub const QUEUE_NOTIFY_OFFSET: u64 = VIRTIO_MMIO_QUEUE_NOTIFY as u64;

// What the MagicValue, Version and VendorID registers read; the Linux
// headers name the registers, not these values.
/// "virt", little endian.
const MAGIC_VALUE: u32 = 0x7472_6976;
/// Virtio 1.x MMIO (version 1 was the legacy interface).
const MMIO_VERSION: u32 = 2;
/// "LTLC".
const VENDOR_ID: u32 = 0x4c43_4c54;
const CONFIG_SPACE_OFFSET: u64 = VIRTIO_MMIO_CONFIG as u64;

/// The MMIO transport around one device.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    event_loop: LoopHandle,
    queues: Vec<Queue>,
    queue_events: Vec<EventFd>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    config_generation: u32,
    /// The device's handler on the event loop, while the device is active.
    handler: Option<HandlerId>,
}

/// Errors while restoring a transport from a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The snapshot has a different device in this slot.
    #[error("snapshot has a virtio device of type {saved} where a device of type {attached} is attached: attach the same devices in the same order")]
    DeviceType {
        /// Type in the snapshot.
        saved: u32,
        /// Type attached now.
        attached: u32,
    },
    /// The queue count differs.
    #[error("saved virtio device of type {0} has a different number of queues")]
    QueueCount(u32),
    /// A saved queue that is not valid.
    #[error(transparent)]
    State(#[from] crate::devices::virtio::persist::Error),
    /// The device could not resume.
    #[error("virtio device failed to resume")]
    Activate(#[source] ActivateError),
    /// The device's handler could not be put on the event loop.
    #[error("the resumed virtio device's handler cannot start")]
    EventLoop(#[source] crate::event_loop::Error),
}

/// Errors while saving a transport for a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    /// The active device's handler saved nothing a transport can restore.
    #[error("virtio device of type {0} cannot be snapshotted while active")]
    Unsupported(u32),
}

/// Errors while creating a transport.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A queue of an invalid maximum size (zero, or not a power of two).
    #[error("virtqueue {index} has an invalid maximum size {size}")]
    QueueSize {
        /// Queue index.
        index: usize,
        /// The offending size.
        size: u16,
    },
    /// Creating a queue-notification eventfd failed.
    #[error("failed to create a queue notification eventfd")]
    EventFd(#[source] std::io::Error),
}

impl MmioTransport {
    /// Wraps `device`; `interrupt` is its line, `mem` the guest memory,
    /// `event_loop` where its handler will run once activated.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        event_loop: LoopHandle,
    ) -> Result<Self, Error> {
        let mut queues = Vec::new();
        let mut queue_events = Vec::new();
        for (index, &size) in device.queue_max_sizes().iter().enumerate() {
            queues.push(Queue::new(size).map_err(|_| Error::QueueSize { index, size })?);
            queue_events.push(EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?);
        }
        Ok(Self {
            device,
            mem,
            interrupt,
            event_loop,
            queues,
            queue_events,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            config_generation: 0,
            handler: None,
        })
    }

    /// The queue-notification eventfds, for registering as ioeventfds at
    /// [`QUEUE_NOTIFY_OFFSET`] with the queue index as datamatch.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The transport's registers and, while the device is active, what its
    /// handler saves. `ops` reaches the handler: call from another handler
    /// on the same loop, once every handler is quiescent.
    pub fn save(&self, ops: &mut Ops<'_>) -> Result<TransportState, SaveError> {
        let device_type = self.device.device_type();
        let runtime = match self.handler {
            None => None,
            Some(id) => {
                let saved = ops
                    .save_handler(id)
                    .and_then(|state| state.downcast::<RuntimeState>().ok())
                    .ok_or(SaveError::Unsupported(device_type))?;
                Some(*saved)
            }
        };
        Ok(TransportState {
            device_type,
            status: self.status,
            acked_features: self.driver_features,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            queues: self.queues.iter().map(SavedQueue::from).collect(),
            runtime,
        })
    }

    /// Whether the device is active: its handler is on the event loop.
    pub fn activated(&self) -> bool {
        self.handler.is_some()
    }

    /// Puts the transport (and, if it was active, the device's handler)
    /// back as saved. The device must be the same type, freshly created.
    pub fn restore(&mut self, state: &TransportState) -> Result<(), RestoreError> {
        let device_type = self.device.device_type();
        if state.device_type != device_type {
            return Err(RestoreError::DeviceType {
                saved: state.device_type,
                attached: device_type,
            });
        }
        if state.queues.len() != self.queues.len() {
            return Err(RestoreError::QueueCount(device_type));
        }
        for (i, saved) in state.queues.iter().enumerate() {
            self.queues[i] = saved.to_queue(i)?;
        }
        self.status = state.status;
        self.driver_features = state.acked_features;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.queue_sel = state.queue_sel;
        self.config_generation = state.config_generation;
        self.interrupt.restore_status(state.interrupt_status);
        if state.status & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            self.device.set_acked_features(state.acked_features);
        }
        let Some(runtime) = &state.runtime else {
            return Ok(());
        };
        if runtime.queues.len() != self.queues.len() {
            return Err(RestoreError::QueueCount(device_type));
        }
        let queues = runtime
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| q.to_queue(i))
            .collect::<Result<Vec<_>, _>>()?;
        let ctx = self
            .context(queues)
            .map_err(|e| RestoreError::Activate(ActivateError::Backend(e)))?;
        let handler = self
            .device
            .restore(ctx, &runtime.device)
            .map_err(RestoreError::Activate)?;
        let id = self
            .event_loop
            .add(handler)
            .map_err(RestoreError::EventLoop)?;
        self.handler = Some(id);
        Ok(())
    }

    /// What the device starts with: `queues`, duplicates of the queue
    /// notification eventfds and the interrupt line.
    fn context(&self, queues: Vec<Queue>) -> std::io::Result<ActivateContext> {
        let queue_events = self
            .queue_events
            .iter()
            .map(EventFd::try_clone)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ActivateContext {
            mem: self.mem.clone(),
            queues,
            queue_events,
            interrupt: self.interrupt.clone(),
        })
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        if self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            return None;
        }
        let index = usize::try_from(self.queue_sel).ok()?;
        self.queues.get_mut(index)
    }

    fn features_page(features: u64, page: u32) -> u32 {
        let half = match page {
            0 => features & u64::from(u32::MAX),
            1 => features >> 32,
            _ => 0,
        };
        u32::try_from(half).unwrap_or(0)
    }

    /// Takes the device's handler off the loop; its `stop` runs there.
    fn remove_handler(&mut self) -> bool {
        let Some(id) = self.handler.take() else {
            return false;
        };
        if let Err(e) = self.event_loop.remove(id) {
            tracing::debug!(
                "virtio device {}: removing its handler: {e}",
                self.device.device_type()
            );
        }
        true
    }

    fn reset(&mut self) {
        if self.remove_handler() {
            self.device.reset();
        }
        for q in &mut self.queues {
            q.reset();
        }
        self.status = 0;
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt.reset();
    }

    /// Marks the device broken and tells the driver (spec 2.1.2).
    fn needs_reset(&mut self) {
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        if self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            let _ = self.interrupt.trigger(VIRTIO_MMIO_INT_CONFIG);
        }
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let new_bits = value & !self.status;
        if new_bits & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            let offered = self.device.avail_features();
            let ok = self.driver_features & !offered == 0
                && self.driver_features & feature(VIRTIO_F_VERSION_1) != 0;
            if !ok {
                // Leaving FEATURES_OK clear tells the driver the set is refused.
                self.status = value & !VIRTIO_CONFIG_S_FEATURES_OK;
                return;
            }
            self.device.set_acked_features(self.driver_features);
        }
        self.status = value;
        if new_bits & VIRTIO_CONFIG_S_DRIVER_OK != 0 && self.handler.is_none() {
            self.activate();
        }
    }

    fn activate(&mut self) {
        if self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0
            || self.status & VIRTIO_CONFIG_S_FAILED != 0
        {
            self.needs_reset();
            return;
        }
        if let Some(index) = self
            .queues
            .iter()
            .position(|q| q.ready() && !q.is_valid(&self.mem))
        {
            tracing::warn!(
                "virtio device {}: queue {index} invalid",
                self.device.device_type()
            );
            self.needs_reset();
            return;
        }
        let queues: Result<Vec<Queue>, _> = self
            .queues
            .iter()
            .map(|q| Queue::try_from(q.state()))
            .collect();
        let Ok(queues) = queues else {
            self.needs_reset();
            return;
        };
        let Ok(ctx) = self.context(queues) else {
            self.needs_reset();
            return;
        };
        let handler = match self.device.activate(ctx) {
            Ok(handler) => handler,
            Err(e) => {
                tracing::warn!(
                    "virtio device {} failed to activate: {e}",
                    self.device.device_type()
                );
                self.needs_reset();
                return;
            }
        };
        match self.event_loop.add(handler) {
            Ok(id) => self.handler = Some(id),
            Err(e) => {
                tracing::warn!(
                    "virtio device {}: its handler cannot start: {e}",
                    self.device.device_type()
                );
                self.needs_reset();
            }
        }
    }

    fn read_register(&mut self, offset: u32) -> u32 {
        match offset {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC_VALUE,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => {
                Self::features_page(self.device.avail_features(), self.device_features_sel)
            }
            VIRTIO_MMIO_QUEUE_NUM_MAX => {
                let index = usize::try_from(self.queue_sel).unwrap_or(usize::MAX);
                self.queues
                    .get(index)
                    .map_or(0, |q| u32::from(q.max_size()))
            }
            VIRTIO_MMIO_QUEUE_READY => {
                let index = usize::try_from(self.queue_sel).unwrap_or(usize::MAX);
                self.queues.get(index).map_or(0, |q| u32::from(q.ready()))
            }
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status(),
            VIRTIO_MMIO_STATUS => {
                if self.interrupt.needs_reset() {
                    self.status | VIRTIO_CONFIG_S_NEEDS_RESET
                } else {
                    self.status
                }
            }
            VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u32, value: u32) {
        match offset {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES => {
                // Features are negotiated only before FEATURES_OK.
                if self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
                    let v = u64::from(value);
                    match self.driver_features_sel {
                        0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v,
                        1 => {
                            self.driver_features = (self.driver_features & 0xffff_ffff) | (v << 32)
                        }
                        _ => {}
                    }
                }
            }
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = value,
            VIRTIO_MMIO_QUEUE_NUM => {
                let size = u16::try_from(value).unwrap_or(0);
                if let Some(q) = self.selected_queue() {
                    q.set_size(size);
                }
            }
            VIRTIO_MMIO_QUEUE_READY => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(value == 1);
                }
            }
            VIRTIO_MMIO_QUEUE_NOTIFY => {
                let index = usize::try_from(value).unwrap_or(usize::MAX);
                if let Some(evt) = self.queue_events.get(index) {
                    let _ = evt.write(1);
                }
            }
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt.ack(value),
            VIRTIO_MMIO_STATUS => self.set_status(value),
            VIRTIO_MMIO_QUEUE_DESC_LOW => {
                self.with_queue(|q| q.set_desc_table_address(Some(value), None))
            }
            VIRTIO_MMIO_QUEUE_DESC_HIGH => {
                self.with_queue(|q| q.set_desc_table_address(None, Some(value)))
            }
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => {
                self.with_queue(|q| q.set_avail_ring_address(Some(value), None))
            }
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => {
                self.with_queue(|q| q.set_avail_ring_address(None, Some(value)))
            }
            VIRTIO_MMIO_QUEUE_USED_LOW => {
                self.with_queue(|q| q.set_used_ring_address(Some(value), None))
            }
            VIRTIO_MMIO_QUEUE_USED_HIGH => {
                self.with_queue(|q| q.set_used_ring_address(None, Some(value)))
            }
            _ => tracing::debug!("virtio-mmio: write to unknown register {offset:#x}"),
        }
    }

    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.selected_queue() {
            f(q);
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.device.read_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        // Below the config space, the offset fits a register number.
        let register = u32::try_from(offset).ok();
        let Some(register) = register.filter(|r| data.len() == 4 && r.is_multiple_of(4)) else {
            data.fill(0);
            return;
        };
        let v = self.read_register(register);
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.device.write_config(offset - CONFIG_SPACE_OFFSET, data);
            self.config_generation = self.config_generation.wrapping_add(1);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        let Some(register) = u32::try_from(offset).ok().filter(|r| r.is_multiple_of(4)) else {
            return;
        };
        self.write_register(register, u32::from_le_bytes(bytes));
    }
}

impl Drop for MmioTransport {
    /// A device that goes away takes its handler off the loop with it.
    fn drop(&mut self) {
        self.remove_handler();
    }
}

#[cfg(test)]
#[path = "mmio_tests.rs"]
mod tests;
