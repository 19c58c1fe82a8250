//! Virtio 1.x over MMIO (virtio spec 1.2, section 4.2.2): the register file
//! the guest driver programs, queue setup, and device activation.

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
use crate::event_loop::LoopHandle;

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
    activated: bool,
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
    /// An active device without runtime state.
    #[error("saved virtio device of type {0} was active but has no runtime state")]
    NoRuntime(u32),
    /// Saved state that does not decode.
    #[error(transparent)]
    State(#[from] crate::devices::virtio::persist::Error),
    /// The device could not resume.
    #[error("virtio device failed to resume")]
    Activate(#[source] ActivateError),
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
    /// `event_loop` where its runtime will live once activated.
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
            activated: false,
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

    /// The transport's registers for a snapshot; the runtime's state is
    /// added by the caller from the handler [`Self::runtime`] names.
    pub fn save(&self) -> TransportState {
        TransportState {
            device_type: self.device.device_type(),
            status: self.status,
            acked_features: self.driver_features,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            activated: self.activated,
            queues: self.queues.iter().map(SavedQueue::from).collect(),
            runtime: None,
        }
    }

    /// The device's runtime handler, when it is active.
    pub fn runtime(&self) -> Option<crate::event_loop::HandlerId> {
        if self.activated {
            self.device.runtime()
        } else {
            None
        }
    }

    /// Whether the device runs and must have its runtime saved.
    pub fn activated(&self) -> bool {
        self.activated
    }

    /// Puts the transport (and, if it was running, the device's runtime)
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
            self.queues[i] = saved.to_queue(i).map_err(RestoreError::State)?;
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
        if !state.activated {
            return Ok(());
        }
        let runtime = state
            .runtime
            .as_deref()
            .ok_or(RestoreError::NoRuntime(device_type))?;
        let runtime = RuntimeState::decode(runtime).map_err(RestoreError::State)?;
        if runtime.queues.len() != self.queues.len() {
            return Err(RestoreError::QueueCount(device_type));
        }
        let queues = runtime
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| q.to_queue(i))
            .collect::<Result<Vec<_>, _>>()
            .map_err(RestoreError::State)?;
        let ctx = self
            .context(queues)
            .map_err(|e| RestoreError::Activate(ActivateError::Backend(e)))?;
        self.device
            .restore_runtime(ctx, &runtime.extra)
            .map_err(RestoreError::Activate)?;
        self.activated = true;
        Ok(())
    }

    /// What the device starts with: `queues`, duplicates of the queue
    /// notification eventfds, the interrupt line and the event loop.
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
            event_loop: self.event_loop.clone(),
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

    fn reset(&mut self) {
        if self.activated {
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
        self.activated = false;
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
        if new_bits & VIRTIO_CONFIG_S_DRIVER_OK != 0 && !self.activated {
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
        match self.device.activate(ctx) {
            Ok(()) => self.activated = true,
            Err(e) => {
                tracing::warn!(
                    "virtio device {} failed to activate: {e}",
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

#[cfg(test)]
#[path = "mmio_tests.rs"]
mod tests;
