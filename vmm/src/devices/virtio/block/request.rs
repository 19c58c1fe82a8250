//! One virtio-blk request, parsed and checked from a descriptor chain
//! (virtio 1.2, 5.2.6).
//!
//! The layout accepted is the one every driver uses: a device-readable
//! header descriptor (`type`, `reserved`, `sector`: 16 bytes), zero or more
//! data descriptors, and a device-writable last descriptor whose final byte
//! is the status. Everything in the chain comes from the guest and is
//! checked here: descriptor count, addresses, lengths, directions, and the
//! sector range against the disk's capacity.
//!
//! A chain whose status byte cannot be located is a structural violation
//! ([`Rejected::status`] is `None`: the device must go to NEEDS_RESET); any
//! other fault is answered through the status byte ([`Error::status_code`]).

use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::SECTOR_SIZE;

use virtio_bindings::virtio_blk::{virtio_blk_discard_write_zeroes, virtio_blk_outhdr};
pub use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};

/// Bytes of one DISCARD / WRITE_ZEROES segment.
pub const RANGE_SEGMENT_LEN: u32 = 16;
const _: () = assert!(size_of::<virtio_blk_discard_write_zeroes>() == RANGE_SEGMENT_LEN as usize);
/// Most sectors one DISCARD / WRITE_ZEROES segment may cover.
pub const MAX_RANGE_SECTORS: u32 = u32::MAX >> 9;

/// Status: success.
pub const VIRTIO_BLK_S_OK: u8 = status_code(virtio_bindings::virtio_blk::VIRTIO_BLK_S_OK);
/// Status: the request failed.
pub const VIRTIO_BLK_S_IOERR: u8 = status_code(virtio_bindings::virtio_blk::VIRTIO_BLK_S_IOERR);
/// Status: the request type is not supported.
pub const VIRTIO_BLK_S_UNSUPP: u8 = status_code(virtio_bindings::virtio_blk::VIRTIO_BLK_S_UNSUPP);

/// The status byte the device writes for a `VIRTIO_BLK_S_*` code (`u32` in
/// the bindings); a code above 255 fails the build.
const fn status_code(code: u32) -> u8 {
    assert!(code <= u8::MAX as u32);
    code.to_le_bytes()[0]
}

/// Bytes of the request header (`struct virtio_blk_outhdr`).
pub const HEADER_LEN: u32 = 16;
const _: () = assert!(size_of::<virtio_blk_outhdr>() == HEADER_LEN as usize);
/// Most data descriptors per request; offered to the driver as `seg_max`.
pub const MAX_SEGMENTS: u32 = 254;
/// Most descriptors per chain: header, data, status.
pub const MAX_DESCRIPTORS: usize = MAX_SEGMENTS as usize + 2;

/// Why a chain is not a valid request.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// The chain yields no descriptor (bad head index or indirect table).
    #[error("the descriptor chain is empty")]
    EmptyChain,
    /// The chain is longer than [`MAX_DESCRIPTORS`], loops, or ends at an
    /// invalid next index, unreadable descriptor or byte-count overflow.
    #[error("the descriptor chain is longer than {MAX_DESCRIPTORS} descriptors or broken")]
    BrokenChain,
    /// The last descriptor is not device-writable or points outside memory.
    #[error("the last descriptor is not a device-writable status byte in guest memory")]
    MissingStatus,
    /// The first descriptor is not a readable 16-byte header in memory.
    #[error("the request header is not a device-readable 16-byte buffer in guest memory")]
    BadHeader,
    /// A request type this device does not implement.
    #[error("request type {0} is not supported")]
    Unsupported(u32),
    /// A data descriptor is outside guest memory (or crosses a region).
    #[error("data buffer {addr:#x}+{len:#x} is outside guest memory")]
    DataOutOfMemory {
        /// Guest physical address.
        addr: u64,
        /// Length in bytes.
        len: u32,
    },
    /// A data descriptor's direction does not fit the request type.
    #[error("a data buffer has the wrong direction for the request type")]
    DataDirection,
    /// More data descriptors than [`MAX_SEGMENTS`].
    #[error("the request has more than {MAX_SEGMENTS} data buffers")]
    TooManySegments,
    /// Data length zero, not whole sectors, or over 4 GiB.
    #[error("data length {0} is not a non-zero multiple of 512 bytes")]
    DataLength(u64),
    /// The request reaches beyond the disk's last sector.
    #[error("sector {sector} + {len} bytes is beyond the disk's {capacity} sectors")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Data length in bytes.
        len: u32,
        /// Disk capacity in sectors.
        capacity: u64,
    },
    /// A write to a read-only disk.
    #[error("the disk is read-only")]
    ReadOnly,
    /// A DISCARD / WRITE_ZEROES request that is not exactly one segment.
    #[error("a discard or write-zeroes request must carry exactly one 16-byte segment")]
    RangeSegments,
    /// Segment flags this device does not implement.
    #[error("segment flags {0:#x} are not supported")]
    RangeFlags(u32),
}

