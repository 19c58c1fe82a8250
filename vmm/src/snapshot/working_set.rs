//! Working-set prefetch: which guest pages a restored guest touched while
//! serving its first request, stored next to the snapshot, and mapped in
//! ahead of use on later restores so the guest does not fault them in one
//! at a time.
//!
//! Recording reads `/proc/self/pagemap`: a page of the guest mapping that is
//! present in the VMM's page tables was touched (read or written) since the
//! restore. Prefetching asks the kernel to read those pages ahead
//! (`MADV_WILLNEED`, asynchronous) or to map them right away
//! (`MADV_POPULATE_READ`, read-only and still shared through the page cache;
//! a guest write later copies as usual).

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress};

use super::format::PAGE_SIZE;

const MAGIC: [u8; 8] = *b"LTLWSET\0";
const VERSION: u32 = 1;
/// Most page ranges a working-set file may hold.
pub const MAX_RANGES: usize = 1 << 20;
const PAGEMAP_PRESENT: u64 = 1 << 63;

/// Errors of working-set files and prefetching.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading the page map or the file failed.
    #[error("working set I/O failed")]
    Io(#[from] std::io::Error),
    /// The file is not a working set, damaged, or too large.
    #[error("working set file is invalid: {0}")]
    Invalid(&'static str),
    /// Guest memory could not be addressed.
    #[error("guest memory region is not mapped")]
    Memory(#[source] vm_memory::GuestMemoryError),
}

/// Page ranges `[start, start + len)` in pages, as offsets into the
/// snapshot's memory image (regions back to back).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkingSet {
    /// Sorted, non-overlapping (first page, page count) runs.
    pub ranges: Vec<(u64, u64)>,
    /// The madvise advice used to prefetch.
    pub advice: libc::c_int,
}

impl Default for WorkingSet {
    fn default() -> Self {
        Self {
            ranges: Vec::new(),
            advice: Self::advice_from_env(),
        }
    }
}

impl WorkingSet {
    /// `LITTLE_PREFETCH=populate|willneed` (default willneed: asynchronous
    /// readahead into the page cache, which does not hold up the guest's own
    /// faults the way a synchronous populate does).
    fn advice_from_env() -> libc::c_int {
        match std::env::var("LITTLE_PREFETCH").as_deref() {
            Ok("populate") => libc::MADV_POPULATE_READ,
            _ => libc::MADV_WILLNEED,
        }
    }

    /// Pages in the set.
    pub fn pages(&self) -> u64 {
        self.ranges.iter().map(|r| r.1).sum()
    }

    /// Records the pages of `mem` present in this process's page tables.
    pub fn record(mem: &GuestMemoryMmap) -> Result<Self, Error> {
        let pagemap = File::open("/proc/self/pagemap")?;
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        let mut image_page = 0u64;
        let mut entries = vec![0u8; 8 * 512];
        for region in mem.iter() {
            let host = region
                .get_host_address(MemoryRegionAddress(0))
                .map_err(Error::Memory)? as u64;
            let pages = region.len() / PAGE_SIZE;
            let mut done = 0u64;
            while done < pages {
                let n = (pages - done).min(512);
                let bytes = usize::try_from(n * 8).map_err(|_| Error::Invalid("region"))?;
                let offset = (host / PAGE_SIZE + done) * 8;
                pagemap.read_exact_at(&mut entries[..bytes], offset)?;
                for (i, e) in entries[..bytes].chunks_exact(8).enumerate() {
                    let mut word = [0u8; 8];
                    word.copy_from_slice(e);
                    if u64::from_le_bytes(word) & PAGEMAP_PRESENT == 0 {
                        continue;
                    }
                    let page = image_page + done + i as u64;
                    match ranges.last_mut() {
                        Some((start, len)) if *start + *len == page => *len += 1,
                        _ => ranges.push((page, 1)),
                    }
                }
                done += n;
            }
            image_page += pages;
        }
        Ok(Self {
            ranges,
            ..Self::default()
        })
    }

    /// Writes the set to `path` (magic, version, count, runs, CRC).
    pub fn save(&self, path: &Path) -> Result<(), Error> {
        let mut body = Vec::with_capacity(16 + self.ranges.len() * 16);
        body.extend_from_slice(&MAGIC);
        body.extend_from_slice(&VERSION.to_le_bytes());
        let count =
            u32::try_from(self.ranges.len()).map_err(|_| Error::Invalid("too many ranges"))?;
        body.extend_from_slice(&count.to_le_bytes());
        for (start, len) in &self.ranges {
            body.extend_from_slice(&start.to_le_bytes());
            body.extend_from_slice(&len.to_le_bytes());
        }
        let crc = crc32fast::hash(&body);
        body.extend_from_slice(&crc.to_le_bytes());
        let tmp = path.with_extension("ws-partial");
        // Owner-only like the snapshot it describes.
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?
            .write_all(&body)?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    }

    /// Reads and checks a set written by [`save`](Self::save).
    pub fn load(path: &Path) -> Result<Self, Error> {
        let mut body = Vec::new();
        File::open(path)?
            .take((MAX_RANGES as u64) * 16 + 20)
            .read_to_end(&mut body)?;
        if body.len() < 20 || body[..8] != MAGIC {
            return Err(Error::Invalid("bad magic"));
        }
        let (data, crc) = body.split_at(body.len() - 4);
        if crc32fast::hash(data).to_le_bytes() != crc {
            return Err(Error::Invalid("checksum mismatch"));
        }
        let word32 =
            |o: usize| u32::from_le_bytes([data[o], data[o + 1], data[o + 2], data[o + 3]]);
        if word32(8) != VERSION {
            return Err(Error::Invalid("unsupported version"));
        }
        let count = usize::try_from(word32(12)).map_err(|_| Error::Invalid("count"))?;
        if count > MAX_RANGES || data.len() != 16 + count * 16 {
            return Err(Error::Invalid("length does not match its count"));
        }
        let word64 = |o: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&data[o..o + 8]);
            u64::from_le_bytes(w)
        };
        let ranges = (0..count)
            .map(|i| (word64(16 + i * 16), word64(24 + i * 16)))
            .collect();
        Ok(Self {
            ranges,
            ..Self::default()
        })
    }

    /// Maps the set's pages of `mem` ahead of use; returns pages prefetched.
    /// Ranges outside `mem` are ignored (a set from another snapshot).
    pub fn prefetch(&self, mem: &GuestMemoryMmap) -> u64 {
        let mut regions = Vec::new();
        let mut first_page = 0u64;
        for region in mem.iter() {
            if let Ok(host) = region.get_host_address(MemoryRegionAddress(0)) {
                let pages = region.len() / PAGE_SIZE;
                regions.push((first_page, pages, host));
                first_page += pages;
            }
        }
        let mut done = 0;
        for &(start, len) in &self.ranges {
            for &(first, pages, host) in &regions {
                let lo = start.max(first);
                let hi = start.saturating_add(len).min(first + pages);
                if lo >= hi {
                    continue;
                }
                let offset = usize::try_from((lo - first) * PAGE_SIZE).unwrap_or(usize::MAX);
                let bytes = usize::try_from((hi - lo) * PAGE_SIZE).unwrap_or(0);
                // `offset + bytes` lies within the region: lo..hi is clamped to it.
                let addr = host.wrapping_add(offset);
                if advise(addr, bytes, self.advice) {
                    done += hi - lo;
                }
            }
        }
        done
    }
}

