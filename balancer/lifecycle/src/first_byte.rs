//! A connection whose first byte must arrive within a deadline.
//!
//! hyper's header-read timeout starts once it reads a request head, but a connection first
//! reads the opening bytes to tell HTTP/1 from HTTP/2 (or, over TLS, the first request after
//! the handshake); a client that connects and sends nothing would wait there for ever.
//! [`FirstByte`] bounds that wait; later request heads are hyper's to time.
//!
//! It also tells the protocol: [`FirstByte::opening`] reads the opening bytes ahead, in one
//! system call of up to [`READ_AHEAD`] bytes, says whether they are HTTP/2's preface, and
//! keeps them for the connection's first read, so hyper gets the whole first request head
//! at once. A first read that asks for less than that (HTTP/2 reads its preface on its own)
//! is read ahead the same way.
//!
//! Both are made for every connection, so neither costs what it need not: the bytes are
//! read into the stack and kept in a buffer of their own size (a small allocation, where a
//! buffer of [`READ_AHEAD`] bytes would be a large one, dearer to make and to free), and the
//! deadline's timer is made only if a read has to wait for the first byte.

use std::future::Future;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::protocols::Protocol;

/// The most bytes the first read asks for: a whole ordinary request head.
pub(crate) const READ_AHEAD: usize = 4096;

/// What an HTTP/2 connection with prior knowledge opens with (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What a connection's opening bytes say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Opening {
    /// It speaks this protocol.
    Speaks(Protocol),
    /// It closed before sending a byte.
    Closed,
}

/// A connection whose first byte must arrive within a deadline: reading fails with
/// `TimedOut` if it has not. After the first byte (and what the first read brought beyond
/// what was asked) it is the connection itself.
#[derive(Debug)]
pub struct FirstByte<I> {
    io: I,
    /// When the first byte is due; `None` once it has been read.
    due: Option<Instant>,
    /// The timer for `due`, made when a read first has to wait.
    timer: Option<Pin<Box<Sleep>>>,
    /// What was read ahead and not yet handed over.
    ahead: BytesMut,
}

impl<I> FirstByte<I> {
    /// `io`, whose first byte must come within `limit`.
    pub fn new(io: I, limit: Duration) -> Self {
        Self {
            io,
            due: Some(Instant::now() + limit),
            timer: None,
            ahead: BytesMut::new(),
        }
    }

    /// Moves what is kept into `buf`, as much as fits; whether anything was kept.
    fn hand_over(&mut self, buf: &mut ReadBuf<'_>) -> bool {
        if self.ahead.is_empty() {
            return false;
        }
        let n = self.ahead.len().min(buf.remaining());
        buf.put_slice(&self.ahead[..n]);
        self.ahead.advance(n);
        if self.ahead.is_empty() {
            self.ahead = BytesMut::new();
        }
        true
    }

    /// Puts `bytes` back in front of what is still to be read: bytes read from here that
    /// are now for another reader.
    pub(crate) fn unread(&mut self, mut bytes: BytesMut) {
        bytes.extend_from_slice(&self.ahead);
        self.ahead = bytes;
    }

    /// The first byte has come: no deadline any more.
    fn disarm(&mut self) {
        self.due = None;
        self.timer = None;
    }

    /// For a read that is pending: the error to end it with if the first byte is late.
    fn late(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Error> {
        let Some(due) = self.due else {
            return Poll::Pending;
        };
        let expired = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)))
            .as_mut()
            .poll(cx)
            .is_ready();
        if expired {
            Poll::Ready(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no request within the header-read timeout",
            ))
        } else {
            Poll::Pending
        }
    }
}

impl<I: AsyncRead + Unpin> FirstByte<I> {
    /// Reads up to [`READ_AHEAD`] more bytes into `ahead` (none at the end of the stream),
    /// within the deadline while it is armed; the count read. A read of some bytes disarms
    /// the deadline if `disarm`.
    fn poll_ahead(&mut self, cx: &mut Context<'_>, disarm: bool) -> Poll<std::io::Result<usize>> {
        let mut space = [MaybeUninit::<u8>::uninit(); READ_AHEAD];
        let mut read = ReadBuf::uninit(&mut space);
        match Pin::new(&mut self.io).poll_read(cx, &mut read) {
            Poll::Ready(Ok(())) => {
                let read = read.filled();
                self.ahead.extend_from_slice(read);
                if !read.is_empty() && disarm {
                    self.disarm();
                }
                Poll::Ready(Ok(read.len()))
            }
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            Poll::Pending => self.late(cx).map(Err),
        }
    }

    /// Waits, within the deadline, for the connection's opening bytes and reads them ahead
    /// (they are then read from here as if they had not been): HTTP/2 if they are its
    /// preface, HTTP/1 as soon as they differ from it. A client that sends the preface in
    /// pieces is read until it is whole or differs, all within the deadline: one that stops
    /// partway through is late like one that sends nothing.
    pub(crate) async fn opening(&mut self) -> std::io::Result<Opening> {
        std::future::poll_fn(|cx| self.poll_opening(cx)).await
    }

