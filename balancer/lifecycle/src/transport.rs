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

use std::io;

use tokio::io::{AsyncRead, AsyncWrite, DuplexStream};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;

/// A connection the server serves: a byte stream that may also be told its next write is
/// its last.
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// The next write is the last before the sending side shuts down: hold partial
    /// segments back until then, so the data and the close leave together. Best effort
    /// (a transport that cannot does nothing); only for a write that a shutdown follows at
    /// once, since held data waits for it.
    fn last_write(&self) {}
}

impl Transport for TcpStream {
    fn last_write(&self) {
        // `TCP_CORK` holds partial segments until it is cleared or the socket shuts down
        // (which sends what is held with the FIN). Failing leaves the write as it was.
        if let Err(error) = socket2::SockRef::from(self).set_tcp_cork(true) {
            tracing::debug!(%error, "setting TCP_CORK before the last write");
        }
    }
}

impl<I: Transport> Transport for TlsStream<I> {
    /// The last record and the `close_notify` the shutdown writes leave with the FIN.
    fn last_write(&self) {
        self.get_ref().0.last_write();
    }
}

/// In-memory streams, for tests: nothing to hold back.
impl Transport for DuplexStream {}

/// Asks `listener` to delay the acknowledgement of the connections it accepts (see the
/// module docs). An error leaves them acknowledging at once, as before.
pub(crate) fn delay_acks(listener: &TcpListener) -> io::Result<()> {
    socket2::SockRef::from(listener).set_tcp_quickack(false)
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn accepted_connections_delay_their_acks() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        delay_acks(&listener).expect("TCP_QUICKACK");
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
