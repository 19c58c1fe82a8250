//! Guest memory in snapshot files: written sparsely (zero pages stay holes),
//! mapped back `MAP_PRIVATE` so every restored guest shares the file's pages
//! through the page cache and pays only for the pages it writes.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
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
    /// mmap of a diff snapshot's pages over its base failed.
    #[error("failed to map a diff snapshot's pages")]
    MapRun(#[source] std::io::Error),
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

/// Most page runs a diff snapshot may hold. A resume maps each run as its
/// own mapping, and the kernel allows a process 65530 by default.
pub const MAX_DIFF_RUNS: usize = 16_384;

/// Calls `f(host address, bytes, image page)` for each part of the image
/// pages `[page, page + count)` that lies in one region of `mem`; an error
/// if any of them lies outside the image.
fn for_each_span(
    mem: &GuestMemoryMmap,
    page: u64,
    count: u64,
    mut f: impl FnMut(*mut u8, usize, u64) -> Result<(), Error>,
) -> Result<(), Error> {
    let end = page.checked_add(count).ok_or(Error::Layout("dirty run"))?;
    let mut at = page;
    let mut first = 0u64;
    for region in mem.iter() {
        let pages = region.len() / PAGE_SIZE;
        let region_end = first + pages;
        if at < end && at >= first && at < region_end {
            let upto = end.min(region_end);
            let host = region
                .get_host_address(MemoryRegionAddress(0))
                .map_err(Error::Read)?;
            let offset = usize::try_from((at - first) * PAGE_SIZE)
                .map_err(|_| Error::Layout("dirty run"))?;
            let len =
                usize::try_from((upto - at) * PAGE_SIZE).map_err(|_| Error::Layout("dirty run"))?;
            f(host.wrapping_add(offset), len, at)?;
            at = upto;
        }
        first = region_end;
    }
    if at < end || count == 0 {
        return Err(Error::Layout("dirty run"));
    }
    Ok(())
}

/// The union of two lists of page runs, sorted, with touching runs joined.
pub fn union_runs(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut all: Vec<(u64, u64)> = a.iter().chain(b).copied().filter(|r| r.1 > 0).collect();
    all.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(all.len());
    for (start, len) in all {
        let end = start.saturating_add(len);
        match out.last_mut() {
            Some((s, l)) if start <= *s + *l => *l = (*l).max(end - *s),
            _ => out.push((start, len)),
        }
    }
    out
}

/// Clean pages between two dirty runs that a diff writes rather than
/// start a new run. A resume maps each run with its own `mmap` (about
/// 5 µs with its later `munmap`, on the latency path of a wake) and a
/// suspend writes each with its own `pwrite`, while one more 4 KiB page
/// costs a suspend well under a microsecond to copy: joining runs across
/// gaps up to 64 KiB cuts a resume's mappings several-fold for a few
/// percent more bytes written.
pub const DIFF_JOIN_GAP: u64 = 16;

/// Joins sorted `runs` whose gap is at most `gap` pages. The gap pages
/// are then saved too: harmless, as a diff may hold any page of the
/// guest, changed or not.
///
/// ```
/// use vmm::snapshot::memory::join_gaps;
/// assert_eq!(join_gaps(vec![(0, 1), (3, 1), (10, 2)], 2), vec![(0, 4), (10, 2)]);
/// assert_eq!(join_gaps(vec![(0, 1), (3, 1)], 0), vec![(0, 1), (3, 1)]);
/// ```
pub fn join_gaps(runs: Vec<(u64, u64)>, gap: u64) -> Vec<(u64, u64)> {
    let mut joined: Vec<(u64, u64)> = Vec::with_capacity(runs.len());
    for (start, len) in runs {
        match joined.last_mut() {
            Some((s, l)) if start <= (*s + *l).saturating_add(gap) => {
                *l = (start + len).max(*s + *l) - *s;
            }
            _ => joined.push((start, len)),
        }
    }
    joined
}

/// Joins sorted `runs` across the smallest gaps until at most `max` remain
/// (see [`join_gaps`]).
pub fn bound_runs(mut runs: Vec<(u64, u64)>, max: usize) -> Vec<(u64, u64)> {
    let mut gap = 1u64;
    while runs.len() > max.max(1) {
        runs = join_gaps(runs, gap);
        gap = gap.saturating_mul(2);
    }
    runs
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
        for_each_span(mem, page, count, |host, len, at| {
            // SAFETY: `for_each_span` gives a span inside one live region
            // mapping; the VM is paused and the loop is this thread, so
            // nothing writes these bytes while they are read.
            let bytes = unsafe { std::slice::from_raw_parts(host.cast_const(), len) };
            file.write_all_at(bytes, offset + at * PAGE_SIZE)
                .map_err(Error::Write)?;
            written += len as u64;
            Ok(())
        })?;
    }
    Ok(written)
}

