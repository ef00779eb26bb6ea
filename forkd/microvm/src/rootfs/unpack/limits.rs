//! What unpacking an image may cost, so that a small crafted layer cannot exhaust the
//! builder's memory or disk: a bound on the bytes the layers decompress to, a cost for every
//! entry beyond its contents, and a bound on the number of entries.
//!
//! **Entries.** Every entry costs [`ENTRY_COST`] against the size limit, which bounds a
//! flood of empty files; a directory, or a symlink whose target is [`FAST_SYMLINK`] bytes or
//! more, takes a block of its own on ext4 and costs [`BLOCK_COST`]. An image may hold at most
//! [`DEFAULT_MAX_ENTRIES`] entries (all layers together, whiteouts included), which bounds the
//! inodes the disk needs whatever their cost.
//!
//! tar reads the whole data of a PAX (`x`, `g`) or GNU long-name (`L`, `K`) header into
//! memory, and none of it is a file's contents; a few-KB zstd layer can declare a 20 GB one.
//! So the decompressed stream of every layer is counted as tar reads it, all layers
//! together, against the same limit as the unpacked size: past it, the read fails and the
//! layer is refused. One header can thus take at most that much memory, and the image's
//! decompressed size is bounded too (trailing padding included).

use std::cell::Cell;
use std::io::{self, Read};
use std::rc::Rc;

/// What an entry costs beyond its contents, against the size limit.
pub(crate) const ENTRY_COST: u64 = 512;

/// What a directory or a long symlink costs: a block of its own on ext4.
pub(super) const BLOCK_COST: u64 = 4096;

/// The length from which a symlink's target no longer fits in an ext4 inode (60 bytes with
/// its terminating NUL), so that it takes a block.
pub(super) const FAST_SYMLINK: usize = 60;

/// How many entries an image may hold, all layers together: ext4 needs an inode for each,
/// and 1,000,000 is a hundred times a Debian root with Python.
pub(super) const DEFAULT_MAX_ENTRIES: u64 = 1_000_000;

/// What an entry of `kind` costs beyond its contents; `link` is its link target's length.
pub(super) fn entry_cost(kind: tar::EntryType, link: usize) -> u64 {
    if kind.is_dir() || (kind.is_symlink() && link >= FAST_SYMLINK) {
        BLOCK_COST
    } else {
        ENTRY_COST
    }
}

/// A decompressed layer, counted into a total shared by all the layers of an image, that
/// fails to read once the total passes `limit`.
pub(super) struct Decompressed<R> {
    inner: R,
    total: Rc<Cell<u64>>,
    limit: u64,
}

impl<R> Decompressed<R> {
    /// Counts `inner` into `total`, up to `limit`.
    pub(super) fn new(inner: R, total: Rc<Cell<u64>>, limit: u64) -> Self {
        Self {
            inner,
            total,
            limit,
        }
    }
}

impl<R: Read> Read for Decompressed<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let total = self.total.get().saturating_add(n as u64);
        self.total.set(total);
        if total > self.limit {
            // The caller sees the total past the limit and reports that.
            return Err(io::Error::other(
                "the layers decompress past the size limit",
            ));
        }
        Ok(n)
    }
}
