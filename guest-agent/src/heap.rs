//! The global allocator: a bump allocator over a static, zero-filled
//! arena.
//!
//! The agent allocates a few kilobytes at boot (configuration, argv, env)
//! and then mostly nothing, so freeing is only done for the most recent
//! block (which makes `Vec` growth cheap). The arena lives in `.bss`: pages
//! the agent never touches cost nothing, which matters where each first
//! touch of a page costs milliseconds. For the same reason
//! `alloc_zeroed` skips zeroing memory that was never handed out.

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;
use core::ptr;
use core::sync::atomic::{AtomicUsize, Ordering};

const ARENA_LEN: usize = 4 << 20;

#[repr(C, align(4096))]
struct Arena(UnsafeCell<[u8; ARENA_LEN]>);

// SAFETY: the arena's bytes are only reached through pointers handed out
// by `Bump`, each to one owner; the agent has a single thread (the vfork
// child, which shares memory, does not allocate).
unsafe impl Sync for Arena {}

static ARENA: Arena = Arena(UnsafeCell::new([0; ARENA_LEN]));

/// Bump allocator over [`ARENA`]. `next` is the offset of the first free
/// byte, `high` the largest `next` ever reached: bytes at or past `high`
/// are still zero.
pub struct Bump {
    next: AtomicUsize,
    high: AtomicUsize,
}

impl Bump {
    /// An empty allocator.
    pub const fn new() -> Self {
        Self {
            next: AtomicUsize::new(0),
            high: AtomicUsize::new(0),
        }
    }

    fn base() -> usize {
        ARENA.0.get() as usize
    }

    /// Reserves `layout` and returns its offset in the arena.
    fn reserve(&self, layout: Layout) -> Option<usize> {
        let base = Self::base();
        let next = self.next.load(Ordering::Relaxed);
        // Align the address, not the offset: the arena is page aligned,
        // but stating it this way does not depend on that.
        let start = (base + next).checked_next_multiple_of(layout.align())? - base;
        let end = start.checked_add(layout.size())?;
        if end > ARENA_LEN {
            return None;
        }
        self.next.store(end, Ordering::Relaxed);
        self.high.fetch_max(end, Ordering::Relaxed);
        Some(start)
    }
}

impl Default for Bump {
    fn default() -> Self {
        Self::new()
    }
}

// SAFETY: `reserve` hands out disjoint ranges inside the arena, aligned as
// asked; a range is only reused after `dealloc` of the block that ends at
// `next`, i.e. after its owner gave it back.
unsafe impl GlobalAlloc for Bump {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match self.reserve(layout) {
            // SAFETY: start + size <= ARENA_LEN, so the pointer stays in
            // the arena.
            Some(start) => unsafe { ARENA.0.get().cast::<u8>().add(start) },
            None => ptr::null_mut(),
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let high = self.high.load(Ordering::Relaxed);
        let Some(start) = self.reserve(layout) else {
            return ptr::null_mut();
        };
        // SAFETY: start + size <= ARENA_LEN.
        let p = unsafe { ARENA.0.get().cast::<u8>().add(start) };
        // Bytes at or past the old high-water mark were never handed out
        // and are still the zeroes of .bss.
        let dirty = high.saturating_sub(start).min(layout.size());
        // SAFETY: p..p+dirty lies inside the block just reserved.
        unsafe { ptr::write_bytes(p, 0, dirty) };
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let end = ptr as usize - Self::base() + layout.size();
        if end == self.next.load(Ordering::Relaxed) {
            self.next
                .store(ptr as usize - Self::base(), Ordering::Relaxed);
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let start = ptr as usize - Self::base();
        // The last block grows or shrinks in place.
        if start + layout.size() == self.next.load(Ordering::Relaxed) {
            if let Some(end) = start.checked_add(new_size).filter(|&e| e <= ARENA_LEN) {
                self.next.store(end, Ordering::Relaxed);
                self.high.fetch_max(end, Ordering::Relaxed);
                return ptr;
            }
            return ptr::null_mut();
        }
        let Ok(new_layout) = Layout::from_size_align(new_size, layout.align()) else {
            return ptr::null_mut();
        };
        // SAFETY: new_layout has a non-zero size (GlobalAlloc's realloc
        // contract) and the alignment of a valid layout.
        let new = unsafe { self.alloc(new_layout) };
        if !new.is_null() {
            // SAFETY: both blocks are live, distinct, and at least
            // min(old, new) bytes long.
            unsafe { ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size)) };
        }
        new
    }
}
