//! Descriptor chains on mock guest memory, shared by the request parser's
//! and the handler's tests.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Descriptor flags, as the split ring's 16-bit field holds them.
pub(super) const F_NEXT: u16 = VRING_DESC_F_NEXT as u16;
pub(super) const F_WRITE: u16 = VRING_DESC_F_WRITE as u16;
/// Where tests put request headers, data and status bytes.
pub(super) const HDR: u64 = 0x10_0000;
pub(super) const DATA: u64 = 0x20_0000;
pub(super) const STATUS: u64 = 0x30_0000;
/// Size of the test guest memory.
pub(super) const MEM_SIZE: usize = 0x100_0000;

pub(super) fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// (addr, len, device-writable) descriptors, linked from table index `first`.
pub(super) fn linked(descs: &[(u64, u32, bool)], first: u16) -> Vec<RawDescriptor> {
    descs
        .iter()
        .enumerate()
        .map(|(i, &(addr, len, write))| {
            let i = u16::try_from(i).unwrap();
            let last = usize::from(i) + 1 == descs.len();
            let flags = if write { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
            RawDescriptor::from(SplitDescriptor::new(addr, len, flags, first + i + 1))
        })
        .collect()
}

pub(super) fn header(mem: &GuestMemoryMmap, at: u64, request_type: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&request_type.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(at)).unwrap();
}

/// Writes one DISCARD / WRITE_ZEROES segment at `at`.
pub(super) fn segment(mem: &GuestMemoryMmap, at: u64, sector: u64, sectors: u32, flags: u32) {
    let mut seg = [0u8; 16];
    seg[..8].copy_from_slice(&sector.to_le_bytes());
    seg[8..12].copy_from_slice(&sectors.to_le_bytes());
    seg[12..].copy_from_slice(&flags.to_le_bytes());
    mem.write_slice(&seg, GuestAddress(at)).unwrap();
}
