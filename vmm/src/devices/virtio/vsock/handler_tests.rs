//! The handler against a driver on mock queues: streams to host sockets,
//! hostile headers, chain faults, and the state it saves and restores.
// Tests may unwrap (CONTRIBUTING.md).
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::time::Duration;

use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::devices::virtio::vsock::packet::{Header, Op, HDR_LEN, HOST_CID, TYPE_STREAM};

const CID: u64 = 3;
const WRITE: u16 = VRING_DESC_F_WRITE as u16;

/// The driver side: TX chains of one descriptor, RX chains of one
/// 4 KiB buffer, all at fresh addresses.
struct Driver<'a> {
    mem: &'a GuestMemoryMmap,
    rx: MockSplitQueue<'a, GuestMemoryMmap>,
    tx: MockSplitQueue<'a, GuestMemoryMmap>,
    next: [u16; 2],
    next_addr: u64,
    rx_seen: u16,
    rx_addrs: Vec<u64>,
}

impl<'a> Driver<'a> {
    fn new(mem: &'a GuestMemoryMmap) -> Self {
        Self {
            mem,
            rx: MockSplitQueue::create(mem, GuestAddress(0), 256),
            tx: MockSplitQueue::create(mem, GuestAddress(0x1_0000), 256),
            next: [0, 0],
            next_addr: 0x10_0000,
            rx_seen: 0,
            rx_addrs: vec![0; 256],
        }
    }

    fn alloc(&mut self, len: u64) -> u64 {
        let a = self.next_addr;
        self.next_addr += len.next_multiple_of(0x1000);
        a
    }

    fn send_raw(&mut self, bytes: &[u8]) {
        let addr = self.alloc(bytes.len() as u64);
        self.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
        self.send_desc(addr, bytes.len() as u32);
    }

    fn send_desc(&mut self, addr: u64, len: u32) {
        let d = RawDescriptor::from(SplitDescriptor::new(addr, len, 0, 0));
        self.tx.add_desc_chains(&[d], self.next[1]).unwrap();
        self.next[1] += 1;
    }

    fn send(&mut self, op: Op, src_port: u32, dst_port: u32, payload: &[u8]) {
        let hdr = Header {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len: payload.len() as u32,
            type_: TYPE_STREAM,
            op: op as u16,
            buf_alloc: 65536,
            ..Header::default()
        };
        let mut bytes = hdr.to_bytes().to_vec();
        bytes.extend_from_slice(payload);
        self.send_raw(&bytes);
    }

    fn post_rx(&mut self, count: usize) {
        for _ in 0..count {
            let addr = self.alloc(4096);
            let d = RawDescriptor::from(SplitDescriptor::new(addr, 4096, WRITE, 0));
            self.rx_addrs[usize::from(self.next[0])] = addr;
            self.rx.add_desc_chains(&[d], self.next[0]).unwrap();
            self.next[0] += 1;
        }
    }

    /// Packets the device put in used RX buffers since the last call.
    fn received(&mut self) -> Vec<(Header, Vec<u8>)> {
        let idx = self.rx.used().idx().load();
        let mut out = Vec::new();
        while self.rx_seen != idx {
            let elem = self
                .rx
                .used()
                .ring()
                .ref_at(usize::from(self.rx_seen))
                .unwrap()
                .load();
            let addr = self.rx_addrs[elem.id() as usize];
            let mut raw = [0u8; HDR_LEN];
            self.mem.read_slice(&mut raw, GuestAddress(addr)).unwrap();
            let hdr = Header::from_bytes(&raw);
            assert_eq!(elem.len(), HDR_LEN as u32 + hdr.len);
            let mut data = vec![0u8; hdr.len as usize];
            self.mem
                .read_slice(&mut data, GuestAddress(addr + HDR_LEN as u64))
                .unwrap();
            out.push((hdr, data));
            self.rx_seen += 1;
        }
        out
    }

    fn tx_used(&self) -> u16 {
        self.tx.used().idx().load()
    }
}

fn handler(driver: &Driver<'_>, dir: &std::path::Path) -> VsockHandler {
    let path = dir.join("v.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let mut muxer = Muxer::new(CID, path, listener);
    muxer.start();
    VsockHandler {
        mem: driver.mem.clone(),
        queues: vec![
            driver.rx.create_queue().unwrap(),
            driver.tx.create_queue().unwrap(),
            driver.rx.create_queue().unwrap(),
        ],
        queue_events: (0..3)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect(),
        interrupt: Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap())),
        muxer,
        guest_cid: CID,
        broken: false,
        reset_pending: false,
    }
}

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap()
}

