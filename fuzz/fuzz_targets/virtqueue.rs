//! Generic virtqueue walking, as every device does it: an arbitrary avail
//! ring and descriptor table (indirect tables, loops, bad indexes, huge
//! lengths) over guest memory with a hole, iterated with `virtio_queue`'s
//! chain iterator and its `Reader`/`Writer`, then completed in the used
//! ring. Nothing may panic; every byte read or written must lie in guest
//! memory.
//!
//! Input: avail idx (u16 LE), then 16 avail ring entries (u16 LE each),
//! then the 16-entry descriptor table, then bytes copied to guest memory
//! at 0x1000.

#![no_main]

use std::io::{Read, Write};

use libfuzzer_sys::fuzz_target;
use little_fuzz::{guest_memory, load_table_and_payload, QUEUE_SIZE, REGION};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueOwnedT, QueueT, Reader, Writer};
use vm_memory::{Address, Bytes};

fuzz_target!(|data: &[u8]| {
    let Some((idx, rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let Some((ring, rest)) = rest.split_first_chunk::<32>() else {
        return;
    };
    let mem = guest_memory();
    let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    load_table_and_payload(&mem, &vq, rest);
    mem.write_slice(ring, vq.avail_addr().unchecked_add(4))
        .expect("avail ring");
    mem.write_slice(idx, vq.avail_addr().unchecked_add(2))
        .expect("avail idx");

    let mut queue: Queue = vq.create_queue().expect("mock queue");
    // At most one pass over the ring: a hostile avail idx must not make
    // the device loop forever.
    for _ in 0..QUEUE_SIZE {
        let chain = match queue.iter(&mem) {
            Ok(mut it) => it.next(),
            Err(_) => return,
        };
        let Some(chain) = chain else {
            return;
        };
        // The avail ring may name a head past the table: such a chain
        // holds no buffer, and the used ring refuses it (the device then
        // needs a reset).
        let head = chain.head_index();
        let in_table = head < QUEUE_SIZE;
        let mut used = 0u32;
        if let Ok(mut reader) = Reader::<()>::new(&mem, chain.clone()) {
            assert!(in_table || reader.available_bytes() == 0);
            let mut sink = vec![0u8; reader.available_bytes().min(REGION)];
            let n = reader.read(&mut sink).unwrap_or(0);
            assert!(n <= sink.len());
        }
        if let Ok(mut writer) = Writer::<()>::new(&mem, chain) {
            assert!(in_table || writer.available_bytes() == 0);
            let fill = vec![0x5au8; writer.available_bytes().min(REGION)];
            if writer.write_all(&fill).is_ok() {
                used = u32::try_from(fill.len()).unwrap_or(u32::MAX);
            }
        }
        if queue.add_used(&mem, head, used).is_err() {
            return;
        }
        assert!(in_table, "head {head} returned used");
    }
});
