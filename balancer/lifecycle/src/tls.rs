//! TLS on a listener: the handshake of each connection, run in that connection's own task.
//!
//! The accept loop only accepts; a client that opens a connection and then sends its
//! ClientHello slowly, or never, costs its own task and nothing else. The handshake is
//! bounded by the listener's header-read timeout (a TLS client that has not finished its
//! handshake in that time would not have sent a request head in it either). A failed
//! handshake is logged at debug, since scanners and clients with old TLS make them all day,
//! and counted when the owner gave a counter.
//!
//! What to speak afterwards is what ALPN settled: `h2` is HTTP/2; `http/1.1`, or no ALPN at
//! all, is HTTP/1.1. The certificates, the protocol versions and the ALPN list are the
//! owner's [`rustls::ServerConfig`](tokio_rustls::rustls::ServerConfig).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::server::TlsStream;

/// TLS termination for an [`HttpServer`](crate::HttpServer): the server configuration (with
/// its certificate resolver and ALPN protocols) and, optionally, a counter of failed
/// handshakes. Cheap to clone.
#[derive(Clone)]
pub struct Tls {
    acceptor: TlsAcceptor,
    failures: Option<IntCounter>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").finish_non_exhaustive()
    }
}

/// The protocol a TLS connection settled on with ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Negotiated {
    /// `http/1.1`, or no ALPN at all.
    Http1,
    /// `h2`.
    Http2,
}

impl Tls {
    /// Terminates TLS with `config`.
    pub fn new(config: Arc<ServerConfig>) -> Self {
        Self {
            acceptor: TlsAcceptor::from(config),
            failures: None,
        }
    }

    /// Counts every failed (or timed-out) handshake in `counter`.
    pub fn count_failures(mut self, counter: IntCounter) -> Self {
        self.failures = Some(counter);
        self
    }

    /// The handshake on `io` from `peer`, bounded by `limit`: the TLS stream and the protocol
    /// ALPN chose, or `None` (logged and counted) when it failed or took too long.
    pub(crate) async fn handshake<I>(
        &self,
        io: I,
        peer: SocketAddr,
        limit: Duration,
        listener: &'static str,
    ) -> Option<(TlsStream<I>, Negotiated)>
    where
        I: AsyncRead + AsyncWrite + Unpin,
    {
        let failure = match tokio::time::timeout(limit, self.acceptor.accept(io)).await {
            Ok(Ok(stream)) => {
                let negotiated = match stream.get_ref().1.alpn_protocol() {
                    Some(b"h2") => Negotiated::Http2,
                    _ => Negotiated::Http1,
                };
                return Some((stream, negotiated));
            }
            Ok(Err(error)) => error.to_string(),
            Err(_) => format!("no handshake within {limit:?}"),
        };
        tracing::debug!(listener, %peer, error = %failure, "TLS handshake failed");
        if let Some(failures) = &self.failures {
            failures.inc();
        }
        None
    }
}