fn watched_in(rt: &mut VsockHandler) -> u32 {
    rt.muxer
        .take_interests()
        .into_iter()
        .filter_map(|i| match i {
            Interest::Watch { token, events, .. }
                if events == libc::POLLIN as u32 && token != LISTENER =>
            {
                Some(token)
            }
            _ => None,
        })
        .next_back()
        .expect("a socket watch")
}

#[test]
fn guest_stream_to_a_host_listener_round_trips() {
    let mem = mem();
    let dir = tempfile::tempdir().unwrap();
    let mut d = Driver::new(&mem);
    let mut rt = handler(&d, dir.path());
    let host = UnixListener::bind(dir.path().join("v.sock_2000")).unwrap();
    d.post_rx(8);
    d.send(Op::Request, 5000, 2000, b"");
    rt.process_tx();
    rt.process_rx();
    let got = d.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0.op, Op::Response as u16);
    assert_eq!(
        rt.interrupt.status() & VIRTIO_MMIO_INT_VRING,
        VIRTIO_MMIO_INT_VRING
    );
    let (mut peer, _) = host.accept().unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();

    d.send(Op::Rw, 5000, 2000, b"guest says hi");
    rt.process_tx();
    assert_eq!(d.tx_used(), 2);
    let mut buf = [0u8; 13];
    peer.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"guest says hi");

    let token = watched_in(&mut rt);
    peer.write_all(b"host answers").unwrap();
    rt.muxer.ready(token, libc::POLLIN as u32);
    rt.process_rx();
    let got = d.received();
    let data: Vec<u8> = got
        .iter()
        .filter(|(h, _)| h.op == Op::Rw as u16)
        .flat_map(|(_, p)| p.clone())
        .collect();
    assert_eq!(data, b"host answers");
    assert!(!rt.broken);
}

#[test]
fn packets_wait_for_rx_buffers() {
    let mem = mem();
    let dir = tempfile::tempdir().unwrap();
    let mut d = Driver::new(&mem);
    let mut rt = handler(&d, dir.path());
    d.send(Op::Request, 5000, 2000, b"");
    rt.process_tx();
    rt.process_rx();
    assert!(d.received().is_empty());
    d.post_rx(1);
    rt.process_rx();
    let got = d.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0.op, Op::Rst as u16, "nobody listens on port 2000");
}

#[test]
fn hostile_headers_get_rst_and_the_device_keeps_working() {
    let mem = mem();
    let dir = tempfile::tempdir().unwrap();
    let mut d = Driver::new(&mem);
    let mut rt = handler(&d, dir.path());
    d.post_rx(8);
    let mut bad = Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port: 1,
        dst_port: 2,
        len: u32::MAX,
        type_: TYPE_STREAM,
        op: Op::Rw as u16,
        ..Header::default()
    };
    d.send_raw(&bad.to_bytes());
    bad.len = 0;
    bad.op = 99;
    d.send_raw(&bad.to_bytes());
    bad.op = Op::Request as u16;
    bad.dst_cid = 5;
    d.send_raw(&bad.to_bytes());
    rt.process_tx();
    rt.process_rx();
    assert_eq!(d.tx_used(), 3);
    let got = d.received();
    assert_eq!(got.len(), 3);
    assert!(got
        .iter()
        .all(|(h, _)| h.op == Op::Rst as u16 && h.dst_port == 1));
    assert!(!rt.broken && !rt.interrupt.needs_reset());
}

#[test]
fn chain_faults_set_needs_reset() {
    let mem = mem();
    let dir = tempfile::tempdir().unwrap();
    let mut d = Driver::new(&mem);
    let mut rt = handler(&d, dir.path());
    // A descriptor past the end of guest memory.
    d.send_desc(0x100_0000 - 8, 64);
    rt.process_tx();
    assert!(rt.broken);
    assert!(rt.interrupt.needs_reset());
    // A short TX chain does the same.
    let mut rt = handler(&d, tempfile::tempdir().unwrap().path());
    d.send_raw(&[0u8; 10]);
    rt.queues[1] = d.tx.create_queue().unwrap();
    // Skip the chain consumed above.
    let _ = rt.queues[1].iter(&mem).unwrap().next();
    rt.process_tx();
    assert!(rt.broken && rt.interrupt.needs_reset());
}

