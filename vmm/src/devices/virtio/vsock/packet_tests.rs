// Tests may unwrap (CONTRIBUTING.md).
#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    clippy::type_complexity
)]

use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;

const GUEST_CID: u64 = 3;
const BUF: u64 = 0x10_0000;
const WRITE: u16 = VRING_DESC_F_WRITE as u16;

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap()
}

fn guest_hdr(op: Op, len: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port: 5000,
        dst_port: 1024,
        len,
        type_: TYPE_STREAM,
        op: op as u16,
        flags: 0,
        buf_alloc: 65536,
        fwd_cnt: 7,
    }
}

/// Writes `bytes` at BUF and parses them from a chain of descriptors of
/// the given lengths (laid out back to back).
fn parse(
    mem: &GuestMemoryMmap,
    bytes: &[u8],
    lens: &[u32],
) -> Result<Result<TxPacket, Rejected>, Error> {
    mem.write_slice(bytes, GuestAddress(BUF)).unwrap();
    let mut addr = BUF;
    let descs: Vec<RawDescriptor> = lens
        .iter()
        .map(|&len| {
            let d = SplitDescriptor::new(addr, len, 0, 0);
            addr += u64::from(len);
            RawDescriptor::from(d)
        })
        .collect();
    let q = MockSplitQueue::new(mem, 16);
    let chain = q.build_desc_chain(&descs).unwrap();
    read_tx(mem, chain, GUEST_CID)
}

fn packet(hdr: Header, payload: &[u8]) -> Vec<u8> {
    let mut v = hdr.to_bytes().to_vec();
    v.extend_from_slice(payload);
    v
}

#[test]
fn header_round_trips_in_little_endian() {
    let h = guest_hdr(Op::Rw, 5);
    let b = h.to_bytes();
    assert_eq!(&b[0..8], &3u64.to_le_bytes());
    assert_eq!(&b[16..20], &5000u32.to_le_bytes());
    assert_eq!(&b[30..32], &5u16.to_le_bytes());
    assert_eq!(Header::from_bytes(&b), h);
}

#[test]
fn parses_a_data_packet_split_over_descriptors() {
    let mem = mem();
    let bytes = packet(guest_hdr(Op::Rw, 5), b"hello");
    // Header split mid-field, payload in its own descriptors.
    let pkt = parse(&mem, &bytes, &[10, 34, 2, 3]).unwrap().unwrap();
    assert_eq!(pkt.op, Op::Rw);
    assert_eq!(pkt.payload, b"hello");
    assert_eq!(pkt.hdr.fwd_cnt, 7);
}

#[test]
fn chain_faults_need_a_reset() {
    let mem = mem();
    let bytes = packet(guest_hdr(Op::Request, 0), b"");
    let err = parse(&mem, &bytes, &[43]).unwrap_err();
    assert!(matches!(err, Error::ShortChain(43)) && err.is_chain_fault());
    // A descriptor pointing past guest memory.
    let q = MockSplitQueue::new(&mem, 16);
    let d = RawDescriptor::from(SplitDescriptor::new(0x1f_ffff, 64, 0, 0));
    let err = read_tx(&mem, q.build_desc_chain(&[d]).unwrap(), GUEST_CID).unwrap_err();
    assert!(err.is_chain_fault(), "{err}");
    // Only device-writable buffers: nothing readable.
    let d = RawDescriptor::from(SplitDescriptor::new(BUF, 64, WRITE, 0));
    let err = read_tx(&mem, q.build_desc_chain(&[d]).unwrap(), GUEST_CID).unwrap_err();
    assert!(matches!(err, Error::ShortChain(0)));
}

