//! Guest memory in snapshot files: written sparsely (zero pages stay holes),
//! mapped back `MAP_PRIVATE` so every restored guest shares the file's pages
//! through the page cache and pays only for the pages it writes.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Address, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MemoryRegionAddress,
};

use super::format::PAGE_SIZE;

/// Most memory regions a snapshot may describe.
pub const MAX_REGIONS: usize = 8;

/// One guest memory region as stored in a snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionState {
    /// Guest physical start.
    pub guest_addr: u64,
    /// Length in bytes (page multiple).
    pub len: u64,
}

/// Errors while saving or mapping guest memory.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading guest memory failed.
    #[error("failed to read guest memory")]
    Read(#[source] vm_memory::GuestMemoryError),
    /// Writing the image failed.
    #[error("failed to write the memory image")]
    Write(#[source] std::io::Error),
    /// `/proc/self/pagemap`, which says which pages were written, could
    /// not be opened or read.
    #[error("failed to read /proc/self/pagemap")]
    Pagemap(#[source] std::io::Error),
    /// The snapshot's region list is unusable.
    #[error("snapshot memory layout is invalid: {0}")]
    Layout(&'static str),
    /// mmap of the memory image failed.
    #[error("failed to map the snapshot's memory image")]
    Map(#[source] vm_memory::mmap::MmapRegionError),
    /// The mapped regions do not form a valid guest memory.
    #[error("snapshot memory regions overlap")]
    Regions(#[source] vm_memory::GuestRegionCollectionError),
}

/// The regions of `mem`, in order.
pub fn regions(mem: &GuestMemoryMmap) -> Vec<RegionState> {
    mem.iter()
        .map(|r| RegionState {
            guest_addr: r.start_addr().raw_value(),
            len: r.len(),
        })
        .collect()
}

fn is_zero(page: &[u8]) -> bool {
    // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets
    // the aligned middle of the byte slice.
    let (head, words, tail) = unsafe { page.align_to::<u64>() };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// A read-only view of a whole guest memory region.
///
/// Only for a VM whose vCPUs are paused and whose devices are not running
/// (snapshot time): nothing else writes guest memory then.
fn region_bytes(region: &GuestRegionMmap) -> Result<&[u8], Error> {
    let len = usize::try_from(region.len()).map_err(|_| Error::Layout("region size"))?;
    let host = region
        .get_host_address(MemoryRegionAddress(0))
        .map_err(Error::Read)?;
    // SAFETY: `host` is the start of the region's live mapping of `len`
    // bytes, owned by `region` which outlives the returned borrow; the VM is
    // paused and the device loop is the caller's own thread, so the bytes do
    // not change while they are read.
    Ok(unsafe { std::slice::from_raw_parts(host.cast_const(), len) })
}

/// Writes every non-zero page of `mem` (a paused VM's memory) into `file` at
/// `offset` onwards (regions back to back); zero pages are left as holes.
/// Returns the bytes written.
pub fn write_sparse(mem: &GuestMemoryMmap, file: &File, offset: u64) -> Result<u64, Error> {
    let page = usize::try_from(PAGE_SIZE).unwrap_or(4096);
    let mut file_pos = offset;
    let mut written = 0;
    for region in mem.iter() {
        let bytes = region_bytes(region)?;
        // Coalesce runs of non-zero pages into one write each.
        let mut run_start: Option<usize> = None;
        for (i, p) in bytes.chunks(page).enumerate() {
            match (is_zero(p), run_start) {
                (false, None) => run_start = Some(i * page),
                (true, Some(start)) => {
                    file.write_all_at(&bytes[start..i * page], file_pos + start as u64)
                        .map_err(Error::Write)?;
                    written += (i * page - start) as u64;
                    run_start = None;
                }
                _ => {}
            }
        }
        if let Some(start) = run_start {
            file.write_all_at(&bytes[start..], file_pos + start as u64)
                .map_err(Error::Write)?;
            written += (bytes.len() - start) as u64;
        }
        file_pos += bytes.len() as u64;
    }
    Ok(written)
}

/// Checks a snapshot's region list against the image length and limits.
pub fn validate(regions: &[RegionState], mem_len: u64, max_bytes: u64) -> Result<(), Error> {
    if regions.is_empty() || regions.len() > MAX_REGIONS {
        return Err(Error::Layout("region count"));
    }
    let mut total = 0u64;
    for r in regions {
        if r.len == 0 || !r.len.is_multiple_of(PAGE_SIZE) || !r.guest_addr.is_multiple_of(PAGE_SIZE)
        {
            return Err(Error::Layout("region alignment"));
        }
        r.guest_addr
            .checked_add(r.len)
            .ok_or(Error::Layout("region end"))?;
        total = total
            .checked_add(r.len)
            .ok_or(Error::Layout("total size"))?;
    }
    if total != mem_len || total > max_bytes {
        return Err(Error::Layout("total size"));
    }
    Ok(())
}

/// Maps the memory image of `file` (at `offset`) as guest memory, private
/// copy-on-write: reads come from the shared page cache, writes stay local.
pub fn map_private(
    file: Arc<File>,
    offset: u64,
    regions: &[RegionState],
) -> Result<GuestMemoryMmap, Error> {
    let mut mapped = Vec::with_capacity(regions.len());
    let mut file_pos = offset;
    for r in regions {
        let size = usize::try_from(r.len).map_err(|_| Error::Layout("region size"))?;
        let mapping = MmapRegionBuilder::new(size)
            .with_file_offset(FileOffset::from_arc(file.clone(), file_pos))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(Error::Map)?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(r.guest_addr))
            .ok_or(Error::Layout("region end"))?;
        mapped.push(region);
        file_pos += r.len;
    }
    GuestMemoryMmap::from_regions(mapped).map_err(Error::Regions)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn sparse_image_round_trips_and_restores_privately() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).expect("mmap");
        mem.write_slice(b"first page", GuestAddress(0))
            .expect("write");
        mem.write_slice(b"far page", GuestAddress(3 << 20))
            .expect("write");
        let file = tempfile::tempfile().expect("tempfile");
        file.set_len(4096 + (4 << 20)).expect("len");
        let written = write_sparse(&mem, &file, 4096).expect("dump");
        assert_eq!(written, 2 * PAGE_SIZE, "only the two non-zero pages");

        let file = Arc::new(file);
        let regions = regions(&mem);
        validate(&regions, 4 << 20, 1 << 30).expect("valid");
        let a = map_private(file.clone(), 4096, &regions).expect("map");
        let b = map_private(file.clone(), 4096, &regions).expect("map");
        let mut buf = [0u8; 10];
        a.read_slice(&mut buf, GuestAddress(0)).expect("read");
        assert_eq!(&buf, b"first page");
        a.write_slice(b"changed!!!", GuestAddress(0))
            .expect("write");
        b.read_slice(&mut buf, GuestAddress(0)).expect("read");
        assert_eq!(&buf, b"first page", "clones do not see each other's writes");
        let mut on_disk = [0u8; 10];
        file.read_exact_at(&mut on_disk, 4096).expect("read");
        assert_eq!(&on_disk, b"first page", "the file is never written");
    }

    #[test]
    fn bad_layouts_are_refused() {
        let r = |guest_addr, len| RegionState { guest_addr, len };
        assert!(validate(&[], 0, 1 << 30).is_err());
        assert!(validate(&[r(0, 100)], 100, 1 << 30).is_err(), "unaligned");
        assert!(
            validate(&[r(0, 4096)], 8192, 1 << 30).is_err(),
            "size mismatch"
        );
        assert!(
            validate(&[r(!0xfff, 8192)], 8192, 1 << 30).is_err(),
            "overflow"
        );
        assert!(
            validate(&[r(0, 1 << 31)], 1 << 31, 1 << 30).is_err(),
            "over the cap"
        );
        assert!(validate(&[r(0, 4096); MAX_REGIONS + 1], 4096 * 9, 1 << 30).is_err());
        validate(&[r(0, 4096), r(1 << 32, 4096)], 8192, 1 << 30).expect("two regions");
    }
}

/// Page runs `(first page, count)` of `mem` that this process has written
/// since they were mapped from a snapshot file: present in the page tables
/// and no longer the file's page (a private copy-on-write copy).
pub fn dirty_pages(mem: &GuestMemoryMmap) -> Result<Vec<(u64, u64)>, Error> {
    const PRESENT: u64 = 1 << 63;
    const FILE_OR_SHARED: u64 = 1 << 61;
    let pagemap = match crate::jail::pagemap() {
        Some(kept) => kept.try_clone(),
        None => File::open("/proc/self/pagemap"),
    }
    .map_err(Error::Pagemap)?;
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut image_page = 0u64;
    let mut entries = vec![0u8; 8 * 512];
    for region in mem.iter() {
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(Error::Read)? as u64;
        let pages = region.len() / PAGE_SIZE;
        let mut done = 0u64;
        while done < pages {
            let n = (pages - done).min(512);
            let bytes = usize::try_from(n * 8).map_err(|_| Error::Layout("region"))?;
            pagemap
                .read_exact_at(&mut entries[..bytes], (host / PAGE_SIZE + done) * 8)
                .map_err(Error::Pagemap)?;
            for (i, e) in entries[..bytes].chunks_exact(8).enumerate() {
                let mut w = [0u8; 8];
                w.copy_from_slice(e);
                let entry = u64::from_le_bytes(w);
                if entry & PRESENT == 0 || entry & FILE_OR_SHARED != 0 {
                    continue;
                }
                let page = image_page + done + i as u64;
                match runs.last_mut() {
                    Some((start, len)) if *start + *len == page => *len += 1,
                    _ => runs.push((page, 1)),
                }
            }
            done += n;
        }
        image_page += pages;
    }
    Ok(runs)
}

/// Host address and length of image pages `[page, page + count)`, if they
/// lie within one region of `mem`.
fn image_span(mem: &GuestMemoryMmap, page: u64, count: u64) -> Option<(*mut u8, usize)> {
    let mut first = 0u64;
    for region in mem.iter() {
        let pages = region.len() / PAGE_SIZE;
        if page >= first && page.checked_add(count)? <= first + pages {
            let host = region.get_host_address(MemoryRegionAddress(0)).ok()?;
            let offset = usize::try_from((page - first) * PAGE_SIZE).ok()?;
            let len = usize::try_from(count * PAGE_SIZE).ok()?;
            return Some((host.wrapping_add(offset), len));
        }
        first += pages;
    }
    None
}

/// Writes the pages in `runs` of a paused VM's `mem` into `file` at their
/// image offsets from `offset` (everything else stays a hole). Returns the
/// bytes written.
pub fn write_runs(
    mem: &GuestMemoryMmap,
    runs: &[(u64, u64)],
    file: &File,
    offset: u64,
) -> Result<u64, Error> {
    let mut written = 0;
    for &(page, count) in runs {
        let (host, len) = image_span(mem, page, count).ok_or(Error::Layout("dirty run"))?;
        // SAFETY: `image_span` checked that the run lies inside one live
        // region mapping; the VM is paused and the loop is this thread, so
        // nothing writes these bytes while they are read.
        let bytes = unsafe { std::slice::from_raw_parts(host.cast_const(), len) };
        file.write_all_at(bytes, offset + page * PAGE_SIZE)
            .map_err(Error::Write)?;
        written += len as u64;
    }
    Ok(written)
}

/// Copies the pages in `runs` from `file` (image at `offset`) into `mem`,
/// over a base image mapped copy-on-write.
pub fn read_runs(
    mem: &GuestMemoryMmap,
    runs: &[(u64, u64)],
    file: &File,
    offset: u64,
) -> Result<(), Error> {
    for &(page, count) in runs {
        let (host, len) = image_span(mem, page, count).ok_or(Error::Layout("dirty run"))?;
        // SAFETY: the run lies inside one live region mapping (checked by
        // `image_span`) and no vCPU runs yet during a restore, so nothing
        // else touches these bytes.
        let bytes = unsafe { std::slice::from_raw_parts_mut(host, len) };
        file.read_exact_at(bytes, offset + page * PAGE_SIZE)
            .map_err(Error::Write)?;
    }
    Ok(())
}

#[cfg(test)]
mod dirty_tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use vm_memory::Bytes;

    #[test]
    fn only_pages_written_after_mapping_are_dirty_and_they_round_trip() {
        let file = tempfile::tempfile().expect("tempfile");
        file.set_len(64 * PAGE_SIZE).expect("len");
        file.write_all_at(&[7u8; 4096], 0).expect("base data");
        let file = Arc::new(file);
        let regions = [RegionState {
            guest_addr: 0,
            len: 64 * PAGE_SIZE,
        }];
        let mem = map_private(file.clone(), 0, &regions).expect("map");
        let mut b = [0u8; 1];
        mem.read_slice(&mut b, GuestAddress(0)).expect("read only");
        mem.write_slice(&[1], GuestAddress(5 * PAGE_SIZE))
            .expect("write");
        mem.write_slice(&[2], GuestAddress(6 * PAGE_SIZE))
            .expect("write");
        mem.write_slice(&[3], GuestAddress(40 * PAGE_SIZE + 9))
            .expect("write");
        let runs = dirty_pages(&mem).expect("pagemap");
        assert_eq!(runs, vec![(5, 2), (40, 1)], "reads are not dirty");

        let diff = tempfile::tempfile().expect("tempfile");
        diff.set_len(64 * PAGE_SIZE).expect("len");
        assert_eq!(
            write_runs(&mem, &runs, &diff, 0).expect("write"),
            3 * PAGE_SIZE
        );
        let fresh = map_private(file, 0, &regions).expect("map");
        read_runs(&fresh, &runs, &diff, 0).expect("overlay");
        let mut got = [0u8; 1];
        fresh
            .read_slice(&mut got, GuestAddress(40 * PAGE_SIZE + 9))
            .expect("read");
        assert_eq!(got, [3]);
        fresh.read_slice(&mut got, GuestAddress(0)).expect("read");
        assert_eq!(got, [7], "untouched pages still come from the base");
        assert!(
            read_runs(&fresh, &[(63, 2)], &diff, 0).is_err(),
            "past the end"
        );
    }
}
