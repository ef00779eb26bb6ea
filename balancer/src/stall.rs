//! A client connection whose writes fail once the client has taken nothing for too long.
//!
//! hyper writes a response only as fast as the client reads it, and stops polling the
//! response body while the socket is full, so a client that stops reading would hold the
//! request, and the worker's slot with it, for as long as it keeps the connection open.
//! [`WriteStall`] turns a write that has made no progress for the limit into an error, which
//! ends the connection and drops the request.
//!
//! It watches the socket, so it covers HTTP/1 connections, upgraded tunnels and HTTP/2
//! connections whose socket backs up. An HTTP/2 client that stops reading one stream only
//! stops opening that stream's flow-control window while the socket keeps moving; that
//! stream is reset after the same limit by [`stream`]'s per-stream watch.

mod stream;

pub(crate) use stream::{ClientPaced, StreamExecutor};

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// `S` with a bound on how long a write (or flush) may wait for the peer.
pub(crate) struct WriteStall<S> {
    inner: S,
    limit: Duration,
    /// Made at the first wait and reset at each later one, so a connection allocates it once.
    deadline: Option<Pin<Box<Sleep>>>,
    /// Whether `deadline` runs: from a wait until bytes are written.
    armed: bool,
}

impl<S> WriteStall<S> {
    pub(crate) fn new(inner: S, limit: Duration) -> Self {
        Self {
            inner,
            limit,
            deadline: None,
            armed: false,
        }
    }

    /// After the inner stream returned `Pending`: pending still, or an error once the
    /// stall has lasted `limit`.
    fn waiting<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let limit = self.limit;
        let at = tokio::time::Instant::now() + limit;
        let deadline = self
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
        if !self.armed {
            deadline.as_mut().reset(at);
            self.armed = true;
        }
        ready!(deadline.as_mut().poll(cx));
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the client took nothing for {limit:?}"),
        )))
    }

    /// A write returned: bytes moved (or it failed, which ends the connection anyway).
    fn wrote(&mut self, result: io::Result<usize>) -> Poll<io::Result<usize>> {
        self.armed = false;
        Poll::Ready(result)
    }
}

impl<S: lifecycle::Transport> lifecycle::Transport for WriteStall<S> {
    fn last_write(&self) {
        self.inner.last_write();
    }

    fn in_event_loop(&self) -> bool {
        self.inner.in_event_loop()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteStall<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteStall<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write(cx, buf) {
            Poll::Ready(result) => self.wrote(result),
            Poll::Pending => self.waiting(cx),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write_vectored(cx, bufs) {
            Poll::Ready(result) => self.wrote(result),
            Poll::Pending => self.waiting(cx),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // A flush that returns moved no bytes: it leaves the clock as it is.
        match Pin::new(&mut self.inner).poll_flush(cx) {
            Poll::Ready(result) => Poll::Ready(result),
            Poll::Pending => self.waiting(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_reads_nothing_fails_the_write_after_the_limit() {
        let (ours, mut theirs) = tokio::io::duplex(64);
        let mut ours = WriteStall::new(ours, Duration::from_secs(5));
        let started = tokio::time::Instant::now();
        let error = ours.write_all(&[0u8; 1024]).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_secs(5));
        // What fitted was written; the peer can still read it.
        let mut got = [0u8; 64];
        theirs.read_exact(&mut got).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn each_stall_gets_the_whole_limit() {
        let (ours, mut theirs) = tokio::io::duplex(64);
        let mut ours = WriteStall::new(ours, Duration::from_secs(5));
        let reader = tokio::spawn(async move {
            // Takes 64 bytes at 4 s and at 8 s, then nothing.
            let mut chunk = [0u8; 64];
            for _ in 0..2 {
                tokio::time::sleep(Duration::from_secs(4)).await;
                let _ = theirs.read(&mut chunk).await.unwrap();
            }
            theirs
        });
        let started = tokio::time::Instant::now();
        let error = ours.write_all(&[0u8; 1024]).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        // The last progress was at 8 s; the write fails 5 s after it, not 5 s after the
        // first stall began.
        let failed_at = started.elapsed();
        assert!(
            failed_at >= Duration::from_secs(13) && failed_at < Duration::from_secs(14),
            "{failed_at:?}"
        );
        drop(reader.await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_reader_that_keeps_taking_is_not_cut_off() {
        let (ours, mut theirs) = tokio::io::duplex(64);
        let mut ours = WriteStall::new(ours, Duration::from_secs(5));
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut chunk = [0u8; 64];
            // 64 bytes every 4 s: always within the limit, 64 s in all.
            while got.len() < 1024 {
                tokio::time::sleep(Duration::from_secs(4)).await;
                let n = theirs.read(&mut chunk).await.unwrap();
                got.extend_from_slice(&chunk[..n]);
            }
            got.len()
        });
        ours.write_all(&[7u8; 1024]).await.unwrap();
        assert_eq!(reader.await.unwrap(), 1024);
    }
}
