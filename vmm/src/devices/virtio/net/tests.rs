//! Handing host connections to the network device, running or not yet.

// Test sizes are small constants.
#![allow(clippy::cast_possible_truncation)]

use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use smoltcp::wire::ArpOperation;
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::Net;
use crate::devices::virtio::{ActivateContext, Interrupt, VirtioDevice};
use crate::event_loop::test_utils::{on_loop, LoopThread};
use crate::usernet::test_utils::{parse, Parsed};
use crate::usernet::{NetConfig, GATEWAY_IP, GUEST_IP};

const WRITE: u16 = VRING_DESC_F_WRITE as u16;
/// The receive queue's ring, and the one buffer posted in it.
const RX_RING: u64 = 0;
const RX_BUFFER: u64 = 0x3_0000;

/// A connected host socket (the platform's accepted one), and its peer.
fn accepted() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
    let (accepted, _) = listener.accept().expect("accept");
    (accepted, client)
}

/// What the device writes into: guest memory, and where the receive
/// queue's used ring is.
type Rx = (GuestMemoryMmap, u64);

/// Activates `net` with one receive buffer posted.
fn activate(net: &mut Net, event_loop: &LoopThread) -> Rx {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("memory");
    let rx_mock = MockSplitQueue::create(&mem, GuestAddress(RX_RING), 16);
    rx_mock
        .add_desc_chains(
            &[RawDescriptor::from(SplitDescriptor::new(
                RX_BUFFER, 1526, WRITE, 0,
            ))],
            0,
        )
        .expect("rx chain");
    let rx: Queue = rx_mock.create_queue().expect("rx");
    let used = rx_mock.used_addr().0;
    let tx: Queue = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16)
        .create_queue()
        .expect("tx");
    let handler = net
        .activate(ActivateContext {
            mem: mem.clone(),
            queues: vec![rx, tx],
            queue_events: (0..2)
                .map(|_| EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"))
                .collect(),
            interrupt: Arc::new(Interrupt::new(
                EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
            )),
        })
        .expect("activated");
    event_loop.handle().add(handler).expect("loop running");
    (mem, used)
}

/// The receive queue's used index, and the frame in its one buffer.
fn received((mem, used): &Rx) -> (u16, Parsed) {
    use vm_memory::Bytes;
    let idx: u16 = mem.read_obj(GuestAddress(used + 2)).expect("used idx");
    let len: u32 = mem.read_obj(GuestAddress(used + 8)).expect("used len");
    let header = super::queues::NET_HDR_LEN;
    let mut frame = vec![0u8; usize::try_from(len).expect("small").saturating_sub(header)];
    mem.read_slice(&mut frame, GuestAddress(RX_BUFFER + header as u64))
        .expect("frame");
    (idx, parse(&frame))
}

/// What the gateway sends first toward a guest it has not heard from: an
/// ARP request for its address, then the SYN.
fn opens_toward_the_guest(parsed: &Parsed) -> bool {
    match parsed {
        Parsed::Arp(ArpOperation::Request, _, sender, target) => {
            (*sender, *target) == (GATEWAY_IP, GUEST_IP)
        }
        Parsed::Tcp(segment) => segment.syn && *segment.dst.ip() == GUEST_IP,
        _ => false,
    }
}

#[test]
fn a_connection_handed_to_a_running_device_starts_at_once() {
    let event_loop = LoopThread::start();
    let mut net = Net::new(&NetConfig::default()).expect("device");
    let inbound = net.inbound();
    let rx = activate(&mut net, &event_loop);
    let (stream, _client) = accepted();
    let handed = inbound.clone();
    let seen = on_loop(event_loop.handle(), move |ops| {
        handed.accept_inbound(ops, stream, 80);
        // The device's handler ran before the hand-over returned.
        received(&rx)
    });
    assert_eq!(seen.0, 1, "a frame for the guest right away: {seen:?}");
    assert!(opens_toward_the_guest(&seen.1), "{seen:?}");
    assert_eq!(inbound.counts(), (1, 1));
}

#[test]
fn a_connection_handed_over_before_the_driver_starts_waits_in_the_stack() {
    let event_loop = LoopThread::start();
    let mut net = Net::new(&NetConfig::default()).expect("device");
    let inbound = net.inbound();
    let (stream, _client) = accepted();
    let handed = inbound.clone();
    on_loop(event_loop.handle(), move |ops| {
        handed.accept_inbound(ops, stream, 80)
    });
    assert_eq!(inbound.counts(), (1, 1), "held, and counted as taken");
    let rx = activate(&mut net, &event_loop);
    let start = Instant::now();
    let seen = loop {
        let seen = received(&rx);
        if seen.0 == 1 {
            break seen;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "no frame");
        std::thread::sleep(Duration::from_millis(1));
    };
    assert!(opens_toward_the_guest(&seen.1), "{seen:?}");
}
