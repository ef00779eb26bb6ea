//! Accepted connections that join the runtime's event loop only when they first wait.
//!
//! tokio registers every socket it accepts with its epoll instance, and removes it again
//! when the socket is dropped: two system calls per connection. A connection that brings
//! its request with it and is answered before it has to wait for anything needs neither.
//! [`Listener`] accepts sockets without registering them, and a [`Stream`] tries each read
//! and write on the socket directly; only the first one that would block registers it, and
//! from then on it is an ordinary tokio stream. A socket that was never registered is closed
//! without the removal.
//!
//! Two things make that the common case rather than a race:
//! - the server's listeners hand a connection over only once its first bytes have come
//!   (`TCP_DEFER_ACCEPT`, see `transport`): without it, about half the connections under
//!   wrk were accepted before their request arrived, and the first read registered them;
//! - watching the client while its request is in flight would register every connection, so
//!   the HTTP/1 path gives the answer a moment first (see `http1`).
//!
//! With a new connection per request, squall's system calls per request fell from 11.4 to
//! 8.8 and its CPU time per request by 19 % (`bench/proxy/profile`, `MODE=close`).

use std::io::{self, IoSlice, Read, Write};
use std::mem;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::pin::Pin;
use std::task::{Context, Poll};

use socket2::SockRef;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// A listening socket whose accepted connections are [`Stream`]s, not yet registered.
#[derive(Debug)]
pub(crate) struct Listener {
    /// The listening socket, registered all its life.
    fd: AsyncFd<OwnedFd>,
}

impl Listener {
    /// Takes over `listener` (named `name` in logs), with the options `transport` sets:
    /// among them deferred accept, which makes a connection's first read find its request.
    pub(crate) fn new(listener: TcpListener, name: &str) -> io::Result<Self> {
        let fd = kernel::async_fd(OwnedFd::from(listener.into_std()?))?;
        crate::transport::tune_listener(fd.get_ref().as_fd(), name);
        Ok(Self { fd })
    }

    /// The listening socket, for options.
    pub(crate) fn socket(&self) -> BorrowedFd<'_> {
        self.fd.get_ref().as_fd()
    }

    /// The next connection, non-blocking and close-on-exec from the one `accept4` call.
    pub(crate) async fn accept(&self) -> io::Result<(Stream, SocketAddr)> {
        loop {
            let mut ready = self.fd.readable().await?;
            let Ok(accepted) = ready.try_io(|fd| {
                SockRef::from(fd.get_ref()).accept4(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
            }) else {
                continue; // would block: readiness is cleared, wait for the next connection
            };
            let (socket, peer) = accepted?;
            let peer = peer.as_socket().ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidData, "accepted a non-IP connection")
            })?;
            return Ok((Stream::unregistered(socket.into()), peer));
        }
    }
}

/// An accepted TCP connection, registered with the runtime at its first wait.
#[derive(Debug)]
pub struct Stream(State);

#[derive(Debug)]
enum State {
    /// Not registered: reads and writes go to the socket directly.
    Unregistered(std::net::TcpStream),
    /// Registered: an ordinary tokio stream.
    Registered(TcpStream),
    /// Registration failed and the socket is closed.
    Failed,
}

impl Stream {
    /// `socket`, which must be non-blocking, not registered yet.
    pub(crate) fn unregistered(socket: std::net::TcpStream) -> Self {
        Self(State::Unregistered(socket))
    }

    /// Whether the runtime watches the socket for readiness (it has had to wait once).
    pub fn is_registered(&self) -> bool {
        matches!(self.0, State::Registered(_))
    }

