//! The device end to end: a handler on a real event loop, a temporary
//! image, and a driver writing chains into mock guest memory.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::io::{Read, Seek, SeekFrom, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_blk::VIRTIO_BLK_F_RO;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::virtio::block::persist::BlockState;
use crate::devices::virtio::block::request::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
};
use crate::devices::virtio::block::test_utils::{
    header, linked, memory, segment, DATA, HDR, STATUS,
};
use crate::devices::virtio::block::{Block, BlockConfig, Disk};
use crate::devices::virtio::persist::{DeviceState, RuntimeState};
use crate::devices::virtio::vsock::persist::VsockState;
use crate::devices::virtio::{feature, ActivateContext, ActivateError, Interrupt, VirtioDevice};
use crate::event_loop::test_utils::{save_handler, LoopThread};
use crate::event_loop::HandlerId;

/// A device on a running event loop with a temporary image.
struct Harness {
    mem: GuestMemoryMmap,
    image: tempfile::NamedTempFile,
    block: Block,
    interrupt: Arc<Interrupt>,
    irq: EventFd,
    kick: EventFd,
    event_loop: LoopThread,
    /// The device's handler on the loop, as the transport keeps it.
    handler: Option<HandlerId>,
    next_desc: u16,
    desc_table: u64,
    avail: u64,
    used: u64,
}

const QUEUE_LEN: u16 = 64;

impl Harness {
    fn new(read_only: bool, features: u64) -> Self {
        let mut image = tempfile::NamedTempFile::new().unwrap();
        let content: Vec<u8> = (0..64 * 512).map(|i| (i / 512) as u8).collect();
        image.write_all(&content).unwrap();
        let mut config = BlockConfig::new(image.path());
        config.read_only = read_only;
        config.serial = Some("test-serial".into());
        let mut block = Block::new(Disk::open(&config).unwrap());
        block.set_acked_features(features);

        let mem = memory();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(Interrupt::new(irq.try_clone().unwrap()));
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let event_loop = LoopThread::start();
        // The mock zeroes the rings each time one is made: make it once and
        // drive the rings through their addresses afterwards.
        let vq = MockSplitQueue::new(&mem, QUEUE_LEN);
        let queue: Queue = vq.create_queue().unwrap();
        let (desc_table, avail, used) =
            (vq.desc_table_addr().0, vq.avail_addr().0, vq.used_addr().0);
        drop(vq);
        let handler = block
            .activate(ActivateContext {
                mem: mem.clone(),
                queues: vec![queue],
                queue_events: vec![kick.try_clone().unwrap()],
                interrupt: interrupt.clone(),
            })
            .unwrap();
        let handler = Some(event_loop.handle().add(handler).unwrap());
        Self {
            mem,
            image,
            block,
            interrupt,
            irq,
            kick,
            event_loop,
            handler,
            next_desc: 0,
            desc_table,
            avail,
            used,
        }
    }

    /// Resets the device as the transport does: handler off the loop first.
    fn reset(&mut self) {
        if let Some(id) = self.handler.take() {
            self.event_loop.handle().remove(id).unwrap();
        }
        self.block.reset();
    }

    fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(self.used + 2)).unwrap()
    }

    /// Queues one chain and kicks the device, as a driver does.
    fn submit(&mut self, descs: &[(u64, u32, bool)]) {
        let first = self.next_desc;
        for (i, d) in linked(descs, first).into_iter().enumerate() {
            let at = self.desc_table + 16 * (u64::from(first) + i as u64);
            self.mem.write_obj(d, GuestAddress(at)).unwrap();
        }
        self.next_desc += u16::try_from(descs.len()).unwrap();
        let idx: u16 = self.mem.read_obj(GuestAddress(self.avail + 2)).unwrap();
        let slot = self.avail + 4 + 2 * u64::from(idx % QUEUE_LEN);
        self.mem.write_obj(first, GuestAddress(slot)).unwrap();
        self.mem
            .write_obj(idx.wrapping_add(1), GuestAddress(self.avail + 2))
            .unwrap();
        self.kick.write(1).unwrap();
    }

    /// Waits until `n` chains are used; returns the last used (id, len).
    fn wait_used(&self, n: u16) -> (u32, u32) {
        let start = Instant::now();
        while self.used_idx() < n {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "device did not complete request {n}"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let at = self.used + 4 + 8 * u64::from((n - 1) % QUEUE_LEN);
        let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
        (id, len)
    }

    fn status(&self, at: u64) -> u8 {
        self.mem.read_obj(GuestAddress(at)).unwrap()
    }

    fn image_bytes(&self) -> Vec<u8> {
        let mut f = self.image.reopen().unwrap();
        f.seek(SeekFrom::Start(0)).unwrap();
        let mut v = Vec::new();
        f.read_to_end(&mut v).unwrap();
        v
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.reset();
    }
}