    fn poll_opening(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<Opening>> {
        loop {
            let n = self.ahead.len().min(PREFACE.len());
            if self.ahead[..n] != PREFACE[..n] {
                self.disarm();
                return Poll::Ready(Ok(Opening::Speaks(Protocol::Http1)));
            }
            if n == PREFACE.len() {
                self.disarm();
                return Poll::Ready(Ok(Opening::Speaks(Protocol::Http2)));
            }
            if ready!(self.poll_ahead(cx, false))? == 0 {
                // Closed within the preface: HTTP/1 will say what is wrong with it.
                return Poll::Ready(Ok(if self.ahead.is_empty() {
                    Opening::Closed
                } else {
                    Opening::Speaks(Protocol::Http1)
                }));
            }
        }
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
        if this.due.is_none() {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        }
        if buf.remaining() < READ_AHEAD {
            // A small first ask (HTTP/2's preface, read on its own): the whole of what has
            // come in one read.
            ready!(this.poll_ahead(cx, true))?;
            this.hand_over(buf);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if buf.filled().len() > before {
                    this.disarm();
                }
                Poll::Ready(result)
            }
            Poll::Pending => this.late(cx).map(Err),
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

impl<I: crate::Transport> crate::Transport for FirstByte<I> {
    fn last_write(&self) {
        self.io.last_write();
    }

    fn in_event_loop(&self) -> bool {
        self.io.in_event_loop()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::AsyncReadExt;

    use crate::protocols::Protocol;

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
        // The bytes were there when asked for: no timer was made for the deadline.
        assert!(first.due.is_none() && first.timer.is_none());
        // Then it is the connection itself: the end, as the connection says.
        let mut more = [0u8; 8];
        assert_eq!(first.read(&mut more).await.expect("the end"), 0);
        assert_eq!(reads.load(Ordering::SeqCst), 2);
    }

    /// Bytes that arrive in the given pieces, one per read, then the end.
    struct Pieces(std::collections::VecDeque<&'static [u8]>);

    impl AsyncRead for Pieces {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            if let Some(piece) = self.0.pop_front() {
                buf.put_slice(piece);
            }
            Poll::Ready(Ok(()))
        }
    }

    async fn opening_of(pieces: &[&'static [u8]]) -> (Opening, Vec<u8>) {
        let mut first = FirstByte::new(
            Pieces(pieces.iter().copied().collect()),
            Duration::from_secs(5),
        );
        let opening = first.opening().await.expect("an opening");
        let mut read = Vec::new();
        first.read_to_end(&mut read).await.expect("the rest");
        (opening, read)
    }

    #[tokio::test]
    async fn what_is_read_ahead_is_kept_in_a_buffer_of_its_own_size() {
        let head: &'static [u8] = b"GET / HTTP/1.1\r\nhost: a\r\n\r\n";
        let mut first = FirstByte::new(Pieces([head].into()), Duration::from_secs(5));
        first.opening().await.expect("an opening");
        assert_eq!(&first.ahead[..], head);
        assert!(
            first.ahead.capacity() < 2 * head.len(),
            "{} bytes kept for a {}-byte head",
            first.ahead.capacity(),
            head.len()
        );
    }

    #[tokio::test]
    async fn the_opening_bytes_tell_http2_s_preface_from_http1_and_are_read_again() {
        let http1 = Opening::Speaks(Protocol::Http1);
        let http2 = Opening::Speaks(Protocol::Http2);
        let head: &[u8] = b"GET / HTTP/1.1\r\nhost: a\r\n\r\n";
        assert_eq!(opening_of(&[head]).await, (http1, head.to_vec()));
        // The preface, whole or in pieces, and what follows it.
        let preface: &[u8] = PREFACE;
        let settings: &[u8] = b"\0\0\0\x04\0\0\0\0\0";
        let whole = [preface, settings].concat();
        assert_eq!(
            opening_of(&[preface, settings]).await,
            (http2, whole.clone())
        );
        assert_eq!(
            opening_of(&[&preface[..1], &preface[1..3], &preface[3..], settings]).await,
            (http2, whole)
        );
        // Methods that begin like the preface are HTTP/1 at their first different byte.
        for method in [&b"POST / HTTP/1.1\r\n"[..], b"PUT / HTTP/1.1\r\n", b"PRIX"] {
            assert_eq!(
                opening_of(&[&method[..1], &method[1..]]).await,
                (http1, method.to_vec())
            );
        }
        // A client that closes at once, or within the preface.
        assert_eq!(opening_of(&[]).await, (Opening::Closed, Vec::new()));
        assert_eq!(opening_of(&[b"PRI * "]).await, (http1, b"PRI * ".to_vec()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_sends_nothing_or_part_of_the_preface_is_late_at_the_deadline() {
        for sent in [&b""[..], b"P", b"PRI * HTTP/2.0\r\n"] {
            let (mut client, server) = tokio::io::duplex(64);
            tokio::io::AsyncWriteExt::write_all(&mut client, sent)
                .await
                .expect("sent");
            let mut first = FirstByte::new(server, Duration::from_secs(10));
            let error = first.opening().await.expect_err("late");
            assert_eq!(error.kind(), std::io::ErrorKind::TimedOut, "after {sent:?}");
            assert!(first.timer.is_some(), "a read waited, so a timer was made");
        }
    }
}