impl Error {
    /// The status byte that answers this error.
    pub fn status_code(&self) -> u8 {
        match self {
            Self::Unsupported(_) | Self::RangeFlags(_) => VIRTIO_BLK_S_UNSUPP,
            _ => VIRTIO_BLK_S_IOERR,
        }
    }
}

/// What a request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestType {
    /// Read `data_len` bytes at `sector` into the data buffers.
    In,
    /// Write the data buffers at `sector`.
    Out,
    /// Make earlier writes durable.
    Flush,
    /// Write the serial into the data buffers.
    GetId,
    /// Deallocate `sectors` sectors from `sector` on.
    Discard {
        /// Sectors in the range.
        sectors: u32,
    },
    /// Zero `sectors` sectors from `sector` on.
    WriteZeroes {
        /// Sectors in the range.
        sectors: u32,
        /// The driver allows deallocating the range.
        unmap: bool,
    },
}

/// A checked request: every buffer lies in guest memory with the right
/// direction, and an In/Out request lies within the disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Head index of the chain (for the used ring).
    pub head: u16,
    /// What to do.
    pub kind: RequestType,
    /// First sector (In/Out).
    pub sector: u64,
    /// Data buffers, in order.
    pub data: Vec<(GuestAddress, u32)>,
    /// Sum of the data buffers' lengths.
    pub data_len: u32,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

impl Request {
    /// Byte offset in the image.
    pub fn offset(&self) -> u64 {
        // Cannot overflow: parse() checked sector * 512 + data_len.
        self.sector.saturating_mul(SECTOR_SIZE)
    }
}

/// A chain that is not a valid request, with what is needed to answer it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    /// Head index of the chain.
    pub head: u16,
    /// The status byte, if the chain has a valid one; `None` means the
    /// driver broke the protocol and the device needs a reset.
    pub status: Option<GuestAddress>,
    /// What is wrong.
    pub error: Error,
}

/// The disk facts a request is checked against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Whether writes are refused.
    pub read_only: bool,
}

fn in_memory(mem: &GuestMemoryMmap, addr: GuestAddress, len: u32) -> bool {
    usize::try_from(len).is_ok_and(|len| mem.get_slice(addr, len).is_ok())
}

/// Collects the chain's descriptors, or says why it is structurally broken.
fn collect(chain: DescriptorChain<&GuestMemoryMmap>) -> Result<Vec<Descriptor>, Error> {
    let mut descs = Vec::new();
    for desc in chain {
        if descs.len() == MAX_DESCRIPTORS {
            return Err(Error::BrokenChain);
        }
        descs.push(desc);
    }
    match descs.last() {
        None => Err(Error::EmptyChain),
        // The iterator stops silently at a loop (its TTL), an out-of-table
        // next index, an unreadable descriptor or a length overflow: the
        // last descriptor it gave then still says "next".
        Some(last) if last.has_next() => Err(Error::BrokenChain),
        Some(_) => Ok(descs),
    }
}

/// The status byte's address: the final byte of the last, device-writable
/// descriptor.
fn status_byte(mem: &GuestMemoryMmap, last: &Descriptor) -> Option<GuestAddress> {
    if !last.is_write_only() || last.len() == 0 {
        return None;
    }
    let addr = last.addr().checked_add(u64::from(last.len()) - 1)?;
    in_memory(mem, addr, 1).then_some(addr)
}

/// Reads the single DISCARD / WRITE_ZEROES segment: (sector, sectors, flags).
fn range_segment(
    mem: &GuestMemoryMmap,
    buffers: &[(GuestAddress, u32)],
    total: u64,
) -> Result<(u64, u32, u32), Error> {
    let [(addr, len)] = buffers else {
        return Err(Error::RangeSegments);
    };
    if *len != RANGE_SEGMENT_LEN || total != u64::from(RANGE_SEGMENT_LEN) {
        return Err(Error::RangeSegments);
    }
    let mut raw = [0u8; RANGE_SEGMENT_LEN as usize];
    mem.read_slice(&mut raw, *addr)
        .map_err(|_| Error::RangeSegments)?;
    let (s, rest) = raw.split_at(8);
    let (n, f) = rest.split_at(4);
    let word = |b: &[u8]| b.try_into().map(u32::from_le_bytes);
    let sector = s
        .try_into()
        .map(u64::from_le_bytes)
        .map_err(|_| Error::RangeSegments)?;
    let sectors = word(n).map_err(|_| Error::RangeSegments)?;
    let flags = word(f).map_err(|_| Error::RangeSegments)?;
    if sectors == 0 || sectors > MAX_RANGE_SECTORS {
        return Err(Error::DataLength(u64::from(sectors) * SECTOR_SIZE));
    }
    Ok((sector, sectors, flags))
}

