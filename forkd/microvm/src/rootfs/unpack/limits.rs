//! What unpacking an image may cost, so that a small crafted layer cannot exhaust the
//! builder's memory or disk: a bound on the bytes the layers decompress to.
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
