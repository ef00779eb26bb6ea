//! Serving one connection in the protocol it speaks, until it ends or is told to finish.
//!
//! The accept loop knows a connection's protocol before serving it: from ALPN under TLS,
//! and otherwise from its opening bytes, which [`FirstByte::opening`](crate::first_byte)
//! reads ahead in one read. So every connection goes straight to hyper's HTTP/1 or HTTP/2
//! connection, with nothing between them and the socket. (hyper-util's `auto` builder, with
//! upgrades, always sniffs for itself: a read of 24 bytes, a copy of them, and then a second
//! read into a buffer that hyper grows, and copies, to make room.)
//!
//! [`Drain`] tells every connection to finish, as hyper-util's `GracefulShutdown` does, for
//! HTTP/1 connections with upgrades too, which that one cannot watch.

use std::error::Error as StdError;

use http::{Request, Response};
use hyper::body::{Body, Incoming};
use hyper::server::conn::{http1, http2};
use hyper::service::Service;
use hyper_util::rt::TokioIo;
use hyper_util::server::conn::auto::HttpServerConnExec;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

/// The protocol a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Protocol {
    /// HTTP/1.1 (or 1.0).
    Http1,
    /// HTTP/2: prior knowledge in cleartext, or `h2` by ALPN.
    Http2,
}

/// hyper's connection settings, one builder per protocol.
#[derive(Debug, Clone)]
pub(crate) struct Protocols<E> {
    pub(crate) http1: http1::Builder,
    pub(crate) http2: http2::Builder<E>,
}

impl<E> Protocols<E> {
    /// Serves `io` in `protocol` (HTTP/1 with upgrades if `upgrades`) with `service`, until
    /// it ends, or, once `drain` changes, until it has finished: HTTP/1 after its current
    /// response, HTTP/2 after GOAWAY and its open streams.
    pub(crate) async fn serve<I, S, B>(
        &self,
        protocol: Protocol,
        upgrades: bool,
        io: I,
        service: S,
        drain: watch::Receiver<()>,
    ) -> hyper::Result<()>
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<Box<dyn StdError + Send + Sync>>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn StdError + Send + Sync>>,
        E: HttpServerConnExec<S::Future, B> + Clone + Send + Sync + 'static,
    {
        let io = TokioIo::new(io);
        match protocol {
            Protocol::Http1 if upgrades => {
                let connection = self.http1.serve_connection(io, service).with_upgrades();
                until_drained(
                    connection,
                    http1::UpgradeableConnection::graceful_shutdown,
                    drain,
                )
                .await
            }
            Protocol::Http1 => {
                let connection = self.http1.serve_connection(io, service);
                until_drained(connection, http1::Connection::graceful_shutdown, drain).await
            }
            Protocol::Http2 => {
                let connection = self.http2.serve_connection(io, service);
                until_drained(connection, http2::Connection::graceful_shutdown, drain).await
            }
        }
    }
}

/// Runs `connection` to its end; if `drain` changes first, calls `finish` on it and then
/// runs it to its end. `drain` is held until then, which is what [`Drain`] counts.
async fn until_drained<C>(
    connection: C,
    finish: fn(std::pin::Pin<&mut C>),
    mut drain: watch::Receiver<()>,
) -> hyper::Result<()>
where
    C: Future<Output = hyper::Result<()>>,
{
    tokio::pin!(connection);
    tokio::select! {
        biased;
        result = &mut connection => return result,
        // Changed, or the sender is gone: either way, time to finish.
        _ = drain.changed() => {}
    }
    finish(connection.as_mut());
    connection.await
}

/// Tells the connections to finish and waits until they all have.
#[derive(Debug)]
pub(crate) struct Drain {
    finish: watch::Sender<()>,
}

impl Drain {
    pub(crate) fn new() -> Self {
        Self {
            finish: watch::Sender::new(()),
        }
    }

    /// What a connection watches, and holds for as long as it is open.
    pub(crate) fn watcher(&self) -> watch::Receiver<()> {
        self.finish.subscribe()
    }

    /// How many connections are open (hold a watcher).
    pub(crate) fn open(&self) -> usize {
        self.finish.receiver_count()
    }

    /// Tells every connection to finish, then waits until all have dropped their watcher.
    pub(crate) async fn finish_all(&self) {
        self.finish.send_replace(());
        self.finish.closed().await;
    }
}
