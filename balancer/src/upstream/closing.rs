//! Ending every connection to a worker that left the pool, so that the requests waiting on
//! it fail over at once instead of waiting for an answer that will not come.
//!
//! The scaler removes a worker from the pool when it is gone or about to be: its host is
//! down or cut off, its forkd no longer lists it, it exited, or its drain ended and it is
//! killed. A worker that died with its connections open resets them, and the requests on
//! them fail over at once; but a worker behind a network partition sends nothing at all,
//! and its requests would wait for `response_timeout`. So removal ends the connections
//! itself: each connection's stream is wrapped in a [`Closable`], which reads as closed by
//! the worker (end of file, and writes fail) from the moment [`Closing::close`] is called.
//! The upstream code then sees what it sees when a worker dies — a connection closed before
//! any answer — and a request that may be sent twice goes to another worker; any other gets
//! `502`, and a response body still streaming is cut, as the worker's death would cut it.
//!
//! Nothing is shared on the request path: each connection holds the receiving end of a
//! channel of its own, which its reads poll without a lock; `close` drops the senders.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;

/// The connections of one worker, to be ended when it leaves the pool; see the module docs.
#[derive(Debug, Default)]
pub(crate) struct Closing {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    closed: bool,
    /// One sender per connection still open (or closed and not yet pruned); dropping it
    /// ends the connection.
    connections: Vec<oneshot::Sender<()>>,
}

impl Closing {
    fn state(&self) -> MutexGuard<'_, State> {
        // A list of senders stays usable after a panic elsewhere.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the worker has left the pool: no new connection is opened to it.
    pub(crate) fn is_closed(&self) -> bool {
        self.state().closed
    }

    /// Ends every connection to the worker, now and to come.
    pub(crate) fn close(&self) {
        let connections = {
            let mut state = self.state();
            state.closed = true;
            std::mem::take(&mut state.connections)
        };
        drop(connections);
    }

    /// Wraps a new connection's stream so that it ends when the worker leaves the pool (at
    /// once if it has already).
    pub(crate) fn wrap<S>(&self, inner: S) -> Closable<S> {
        let (sender, closed) = oneshot::channel();
        let mut state = self.state();
        if !state.closed {
            // Connections that ended dropped their receivers: forget their senders here,
            // so that the list holds about as many as are open.
            state.connections.retain(|sender| !sender.is_closed());
            state.connections.push(sender);
        }
        Closable {
            inner,
            closed,
            ended: false,
        }
    }
}

/// A connection's stream that reads as closed once its worker left the pool; see the module
/// docs.
#[derive(Debug)]
pub(crate) struct Closable<S> {
    inner: S,
    /// Completes (with an error: the sender is dropped, never used) when the worker leaves.
    closed: oneshot::Receiver<()>,
    /// Whether `closed` has completed: it may not be polled again.
    ended: bool,
}

impl<S> Closable<S> {
    /// The stream inside.
    pub(crate) fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Whether the worker has left the pool; registers the task to be woken when it does.
    fn check(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.ended && Pin::new(&mut self.closed).poll(cx).is_ready() {
            self.ended = true;
        }
        self.ended
    }
}

/// The error a write to a worker that left the pool gets.
fn left() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "the worker left the pool")
}

impl<S: AsyncRead + Unpin> AsyncRead for Closable<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.check(cx) {
            // End of file: the worker closed the connection, as far as anyone reading knows.
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Closable<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bytes: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.check(cx) {
            return Poll::Ready(Err(left()));
        }
        Pin::new(&mut this.inner).poll_write(cx, bytes)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.check(cx) {
            return Poll::Ready(Err(left()));
        }
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_connection_reads_as_closed_once_its_worker_left() {
        let closing = Closing::default();
        let (near, mut far) = tokio::io::duplex(64);
        let mut stream = closing.wrap(near);
        far.write_all(b"before").await.expect("write");
        let mut buffer = [0u8; 6];
        stream.read_exact(&mut buffer).await.expect("read");
        assert_eq!(&buffer, b"before");

        // A read waiting for the worker is woken by the close, and sees the end.
        let reading = tokio::spawn(async move {
            let mut rest = Vec::new();
            let read = stream.read_to_end(&mut rest).await;
            (read.map_err(|e| e.kind()), stream)
        });
        tokio::task::yield_now().await;
        assert!(!closing.is_closed());
        closing.close();
        let (read, mut stream) = reading.await.expect("task");
        assert_eq!(read, Ok(0), "a read after the close is the end");
        // What the worker sends after it is not read, and nothing more can be written.
        far.write_all(b"after").await.expect("write");
        assert_eq!(stream.read(&mut buffer).await.ok(), Some(0));
        let write = stream.write_all(b"x").await.map_err(|e| e.kind());
        assert_eq!(write, Err(io::ErrorKind::BrokenPipe));
    }

    #[tokio::test]
    async fn a_connection_opened_after_the_close_ends_at_once_and_none_is_kept() {
        let closing = Closing::default();
        let ended: Vec<_> = (0..3).map(|_| closing.wrap(tokio::io::empty())).collect();
        drop(ended);
        let _open = closing.wrap(tokio::io::empty());
        // The ended ones' senders were forgotten when the fourth came.
        assert_eq!(closing.state().connections.len(), 1);
        closing.close();
        assert!(closing.is_closed());
        assert!(closing.state().connections.is_empty());
        let mut late = closing.wrap(tokio::io::repeat(b'x'));
        let mut buffer = [0u8; 4];
        assert_eq!(late.read(&mut buffer).await.ok(), Some(0));
        assert!(closing.state().connections.is_empty());
    }
}
