//! [`Malloc`], the C library's allocator as Rust's global allocator, with over-aligned
//! layouts served by `malloc` too.
//!
//! Rust's `System` allocator hands any layout aligned beyond `malloc`'s own 16 bytes (or
//! beyond its own size) to `posix_memalign`. tokio aligns each task and each socket registration to a cache line
//! (128 bytes on x86-64), so the balancer makes two such allocations for every connection.
//! glibc 2.36 serves them through `_int_memalign`, past the per-thread cache: it takes a
//! chunk big enough to cut an aligned one from, splits off the lead and the tail, and
//! frees both, mostly into the shared bins, where the fragments slow the allocations that
//! follow.
//! Here such a layout gets `align` bytes more from plain `malloc` instead, rounded up to
//! its alignment, with the pointer `malloc` returned kept in the word just below the block
//! for `free`. The cost is up to `align` bytes per block; `malloc_trim` and the rest of the
//! C library's behaviour are unchanged.

use std::alloc::{GlobalAlloc, Layout};
use std::mem;
use std::ptr;

/// The alignment the C library's own `malloc` gives every block of at least this size
/// (glibc's `MALLOC_ALIGNMENT` and musl's unit: two words, or more on some 32-bit targets,
/// which only makes this value conservative). Smaller blocks are not counted on: an
/// allocator preloaded in glibc's place may align them less, so a layout smaller than its
/// alignment goes to `posix_memalign`, as `System` sends it.
const MALLOC_ALIGN: usize = 2 * mem::size_of::<usize>();

/// The largest alignment padded inside a `malloc` block. Larger ones (pages) are rare and
/// would waste a page each, so they still go to `posix_memalign`.
const MAX_PADDED_ALIGN: usize = 256;

/// The C library's `malloc` as the global allocator, with small over-alignments (up to 256
/// bytes) padded within a `malloc` block rather than served by `posix_memalign`. Install it
/// with `#[global_allocator]`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Malloc;

/// How a layout's memory is obtained. Whether a block is padded depends on its alignment
/// alone, and the other two kinds are both given back with plain `free`, so `dealloc` and
/// `realloc`, given the same alignment, always find the block `alloc` made.
enum Kind {
    /// `malloc` aligns it already.
    Plain,
    /// Padded inside a larger `malloc` block.
    Padded,
    /// `posix_memalign`: large alignments, and layouts smaller than their alignment.
    Aligned,
}

fn kind(align: usize, size: usize) -> Kind {
    if align <= MALLOC_ALIGN {
        if align <= size {
            Kind::Plain
        } else {
            Kind::Aligned
        }
    } else if align <= MAX_PADDED_ALIGN {
        Kind::Padded
    } else {
        Kind::Aligned
    }
}

/// Allocates `layout` (alignment over [`MALLOC_ALIGN`], at most [`MAX_PADDED_ALIGN`]) inside a
/// `malloc` block of `size + align` bytes.
///
/// The block starts `MALLOC_ALIGN`-aligned, so the first `align`-aligned address strictly
/// after its start is between `MALLOC_ALIGN` and `align` bytes in: there is room below it for
/// the word that records the block's start, and `size` bytes fit after it.
///
/// # Safety
/// As for [`GlobalAlloc::alloc`].
unsafe fn padded_alloc(layout: Layout) -> *mut u8 {
    let align = layout.align();
    let Some(total) = layout.size().checked_add(align) else {
        return ptr::null_mut();
    };
    // SAFETY: malloc takes any size and returns null or a block of at least `total` bytes.
    let block = unsafe { libc::malloc(total) }.cast::<u8>();
    if block.is_null() {
        return block;
    }
    let offset = align - (block.addr() & (align - 1));
    // SAFETY: `offset` is at most `align`, so `start` and the `size` bytes after it lie within
    // the block; it is at least MALLOC_ALIGN (block and align are both multiples of it), so
    // the word below `start` lies within the block too, and is word-aligned because `start`
    // is.
    unsafe {
        let start = block.add(offset);
        start.cast::<*mut u8>().sub(1).write(block);
        start
    }
}