#[test]
fn invalid_headers_are_rejected_for_rst() {
    let mem = mem();
    let cases: Vec<(Header, fn(&Error) -> bool)> = vec![
        (
            Header {
                src_cid: 9,
                ..guest_hdr(Op::Request, 0)
            },
            |e| matches!(e, Error::BadSrcCid(9)),
        ),
        (
            Header {
                dst_cid: 1,
                ..guest_hdr(Op::Request, 0)
            },
            |e| matches!(e, Error::BadDstCid(1)),
        ),
        (
            Header {
                type_: 2,
                ..guest_hdr(Op::Request, 0)
            },
            |e| matches!(e, Error::BadType(2)),
        ),
        (
            Header {
                op: 0,
                ..guest_hdr(Op::Request, 0)
            },
            |e| matches!(e, Error::BadOp(0)),
        ),
        (
            Header {
                op: 8,
                ..guest_hdr(Op::Request, 0)
            },
            |e| matches!(e, Error::BadOp(8)),
        ),
        (guest_hdr(Op::Rw, u32::MAX), |e| {
            matches!(e, Error::TooLong(u32::MAX))
        }),
        (guest_hdr(Op::Rw, MAX_PAYLOAD + 1), |e| {
            matches!(e, Error::TooLong(_))
        }),
        (guest_hdr(Op::Request, 4), |e| {
            matches!(e, Error::UnexpectedPayload(1))
        }),
        (guest_hdr(Op::Rw, 100), |e| {
            matches!(
                e,
                Error::Truncated {
                    len: 100,
                    available: 4
                }
            )
        }),
    ];
    for (hdr, check) in cases {
        let bytes = packet(hdr, b"abcd");
        let rejected = parse(&mem, &bytes, &[48]).unwrap().unwrap_err();
        assert!(check(&rejected.reason), "{hdr:?}: {}", rejected.reason);
        assert!(!rejected.reason.is_chain_fault());
        assert_eq!(rejected.hdr, hdr);
    }
}

#[test]
fn resets_are_never_answered() {
    let rst = guest_hdr(Op::Rst, 0);
    assert_eq!(rst.reset_reply(), None);
    let reply = guest_hdr(Op::Rw, 3).reset_reply().unwrap();
    assert_eq!((reply.src_cid, reply.dst_cid), (HOST_CID, GUEST_CID));
    assert_eq!((reply.src_port, reply.dst_port), (1024, 5000));
    assert_eq!(reply.op, Op::Rst as u16);
}

#[test]
fn rx_buffers_take_header_and_payload() {
    let mem = mem();
    let q = MockSplitQueue::new(&mem, 16);
    let descs = [
        RawDescriptor::from(SplitDescriptor::new(BUF, 44, WRITE, 0)),
        RawDescriptor::from(SplitDescriptor::new(BUF + 0x1000, 8, WRITE, 0)),
    ];
    let buffer = RxBuffer::new(&mem, q.build_desc_chain(&descs).unwrap()).unwrap();
    assert_eq!(buffer.payload_capacity(), 8);
    let hdr = guest_hdr(Op::Rw, 0);
    assert_eq!(buffer.write(hdr, b"data").unwrap(), 48);
    let mut raw = [0u8; HDR_LEN];
    mem.read_slice(&mut raw, GuestAddress(BUF)).unwrap();
    assert_eq!(Header::from_bytes(&raw).len, 4);
    let mut data = [0u8; 4];
    mem.read_slice(&mut data, GuestAddress(BUF + 0x1000))
        .unwrap();
    assert_eq!(&data, b"data");

    let small = [RawDescriptor::from(SplitDescriptor::new(BUF, 40, WRITE, 0))];
    let err = RxBuffer::new(&mem, q.build_desc_chain(&small).unwrap())
        .err()
        .unwrap();
    assert!(matches!(err, Error::ShortChain(40)));
    let one = [RawDescriptor::from(SplitDescriptor::new(BUF, 50, WRITE, 0))];
    let buffer = RxBuffer::new(&mem, q.build_desc_chain(&one).unwrap()).unwrap();
    assert!(buffer.write(hdr, b"too long").is_err());
}