/// Maps the pages in `runs` of `file` (image at `offset`) over `mem`,
/// private copy-on-write like the base image under them: a resume costs
/// one mapping per run, whatever the pages hold, and reads them lazily
/// from the page cache.
///
/// Pages mapped this way are file pages to `/proc/self/pagemap` until the
/// guest writes them, so the next diff must add `runs` to
/// [`dirty_pages`]'s (see [`union_runs`]).
pub fn map_runs(
    mem: &GuestMemoryMmap,
    runs: &[(u64, u64)],
    file: &File,
    offset: u64,
) -> Result<(), Error> {
    if runs.len() > MAX_DIFF_RUNS {
        return Err(Error::Layout("diff run count"));
    }
    let file_len = file.metadata().map_err(Error::MapRun)?.len();
    for &(page, count) in runs {
        for_each_span(mem, page, count, |host, len, at| {
            let start = offset + at * PAGE_SIZE;
            if start
                .checked_add(len as u64)
                .is_none_or(|end| end > file_len)
            {
                return Err(Error::Layout("dirty run past the end of the file"));
            }
            let start = libc::off_t::try_from(start).map_err(|_| Error::Layout("dirty run"))?;
            // SAFETY: `[host, host + len)` lies inside one live region
            // mapping owned by `mem` (checked by `for_each_span`), which
            // MAP_FIXED replaces with the file's pages in place; no vCPU
            // runs yet during a restore, and `mem` unmaps the whole region,
            // these pages included, when it is dropped. The file range was
            // checked to exist, so reading the pages cannot fault.
            let mapped = unsafe {
                libc::mmap(
                    host.cast(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                    file.as_raw_fd(),
                    start,
                )
            };
            if mapped == libc::MAP_FAILED {
                return Err(Error::MapRun(std::io::Error::last_os_error()));
            }
            Ok(())
        })?;
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
        map_runs(&fresh, &runs, &diff, 0).expect("overlay");
        let mut got = [0u8; 1];
        fresh
            .read_slice(&mut got, GuestAddress(40 * PAGE_SIZE + 9))
            .expect("read");
        assert_eq!(got, [3]);
        fresh.read_slice(&mut got, GuestAddress(0)).expect("read");
        assert_eq!(got, [7], "untouched pages still come from the base");
        assert!(
            map_runs(&fresh, &[(63, 2)], &diff, 0).is_err(),
            "past the image"
        );
        assert!(
            map_runs(&fresh, &[(3, 1)], &diff, 64 * PAGE_SIZE).is_err(),
            "past the end of the file"
        );

        // The mapped pages are the file's until written: pagemap misses
        // them, so the next diff adds the runs mapped at its resume.
        fresh
            .write_slice(&[4], GuestAddress(20 * PAGE_SIZE))
            .expect("write");
        let seen = dirty_pages(&fresh).expect("pagemap");
        assert_eq!(seen, vec![(20, 1)]);
        assert_eq!(union_runs(&seen, &runs), vec![(5, 2), (20, 1), (40, 1)]);
        let mut on_disk = [0u8; 1];
        diff.read_exact_at(&mut on_disk, 40 * PAGE_SIZE + 9)
            .expect("read");
        fresh
            .write_slice(&[9], GuestAddress(40 * PAGE_SIZE + 9))
            .expect("write");
        let mut still = [0u8; 1];
        diff.read_exact_at(&mut still, 40 * PAGE_SIZE + 9)
            .expect("read");
        assert_eq!(
            (on_disk, still),
            ([3], [3]),
            "the diff file is never written"
        );
    }

    #[test]
    fn runs_join_and_split_at_region_edges() {
        assert_eq!(
            union_runs(&[(0, 2), (10, 1)], &[(1, 3), (4, 1), (9, 1), (20, 0)]),
            vec![(0, 5), (9, 2)]
        );
        let runs = vec![(0, 1), (2, 1), (4, 1), (10, 1), (30, 2)];
        assert_eq!(bound_runs(runs.clone(), 10), runs);
        assert_eq!(bound_runs(runs.clone(), 3), vec![(0, 5), (10, 1), (30, 2)]);
        assert_eq!(bound_runs(runs, 1), vec![(0, 32)]);

        // Two regions; a run over the edge is written as two spans.
        let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 4 * 4096),
            (GuestAddress(1 << 20), 4 * 4096),
        ])
        .expect("mmap");
        mem.write_slice(&[1], GuestAddress(3 * PAGE_SIZE))
            .expect("write");
        mem.write_slice(&[2], GuestAddress(1 << 20)).expect("write");
        let file = tempfile::tempfile().expect("tempfile");
        file.set_len(8 * PAGE_SIZE).expect("len");
        assert_eq!(
            write_runs(&mem, &[(3, 2)], &file, 0).expect("write"),
            2 * PAGE_SIZE
        );
        let mut b = [0u8; 1];
        file.read_exact_at(&mut b, 4 * PAGE_SIZE).expect("read");
        assert_eq!(b, [2]);
        assert!(
            write_runs(&mem, &[(7, 2)], &file, 0).is_err(),
            "past the image"
        );
        assert!(write_runs(&mem, &[(2, 0)], &file, 0).is_err(), "empty");
    }
}