/// The `malloc` block that holds a block [`padded_alloc`] returned.
///
/// # Safety
/// `start` was returned by [`padded_alloc`] and not yet freed.
unsafe fn padded_block(start: *mut u8) -> *mut libc::c_void {
    // SAFETY: padded_alloc wrote the block's start in the word below `start`.
    unsafe { start.cast::<*mut u8>().sub(1).read() }.cast()
}

// SAFETY: every block comes from the C library's allocator, which is thread-safe, and is
// at least as large and as aligned as its layout asks (see `padded_alloc`); `dealloc` and
// `realloc` find the block's kind from the same layout, so each block goes back the way it
// was taken.
unsafe impl GlobalAlloc for Malloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match kind(layout.align(), layout.size()) {
            // SAFETY: malloc takes any size.
            Kind::Plain => unsafe { libc::malloc(layout.size()) }.cast(),
            // SAFETY: the caller keeps GlobalAlloc::alloc's contract, as padded_alloc asks.
            Kind::Padded => unsafe { padded_alloc(layout) },
            Kind::Aligned => {
                let mut block = ptr::null_mut();
                // posix_memalign wants a power of two (Layout guarantees one) that is a
                // multiple of the word size.
                let align = layout.align().max(mem::size_of::<usize>());
                // SAFETY: `block` is a valid place for the result, and `align` is as above.
                let failed = unsafe { libc::posix_memalign(&mut block, align, layout.size()) };
                if failed == 0 {
                    block.cast()
                } else {
                    ptr::null_mut()
                }
            }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if let Kind::Plain = kind(layout.align(), layout.size()) {
            // SAFETY: calloc takes any count and size.
            return unsafe { libc::calloc(layout.size(), 1) }.cast();
        }
        // SAFETY: the caller keeps alloc_zeroed's contract, which is alloc's.
        let start = unsafe { self.alloc(layout) };
        if !start.is_null() {
            // SAFETY: `start` holds `layout.size()` writable bytes.
            unsafe { ptr::write_bytes(start, 0, layout.size()) };
        }
        start
    }

    unsafe fn dealloc(&self, start: *mut u8, layout: Layout) {
        let block = match kind(layout.align(), layout.size()) {
            Kind::Plain | Kind::Aligned => start.cast(),
            // SAFETY: a layout of this kind was allocated by padded_alloc (the caller passes
            // the layout it allocated with).
            Kind::Padded => unsafe { padded_block(start) },
        };
        // SAFETY: `block` is what malloc or posix_memalign returned, freed once.
        unsafe { libc::free(block) }
    }

    unsafe fn realloc(&self, start: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if let Kind::Plain = kind(layout.align(), new_size) {
            // SAFETY: `start` came from malloc, calloc, realloc or posix_memalign (the
            // alignment is at most MALLOC_ALIGN, so it was not padded), any of which realloc
            // takes; it is not used again if realloc moves it. The new block, at least
            // MALLOC_ALIGN bytes long, is aligned enough.
            return unsafe { libc::realloc(start.cast(), new_size) }.cast();
        }
        // SAFETY: the caller guarantees the new size, rounded up to the alignment, does not
        // overflow isize, which is all Layout checks.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: as for alloc; the new layout is non-zero in size (realloc's contract).
        let moved = unsafe { self.alloc(new_layout) };
        if !moved.is_null() {
            // SAFETY: both blocks hold at least the smaller size, and they are distinct
            // allocations, so they do not overlap; the old one is freed with its own layout.
            unsafe {
                ptr::copy_nonoverlapping(start, moved, layout.size().min(new_size));
                self.dealloc(start, layout);
            }
        }
        moved
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Alignments of every kind: plain (or `posix_memalign`'s, for the sizes below 16),
    /// padded (up to the limit) and `posix_memalign`'s; with the sizes, blocks change kind
    /// as they grow and shrink.
    const ALIGNS: [usize; 10] = [1, 8, 16, 32, 64, 128, 256, 512, 4096, 16384];
    const SIZES: [usize; 7] = [1, 7, 16, 100, 1000, 5000, 70_000];

    fn layout(size: usize, align: usize) -> Layout {
        Layout::from_size_align(size, align).expect("a valid layout")
    }

    /// # Safety
    /// `start` holds at least `len` writable bytes.
    unsafe fn fill(start: *mut u8, len: usize, seed: u8) {
        for i in 0..len {
            // SAFETY: `start` holds at least `len` bytes.
            unsafe { start.add(i).write(seed.wrapping_add(i as u8)) };
        }
    }

    /// # Safety
    /// `start` holds at least `len` initialised bytes.
    unsafe fn holds(start: *const u8, len: usize, seed: u8) -> bool {
        // SAFETY: `start` holds at least `len` initialised bytes.
        (0..len).all(|i| unsafe { start.add(i).read() } == seed.wrapping_add(i as u8))
    }

    #[test]
    fn every_block_is_aligned_and_keeps_its_bytes_through_growing_and_shrinking() {
        for align in ALIGNS {
            for size in SIZES {
                let first = layout(size, align);
                // SAFETY: a non-zero layout; each block is freed once with its layout.
                unsafe {
                    let start = Malloc.alloc(first);
                    assert!(!start.is_null(), "{size} bytes at {align}");
                    assert_eq!(start as usize % align, 0, "{size} bytes at {align}");
                    fill(start, size, 3);
                    let grown = Malloc.realloc(start, first, size * 3);
                    assert!(!grown.is_null(), "grown {size} bytes at {align}");
                    assert_eq!(grown as usize % align, 0, "grown {size} bytes at {align}");
                    assert!(holds(grown, size, 3), "grown {size} bytes at {align}");
                    fill(grown, size * 3, 5);
                    let shrunk = Malloc.realloc(grown, layout(size * 3, align), size.div_ceil(2));
                    assert!(!shrunk.is_null(), "shrunk {size} bytes at {align}");
                    assert_eq!(shrunk as usize % align, 0, "shrunk {size} bytes at {align}");
                    assert!(
                        holds(shrunk, size.div_ceil(2), 5),
                        "shrunk {size} bytes at {align}"
                    );
                    Malloc.dealloc(shrunk, layout(size.div_ceil(2), align));
                }
            }
        }
    }

    #[test]
    fn zeroed_blocks_are_zero_even_where_a_freed_block_was_written() {
        for align in ALIGNS {
            for size in SIZES {
                let layout = layout(size, align);
                // SAFETY: a non-zero layout; each block is freed once with its layout.
                unsafe {
                    // Leave written memory behind for the zeroed block to be cut from.
                    let dirty = Malloc.alloc(layout);
                    assert!(!dirty.is_null(), "{size} bytes at {align}");
                    ptr::write_bytes(dirty, 0xa5, size);
                    Malloc.dealloc(dirty, layout);
                    let start = Malloc.alloc_zeroed(layout);
                    assert!(!start.is_null(), "{size} bytes at {align}");
                    assert_eq!(start as usize % align, 0, "{size} bytes at {align}");
                    assert!(
                        (0..size).all(|i| start.add(i).read() == 0),
                        "{size} bytes at {align}"
                    );
                    Malloc.dealloc(start, layout);
                }
            }
        }
    }

    #[test]
    fn many_live_blocks_of_mixed_alignments_do_not_overlap() {
        let blocks: Vec<(*mut u8, Layout)> = (0..2000)
            .map(|i| {
                let layout = layout(1 + (i * 37) % 700, ALIGNS[i % ALIGNS.len()]);
                // SAFETY: a non-zero layout.
                let start = unsafe { Malloc.alloc(layout) };
                assert!(!start.is_null());
                // SAFETY: the block holds `layout.size()` bytes.
                unsafe { fill(start, layout.size(), i as u8) };
                (start, layout)
            })
            .collect();
        for (i, (start, layout)) in blocks.iter().enumerate() {
            // SAFETY: every block was filled whole and is still live.
            let kept = unsafe { holds(*start, layout.size(), i as u8) };
            assert!(kept, "block {i} was overwritten");
        }
        for (start, layout) in blocks {
            // SAFETY: each block is freed once, with the layout it was allocated with.
            unsafe { Malloc.dealloc(start, layout) };
        }
    }

    #[test]
    fn a_block_malloc_cannot_give_is_null() {
        let layout = layout(isize::MAX as usize - 255, 128);
        // SAFETY: a non-zero layout; a null result is not freed.
        assert!(unsafe { Malloc.alloc(layout) }.is_null());
    }
}
