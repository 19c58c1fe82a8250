//! Frames through both queues into the stack and back, and a device
//! restored from saved state.

// Test sizes are small constants.
#![allow(clippy::cast_possible_truncation)]

use std::sync::Arc;

use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::{process_rx, process_tx};
use crate::devices::virtio::block::persist::BlockState;
use crate::devices::virtio::net::persist::NetState;
use crate::devices::virtio::net::queues::{QueueError, NET_HDR_LEN};
use crate::devices::virtio::net::Net;
use crate::devices::virtio::persist::{DeviceState, RuntimeState};
use crate::devices::virtio::{ActivateContext, ActivateError, Interrupt, VirtioDevice};
use crate::event_loop::test_utils::{save_handler, LoopThread};
use crate::usernet::test_utils::{arp_request, parse, Parsed};
use crate::usernet::{NetConfig, Stack, GATEWAY_IP, GATEWAY_MAC, GUEST_IP};

const WRITE: u16 = VRING_DESC_F_WRITE as u16;

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("mock memory")
}

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

fn interrupt() -> (Arc<Interrupt>, EventFd) {
    let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    let observer = irq.try_clone().expect("clone");
    (Arc::new(Interrupt::new(irq)), observer)
}

#[test]
fn avail_index_beyond_the_queue_is_an_error() {
    let mem = memory();
    let mock = MockSplitQueue::create(&mem, GuestAddress(0), 16);
    mock.avail().idx().store(100);
    let mut q: Queue = mock.create_queue().expect("queue");
    let mut stack = Stack::new(&NetConfig::default()).expect("stack");
    let (irq, _) = interrupt();
    let r = process_tx(&mem, &mut q, &mut stack, &irq, 16);
    assert!(matches!(r, Err(QueueError::AvailRing(_))), "{r:?}");
}

#[test]
fn arp_through_the_tx_queue_is_answered_in_the_rx_queue() {
    let mem = memory();
    let arp = arp_request(GATEWAY_IP);
    mem.write_slice(&[0u8; NET_HDR_LEN], GuestAddress(0x20000))
        .expect("hdr");
    mem.write_slice(&arp, GuestAddress(0x20000 + NET_HDR_LEN as u64))
        .expect("frame");
    let tx_len = (NET_HDR_LEN + arp.len()) as u32;
    let tx_mock = MockSplitQueue::create(&mem, GuestAddress(0x10000), 16);
    tx_mock
        .add_desc_chains(&[desc(0x20000, tx_len, 0, 0)], 0)
        .expect("tx chain");
    let mut tx: Queue = tx_mock.create_queue().expect("tx");
    let rx_mock = MockSplitQueue::create(&mem, GuestAddress(0), 16);
    rx_mock
        .add_desc_chains(&[desc(0x30000, 1526, WRITE, 0)], 0)
        .expect("rx chain");
    let mut rx: Queue = rx_mock.create_queue().expect("rx");

    let mut stack = Stack::new(&NetConfig::default()).expect("stack");
    let (irq, observer) = interrupt();
    process_tx(&mem, &mut tx, &mut stack, &irq, 16).expect("tx");
    assert_eq!(tx_mock.used().idx().load(), 1, "tx chain returned");
    stack.poll();
    process_rx(&mem, &mut rx, &mut stack, &irq).expect("rx");
    assert_eq!(rx_mock.used().idx().load(), 1, "rx chain used");
    let used = rx_mock.used().ring().ref_at(0).expect("slot").load();
    let len = used.len() as usize;
    assert!(len > NET_HDR_LEN);
    let mut reply = vec![0u8; len - NET_HDR_LEN];
    mem.read_slice(&mut reply, GuestAddress(0x30000 + NET_HDR_LEN as u64))
        .expect("read");
    assert_eq!(
        parse(&reply),
        Parsed::Arp(
            smoltcp::wire::ArpOperation::Reply,
            GATEWAY_MAC,
            GATEWAY_IP,
            GUEST_IP
        )
    );
    assert!(observer.read().expect("interrupt raised") >= 1);
    assert!(!irq.needs_reset());
}

#[test]
fn a_restored_device_keeps_its_queues_and_saved_mac() {
    let event_loop = LoopThread::start();

    let mem = memory();
    let saved_mac = [0x52, 0x54, 0x00, 0xab, 0xcd, 0xef];
    let mut net = Net::new(&NetConfig::default()).expect("device");
    let ctx = |at_rx: u64, at_tx: u64| {
        let mut rx: Queue = MockSplitQueue::create(&mem, GuestAddress(at_rx), 16)
            .create_queue()
            .expect("rx");
        rx.set_next_avail(3);
        rx.set_next_used(3);
        let tx: Queue = MockSplitQueue::create(&mem, GuestAddress(at_tx), 16)
            .create_queue()
            .expect("tx");
        ActivateContext {
            mem: mem.clone(),
            queues: vec![rx, tx],
            queue_events: (0..2)
                .map(|_| EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"))
                .collect(),
            interrupt: interrupt().0,
        }
    };
    let mut other_layout = NetState::new(saved_mac);
    other_layout.version += 1;
    for refused in [
        DeviceState::Block(BlockState::default()),
        DeviceState::Net(other_layout),
    ] {
        assert!(
            matches!(
                net.restore(ctx(0, 0x1000), &refused),
                Err(ActivateError::State(_))
            ),
            "{refused:?}"
        );
    }
    let handler = net
        .restore(ctx(0, 0x1000), &DeviceState::Net(NetState::new(saved_mac)))
        .expect("restored");
    let id = event_loop.handle().add(handler).expect("loop running");
    let mut mac = [0u8; 6];
    net.read_config(0, &mut mac);
    assert_eq!(mac, saved_mac, "the guest keeps the MAC it probed");

    let (quiescent, saved) = save_handler(event_loop.handle(), id);
    assert!(quiescent);
    let state = saved
        .expect("saved")
        .downcast::<RuntimeState>()
        .expect("a virtio runtime state");
    assert_eq!(state.device, DeviceState::Net(NetState::new(saved_mac)));
    assert_eq!(state.queues.len(), 2);
    assert_eq!(
        (state.queues[0].next_avail, state.queues[0].next_used),
        (3, 3)
    );
}

#[test]
fn a_full_transmit_queue_is_taken_a_budget_at_a_time() {
    let mem = memory();
    let arp = arp_request(GATEWAY_IP);
    let mut chains = Vec::new();
    for i in 0..10u64 {
        let at = 0x20000 + i * 0x1000;
        mem.write_slice(&[0u8; NET_HDR_LEN], GuestAddress(at))
            .expect("hdr");
        mem.write_slice(&arp, GuestAddress(at + NET_HDR_LEN as u64))
            .expect("frame");
        chains.push(desc(at, (NET_HDR_LEN + arp.len()) as u32, 0, 0));
    }
    let tx_mock = MockSplitQueue::create(&mem, GuestAddress(0x10000), 16);
    tx_mock.add_desc_chains(&chains, 0).expect("tx chains");
    let mut tx: Queue = tx_mock.create_queue().expect("tx");
    let mut stack = Stack::new(&NetConfig::default()).expect("stack");
    let (irq, _) = interrupt();
    let mut taken = Vec::new();
    loop {
        let more = process_tx(&mem, &mut tx, &mut stack, &irq, 4).expect("tx");
        taken.push(tx_mock.used().idx().load());
        if !more {
            break;
        }
    }
    assert_eq!(taken, [4, 8, 10], "used index after each pass");
}