#[test]
fn reads_land_in_guest_memory() {
    let mut h = Harness::new(false, feature(VIRTIO_F_VERSION_1));
    header(&h.mem, HDR, VIRTIO_BLK_T_IN, 5);
    h.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    h.submit(&[
        (HDR, 16, false),
        (DATA, 512, true),
        (DATA + 0x1000, 512, true),
        (STATUS, 1, true),
    ]);
    assert_eq!(h.wait_used(1), (0, 1025));
    assert_eq!(h.status(STATUS), VIRTIO_BLK_S_OK);
    let mut buf = [0u8; 512];
    h.mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
    assert!(buf.iter().all(|&b| b == 5), "sector 5");
    h.mem
        .read_slice(&mut buf, GuestAddress(DATA + 0x1000))
        .unwrap();
    assert!(buf.iter().all(|&b| b == 6), "sector 6");
    assert!(h.interrupt.status() & 1 != 0, "used-ring interrupt");
    assert!(h.irq.read().is_ok(), "irqfd raised");
}

#[test]
fn writes_reach_the_image_and_flush_succeeds() {
    let mut h = Harness::new(false, feature(VIRTIO_F_VERSION_1));
    header(&h.mem, HDR, VIRTIO_BLK_T_OUT, 2);
    h.mem
        .write_slice(&[0xab; 1024], GuestAddress(DATA))
        .unwrap();
    h.submit(&[(HDR, 16, false), (DATA, 1024, false), (STATUS, 1, true)]);
    assert_eq!(h.wait_used(1).1, 1);
    assert_eq!(h.status(STATUS), VIRTIO_BLK_S_OK);
    let image = h.image_bytes();
    assert!(image[1024..2048].iter().all(|&b| b == 0xab));
    assert!(
        image[512..1024].iter().all(|&b| b == 1),
        "neighbours untouched"
    );
    assert!(image[2048..2560].iter().all(|&b| b == 4));

    header(&h.mem, HDR + 0x100, VIRTIO_BLK_T_FLUSH, 0);
    h.mem.write_obj(0xffu8, GuestAddress(STATUS + 1)).unwrap();
    h.submit(&[(HDR + 0x100, 16, false), (STATUS + 1, 1, true)]);
    assert_eq!(h.wait_used(2).1, 1);
    assert_eq!(h.status(STATUS + 1), VIRTIO_BLK_S_OK);
}

#[test]
fn get_id_returns_the_serial() {
    let mut h = Harness::new(false, feature(VIRTIO_F_VERSION_1));
    header(&h.mem, HDR, VIRTIO_BLK_T_GET_ID, 0);
    h.submit(&[(HDR, 16, false), (DATA, 20, true), (STATUS, 1, true)]);
    assert_eq!(h.wait_used(1).1, 21);
    assert_eq!(h.status(STATUS), VIRTIO_BLK_S_OK);
    let mut id = [0u8; 20];
    h.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..11], b"test-serial");
    assert!(id[11..].iter().all(|&b| b == 0));
}

#[test]
fn read_only_disk_rejects_writes_with_ioerr() {
    let mut h = Harness::new(true, feature(VIRTIO_F_VERSION_1) | feature(VIRTIO_BLK_F_RO));
    assert!(h.block.avail_features() & feature(VIRTIO_BLK_F_RO) != 0);
    header(&h.mem, HDR, VIRTIO_BLK_T_OUT, 0);
    h.mem.write_slice(&[0xcd; 512], GuestAddress(DATA)).unwrap();
    h.submit(&[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)]);
    assert_eq!(h.wait_used(1).1, 1);
    assert_eq!(h.status(STATUS), VIRTIO_BLK_S_IOERR);
    assert!(
        h.image_bytes()[..512].iter().all(|&b| b == 0),
        "image unchanged"
    );
}

