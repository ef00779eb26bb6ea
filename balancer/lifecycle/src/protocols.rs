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
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;

use http::{Request, Response};
use hyper::body::{Body, Incoming};
use hyper::server::conn::{http1, http2};
use hyper::service::Service;
use hyper_util::rt::TokioIo;
use hyper_util::server::conn::auto::HttpServerConnExec;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

use crate::Transport;
use crate::first_byte::FirstByte;
use crate::http1::{Bodiless, Bounds};

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

/// A connection being served, boxed: what [`Protocols::serve`] gives.
pub(crate) type Serving = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>;

/// Why a served connection ended early.
pub(crate) type BoxError = Box<dyn StdError + Send + Sync>;

impl<E> Protocols<E> {
    /// Serves `io` in `protocol` (HTTP/1 with upgrades if `upgrades`) with `service`, until
    /// it ends, or, once `drain` changes, until it has finished: HTTP/1 after its current
    /// response, HTTP/2 after GOAWAY and its open streams.
    ///
    /// Not an `async fn`, and boxed per protocol: hyper's connection is built here and moved
    /// once, into a box of its own size. An `async fn` would keep `io` and `service` in its
    /// state beside the connection that holds them, and a future for either protocol is
    /// the size of the larger (HTTP/2's); every move of such a future, into a box or a
    /// task, copies all of it, which measured 8.8 KiB twice per connection.
    pub(crate) fn serve<I, S, B>(
        &self,
        protocol: Protocol,
        upgrades: bool,
        io: I,
        service: S,
        drain: watch::Receiver<()>,
    ) -> Serving
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
            Protocol::Http1 if upgrades => Box::pin(until_drained(
                self.http1.serve_connection(io, service).with_upgrades(),
                http1::UpgradeableConnection::graceful_shutdown,
                drain,
            )),
            Protocol::Http1 => Box::pin(until_drained(
                self.http1.serve_connection(io, service),
                http1::Connection::graceful_shutdown,
                drain,
            )),
            Protocol::Http2 => Box::pin(until_drained(
                self.http2.serve_connection(io, service),
                http2::Connection::graceful_shutdown,
                drain,
            )),
        }
    }
}

/// How a server serves a connection whose protocol is known: [`Hyper`] for hyper alone,
/// [`Own`] for HTTP/1 on Squall's own path first (see [`crate::http1`]).
pub(crate) trait Path<S, B, E>: Copy + Send + 'static {
    /// Serves `io` as [`Protocols::serve`] does.
    fn serve<I>(
        self,
        protocols: &Arc<Protocols<E>>,
        protocol: Protocol,
        upgrades: bool,
        io: FirstByte<I>,
        service: S,
        drain: watch::Receiver<()>,
    ) -> Serving
    where
        I: Transport;
}

/// Every connection is served by hyper.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Hyper;

impl<S, B, E> Path<S, B, E> for Hyper
where
    S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
    E: HttpServerConnExec<S::Future, B> + Clone + Send + Sync + 'static,
{
    fn serve<I>(
        self,
        protocols: &Arc<Protocols<E>>,
        protocol: Protocol,
        upgrades: bool,
        io: FirstByte<I>,
        service: S,
        drain: watch::Receiver<()>,
    ) -> Serving
    where
        I: Transport,
    {
        protocols.serve(protocol, upgrades, io, service, drain)
    }
}

/// HTTP/1 connections (with upgrades) start on Squall's own path, which hands a connection
/// to hyper at its first request with a body; HTTP/2 is hyper's.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Own(pub(crate) Bounds);

impl<S, B, E> Path<S, B, E> for Own
where
    S: Service<Request<Incoming>, Response = Response<B>>
        + Bodiless<ResponseBody = B>
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
    E: HttpServerConnExec<S::Future, B> + Clone + Send + Sync + 'static,
{
    fn serve<I>(
        self,
        protocols: &Arc<Protocols<E>>,
        protocol: Protocol,
        upgrades: bool,
        io: FirstByte<I>,
        service: S,
        drain: watch::Receiver<()>,
    ) -> Serving
    where
        I: Transport,
    {
        if protocol == Protocol::Http1 && upgrades {
            Box::pin(crate::http1::serve(
                Arc::clone(protocols),
                io,
                service,
                drain,
                self.0,
            ))
        } else {
            protocols.serve(protocol, upgrades, io, service, drain)
        }
    }
}

/// Runs `connection` to its end; if `drain` changes first, calls `finish` on it and then
/// runs it to its end. `drain` is held until then, which is what [`Drain`] counts.
///
/// The connection is polled where it was captured (hyper's connections are `Unpin`), so the
/// future is the connection and little more. As an `async fn` it would be twice that: its
/// parameter and the local it is moved into each keep a place in the future.
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn would hold the connection twice"
)]
fn until_drained<C>(
    mut connection: C,
    finish: fn(Pin<&mut C>),
    mut drain: watch::Receiver<()>,
) -> impl Future<Output = Result<(), BoxError>>
where
    C: Future<Output = hyper::Result<()>> + Unpin,
{
    async move {
        tokio::select! {
            biased;
            result = &mut connection => return result.map_err(Into::into),
            // Changed, or the sender is gone: either way, time to finish.
            _ = drain.changed() => {}
        }
        finish(Pin::new(&mut connection));
        Ok((&mut connection).await?)
    }
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

#[cfg(test)]
mod tests {
    use std::task::{Context, Poll};

    use super::*;

    /// A connection of 4 KiB, the size of hyper's HTTP/2 one, that ends when polled.
    struct Large(#[expect(dead_code, reason = "it is there for its size")] [u8; 4096]);

    impl Future for Large {
        type Output = hyper::Result<()>;

        fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Self::Output> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn watching_for_a_drain_holds_the_connection_once() {
        let drain = Drain::new();
        let watched = until_drained(Large([0; 4096]), |_| {}, drain.watcher());
        // Every move of the future copies all of it; with the connection held twice
        // (an `async fn`'s parameter and its local) it would be over 8 KiB.
        let size = std::mem::size_of_val(&watched);
        assert!(size < 4096 + 512, "{size} bytes");
        watched.await.expect("ended");
        assert_eq!(
            drain.open(),
            0,
            "the watcher is dropped with the connection"
        );
    }
}
