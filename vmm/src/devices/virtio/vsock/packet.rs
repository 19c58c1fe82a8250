//! The `virtio_vsock_hdr` and the packets it heads (virtio spec 1.2,
//! 5.10.6): parsing what the guest puts on the TX queue, writing what the
//! device puts on the RX queue.
//!
//! A TX descriptor chain is hostile input. Faults in the chain itself
//! (descriptors outside guest memory, fewer than 44 readable bytes) are
//! [`Error::is_chain_fault`]: the device goes to NEEDS_RESET. A readable
//! header that says something invalid (wrong cid, not STREAM, unknown op,
//! an oversized or truncated payload) is a [`Rejected`] packet: the device
//! answers it with RST.

use std::io::{Read, Write};

use virtio_queue::{DescriptorChain, Reader, Writer};
use vm_memory::GuestMemoryMmap;

// virtio-bindings 0.2 has no virtio_vsock.h: the header layout, types,
// operations, flags and events below are defined here from the virtio spec
// (1.2, 5.10).

/// Size of `struct virtio_vsock_hdr`.
pub const HDR_LEN: usize = 44;
/// Largest payload the device accepts from or gives to the guest in one
/// packet (Linux sends at most 64 KiB per packet).
pub const MAX_PAYLOAD: u32 = 64 * 1024;
/// The only socket type offered (VIRTIO_VSOCK_F_SEQPACKET is not).
pub const TYPE_STREAM: u16 = 1;
/// SHUTDOWN flag: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;
/// The host's context id.
pub const HOST_CID: u64 = libc::VMADDR_CID_HOST as u64;
/// `virtio_vsock_event.id` of a transport reset (virtio 1.2, 5.10.6.6).
pub const VIRTIO_VSOCK_EVENT_TRANSPORT_RESET: u32 = 0;
/// Bytes of `struct virtio_vsock_event`.
pub const EVENT_LEN: u32 = 4;

/// A `virtio_vsock_hdr` operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Connection request.
    Request = 1,
    /// Connection accepted.
    Response = 2,
    /// Connection reset (refused, aborted or closed).
    Rst = 3,
    /// The sender shuts down one or both directions.
    Shutdown = 4,
    /// Data.
    Rw = 5,
    /// The sender's receive credit (buf_alloc, fwd_cnt) changed.
    CreditUpdate = 6,
    /// The sender asks for a credit update.
    CreditRequest = 7,
}

impl Op {
    fn from_u16(op: u16) -> Option<Self> {
        Some(match op {
            1 => Self::Request,
            2 => Self::Response,
            3 => Self::Rst,
            4 => Self::Shutdown,
            5 => Self::Rw,
            6 => Self::CreditUpdate,
            7 => Self::CreditRequest,
            _ => return None,
        })
    }
}

/// `struct virtio_vsock_hdr`, decoded (all fields little-endian on the wire).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// Source context id.
    pub src_cid: u64,
    /// Destination context id.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type.
    pub type_: u16,
    /// Operation.
    pub op: u16,
    /// Operation flags (SHUTDOWN).
    pub flags: u32,
    /// The sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer, ever.
    pub fwd_cnt: u32,
}