#[test]
fn a_restored_handler_resets_the_transport_and_starts_empty() {
    let mem = mem();
    let dir = tempfile::tempdir().unwrap();
    let mut d = Driver::new(&mem);
    let evt = MockSplitQueue::create(&mem, GuestAddress(0x2_0000), 256);
    let mut rt = handler(&d, dir.path());
    rt.queues[EVT] = evt.create_queue().unwrap();
    let _host = UnixListener::bind(dir.path().join("v.sock_2000")).unwrap();
    d.post_rx(8);
    d.send(Op::Request, 5000, 2000, b"");
    rt.process_tx();
    rt.process_rx();
    assert_eq!(d.received()[0].0.op, Op::Response as u16);
    assert_eq!(rt.muxer.connections(), 1);

    let saved = rt.save().unwrap().downcast::<RuntimeState>().unwrap();
    assert_eq!(saved.device, DeviceState::Vsock(VsockState::default()));
    assert_eq!(saved.queues.len(), 3);
    assert_eq!(
        (saved.queues[TX].next_avail, saved.queues[RX].next_used),
        (1, 1)
    );

    // The restored handler: same rings, positions as saved, a new muxer.
    let restored_dir = tempfile::tempdir().unwrap();
    let mut rt = handler(&d, restored_dir.path());
    rt.queues = saved
        .queues
        .iter()
        .enumerate()
        .map(|(i, q)| q.to_queue(i).unwrap())
        .collect();
    rt.reset_pending = true;
    // No event buffer yet: the reset waits for one.
    rt.process_evt();
    assert!(rt.reset_pending && !rt.broken);
    let event_buf = 0x80_0000;
    mem.write_obj(0xffff_ffffu32, GuestAddress(event_buf))
        .unwrap();
    let desc = RawDescriptor::from(SplitDescriptor::new(event_buf, 4, WRITE, 0));
    evt.add_desc_chains(&[desc], 0).unwrap();
    rt.process_evt();
    assert!(!rt.reset_pending && !rt.broken);
    assert_eq!(evt.used().idx().load(), 1);
    let used = evt.used().ring().ref_at(0).unwrap().load();
    assert_eq!((used.id(), used.len()), (0, 4));
    let id: u32 = mem.read_obj(GuestAddress(event_buf)).unwrap();
    assert_eq!(id, VIRTIO_VSOCK_EVENT_TRANSPORT_RESET);
    assert_eq!(rt.muxer.connections(), 0, "no stream carried over");

    // The old stream is unknown now: its next packet is answered with RST,
    // in the RX slot after the ones used before the snapshot.
    d.send(Op::Rw, 5000, 2000, b"late");
    rt.process_tx();
    rt.process_rx();
    assert_eq!(d.tx_used(), 2);
    let got = d.received();
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].0.op, got[0].0.dst_port), (Op::Rst as u16, 5000));
}

#[test]
fn a_bad_event_buffer_needs_a_reset() {
    let mem = mem();
    let dir = tempfile::tempdir().unwrap();
    let d = Driver::new(&mem);
    let evt = MockSplitQueue::create(&mem, GuestAddress(0x2_0000), 256);
    let mut rt = handler(&d, dir.path());
    rt.queues[EVT] = evt.create_queue().unwrap();
    rt.reset_pending = true;
    // Device-readable, and too short for a virtio_vsock_event.
    let desc = RawDescriptor::from(SplitDescriptor::new(0x80_0000, 2, 0, 0));
    evt.add_desc_chains(&[desc], 0).unwrap();
    rt.process_evt();
    assert!(rt.broken && rt.interrupt.needs_reset());
}

#[test]
fn a_full_tx_queue_is_taken_a_budget_at_a_time() {
    let mem = mem();
    let dir = tempfile::tempdir().unwrap();
    let mut d = Driver::new(&mem);
    let mut rt = handler(&d, dir.path());
    // A few chains: all taken, no need to come back.
    for _ in 0..10 {
        d.send(Op::Rw, 5000, 1, b"x");
    }
    rt.process_tx();
    assert_eq!(d.tx_used(), 10);
    assert!(
        rt.queue_events[TX].read().is_err(),
        "the queue was drained: no wake-up of its own"
    );
    // A budget's worth (a whole queue): taken, and the handler signals
    // itself to come back for whatever the guest adds meanwhile.
    let mut d = Driver::new(&mem);
    let dir = tempfile::tempdir().unwrap();
    let mut rt = handler(&d, dir.path());
    for _ in 0..DRAIN_BUDGET {
        d.send(Op::Rw, 5000, 1, b"x");
    }
    rt.process_tx();
    assert_eq!(usize::from(d.tx_used()), DRAIN_BUDGET);
    assert_eq!(
        rt.queue_events[TX]
            .read()
            .expect("re-signalled past the budget"),
        1
    );
    assert!(!rt.broken);
}
