//! A connection whose first byte must arrive within a deadline.
//!
//! hyper's header-read timeout starts once it reads a request head, but a connection first
//! reads the opening bytes to tell HTTP/1 from HTTP/2 (or, over TLS, the first request after
//! the handshake); a client that connects and sends nothing would wait there for ever.
//! [`FirstByte`] bounds that wait; later request heads are hyper's to time.
//!
//! It also reads the opening bytes in one system call: the HTTP/1-or-2 sniff asks for the 24
//! bytes of the HTTP/2 preface alone, and the rest of the first request head would take a
//! second read. The first read asks the kernel for up to [`READ_AHEAD`] bytes, hands the
//! sniff what it asked for and keeps the rest for the next reads.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The most bytes the first read asks for: a whole ordinary request head.
pub(crate) const READ_AHEAD: usize = 4096;

/// A connection whose first byte must arrive within a deadline: reading fails with
/// `TimedOut` if it has not. After the first byte (and what the first read brought beyond
/// what was asked) it is the connection itself.
#[derive(Debug)]
pub struct FirstByte<I> {
    io: I,
    /// Armed until the first byte is read.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// What the first read brought beyond what was asked, from `ahead_at` on.
    ahead: Vec<u8>,
    ahead_at: usize,
}

impl<I> FirstByte<I> {
    /// `io`, whose first byte must come within `limit`.
    pub fn new(io: I, limit: Duration) -> Self {
        Self {
            io,
            deadline: Some(Box::pin(tokio::time::sleep(limit))),
            ahead: Vec::new(),
            ahead_at: 0,
        }
    }

    /// Moves what is kept into `buf`, as much as fits; whether anything was kept.
    fn hand_over(&mut self, buf: &mut ReadBuf<'_>) -> bool {
        let kept = &self.ahead[self.ahead_at..];
        if kept.is_empty() {
            return false;
        }
        let n = kept.len().min(buf.remaining());
        buf.put_slice(&kept[..n]);
        self.ahead_at += n;
        if self.ahead_at == self.ahead.len() {
            self.ahead = Vec::new();
            self.ahead_at = 0;
        }
        true
    }
}

impl<I: AsyncRead + Unpin> FirstByte<I> {
    /// The first read, for a caller that asked for less than [`READ_AHEAD`]: up to that into
    /// `ahead`, of which `buf` gets what fits.
    fn read_ahead(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.ahead.resize(READ_AHEAD, 0);
        let mut into = ReadBuf::new(&mut self.ahead);
        let polled = Pin::new(&mut self.io).poll_read(cx, &mut into);
        let read = into.filled().len();
        self.ahead.truncate(read);
        self.ahead_at = 0;
        if let Poll::Ready(Ok(())) = polled {
            self.hand_over(buf);
        }
        polled
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for FirstByte<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.hand_over(buf) {
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let polled = if this.deadline.is_some() && buf.remaining() < READ_AHEAD {
            this.read_ahead(cx, buf)
        } else {
            Pin::new(&mut this.io).poll_read(cx, buf)
        };
        match polled {
            Poll::Ready(result) => {
                if buf.filled().len() > before {
                    this.deadline = None;
                }
                Poll::Ready(result)
            }
            Poll::Pending => {
                let expired = this
                    .deadline
                    .as_mut()
                    .is_some_and(|deadline| deadline.as_mut().poll(cx).is_ready());
                if expired {
                    Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "no request within the header-read timeout",
                    )))
                } else {
                    Poll::Pending
                }
            }
        }
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for FirstByte<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::AsyncReadExt;

    use super::*;

    /// Bytes read in pieces of at most what is asked, counting the reads.
    struct Counted {
        bytes: Vec<u8>,
        at: usize,
        reads: Arc<AtomicUsize>,
    }

    impl AsyncRead for Counted {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            let n = buf.remaining().min(self.bytes.len() - self.at);
            let at = self.at;
            buf.put_slice(&self.bytes[at..at + n]);
            self.at += n;
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn the_opening_bytes_come_in_one_read_whatever_the_first_ask() {
        let head = b"GET /x HTTP/1.1\r\nhost: a\r\nuser-agent: test\r\n\r\n".to_vec();
        let reads = Arc::new(AtomicUsize::new(0));
        let io = Counted {
            bytes: head.clone(),
            at: 0,
            reads: Arc::clone(&reads),
        };
        let mut first = FirstByte::new(io, Duration::from_secs(5));
        // The HTTP/2 preface sniff asks for 24 bytes; the head's parser, for the rest.
        let mut preface = [0u8; 24];
        first.read_exact(&mut preface).await.expect("24 bytes");
        let mut rest = vec![0u8; head.len() - 24];
        first.read_exact(&mut rest).await.expect("the rest");
        assert_eq!([&preface[..], &rest[..]].concat(), head);
        assert_eq!(
            reads.load(Ordering::SeqCst),
            1,
            "the head took more than one read"
        );
        assert!(first.ahead.is_empty() && first.ahead.capacity() == 0);
        // Then it is the connection itself: the end, as the connection says.
        let mut more = [0u8; 8];
        assert_eq!(first.read(&mut more).await.expect("the end"), 0);
        assert_eq!(reads.load(Ordering::SeqCst), 2);
    }
}
