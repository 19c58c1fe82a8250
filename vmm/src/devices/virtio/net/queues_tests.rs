//! Hostile and well-formed descriptor chains on mock guest memory.

// Test sizes are small constants.
#![allow(clippy::cast_possible_truncation)]

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueOwnedT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{read_tx_frame, write_rx_frame, QueueError, NET_HDR_LEN};

const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const WRITE: u16 = VRING_DESC_F_WRITE as u16;
const MEM_SIZE: u64 = 0x10_0000;

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).expect("mock memory")
}

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

/// A queue at `base` holding `descs` (one chain, linked by their NEXT flags).
fn queue_with(mem: &GuestMemoryMmap, base: u64, descs: &[RawDescriptor]) -> Queue {
    let mock = MockSplitQueue::create(mem, GuestAddress(base), 16);
    mock.add_desc_chains(descs, 0).expect("chain written");
    mock.create_queue::<Queue>().expect("queue")
}

fn tx_result(
    mem: &GuestMemoryMmap,
    descs: &[RawDescriptor],
) -> Result<Option<Vec<u8>>, QueueError> {
    let mut q = queue_with(mem, 0, descs);
    let chain = q.iter(mem).expect("avail ring").next().expect("a chain");
    read_tx_frame(mem, chain)
}

fn frame(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

#[test]
fn tx_frame_split_across_descriptors_is_reassembled() {
    let mem = memory();
    let f = frame(60);
    mem.write_slice(&[0u8; NET_HDR_LEN], GuestAddress(0x2000))
        .expect("hdr");
    mem.write_slice(&f, GuestAddress(0x3000)).expect("frame");
    // Header and frame split at an odd place.
    let got = tx_result(
        &mem,
        &[
            desc(0x2000, 8, NEXT, 1),
            desc(0x2008, 4, NEXT, 2),
            desc(0x3000, 60, 0, 0),
        ],
    )
    .expect("valid chain");
    assert_eq!(got, Some(f));
}

#[test]
fn tx_chain_with_a_writable_buffer_is_rejected() {
    let mem = memory();
    let r = tx_result(
        &mem,
        &[desc(0x2000, 12, NEXT, 1), desc(0x3000, 60, WRITE, 0)],
    );
    assert!(matches!(r, Err(QueueError::WritableInTx(0))), "{r:?}");
}

#[test]
fn tx_buffer_outside_guest_memory_is_rejected() {
    let mem = memory();
    for (addr, len) in [(MEM_SIZE - 16, 64), (u64::MAX - 8, 72), (MEM_SIZE, 1)] {
        let r = tx_result(&mem, &[desc(addr, len, 0, 0)]);
        assert!(
            matches!(r, Err(QueueError::OutOfBounds { .. })),
            "{addr:#x}: {r:?}"
        );
    }
}

#[test]
fn tx_chain_linking_outside_the_table_or_looping_is_rejected() {
    let mem = memory();
    let r = tx_result(&mem, &[desc(0x2000, 80, NEXT, 200)]);
    assert!(matches!(r, Err(QueueError::BrokenChain(0))), "{r:?}");
    // Descriptor 0 -> 1 -> 0 -> ...: the iterator's TTL ends it mid-chain.
    let mock = MockSplitQueue::create(&mem, GuestAddress(0), 16);
    mock.desc_table()
        .store(0, desc(0x2000, 40, NEXT, 1))
        .expect("d0");
    mock.desc_table()
        .store(1, desc(0x3000, 40, NEXT, 0))
        .expect("d1");
    mock.avail().ring().ref_at(0).expect("slot").store(0);
    mock.avail().idx().store(1);
    let mut q: Queue = mock.create_queue().expect("queue");
    let chain = q.iter(&mem).expect("avail").next().expect("chain");
    assert!(matches!(
        read_tx_frame(&mem, chain),
        Err(QueueError::BrokenChain(0))
    ));
}

#[test]
fn tx_runts_and_giants_are_dropped_not_fatal() {
    let mem = memory();
    let runt = tx_result(&mem, &[desc(0x2000, (NET_HDR_LEN + 13) as u32, 0, 0)]);
    assert!(matches!(runt, Ok(None)), "{runt:?}");
    let giant = tx_result(&mem, &[desc(0x2000, (NET_HDR_LEN + 1515) as u32, 0, 0)]);
    assert!(matches!(giant, Ok(None)), "{giant:?}");
    let huge = tx_result(
        &mem,
        &[
            desc(0x2000, u32::MAX, NEXT, 1),
            desc(0x2000, u32::MAX, 0, 0),
        ],
    );
    assert!(huge.is_err() || matches!(huge, Ok(None)), "{huge:?}");
}

fn rx_write(mem: &GuestMemoryMmap, descs: &[RawDescriptor], f: &[u8]) -> Result<u32, QueueError> {
    let mut q = queue_with(mem, 0, descs);
    let chain = q.iter(mem).expect("avail ring").next().expect("a chain");
    write_rx_frame(mem, chain, f)
}

#[test]
fn rx_frame_is_written_behind_a_header_across_buffers() {
    let mem = memory();
    let f = frame(100);
    let len = rx_write(
        &mem,
        &[
            desc(0x4000, 10, WRITE | NEXT, 1),
            desc(0x5000, 2000, WRITE, 0),
        ],
        &f,
    )
    .expect("valid chain");
    assert_eq!(len as usize, NET_HDR_LEN + 100);
    let mut hdr = [0xffu8; 12];
    mem.read_slice(&mut hdr[..10], GuestAddress(0x4000))
        .expect("read");
    mem.read_slice(&mut hdr[10..], GuestAddress(0x5000))
        .expect("read");
    assert_eq!(hdr, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0], "num_buffers = 1");
    let mut back = vec![0u8; 100];
    mem.read_slice(&mut back, GuestAddress(0x5002))
        .expect("read");
    assert_eq!(back, f);
}

#[test]
fn rx_chain_too_small_or_readable_is_handled() {
    let mem = memory();
    assert_eq!(
        rx_write(&mem, &[desc(0x4000, 50, WRITE, 0)], &frame(60)).expect("ok"),
        0
    );
    let r = rx_write(&mem, &[desc(0x4000, 2000, 0, 0)], &frame(60));
    assert!(matches!(r, Err(QueueError::ReadableInRx(0))), "{r:?}");
}
