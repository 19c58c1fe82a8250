//! Snapshot state of virtio devices: the transport's registers, each live
//! queue's ring addresses and positions, and device-specific runtime bytes.

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState};

/// Most queues a saved device may have.
pub const MAX_QUEUES: usize = 16;
/// Largest device-specific runtime state accepted.
pub const MAX_RUNTIME_EXTRA: usize = 1 << 20;

/// Errors decoding saved virtio state.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The bytes are not a runtime state.
    #[error("saved virtio runtime state does not decode")]
    Decode(#[source] bincode::Error),
    /// A saved queue is not a valid queue (bad size, say).
    #[error("saved virtqueue {0} is invalid")]
    Queue(usize),
    /// More queues or bytes than any device has.
    #[error("saved virtio state is larger than allowed")]
    TooLarge,
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

/// What a device runtime saves: its queues and device-specific bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeState {
    /// Live queues in index order.
    pub queues: Vec<SavedQueue>,
    /// Device-specific state (connections, counters...).
    pub extra: Vec<u8>,
}

impl RuntimeState {
    /// Encodes the live `queues` and `extra` for [`crate::event_loop::EventHandler::save`].
    pub fn encode(queues: &[&Queue], extra: Vec<u8>) -> Vec<u8> {
        let state = RuntimeState {
            queues: queues.iter().map(|q| SavedQueue::from(*q)).collect(),
            extra,
        };
        // Serializing plain integers and byte vectors into memory cannot fail.
        bincode::serialize(&state).unwrap_or_default()
    }

    /// Decodes and bounds-checks saved runtime bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, Error> {
        use bincode::Options;
        let state: RuntimeState = bincode::DefaultOptions::new()
            .with_fixint_encoding()
            .with_limit((MAX_RUNTIME_EXTRA + 4096) as u64)
            .deserialize(bytes)
            .map_err(Error::Decode)?;
        if state.queues.len() > MAX_QUEUES || state.extra.len() > MAX_RUNTIME_EXTRA {
            return Err(Error::TooLarge);
        }
        Ok(state)
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
    /// Whether the device was running (DRIVER_OK and activated).
    pub activated: bool,
    /// Queue configuration as the transport holds it.
    pub queues: Vec<SavedQueue>,
    /// The runtime's state, when activated.
    pub runtime: Option<Vec<u8>>,
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
    fn bad_saved_queues_and_bytes_are_refused() {
        let mut saved = SavedQueue::from(&Queue::new(16).expect("valid"));
        saved.max_size = 0;
        assert!(saved.to_queue(3).is_err());
        assert!(RuntimeState::decode(&[0xff; 16]).is_err());
        let ok = RuntimeState::encode(&[&Queue::new(16).expect("valid")], vec![1, 2]);
        let state = RuntimeState::decode(&ok).expect("round trip");
        assert_eq!(state.extra, vec![1, 2]);
        assert_eq!(state.queues.len(), 1);
    }
}
