//! The virtio-blk device as the MMIO transport sees it: features, config
//! space, and the handler it starts on activation.

use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;

use super::handler::BlockHandler;
use super::request::{MAX_RANGE_SECTORS, MAX_SEGMENTS};
use super::Disk;
use crate::devices::virtio::persist::DeviceState;
use crate::devices::virtio::{
    feature, read_config_bytes, ActivateContext, ActivateError, VirtioDevice,
};
use crate::event_loop::EventHandler;

/// Size of the one request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Logical block size reported to the guest.
pub const BLOCK_SIZE: u32 = 512;
/// Bytes of `struct virtio_blk_config` up to and including
/// `write_zeroes_may_unmap` (and its padding).
const CONFIG_LEN: usize = 60;
/// Discard granularity in sectors (4 KiB, the host page and fs block).
const DISCARD_ALIGNMENT: u32 = 8;

/// A virtio-blk device backed by a raw image.
pub struct Block {
    disk: Arc<Disk>,
    config: [u8; CONFIG_LEN],
    acked_features: u64,
}

impl Block {
    /// A device serving `disk`.
    pub fn new(disk: Disk) -> Self {
        let mut config = [0u8; CONFIG_LEN];
        config[0..8].copy_from_slice(&disk.capacity().to_le_bytes());
        // size_max (8..12) is not offered: segments may be any length.
        config[12..16].copy_from_slice(&MAX_SEGMENTS.to_le_bytes());
        // geometry (16..20) is not offered.
        config[20..24].copy_from_slice(&BLOCK_SIZE.to_le_bytes());
        // topology, writeback, num_queues (24..36) are not offered.
        config[36..40].copy_from_slice(&MAX_RANGE_SECTORS.to_le_bytes());
        config[40..44].copy_from_slice(&1u32.to_le_bytes());
        config[44..48].copy_from_slice(&DISCARD_ALIGNMENT.to_le_bytes());
        config[48..52].copy_from_slice(&MAX_RANGE_SECTORS.to_le_bytes());
        config[52..56].copy_from_slice(&1u32.to_le_bytes());
        config[56] = 1; // write_zeroes_may_unmap
        Self {
            disk: Arc::new(disk),
            config,
            acked_features: 0,
        }
    }

    /// The features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        let writes = if self.disk.read_only() {
            feature(VIRTIO_BLK_F_RO)
        } else {
            feature(VIRTIO_BLK_F_DISCARD) | feature(VIRTIO_BLK_F_WRITE_ZEROES)
        };
        feature(VIRTIO_F_VERSION_1)
            | feature(VIRTIO_RING_F_INDIRECT_DESC)
            | feature(VIRTIO_RING_F_EVENT_IDX)
            | feature(VIRTIO_BLK_F_SEG_MAX)
            | feature(VIRTIO_BLK_F_BLK_SIZE)
            | feature(VIRTIO_BLK_F_FLUSH)
            | writes
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        // Nothing in the offered config space is writable (no CONFIG_WCE).
        tracing::debug!("virtio-blk: ignored config write at {offset:#x}");
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<Box<dyn EventHandler>, ActivateError> {
        let ActivateContext {
            mem,
            queues,
            queue_events,
            interrupt,
        } = ctx;
        let got = queues.len();
        let (Ok([mut queue]), Ok([queue_evt])) =
            (<[_; 1]>::try_from(queues), <[_; 1]>::try_from(queue_events))
        else {
            return Err(ActivateError::QueueCount { expected: 1, got });
        };
        if !queue.ready() {
            return Err(ActivateError::InvalidQueue(0));
        }
        queue.set_event_idx(self.acked_features & feature(VIRTIO_RING_F_EVENT_IDX) != 0);
        Ok(Box::new(BlockHandler::new(
            mem,
            queue,
            queue_evt,
            interrupt,
            self.disk.clone(),
        )))
    }

    /// The handler holds nothing but its queue, whose saved ring positions
    /// the transport hands back; `activate` re-applies EVENT_IDX from the
    /// restored acked features.
    fn restore(
        &mut self,
        ctx: ActivateContext,
        state: &DeviceState,
    ) -> Result<Box<dyn EventHandler>, ActivateError> {
        let DeviceState::Block(state) = state else {
            return Err(state.mismatch("virtio-blk").into());
        };
        state.check()?;
        self.activate(ctx)
    }

    /// In-flight io_uring operations keep their guest memory mapped (the
    /// loop holds a clone) and the image file stays open here, so the
    /// handler can go before they complete; their completions are dropped.
    fn reset(&mut self) {
        self.acked_features = 0;
    }
}
