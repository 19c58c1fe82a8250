//! Snapshot state of virtio devices: the transport's registers, each live
//! queue's ring addresses and positions, and what each device's handler
//! keeps besides its queues (a typed state per device, defined in that
//! device's `persist.rs`).

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState};

use super::block::persist::BlockState;
use super::net::persist::NetState;
use super::vsock::persist::VsockState;

/// Errors in saved virtio state.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A saved queue is not a valid queue (bad size, say).
    #[error("saved virtqueue {0} is invalid")]
    Queue(usize),
    /// The saved state belongs to another kind of device.
    #[error("saved state of a {found} device cannot resume a {device} device")]
    Device {
        /// The device resuming.
        device: &'static str,
        /// The device the state was saved from.
        found: &'static str,
    },
    /// The device's state has a layout this vmm does not read.
    #[error("saved {device} state has layout version {found}, this vmm reads version {reads}")]
    Version {
        /// The device.
        device: &'static str,
        /// Version in the snapshot.
        found: u16,
        /// Version this vmm reads.
        reads: u16,
    },
}

/// Checks the layout `version` of `device`'s saved state against the
/// version this vmm reads.
pub fn check_version(device: &'static str, found: u16, reads: u16) -> Result<(), Error> {
    if found == reads {
        Ok(())
    } else {
        Err(Error::Version {
            device,
            found,
            reads,
        })
    }
}

/// One virtqueue: configuration and ring positions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedQueue {
    /// Maximum size offered by the device.
    pub max_size: u16,
    /// Size chosen by the driver.
    pub size: u16,
    /// Driver marked the queue ready.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available (driver) ring address.
    pub avail_ring: u64,
    /// Used (device) ring address.
    pub used_ring: u64,
    /// Next available index the device will read.
    pub next_avail: u16,
    /// Next used index the device will write.
    pub next_used: u16,
    /// VIRTIO_F_EVENT_IDX negotiated.
    pub event_idx: bool,
}

impl From<&Queue> for SavedQueue {
    fn from(q: &Queue) -> Self {
        let s = q.state();
        Self {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx: s.event_idx_enabled,
        }
    }
}

impl SavedQueue {
    /// The queue again; refuses sizes a queue cannot have.
    pub fn to_queue(&self, index: usize) -> Result<Queue, Error> {
        Queue::try_from(QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        })
        .map_err(|_| Error::Queue(index))
    }
}

/// What an active device's handler saves: its live queues, then what the
/// device keeps besides them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeState {
    /// Live queues in index order.
    pub queues: Vec<SavedQueue>,
    /// The device's own state.
    pub device: DeviceState,
}

impl RuntimeState {
    /// The state of a handler running `queues`, for
    /// [`EventHandler::save`](crate::event_loop::EventHandler::save).
    pub fn new(queues: &[&Queue], device: DeviceState) -> Self {
        Self {
            queues: queues.iter().map(|q| SavedQueue::from(*q)).collect(),
            device,
        }
    }
}

/// The device-specific part of a [`RuntimeState`], one variant per device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceState {
    /// virtio-blk.
    Block(BlockState),
    /// virtio-net.
    Net(NetState),
    /// virtio-vsock.
    Vsock(VsockState),
}

impl DeviceState {
    /// The device's name, for errors.
    pub fn device(&self) -> &'static str {
        match self {
            Self::Block(_) => "virtio-blk",
            Self::Net(_) => "virtio-net",
            Self::Vsock(_) => "virtio-vsock",
        }
    }

    /// `Err` naming both devices, for a device handed another's state.
    pub fn mismatch(&self, device: &'static str) -> Error {
        Error::Device {
            device,
            found: self.device(),
        }
    }
}

/// The MMIO transport's registers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    /// Virtio device type (checked against the device on restore).
    pub device_type: u32,
    /// Device status register.
    pub status: u32,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// QueueSel.
    pub queue_sel: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// Queue configuration as the transport holds it.
    pub queues: Vec<SavedQueue>,
    /// What the device's handler saved, when the device was active.
    pub runtime: Option<RuntimeState>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::QueueT;

    #[test]
    fn queue_round_trip_keeps_positions() {
        let mut q = Queue::new(256).expect("valid size");
        q.set_size(128);
        q.set_desc_table_address(Some(0x1000), Some(0));
        q.set_next_avail(7);
        q.set_next_used(5);
        let saved = SavedQueue::from(&q);
        let back = saved.to_queue(0).expect("valid");
        assert_eq!(SavedQueue::from(&back), saved);
        assert_eq!(back.next_avail(), 7);
    }

    #[test]
    fn bad_saved_queues_are_refused() {
        let mut saved = SavedQueue::from(&Queue::new(16).expect("valid"));
        saved.max_size = 0;
        assert!(matches!(saved.to_queue(3), Err(Error::Queue(3))));
    }

    #[test]
    fn state_of_another_layout_or_device_is_refused_by_name() {
        assert!(check_version("virtio-blk", 1, 1).is_ok());
        let e = check_version("virtio-blk", 7, 1).expect_err("other layout");
        assert_eq!(
            e.to_string(),
            "saved virtio-blk state has layout version 7, this vmm reads version 1"
        );
        let e = DeviceState::Block(BlockState::default()).mismatch("virtio-net");
        assert_eq!(
            e.to_string(),
            "saved state of a virtio-blk device cannot resume a virtio-net device"
        );
    }
}
