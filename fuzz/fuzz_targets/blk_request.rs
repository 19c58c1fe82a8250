//! virtio-blk request parser: arbitrary descriptor tables (including
//! indirect tables, loops and bad indexes), arbitrary headers and buffers,
//! over guest memory with a hole, against an arbitrary disk size.
//!
//! Input: capacity (u64 LE), flags (bit 0: read-only), head index (u16 LE),
//! then the 16-entry descriptor table, then bytes copied to guest memory at
//! 0x1000 (headers, indirect tables, data).

#![no_main]

use libfuzzer_sys::fuzz_target;
use little_fuzz::{guest_memory, load_table_and_payload, QUEUE_SIZE};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueOwnedT};
use vm_memory::{Address, Bytes, GuestMemoryBackend};
use vmm::devices::virtio::block::request::{self, Limits, RequestType, MAX_SEGMENTS};
use vmm::devices::virtio::block::SECTOR_SIZE;

fuzz_target!(|data: &[u8]| {
    let Some((ctl, rest)) = data.split_first_chunk::<11>() else {
        return;
    };
    let capacity = u64::from_le_bytes([
        ctl[0], ctl[1], ctl[2], ctl[3], ctl[4], ctl[5], ctl[6], ctl[7],
    ]);
    let limits = Limits {
        capacity,
        read_only: ctl[8] & 1 == 1,
    };
    let head = u16::from_le_bytes([ctl[9], ctl[10]]);

    // Two regions with a 4 KiB hole between them.
    let mem = guest_memory();
    let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    load_table_and_payload(&mem, &vq, rest);
    // One available chain, starting at the fuzzed head index.
    mem.write_obj(head, vq.avail_addr().unchecked_add(4))
        .expect("avail ring");
    mem.write_obj(1u16, vq.avail_addr().unchecked_add(2))
        .expect("avail idx");

    let mut queue: Queue = vq.create_queue().expect("mock queue");
    let Ok(mut chains) = queue.iter(&mem) else {
        return;
    };
    let Some(chain) = chains.next() else {
        return;
    };
    match request::parse(chain, &mem, limits) {
        Ok(req) => {
            // What the runtime relies on.
            assert!(mem.get_slice(req.status, 1).is_ok());
            assert!(req.data.len() <= MAX_SEGMENTS as usize);
            let mut total = 0u64;
            for &(addr, len) in &req.data {
                assert!(mem.get_slice(addr, len as usize).is_ok());
                total += u64::from(len);
            }
            if let RequestType::Discard { sectors } | RequestType::WriteZeroes { sectors, .. } =
                req.kind
            {
                assert!(req.data.is_empty() && !limits.read_only);
                let end = u128::from(req.sector) * 512 + u128::from(sectors) * 512;
                assert!(end <= u128::from(capacity) * 512);
            } else if req.kind != RequestType::Flush {
                assert_eq!(total, u64::from(req.data_len));
            }
            if matches!(req.kind, RequestType::In | RequestType::Out) {
                assert!(req.data_len > 0 && u64::from(req.data_len) % SECTOR_SIZE == 0);
                let end = u128::from(req.sector) * 512 + u128::from(req.data_len);
                assert!(end <= u128::from(capacity) * 512);
                assert!(!(limits.read_only && req.kind == RequestType::Out));
            }
        }
        Err(rejected) => {
            if let Some(status) = rejected.status {
                assert!(mem.get_slice(status, 1).is_ok());
            }
        }
    }
});