/// `madvise` on part of a guest memory mapping; false if the kernel refused.
fn advise(addr: *mut u8, len: usize, advice: libc::c_int) -> bool {
    // SAFETY: `addr..addr + len` lies inside a live guest memory mapping
    // (clamped to its region by the caller); MADV_POPULATE_READ and
    // MADV_WILLNEED only fault in or read ahead pages, they never change
    // their contents or the mapping.
    unsafe { libc::madvise(addr.cast(), len, advice) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn records_touched_pages_and_round_trips() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("mmap");
        mem.write_slice(&[1], GuestAddress(0x3000)).expect("touch");
        mem.write_slice(&[1], GuestAddress(0x4000)).expect("touch");
        mem.write_slice(&[1], GuestAddress(0x9000)).expect("touch");
        let ws = WorkingSet::record(&mem).expect("pagemap readable");
        assert_eq!(
            ws.ranges,
            vec![(3, 2), (9, 1)],
            "untouched anonymous pages are absent"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("app.ws");
        ws.save(&path).expect("save");
        assert_eq!(WorkingSet::load(&path).expect("load"), ws);
        let mode = std::fs::metadata(&path).expect("saved").permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o077,
            0,
            "owner-only"
        );
        let fresh: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("mmap");
        assert_eq!(ws.prefetch(&fresh), 3);
    }

    #[test]
    fn damaged_files_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("app.ws");
        WorkingSet {
            ranges: vec![(1, 2)],
            ..WorkingSet::default()
        }
        .save(&path)
        .expect("save");
        let good = std::fs::read(&path).expect("read");
        for (i, expect) in [(0, "bad magic"), (20, "checksum"), (8, "checksum")] {
            let mut bad = good.clone();
            bad[i] ^= 0xff;
            std::fs::write(&path, &bad).expect("write");
            let e = WorkingSet::load(&path).expect_err("damaged");
            assert!(e.to_string().contains(expect), "{i}: {e}");
        }
        std::fs::write(&path, &good[..10]).expect("write");
        assert!(WorkingSet::load(&path).is_err());
    }

    #[test]
    fn ranges_outside_memory_are_ignored() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 16)]).expect("mmap");
        let ws = WorkingSet {
            ranges: vec![(14, 10), (1 << 40, 5)],
            ..WorkingSet::default()
        };
        assert_eq!(ws.prefetch(&mem), 2, "only pages 14 and 15 exist");
    }
}