fn le_u64(b: &[u8; HDR_LEN], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

fn le_u32(b: &[u8; HDR_LEN], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl Header {
    /// Decodes the wire format.
    pub fn from_bytes(b: &[u8; HDR_LEN]) -> Self {
        Self {
            src_cid: le_u64(b, 0),
            dst_cid: le_u64(b, 8),
            src_port: le_u32(b, 16),
            dst_port: le_u32(b, 20),
            len: le_u32(b, 24),
            type_: u16::from_le_bytes([b[28], b[29]]),
            op: u16::from_le_bytes([b[30], b[31]]),
            flags: le_u32(b, 32),
            buf_alloc: le_u32(b, 36),
            fwd_cnt: le_u32(b, 40),
        }
    }

    /// Encodes the wire format.
    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// The RST answering this header (addresses swapped), or `None` for a
    /// RST itself: a reset is never answered, so two peers cannot loop.
    pub fn reset_reply(&self) -> Option<Header> {
        (self.op != Op::Rst as u16).then_some(Header {
            src_cid: self.dst_cid,
            dst_cid: self.src_cid,
            src_port: self.dst_port,
            dst_port: self.src_port,
            type_: TYPE_STREAM,
            op: Op::Rst as u16,
            ..Header::default()
        })
    }
}

/// Errors in a packet or its descriptor chain.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The chain's buffers are not valid guest memory.
    #[error("vsock descriptor chain is not valid guest memory")]
    Chain(#[source] virtio_queue::Error),
    /// Fewer bytes in the chain than the header needs.
    #[error("vsock descriptor chain has {0} bytes, less than the {HDR_LEN}-byte header")]
    ShortChain(usize),
    /// Copying to or from guest memory failed.
    #[error("failed to copy a vsock packet through guest memory")]
    Copy(#[source] std::io::Error),
    /// The payload is larger than [`MAX_PAYLOAD`].
    #[error("vsock payload of {0} bytes exceeds the {MAX_PAYLOAD}-byte limit")]
    TooLong(u32),
    /// The header announces more payload than the chain holds.
    #[error("vsock header announces {len} payload bytes, the chain holds {available}")]
    Truncated {
        /// The header's `len`.
        len: u32,
        /// Bytes after the header.
        available: usize,
    },
    /// A control packet with a payload.
    #[error("vsock operation {0} carries a payload")]
    UnexpectedPayload(u16),
    /// Not a STREAM packet.
    #[error("vsock socket type {0} is not STREAM")]
    BadType(u16),
    /// Not one of the seven operations.
    #[error("unknown vsock operation {0}")]
    BadOp(u16),
    /// The source is not the guest.
    #[error("vsock source cid {0} is not the guest's")]
    BadSrcCid(u64),
    /// The destination is not the host.
    #[error("vsock destination cid {0} is not the host's")]
    BadDstCid(u64),
}

impl Error {
    /// Whether the fault is in the descriptor chain itself (the device
    /// needs a reset) rather than in what a readable header says.
    pub fn is_chain_fault(&self) -> bool {
        matches!(self, Self::Chain(_) | Self::ShortChain(_) | Self::Copy(_))
    }
}

/// A valid packet from the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxPacket {
    /// Its header.
    pub hdr: Header,
    /// Its operation.
    pub op: Op,
    /// Its payload (`Rw` only; empty otherwise).
    pub payload: Vec<u8>,
}

/// A packet whose header was read but is invalid: answer `hdr` with RST.
#[derive(Debug)]
pub struct Rejected {
    /// The header as the guest wrote it.
    pub hdr: Header,
    /// What is wrong.
    pub reason: Error,
}

/// Checks a header from a guest whose context id is `guest_cid`.
pub fn validate(hdr: &Header, guest_cid: u64) -> Result<Op, Error> {
    if hdr.src_cid != guest_cid {
        return Err(Error::BadSrcCid(hdr.src_cid));
    }
    if hdr.dst_cid != HOST_CID {
        return Err(Error::BadDstCid(hdr.dst_cid));
    }
    if hdr.type_ != TYPE_STREAM {
        return Err(Error::BadType(hdr.type_));
    }
    let op = Op::from_u16(hdr.op).ok_or(Error::BadOp(hdr.op))?;
    if hdr.len > MAX_PAYLOAD {
        return Err(Error::TooLong(hdr.len));
    }
    if op != Op::Rw && hdr.len != 0 {
        return Err(Error::UnexpectedPayload(hdr.op));
    }
    Ok(op)
}

/// Reads and validates the packet in a TX descriptor chain. The outer
/// error is a chain fault (NEEDS_RESET), the inner one a packet to reset.
pub fn read_tx(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    guest_cid: u64,
) -> Result<Result<TxPacket, Rejected>, Error> {
    let mut reader: Reader<'_> = Reader::new(mem, chain).map_err(Error::Chain)?;
    let available = reader.available_bytes();
    if available < HDR_LEN {
        return Err(Error::ShortChain(available));
    }
    let mut raw = [0u8; HDR_LEN];
    reader.read_exact(&mut raw).map_err(Error::Copy)?;
    let hdr = Header::from_bytes(&raw);
    let op = match validate(&hdr, guest_cid) {
        Ok(op) => op,
        Err(reason) => return Ok(Err(Rejected { hdr, reason })),
    };
    let available = reader.available_bytes();
    // validate() capped len at MAX_PAYLOAD, so it fits a usize.
    let len = usize::try_from(hdr.len).unwrap_or(usize::MAX);
    if len > available {
        return Ok(Err(Rejected {
            hdr,
            reason: Error::Truncated {
                len: hdr.len,
                available,
            },
        }));
    }
    let mut payload = vec![0u8; len];
    reader.read_exact(&mut payload).map_err(Error::Copy)?;
    Ok(Ok(TxPacket { hdr, op, payload }))
}

/// An RX descriptor chain opened for writing one packet.
pub struct RxBuffer<'a> {
    writer: Writer<'a>,
}

impl<'a> RxBuffer<'a> {
    /// Opens `chain`; it must hold at least a header.
    pub fn new(
        mem: &'a GuestMemoryMmap,
        chain: DescriptorChain<&'a GuestMemoryMmap>,
    ) -> Result<Self, Error> {
        let writer: Writer<'a> = Writer::new(mem, chain).map_err(Error::Chain)?;
        let available = writer.available_bytes();
        if available < HDR_LEN {
            return Err(Error::ShortChain(available));
        }
        Ok(Self { writer })
    }

    /// Payload bytes that fit after the header (at most [`MAX_PAYLOAD`]).
    pub fn payload_capacity(&self) -> usize {
        let cap = usize::try_from(MAX_PAYLOAD).unwrap_or(usize::MAX);
        (self.writer.available_bytes() - HDR_LEN).min(cap)
    }

    /// Writes `hdr` (its `len` set to the payload's) and `payload`;
    /// returns the bytes written, for the used ring.
    pub fn write(mut self, mut hdr: Header, payload: &[u8]) -> Result<u32, Error> {
        let too_long = || Error::TooLong(u32::MAX);
        if payload.len() > self.payload_capacity() {
            return Err(Error::Truncated {
                len: u32::try_from(payload.len()).unwrap_or(u32::MAX),
                available: self.payload_capacity(),
            });
        }
        hdr.len = u32::try_from(payload.len()).map_err(|_| too_long())?;
        self.writer
            .write_all(&hdr.to_bytes())
            .map_err(Error::Copy)?;
        self.writer.write_all(payload).map_err(Error::Copy)?;
        u32::try_from(HDR_LEN + payload.len()).map_err(|_| too_long())
    }
}

#[cfg(test)]
#[path = "packet_tests.rs"]
mod tests;
