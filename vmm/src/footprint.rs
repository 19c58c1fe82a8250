//! Keeps an idle VMM process small.
//!
//! A host runs thousands of idle VMMs, so every private page a VMM keeps
//! after start-up is paid thousands of times. Restoring a guest touches a
//! deep main-thread stack (KVM state structures are large and move by value
//! while they are decoded) and leaves freed heap chunks behind; neither is
//! needed once the vCPUs run. [`release_startup_memory`] hands both back to
//! the kernel. It runs after the vCPUs are started, off the restore path.

use std::io::{BufRead, BufReader};

/// Why the start-up memory could not be released (only ever logged).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `/proc/self/maps` could not be read.
    #[error("cannot read /proc/self/maps")]
    Maps(#[source] std::io::Error),
    /// The current stack pointer is in no mapping listed in `/proc/self/maps`.
    #[error("the current stack is not in /proc/self/maps")]
    NoStack,
    /// `madvise(MADV_DONTNEED)` on the unused stack failed.
    #[error("madvise on the unused stack failed")]
    Madvise(#[source] std::io::Error),
}

/// Space left untouched below the caller's frame: the frames of the calls
/// made from here (and a signal handler that might run meanwhile) live there.
const STACK_MARGIN: usize = 16 << 10;

const PAGE: usize = 4096;

/// Returns the heap's free pages and the unused part of the calling
/// thread's stack to the kernel. Call it from the thread that built the VM,
/// once the VM runs; returns the bytes of stack address space advised away.
pub fn release_startup_memory() -> Result<usize, Error> {
    // SAFETY: malloc_trim only returns free heap memory to the kernel; it
    // touches no memory in use and is safe to call at any time.
    unsafe { libc::malloc_trim(0) };
    release_unused_stack()
}

/// `MADV_DONTNEED` on the pages of the current stack mapping that lie more
/// than [`STACK_MARGIN`] below this frame.
fn release_unused_stack() -> Result<usize, Error> {
    let marker = 0u8;
    let here = std::hint::black_box(&marker) as *const u8 as usize;
    let start = mapping_start(here)?.ok_or(Error::NoStack)?;
    let top = here.saturating_sub(STACK_MARGIN) & !(PAGE - 1);
    if top <= start {
        return Ok(0);
    }
    let len = top - start;
    // SAFETY: [start, top) is the low part of this thread's own stack
    // mapping, more than STACK_MARGIN below the live frame: the stack grows
    // down, so nothing there is in use (the frames of madvise itself and of
    // any signal handler are within the margin). MADV_DONTNEED on private
    // anonymous memory only drops the pages; a later touch gets zero pages.
    let rc = unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_DONTNEED) };
    if rc != 0 {
        return Err(Error::Madvise(std::io::Error::last_os_error()));
    }
    Ok(len)
}

/// The start of the mapping in `/proc/self/maps` that holds `addr`.
fn mapping_start(addr: usize) -> Result<Option<usize>, Error> {
    let maps = std::fs::File::open("/proc/self/maps").map_err(Error::Maps)?;
    for line in BufReader::new(maps).lines() {
        let line = line.map_err(Error::Maps)?;
        if let Some((start, end)) = parse_range(&line) {
            if (start..end).contains(&addr) {
                return Ok(Some(start));
            }
        }
    }
    Ok(None)
}

/// Parses the `start-end` field of a `/proc/<pid>/maps` line.
fn parse_range(line: &str) -> Option<(usize, usize)> {
    let (start, end) = line.split_whitespace().next()?.split_once('-')?;
    Some((
        usize::from_str_radix(start, 16).ok()?,
        usize::from_str_radix(end, 16).ok()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_maps_ranges() {
        assert_eq!(
            parse_range("7ffe9ef6f000-7ffe9ef90000 rw-p 00000000 00:00 0   [stack]"),
            Some((0x7ffe_9ef6_f000, 0x7ffe_9ef9_0000))
        );
        assert_eq!(parse_range("garbage"), None);
        assert_eq!(parse_range("zz-10 r--p"), None);
    }

    #[inline(never)]
    fn deep(n: u8) -> u8 {
        let buf = std::hint::black_box([n; 8192]);
        if n == 0 {
            buf[0]
        } else {
            deep(n - 1).wrapping_add(buf[1])
        }
    }

    #[test]
    fn releases_a_deep_stack_and_keeps_the_live_frames() {
        // Runs on a thread of its own so that the stack is a plain mapping
        // this test owns; 32 frames of 8 KiB leave ~256 KiB to release.
        std::thread::Builder::new()
            .stack_size(1 << 20)
            .spawn(|| {
                let live = std::hint::black_box([7u8; 1024]);
                let _ = deep(32);
                let released = release_unused_stack().expect("release");
                assert!(released >= 128 << 10, "released only {released} bytes");
                // The live frame is intact and the stack still works.
                assert!(live.iter().all(|&b| b == 7));
                assert_eq!(deep(16), deep(16));
            })
            .expect("spawn")
            .join()
            .expect("the test thread");
    }
}
