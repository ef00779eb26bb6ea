//! What a connection has yet to write: a buffer that heads, chunk lines and small pieces of
//! body are copied into (one write for a whole small response), and large pieces of body
//! queued behind it as they are, written with the buffer in one vectored write.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use http::HeaderMap;
use tokio::io::AsyncWrite;

/// Pieces of body at most this long are copied into the buffer; longer ones are queued.
pub(crate) const COPY_MAX: usize = 8 * 1024;

/// What the buffer keeps of its memory between responses.
const KEEP: usize = 4 * 1024;

/// At most this many pieces go into one vectored write.
const MAX_SLICES: usize = 16;

/// Bytes to write, in order: `buf[written..]`, then each of `queued`.
#[derive(Debug, Default)]
pub(crate) struct Output {
    /// Kept from response to response, so a connection allocates it once.
    buf: Vec<u8>,
    /// How much of `buf` has been written.
    written: usize,
    queued: VecDeque<Bytes>,
}

impl Output {
    /// Where a response head is written (after whatever is still unwritten).
    pub(crate) fn buf(&mut self) -> &mut Vec<u8> {
        debug_assert!(self.queued.is_empty(), "a head goes after queued body");
        &mut self.buf
    }

    /// How many bytes are still to be written.
    pub(crate) fn len(&self) -> usize {
        self.buf.len() - self.written + self.queued.iter().map(Bytes::len).sum::<usize>()
    }

    /// Queues `data`, copying it if it is small and nothing is queued ahead of the buffer.
    pub(crate) fn push(&mut self, data: Bytes) {
        if self.queued.is_empty() && data.len() <= COPY_MAX {
            self.buf.extend_from_slice(&data);
        } else {
            self.queued.push_back(data);
        }
    }

    /// Queues a copy of `bytes`.
    pub(crate) fn push_slice(&mut self, bytes: &[u8]) {
        if self.queued.is_empty() {
            self.buf.extend_from_slice(bytes);
        } else {
            self.queued.push_back(Bytes::copy_from_slice(bytes));
        }
    }

    /// Queues `data` as one chunk of the chunked coding (RFC 9112 §7.1).
    pub(crate) fn push_chunk(&mut self, data: Bytes) {
        let mut size = [0u8; 18];
        let mut at = size.len() - 2;
        size[at..].copy_from_slice(b"\r\n");
        let mut n = data.len();
        loop {
            at -= 1;
            size[at] = b"0123456789abcdef"[n % 16];
            n /= 16;
            if n == 0 {
                break;
            }
        }
        self.push_slice(&size[at..]);
        self.push(data);
        self.push_slice(b"\r\n");
    }

    /// Queues the end of a chunked body: the last chunk, `trailers` if any, and the empty
    /// line.
    pub(crate) fn push_last_chunk(&mut self, trailers: Option<&HeaderMap>) {
        self.push_slice(b"0\r\n");
        for (name, value) in trailers.into_iter().flatten() {
            self.push_slice(name.as_str().as_bytes());
            self.push_slice(b": ");
            self.push_slice(value.as_bytes());
            self.push_slice(b"\r\n");
        }
        self.push_slice(b"\r\n");
    }

    /// Writes everything to `io`; `Ready(Ok)` once all is written (the buffer is then empty,
    /// and keeps its memory).
    pub(crate) fn poll_write_all<W: AsyncWrite + Unpin>(
        &mut self,
        io: &mut W,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let pending = &self.buf[self.written..];
            if pending.is_empty() && self.queued.is_empty() {
                self.buf.clear();
                self.written = 0;
                // Kept for the next response, but not more than a head and a small body
                // need: an idle connection holds no large buffer.
                self.buf.shrink_to(KEEP);
                return Poll::Ready(Ok(()));
            }
            let n = if self.queued.is_empty() {
                ready!(Pin::new(&mut *io).poll_write(cx, pending))?
            } else {
                let mut slices = [IoSlice::new(&[]); MAX_SLICES];
                let mut count = 0;
                for piece in std::iter::once(pending)
                    .filter(|piece| !piece.is_empty())
                    .chain(self.queued.iter().map(|bytes| &bytes[..]))
                    .take(MAX_SLICES)
                {
                    slices[count] = IoSlice::new(piece);
                    count += 1;
                }
                ready!(Pin::new(&mut *io).poll_write_vectored(cx, &slices[..count]))?
            };
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.advance(n);
        }
    }

    /// Marks `n` more bytes written.
    fn advance(&mut self, mut n: usize) {
        let from_buf = n.min(self.buf.len() - self.written);
        self.written += from_buf;
        n -= from_buf;
        while n > 0 {
            let Some(front) = self.queued.front_mut() else {
                break;
            };
            if n < front.len() {
                front.advance(n);
                return;
            }
            n -= front.len();
            self.queued.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::task::Waker;

    use http::HeaderValue;

    use super::*;

    /// A writer that takes at most `at_once` bytes per write and keeps them.
    struct Trickle {
        taken: Vec<u8>,
        at_once: usize,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = buf.len().min(self.at_once);
            self.taken.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let mut n = 0;
            for buf in bufs {
                let take = buf.len().min(self.at_once - n);
                self.taken.extend_from_slice(&buf[..take]);
                n += take;
            }
            Poll::Ready(Ok(n))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn everything_is_written_in_order_however_the_writer_takes_it() {
        let large = Bytes::from(vec![b'L'; COPY_MAX + 1]);
        for at_once in [1, 7, 100, 1 << 20] {
            let mut output = Output::default();
            output.buf().extend_from_slice(b"HEAD\r\n");
            output.push_chunk(Bytes::from_static(b"small"));
            output.push_chunk(large.clone());
            output.push(Bytes::from_static(b"after"));
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", HeaderValue::from_static("0"));
            output.push_last_chunk(Some(&trailers));
            let expected = [
                &b"HEAD\r\n5\r\nsmall\r\n2001\r\n"[..],
                &large,
                b"\r\nafter0\r\ngrpc-status: 0\r\n\r\n",
            ]
            .concat();
            assert_eq!(output.len(), expected.len());
            let mut io = Trickle {
                taken: Vec::new(),
                at_once,
            };
            let mut cx = Context::from_waker(Waker::noop());
            assert!(matches!(
                output.poll_write_all(&mut io, &mut cx),
                Poll::Ready(Ok(()))
            ));
            assert_eq!(io.taken, expected, "{at_once} at once");
            assert_eq!(output.len(), 0);
        }
    }
}
