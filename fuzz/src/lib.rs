//! Shared setup of the fuzz targets: guest memory with a hole, a mock split
//! queue in it, the fuzzer's bytes laid out as a descriptor table plus
//! payload, and a guest network that reaches nothing on the host.

use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::usernet::{NetConfig, Policy};

/// Queue size of every mock queue.
pub const QUEUE_SIZE: u16 = 16;
/// Where the payload bytes (headers, indirect tables, data) land.
pub const PAYLOAD_AT: u64 = 0x1000;
/// Size of each of the two guest memory regions.
pub const REGION: usize = 0x1_0000;

/// Two regions with a 4 KiB hole between them, so chains can point into
/// unmapped guest memory.
pub fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(0), REGION),
        (GuestAddress(REGION as u64 + 0x1000), REGION),
    ])
    .expect("small mapping")
}

/// Writes the first `QUEUE_SIZE * 16` bytes of `input` as `vq`'s descriptor
/// table and what follows at [`PAYLOAD_AT`] (cut to fit the region);
/// returns the payload bytes written.
pub fn load_table_and_payload(
    mem: &GuestMemoryMmap,
    vq: &MockSplitQueue<'_, GuestMemoryMmap>,
    input: &[u8],
) -> usize {
    let table_len = usize::from(QUEUE_SIZE) * 16;
    let (table, payload) = input.split_at(input.len().min(table_len));
    mem.write_slice(table, vq.desc_table_addr())
        .expect("table fits");
    let payload = &payload[..payload.len().min(REGION - PAYLOAD_AT as usize)];
    mem.write_slice(payload, GuestAddress(PAYLOAD_AT))
        .expect("payload fits");
    payload.len()
}

/// A guest network whose policy denies every outbound connection and DNS
/// (a denied query is answered REFUSED without a host socket), so that no
/// input makes a fuzz target reach the host.
pub fn deny_all_net() -> NetConfig {
    NetConfig {
        policy: Policy {
            allow_by_default: false,
            ..Policy::default()
        },
        dns_upstream: Some("127.0.0.1:9".parse().expect("literal address")),
        ..NetConfig::default()
    }
}