/// Parses `chain` into a request checked against `limits`.
pub fn parse(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    limits: Limits,
) -> Result<Request, Rejected> {
    let head = chain.head_index();
    let reject = |status, error| Rejected {
        head,
        status,
        error,
    };
    let descs = collect(chain).map_err(|e| reject(None, e))?;
    let last = descs
        .last()
        .ok_or_else(|| reject(None, Error::EmptyChain))?;
    let status = status_byte(mem, last).ok_or_else(|| reject(None, Error::MissingStatus))?;
    let fail = |error| reject(Some(status), error);

    let (header, data) = match descs.as_slice() {
        [header, data @ .., _status] => (header, data),
        [_] => return Err(fail(Error::BadHeader)),
        [] => return Err(reject(None, Error::EmptyChain)),
    };
    if header.is_write_only() || header.len() < HEADER_LEN {
        return Err(fail(Error::BadHeader));
    }
    let mut raw = [0u8; HEADER_LEN as usize];
    mem.read_slice(&mut raw, header.addr())
        .map_err(|_| fail(Error::BadHeader))?;
    let (type_bytes, rest) = raw.split_at(4);
    let request_type =
        u32::from_le_bytes(type_bytes.try_into().map_err(|_| fail(Error::BadHeader))?);
    let sector = u64::from_le_bytes(rest[4..].try_into().map_err(|_| fail(Error::BadHeader))?);

    let (kind, writable) = match request_type {
        VIRTIO_BLK_T_IN => (RequestType::In, true),
        VIRTIO_BLK_T_OUT => (RequestType::Out, false),
        VIRTIO_BLK_T_FLUSH => (RequestType::Flush, false),
        VIRTIO_BLK_T_GET_ID => (RequestType::GetId, true),
        VIRTIO_BLK_T_DISCARD => (RequestType::Discard { sectors: 0 }, false),
        VIRTIO_BLK_T_WRITE_ZEROES => (
            RequestType::WriteZeroes {
                sectors: 0,
                unmap: false,
            },
            false,
        ),
        other => return Err(fail(Error::Unsupported(other))),
    };
    if u32::try_from(data.len()).map_or(true, |n| n > MAX_SEGMENTS) {
        return Err(fail(Error::TooManySegments));
    }
    let mut buffers = Vec::with_capacity(data.len());
    let mut total: u64 = 0;
    for d in data {
        if d.is_write_only() != writable {
            return Err(fail(Error::DataDirection));
        }
        if !in_memory(mem, d.addr(), d.len()) {
            return Err(fail(Error::DataOutOfMemory {
                addr: d.addr().raw_value(),
                len: d.len(),
            }));
        }
        total += u64::from(d.len());
        buffers.push((d.addr(), d.len()));
    }
    // A flush carries no data by spec; any buffers it has are ignored.
    let mut kind = kind;
    let mut sector = sector;
    let data_len = match kind {
        RequestType::Discard { .. } | RequestType::WriteZeroes { .. } => {
            let (start, sectors, flags) = range_segment(mem, &buffers, total).map_err(fail)?;
            let unmap = flags == VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
            kind = match kind {
                RequestType::Discard { .. } if flags == 0 => RequestType::Discard { sectors },
                RequestType::WriteZeroes { .. }
                    if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP == 0 =>
                {
                    RequestType::WriteZeroes { sectors, unmap }
                }
                _ => return Err(fail(Error::RangeFlags(flags))),
            };
            let bytes = u64::from(sectors) * SECTOR_SIZE;
            let len = u32::try_from(bytes).map_err(|_| fail(Error::DataLength(bytes)))?;
            let end = start
                .checked_mul(SECTOR_SIZE)
                .and_then(|s| s.checked_add(bytes));
            if end.is_none_or(|end| end > limits.capacity.saturating_mul(SECTOR_SIZE)) {
                return Err(fail(Error::OutOfRange {
                    sector: start,
                    len,
                    capacity: limits.capacity,
                }));
            }
            if limits.read_only {
                return Err(fail(Error::ReadOnly));
            }
            sector = start;
            buffers.clear();
            len
        }
        RequestType::Flush => {
            buffers.clear();
            0
        }
        RequestType::GetId => {
            if total == 0 {
                return Err(fail(Error::DataLength(0)));
            }
            u32::try_from(total).map_err(|_| fail(Error::DataLength(total)))?
        }
        RequestType::In | RequestType::Out => {
            if total == 0 || !total.is_multiple_of(SECTOR_SIZE) {
                return Err(fail(Error::DataLength(total)));
            }
            let len = u32::try_from(total).map_err(|_| fail(Error::DataLength(total)))?;
            let end = sector
                .checked_mul(SECTOR_SIZE)
                .and_then(|start| start.checked_add(total));
            if end.is_none_or(|end| end > limits.capacity.saturating_mul(SECTOR_SIZE)) {
                return Err(fail(Error::OutOfRange {
                    sector,
                    len,
                    capacity: limits.capacity,
                }));
            }
            if kind == RequestType::Out && limits.read_only {
                return Err(fail(Error::ReadOnly));
            }
            len
        }
    };
    Ok(Request {
        head,
        kind,
        sector,
        data: buffers,
        data_len,
        status,
    })
}

#[cfg(test)]
#[path = "request_tests.rs"]
mod tests;
