//! What the server asks of a connection's transport beyond reads and writes: that the
//! packets of a request and its answer be as few as the kernel can make them.
//!
//! A request and its response cost a packet each way; what can be saved is the empty ones
//! around them. Two are saved on a connection that serves one request and closes:
//!
//! - **the ACK of the request.** A new TCP connection acknowledges data at once, so the
//!   request is answered by an empty ACK and then by the response. With delayed ACKs asked
//!   of the listener (`TCP_QUICKACK` off, which accepted connections inherit), the ACK
//!   rides on the response, which follows within microseconds. A server that takes longer
//!   still acknowledges within the kernel's delayed-ACK time (40 ms at most), far inside a
//!   client's retransmission timeout, and a large upload is acknowledged every second
//!   segment as always.
//! - **the FIN.** The last response of a connection is written and the sending side shut
//!   down at once; with the response held back until then ([`Transport::last_write`]), the
//!   data and the FIN leave in one packet.
//!
//! Measured with tcpdump under wrk with a new connection per request: 10 packets per
//! request before, 7 after (the client's ACK of the response then rides on its own FIN).
//!
//! The listener also hands a connection over only once its first bytes have come
//! (`TCP_DEFER_ACCEPT`), as nginx's `deferred` and HAProxy's `defer-accept` do: the server
//! wakes once for a new connection and its request, not once for each, and the request is
//! there to be read without waiting, so the connection need not join the event loop (see
//! [`Stream`]). HTTP and TLS clients speak first; one that connects and says nothing is
//! handed over after [`DEFER_ACCEPT_SECONDS`] (rounded up to the kernel's next SYN-ACK
//! retransmission) and then meets the first-byte deadline as before. It holds no connection
//! slot meanwhile.

use std::io;
use std::os::fd::BorrowedFd;

use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use crate::Stream;

/// A connection the server serves: a byte stream that may also be told its next write is
/// its last.
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// The next write is the last before the sending side shuts down: hold partial
    /// segments back until then, so the data and the close leave together. Best effort
    /// (a transport that cannot does nothing); only for a write that a shutdown follows at
    /// once, since held data waits for it.
    fn last_write(&self) {}

    /// Whether the runtime already watches this transport for readiness, so that waiting
    /// on it costs no system call of its own. A [`Stream`] is not watched until it first
    /// has to wait; the HTTP/1 path then gives an answer a moment to come before it watches
    /// the client.
    fn in_event_loop(&self) -> bool {
        true
    }
}

impl Transport for Stream {
    fn last_write(&self) {
        if let Some(socket) = self.socket() {
            cork(socket);
        }
    }

    fn in_event_loop(&self) -> bool {
        self.is_registered()
    }
}

impl Transport for TcpStream {
    fn last_write(&self) {
        cork(self.into());
    }
}

/// `TCP_CORK` holds partial segments until it is cleared or the socket shuts down (which
/// sends what is held with the FIN). Failing leaves the write as it was.
fn cork(socket: SockRef<'_>) {
    if let Err(error) = socket.set_tcp_cork(true) {
        tracing::debug!(%error, "setting TCP_CORK before the last write");
    }
}

impl<I: Transport> Transport for TlsStream<I> {
    /// The last record and the `close_notify` the shutdown writes leave with the FIN.
    fn last_write(&self) {
        self.get_ref().0.last_write();
    }

    fn in_event_loop(&self) -> bool {
        self.get_ref().0.in_event_loop()
    }
}

/// How long a connection that sends nothing may wait in the kernel before it is handed over
/// all the same (and then closed by the server's first-byte deadline).
const DEFER_ACCEPT_SECONDS: u32 = 1;

/// In-memory streams, for tests: nothing to hold back.
impl Transport for DuplexStream {}

/// Sets what the module docs say on a server's `listener`: delayed ACKs, and connections
/// handed over with their first bytes. Either failing only costs packets or system calls.
pub(crate) fn tune_listener(listener: BorrowedFd<'_>, name: &str) {
    if let Err(error) = delay_acks(SockRef::from(&listener)) {
        tracing::debug!(listener = name, %error, "delaying ACKs (TCP_QUICKACK off)");
    }
    if let Err(error) = kernel::set_tcp_defer_accept(listener, DEFER_ACCEPT_SECONDS) {
        tracing::debug!(listener = name, %error, "accepting with data (TCP_DEFER_ACCEPT)");
    }
}

/// Asks `listener` to delay the acknowledgement of the connections it accepts (see the
/// module docs).
fn delay_acks(listener: SockRef<'_>) -> io::Result<()> {
    listener.set_tcp_quickack(false)
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    #[tokio::test]
    async fn accepted_connections_delay_their_acks() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        delay_acks(SockRef::from(&listener)).expect("TCP_QUICKACK");
        let addr = listener.local_addr().expect("address");
        let _client = TcpStream::connect(addr).await.expect("connect");
        let (stream, _) = listener.accept().await.expect("accept");
        // Linux reads TCP_QUICKACK back as "not in delayed-ACK mode".
        let quick = socket2::SockRef::from(&stream)
            .tcp_quickack()
            .expect("getsockopt");
        assert!(!quick, "the accepted connection acknowledges at once");
    }

    #[tokio::test]
    async fn a_last_write_arrives_whole_with_the_close() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let mut client = TcpStream::connect(addr).await.expect("connect");
        let (mut stream, _) = listener.accept().await.expect("accept");
        stream.last_write();
        assert!(
            socket2::SockRef::from(&stream)
                .tcp_cork()
                .expect("getsockopt")
        );
        let response = vec![b'x'; 100_000];
        let writing = tokio::spawn(async move {
            stream.write_all(&response).await.expect("write");
            stream.shutdown().await.expect("shutdown");
            stream
        });
        let mut received = Vec::new();
        client.read_to_end(&mut received).await.expect("read");
        assert_eq!(received.len(), 100_000);
        assert!(received.iter().all(|&b| b == b'x'));
        drop(writing.await.expect("writer"));
    }
}
