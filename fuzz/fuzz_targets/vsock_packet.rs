//! virtio-vsock packet parser and RX writer: arbitrary descriptor tables
//! (indirect tables, loops, bad indexes) over guest memory with a hole,
//! arbitrary headers and payloads.
//!
//! Input: head index (u16 LE), then the 16-entry descriptor table, then
//! bytes copied to guest memory at 0x1000 (headers, payloads, tables).

#![no_main]

use libfuzzer_sys::fuzz_target;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueOwnedT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm::devices::virtio::vsock::packet::{self, Header, Op, RxBuffer, MAX_PAYLOAD};

const QUEUE_SIZE: u16 = 16;
const PAYLOAD_AT: u64 = 0x1000;
const REGION: usize = 0x1_0000;
const GUEST_CID: u64 = 3;

fuzz_target!(|data: &[u8]| {
    let Some((ctl, rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let head = u16::from_le_bytes(*ctl);
    let mem = GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(0), REGION),
        (GuestAddress(REGION as u64 + 0x1000), REGION),
    ])
    .expect("small mapping");
    let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    let table_len = usize::from(QUEUE_SIZE) * 16;
    let (table, payload) = rest.split_at(rest.len().min(table_len));
    mem.write_slice(table, vq.desc_table_addr())
        .expect("table fits");
    let payload = &payload[..payload.len().min(REGION - PAYLOAD_AT as usize)];
    mem.write_slice(payload, GuestAddress(PAYLOAD_AT))
        .expect("payload fits");
    mem.write_obj(head, vq.avail_addr().unchecked_add(4))
        .expect("avail ring");
    mem.write_obj(2u16, vq.avail_addr().unchecked_add(2))
        .expect("avail idx");
    mem.write_obj(head, vq.avail_addr().unchecked_add(6))
        .expect("avail ring");

    let mut queue: Queue = vq.create_queue().expect("mock queue");
    // The same chain as TX (parse) and as RX (write a packet into it).
    let Ok(mut chains) = queue.iter(&mem) else {
        return;
    };
    if let Some(chain) = chains.next() {
        match packet::read_tx(&mem, chain, GUEST_CID) {
            Ok(Ok(pkt)) => {
                assert_eq!(pkt.hdr.src_cid, GUEST_CID);
                assert_eq!(pkt.hdr.len as usize, pkt.payload.len());
                assert!(pkt.hdr.len <= MAX_PAYLOAD);
                assert!(pkt.op == Op::Rw || pkt.payload.is_empty());
            }
            Ok(Err(rejected)) => {
                assert!(!rejected.reason.is_chain_fault());
                let _ = rejected.hdr.reset_reply();
            }
            Err(e) => assert!(e.is_chain_fault()),
        }
    }
    if let Some(chain) = chains.next() {
        if let Ok(buffer) = RxBuffer::new(&mem, chain) {
            let room = buffer.payload_capacity();
            let body = vec![0xa5u8; room.min(payload.len())];
            let written = buffer
                .write(Header::default(), &body)
                .expect("a payload within capacity fits");
            assert_eq!(written as usize, packet::HDR_LEN + body.len());
        }
    }
});
