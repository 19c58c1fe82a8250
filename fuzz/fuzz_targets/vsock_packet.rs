//! virtio-vsock packet parser and RX writer: arbitrary descriptor tables
//! (indirect tables, loops, bad indexes) over guest memory with a hole,
//! arbitrary headers and payloads.
//!
//! Input: head index (u16 LE), then the 16-entry descriptor table, then
//! bytes copied to guest memory at 0x1000 (headers, payloads, tables).

#![no_main]

use libfuzzer_sys::fuzz_target;
use little_fuzz::{guest_memory, load_table_and_payload, QUEUE_SIZE};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueOwnedT};
use vm_memory::{Address, Bytes};
use vmm::devices::virtio::vsock::packet::{self, Header, Op, RxBuffer, MAX_PAYLOAD};

const GUEST_CID: u64 = 3;

fuzz_target!(|data: &[u8]| {
    let Some((ctl, rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let head = u16::from_le_bytes(*ctl);
    let mem = guest_memory();
    let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    let payload_len = load_table_and_payload(&mem, &vq, rest);
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
            let body = vec![0xa5u8; room.min(payload_len)];
            let written = buffer
                .write(Header::default(), &body)
                .expect("a payload within capacity fits");
            assert_eq!(written as usize, packet::HDR_LEN + body.len());
        }
    }
});