    /// The socket, for options.
    pub(crate) fn socket(&self) -> Option<SockRef<'_>> {
        match &self.0 {
            State::Unregistered(socket) => Some(socket.into()),
            State::Registered(stream) => Some(stream.into()),
            State::Failed => None,
        }
    }

    /// The registered stream, registering the socket if it is not yet.
    fn registered(&mut self) -> io::Result<&mut TcpStream> {
        if matches!(self.0, State::Unregistered(_))
            && let State::Unregistered(socket) = mem::replace(&mut self.0, State::Failed)
        {
            self.0 = State::Registered(TcpStream::from_std(socket)?);
        }
        match &mut self.0 {
            State::Registered(stream) => Ok(stream),
            _ => Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "the connection could not be registered with the runtime",
            )),
        }
    }

    /// `attempt` on the unregistered socket: `None` if it would block (or there is no
    /// unregistered socket), so the caller registers and waits.
    fn direct<T>(
        &mut self,
        attempt: impl FnOnce(&std::net::TcpStream) -> io::Result<T>,
    ) -> Option<io::Result<T>> {
        let State::Unregistered(socket) = &self.0 else {
            return None;
        };
        match attempt(socket) {
            Err(error)
                if matches!(
                    error.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                None
            }
            result => Some(result),
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(read) = this.direct(|mut socket| socket.read(buf.initialize_unfilled())) {
            buf.advance(read?);
            return Poll::Ready(Ok(()));
        }
        Pin::new(this.registered()?).poll_read(cx, buf)
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(written) = this.direct(|mut socket| socket.write(buf)) {
            return Poll::Ready(written);
        }
        Pin::new(this.registered()?).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(written) = this.direct(|mut socket| socket.write_vectored(bufs)) {
            return Poll::Ready(written);
        }
        Pin::new(this.registered()?).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(())) // a TCP socket holds nothing back for a flush to push
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match &mut this.0 {
            State::Unregistered(socket) => Poll::Ready(socket.shutdown(Shutdown::Write)),
            State::Registered(stream) => Pin::new(stream).poll_shutdown(cx),
            State::Failed => Poll::Ready(Ok(())),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn listener() -> (Listener, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let listener = Listener::new(listener, "test").expect("listener");
        (listener, addr)
    }

    #[tokio::test]
    async fn a_connection_is_handed_over_with_its_first_bytes() {
        let (listener, addr) = listener().await;
        let mut client = TcpStream::connect(addr).await.expect("connect");
        // Connected, as far as the client knows, but silent: the kernel keeps it.
        let early = tokio::time::timeout(Duration::from_millis(300), listener.accept()).await;
        assert!(early.is_err(), "a silent connection was handed over");
        client.write_all(b"hello").await.expect("write");
        let (mut stream, peer) = listener.accept().await.expect("accept");
        assert_eq!(peer, client.local_addr().expect("address"));
        // What it sent is there: read, and answered, without joining the event loop.
        let mut buf = [0; 16];
        let n = stream.read(&mut buf).await.expect("read");
        assert_eq!(&buf[..n], b"hello");
        stream.write_all(b"world").await.expect("write");
        assert!(!stream.is_registered());
        let n = client.read(&mut buf).await.expect("read");
        assert_eq!(&buf[..n], b"world");
        // A read that has to wait registers it, and is woken when the bytes come.
        let reading = tokio::spawn(async move {
            let mut buf = [0; 16];
            let n = stream.read(&mut buf).await.expect("read");
            (stream, buf[..n].to_vec())
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        client.write_all(b"again").await.expect("write");
        let (mut stream, read) = reading.await.expect("reader");
        assert_eq!(read, b"again");
        assert!(stream.is_registered());
        // Both kinds shut down in order.
        stream.shutdown().await.expect("shutdown");
        assert_eq!(client.read(&mut buf).await.expect("read"), 0);
    }

    #[tokio::test]
    async fn an_unregistered_connection_shuts_down_and_closes_in_order() {
        let (listener, addr) = listener().await;
        let mut client = TcpStream::connect(addr).await.expect("connect");
        client.write_all(b"bye").await.expect("write");
        let (mut stream, _) = listener.accept().await.expect("accept");
        stream.write_all(b"ok").await.expect("write");
        stream.shutdown().await.expect("shutdown");
        assert!(!stream.is_registered());
        let mut all = Vec::new();
        client.read_to_end(&mut all).await.expect("read");
        assert_eq!(all, b"ok");
    }
}
