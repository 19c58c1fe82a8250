//! virtio-net's queue handling as the device's handler runs it: transmit
//! chains into the userspace network stack, the stack's answers into
//! receive chains, over arbitrary rings and descriptor tables (bad
//! directions, loops, buffers in the memory hole, runts and giants).
//!
//! Input: TX avail idx, RX avail idx (u16 LE each), the TX budget, the
//! number of passes, 16 TX then 16 RX avail ring entries (u16 LE each), the
//! TX then the RX 16-entry descriptor tables, then bytes copied to guest
//! memory at 0x1000 (headers, frames, receive buffers).
//!
//! The stack's policy denies everything: no input opens a host socket.
//! Every chain taken is returned used (TX with length 0, RX with at most a
//! header and a largest frame), never more than the driver made available
//! nor, for TX, more than the budget per pass.

#![no_main]

use libfuzzer_sys::fuzz_target;
use little_fuzz::{deny_all_net, guest_memory, PAYLOAD_AT, QUEUE_SIZE, REGION};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm::devices::virtio::net::queues::NET_HDR_LEN;
use vmm::devices::virtio::net::test_utils::{process_rx, process_tx};
use vmm::devices::virtio::Interrupt;
use vmm::usernet::{Stack, MAX_FRAME_LEN};
use vmm_sys_util::eventfd::EventFd;

/// Where the receive queue's rings start (the transmit queue's are at 0).
const RX_AT: u64 = 0x800;
const TABLE_LEN: usize = QUEUE_SIZE as usize * 16;

/// The used entries the device added from index `from` to `to`: (id, len)
/// each, as they read in the used ring now.
fn used(mock: &MockSplitQueue<'_, GuestMemoryMmap>, from: u16, to: u16) -> Vec<(u32, u32)> {
    let mut out = Vec::new();
    let mut i = from;
    while i != to {
        let slot = usize::from(i % QUEUE_SIZE);
        let elem = mock.used().ring().ref_at(slot).expect("in the ring").load();
        out.push((elem.id(), elem.len()));
        i = i.wrapping_add(1);
    }
    out
}

/// Whether every receive buffer lies in the payload area, so that the
/// frames written there leave the rings (below it) as the device wrote
/// them. A guest may aim its buffers at its own rings; then the used ring
/// holds what the frames made of it.
fn rx_buffers_apart(rx_table: &[u8]) -> bool {
    rx_table.len() == TABLE_LEN
        && rx_table.chunks_exact(16).all(|d| {
            let addr = u64::from_le_bytes(d[..8].try_into().expect("8 bytes"));
            let flags = u16::from_le_bytes([d[12], d[13]]);
            // No indirect tables: their buffers would not be checked here.
            addr >= PAYLOAD_AT && flags & 4 == 0
        })
}

fuzz_target!(|data: &[u8]| {
    let Some((ctl, rest)) = data.split_first_chunk::<6>() else {
        return;
    };
    let Some((rings, rest)) = rest.split_first_chunk::<64>() else {
        return;
    };
    let tx_avail = u16::from_le_bytes([ctl[0], ctl[1]]);
    let rx_avail = u16::from_le_bytes([ctl[2], ctl[3]]);
    let budget = 1 + usize::from(ctl[4] % 16);
    let passes = 1 + ctl[5] % 4;

    let mem = guest_memory();
    let tx_mock = MockSplitQueue::create(&mem, GuestAddress(0), QUEUE_SIZE);
    let rx_mock = MockSplitQueue::create(&mem, GuestAddress(RX_AT), QUEUE_SIZE);
    let (tx_table, rest) = rest.split_at(rest.len().min(TABLE_LEN));
    let (rx_table, payload) = rest.split_at(rest.len().min(TABLE_LEN));
    let payload = &payload[..payload.len().min(REGION - PAYLOAD_AT as usize)];
    for (mock, table, ring, idx) in [
        (&tx_mock, tx_table, &rings[..32], tx_avail),
        (&rx_mock, rx_table, &rings[32..], rx_avail),
    ] {
        mem.write_slice(table, mock.desc_table_addr())
            .expect("table fits");
        mem.write_slice(ring, mock.avail_addr().unchecked_add(4))
            .expect("avail ring");
        mem.write_obj(idx, mock.avail_addr().unchecked_add(2))
            .expect("avail idx");
    }
    mem.write_slice(payload, GuestAddress(PAYLOAD_AT))
        .expect("payload fits");

    let (Ok(mut tx), Ok(mut rx)) = (
        tx_mock.create_queue::<Queue>(),
        rx_mock.create_queue::<Queue>(),
    ) else {
        return;
    };
    let Ok(mut stack) = Stack::new(&deny_all_net()) else {
        return;
    };
    let Ok(irq) = EventFd::new(libc::EFD_NONBLOCK) else {
        return;
    };
    let interrupt = Interrupt::new(irq);

    let rx_apart = rx_buffers_apart(rx_table);
    for _ in 0..passes {
        let before = tx.next_used();
        match process_tx(&mem, &mut tx, &mut stack, &interrupt, budget) {
            Ok(more) => {
                let taken = usize::from(tx.next_used().wrapping_sub(before));
                assert!(taken <= budget, "{taken} chains over a budget of {budget}");
                assert!(!more || taken == budget);
                // The avail idx as the guest's memory holds it now (its
                // receive buffers may aim at it).
                let avail = tx_mock.avail().idx().load();
                assert!(
                    more || tx.next_avail() == avail,
                    "stopped before the avail idx"
                );
                assert_eq!(tx.next_used(), tx.next_avail(), "every chain taken is used");
                if taken > 0 {
                    assert_eq!(tx_mock.used().idx().load(), tx.next_used());
                }
                for (id, len) in used(&tx_mock, before, tx.next_used()) {
                    assert!(id < u32::from(QUEUE_SIZE));
                    assert_eq!(len, 0, "the device writes nothing into TX buffers");
                }
            }
            // The handler stops here and the device needs a reset.
            Err(_) => break,
        }
        stack.poll();
        let before = rx.next_used();
        let queued = stack.to_guest().len();
        match process_rx(&mem, &mut rx, &mut stack, &interrupt) {
            Ok(()) => {
                let taken = usize::from(rx.next_used().wrapping_sub(before));
                assert_eq!(stack.to_guest().len() + taken, queued);
                assert_eq!(rx.next_used(), rx.next_avail(), "every chain taken is used");
                if !rx_apart {
                    continue;
                }
                if taken > 0 {
                    assert_eq!(rx_mock.used().idx().load(), rx.next_used());
                }
                for (id, len) in used(&rx_mock, before, rx.next_used()) {
                    assert!(id < u32::from(QUEUE_SIZE));
                    let len = usize::try_from(len).expect("u32 fits");
                    assert!(
                        len == 0 || (NET_HDR_LEN + 14..=NET_HDR_LEN + MAX_FRAME_LEN).contains(&len),
                        "used length {len}"
                    );
                }
            }
            Err(_) => break,
        }
    }
    assert_eq!(
        stack.connections(),
        0,
        "a deny-all network opened a connection"
    );
    assert!(
        stack.take_requests().is_empty(),
        "a deny-all network watches a host fd"
    );
});