#[test]
fn bad_requests_complete_with_a_status_and_the_queue_goes_on() {
    let mut h = Harness::new(
        false,
        feature(VIRTIO_F_VERSION_1) | feature(VIRTIO_RING_F_EVENT_IDX),
    );
    header(&h.mem, HDR, VIRTIO_BLK_T_IN, 1000);
    h.submit(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
    assert_eq!(h.wait_used(1).1, 1);
    assert_eq!(h.status(STATUS), VIRTIO_BLK_S_IOERR);
    header(&h.mem, HDR + 0x100, 99, 0);
    h.submit(&[(HDR + 0x100, 16, false), (STATUS + 1, 1, true)]);
    h.wait_used(2);
    assert_eq!(h.status(STATUS + 1), VIRTIO_BLK_S_UNSUPP);
    assert!(!h.interrupt.needs_reset());
}

#[test]
fn a_chain_without_status_sets_needs_reset() {
    let mut h = Harness::new(false, feature(VIRTIO_F_VERSION_1));
    header(&h.mem, HDR, VIRTIO_BLK_T_OUT, 0);
    h.submit(&[(HDR, 16, false), (DATA, 512, false)]);
    let start = Instant::now();
    while !h.interrupt.needs_reset() {
        assert!(start.elapsed() < Duration::from_secs(60), "no NEEDS_RESET");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(h.interrupt.status() & 2 != 0, "config interrupt");
    // Nothing more is processed until the driver resets the device.
    header(&h.mem, HDR + 0x100, VIRTIO_BLK_T_FLUSH, 0);
    h.submit(&[(HDR + 0x100, 16, false), (STATUS, 1, true)]);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(h.used_idx(), 0);
}

#[test]
fn write_zeroes_and_discard_zero_the_image_range() {
    let mut h = Harness::new(false, feature(VIRTIO_F_VERSION_1));
    header(&h.mem, HDR, VIRTIO_BLK_T_WRITE_ZEROES, 3);
    segment(&h.mem, DATA, 3, 2, 0);
    h.submit(&[(HDR, 16, false), (DATA, 16, false), (STATUS, 1, true)]);
    assert_eq!(h.wait_used(1).1, 1);
    assert_eq!(h.status(STATUS), VIRTIO_BLK_S_OK);
    header(&h.mem, HDR + 0x100, VIRTIO_BLK_T_DISCARD, 0);
    segment(&h.mem, DATA + 0x100, 16, 8, 0);
    h.submit(&[
        (HDR + 0x100, 16, false),
        (DATA + 0x100, 16, false),
        (STATUS + 1, 1, true),
    ]);
    h.wait_used(2);
    assert_eq!(h.status(STATUS + 1), VIRTIO_BLK_S_OK);
    let image = h.image_bytes();
    assert_eq!(image.len(), 64 * 512, "size kept");
    assert!(
        image[512 * 2..512 * 3].iter().all(|&b| b == 2),
        "before the range"
    );
    assert!(image[512 * 3..512 * 5].iter().all(|&b| b == 0), "zeroed");
    assert!(
        image[512 * 5..512 * 6].iter().all(|&b| b == 5),
        "after the range"
    );
    assert!(
        image[512 * 16..512 * 24].iter().all(|&b| b == 0),
        "discarded"
    );
    assert!(image[512 * 24..512 * 25].iter().all(|&b| b == 24));
}

#[test]
fn a_saved_handler_resumes_from_its_ring_positions() {
    let features = feature(VIRTIO_F_VERSION_1) | feature(VIRTIO_RING_F_EVENT_IDX);
    let mut h = Harness::new(false, features);
    header(&h.mem, HDR, VIRTIO_BLK_T_IN, 5);
    h.submit(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
    assert_eq!(h.wait_used(1), (0, 513));

    let id = h.handler.expect("an active device has a handler");
    let (quiescent, saved) = save_handler(h.event_loop.handle(), id);
    assert!(quiescent, "no I/O in flight once the request is used");
    let state = *saved
        .expect("the handler saves")
        .downcast::<RuntimeState>()
        .unwrap();
    assert_eq!(state.device, DeviceState::Block(BlockState::default()));
    let [queue] = state.queues.as_slice() else {
        panic!("one queue: {state:?}");
    };
    assert_eq!((queue.next_avail, queue.next_used), (1, 1));
    assert!(queue.event_idx, "EVENT_IDX is part of the saved queue");

    // The VMM that took the snapshot goes away; the driver queues one more
    // request meanwhile (available, not yet seen by any device).
    h.reset();
    header(&h.mem, HDR + 0x100, VIRTIO_BLK_T_IN, 7);
    h.mem.write_obj(0xffu8, GuestAddress(STATUS + 1)).unwrap();
    h.submit(&[
        (HDR + 0x100, 16, false),
        (DATA + 0x1000, 512, true),
        (STATUS + 1, 1, true),
    ]);

    // Restore as the transport does: acked features first, then the handler.
    h.block.set_acked_features(features);
    let ctx = || ActivateContext {
        mem: h.mem.clone(),
        queues: vec![queue.to_queue(0).unwrap()],
        queue_events: vec![h.kick.try_clone().unwrap()],
        interrupt: h.interrupt.clone(),
    };
    let other = DeviceState::Vsock(VsockState::default());
    assert!(matches!(
        h.block.restore(ctx(), &other),
        Err(ActivateError::State(_))
    ));
    let handler = h.block.restore(ctx(), &state.device).unwrap();
    h.handler = Some(h.event_loop.handle().add(handler).unwrap());
    // The pending request is picked up without a new kick and lands in
    // used slot 1, after the one completed before the snapshot.
    let _ = h.kick.read();
    assert_eq!(h.wait_used(2), (3, 513));
    assert_eq!(h.status(STATUS + 1), VIRTIO_BLK_S_OK);
    let mut buf = [0u8; 512];
    h.mem
        .read_slice(&mut buf, GuestAddress(DATA + 0x1000))
        .unwrap();
    assert!(buf.iter().all(|&b| b == 7), "sector 7");

    let (_, saved) = save_handler(h.event_loop.handle(), h.handler.unwrap());
    let state = saved.unwrap().downcast::<RuntimeState>().unwrap();
    assert_eq!(
        (state.queues[0].next_avail, state.queues[0].next_used),
        (2, 2)
    );
    assert!(state.queues[0].event_idx, "still on after the restore");
}
