//! Moving frames through the guest's virtqueues. Every descriptor is
//! hostile input: direction, bounds and chain links are checked before a
//! byte is read or written.

use virtio_bindings::virtio_net::virtio_net_hdr_v1;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::usernet::MAX_FRAME_LEN;

/// Length of `struct virtio_net_hdr_v1` (with VIRTIO_F_VERSION_1 the header
/// always carries `num_buffers`), in front of every frame either way.
pub const NET_HDR_LEN: usize = size_of::<virtio_net_hdr_v1>();
/// Smallest frame handled: an Ethernet header.
const MIN_FRAME_LEN: usize = 14;

/// A driver mistake in a descriptor chain: the device needs a reset.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The avail ring index moved further than the queue holds, or the queue is not ready.
    #[error("the driver's available ring is invalid")]
    AvailRing(#[source] virtio_queue::Error),
    /// A chain is empty, or links to a descriptor outside the table, or loops.
    #[error("descriptor chain {0} is empty or links outside the descriptor table")]
    BrokenChain(u16),
    /// The transmit queue got a device-writable buffer.
    #[error("descriptor chain {0} on the transmit queue has a device-writable buffer")]
    WritableInTx(u16),
    /// The receive queue got a device-readable buffer.
    #[error("descriptor chain {0} on the receive queue has a device-readable buffer")]
    ReadableInRx(u16),
    /// A buffer is not inside guest memory.
    #[error("guest buffer {addr:#x}+{len:#x} is outside guest memory")]
    OutOfBounds {
        /// Guest physical address.
        addr: u64,
        /// Length in bytes.
        len: u32,
    },
    /// The used ring could not be updated (or its flags read).
    #[error("updating the used ring failed")]
    UsedRing(#[source] virtio_queue::Error),
}

/// The descriptors of one chain, checked for direction, bounds and links.
fn buffers(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    writable: bool,
) -> Result<Vec<(GuestAddress, u32)>, QueueError> {
    let head = chain.head_index();
    let mut out = Vec::new();
    let mut continues = true;
    for desc in chain {
        continues = desc.has_next();
        if desc.is_write_only() != writable {
            return Err(if writable {
                QueueError::ReadableInRx(head)
            } else {
                QueueError::WritableInTx(head)
            });
        }
        let (addr, len) = (desc.addr(), desc.len());
        let fits = usize::try_from(len).is_ok_and(|n| n == 0 || mem.get_slice(addr, n).is_ok());
        if !fits {
            return Err(QueueError::OutOfBounds { addr: addr.0, len });
        }
        out.push((addr, len));
    }
    // The iterator stops silently at a bad link or a loop: the last
    // descriptor it gave then still says "next".
    if out.is_empty() || continues {
        return Err(QueueError::BrokenChain(head));
    }
    Ok(out)
}

/// Reads one transmit chain: `Ok(Some(frame))` without the virtio header,
/// `Ok(None)` for a chain whose size cannot be an Ethernet frame (dropped,
/// as a NIC drops a runt or a giant), or the driver's mistake.
pub fn read_tx_frame(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> Result<Option<Vec<u8>>, QueueError> {
    let bufs = buffers(mem, chain, false)?;
    let total = bufs.iter().try_fold(0usize, |acc, &(_, len)| {
        acc.checked_add(usize::try_from(len).ok()?)
    });
    let Some(total) = total else {
        return Ok(None);
    };
    if !(NET_HDR_LEN + MIN_FRAME_LEN..=NET_HDR_LEN + MAX_FRAME_LEN).contains(&total) {
        return Ok(None);
    }
    let mut data = vec![0u8; total];
    let mut at = 0;
    for (addr, len) in bufs {
        let n = usize::try_from(len).unwrap_or(0);
        mem.read_slice(&mut data[at..at + n], addr)
            .map_err(|_| QueueError::OutOfBounds { addr: addr.0, len })?;
        at += n;
    }
    data.drain(..NET_HDR_LEN);
    Ok(Some(data))
}

/// Writes `frame` behind a virtio-net header into one receive chain and
/// returns the length for the used ring. A chain too small for the frame
/// gets length 0 (the driver counts a length error and recycles it).
pub fn write_rx_frame(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    frame: &[u8],
) -> Result<u32, QueueError> {
    let bufs = buffers(mem, chain, true)?;
    let capacity: u64 = bufs.iter().map(|&(_, len)| u64::from(len)).sum();
    let mut data = Vec::with_capacity(NET_HDR_LEN + frame.len());
    // flags, gso_type, hdr_len, gso_size, csum_start, csum_offset: all 0;
    // num_buffers = 1.
    data.extend_from_slice(&[0u8; NET_HDR_LEN - 2]);
    data.extend_from_slice(&1u16.to_le_bytes());
    data.extend_from_slice(frame);
    let Ok(total) = u32::try_from(data.len()) else {
        return Ok(0);
    };
    if capacity < u64::from(total) {
        return Ok(0);
    }
    let mut at = 0usize;
    for (addr, len) in bufs {
        if at == data.len() {
            break;
        }
        let n = usize::try_from(len).unwrap_or(0).min(data.len() - at);
        mem.write_slice(&data[at..at + n], addr)
            .map_err(|_| QueueError::OutOfBounds { addr: addr.0, len })?;
        at += n;
    }
    Ok(total)
}

#[cfg(test)]
#[path = "queues_tests.rs"]
mod tests;
