//! The accept loop every HTTP listener in Squall runs.
//!
//! It accepts connections until the [`Shutdown`] comes, serving each with hyper (HTTP/1.1, or
//! HTTP/2 with prior knowledge) in a task of its own. Then it closes the listener, tells every
//! connection to finish (HTTP/1 after its current response, HTTP/2 with GOAWAY) and returns
//! once they all have, or once [`Limits::drain_timeout`] has passed.
//!
//! The limits bound what a client can hold: the time to send a request head, the head's
//! size, HTTP/2 streams per connection, and, for listeners that must stay reachable under
//! abuse (admin pages, forkd's API), the number of connections at once and the life of each.
//! A connection over the count waits in the kernel's accept queue, not in our memory.
//!
//! hyper's header-read timeout starts once it reads a request head, but the connection first
//! reads the opening bytes to tell HTTP/1 from HTTP/2; a client that connects and sends
//! nothing would wait there for ever. So the first byte of every connection must come
//! within the same timeout ([`FirstByte`]); later request heads are hyper's to time.
//!
//! With [`HttpServer::tls`], each connection's task first runs the TLS handshake (bounded by
//! the same timeout; see [`Tls`]) and then speaks the protocol ALPN chose.

use std::error::Error as StdError;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Body, Incoming};
use hyper::server::conn::{http1, http2};
use hyper::service::Service;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto::HttpServerConnExec;
use socket2::SockRef;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::Shutdown;
use crate::Transport;
use crate::first_byte::{FirstByte, Opening};
use crate::http1::{Bodiless, Bounds};
use crate::nodelay::NoDelay;
use crate::protocols::{Drain, Hyper, Own, Path, Protocol, Protocols};
use crate::stream::{Listener, Stream};
use crate::tls::{Negotiated, Tls};

/// Pause after a failed `accept` (out of file descriptors, typically) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// hyper's floor for its HTTP/1 read buffer, which caps the request head; the own path
/// ([`crate::http1`]) keeps the same cap.
const MIN_HEAD_BUFFER: usize = 8192;

/// What one listener allows a client.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// How long a client may take to send a request head (HTTP/1) before the connection is
    /// closed, so that idle sockets cannot pile up.
    pub header_read_timeout: Duration,
    /// The largest request head, in bytes (HTTP/1 buffer, HTTP/2 header list).
    pub max_header_bytes: usize,
    /// At most this many HTTP/2 streams at once on one connection.
    pub max_concurrent_streams: u32,
    /// At most this many connections at once; `None` for no limit. Further connections wait
    /// in the kernel's accept queue until one closes.
    pub max_connections: Option<usize>,
    /// A connection is closed this long after it was accepted, whatever it is doing; `None`
    /// for no limit.
    pub connection_lifetime: Option<Duration>,
    /// How long shutdown waits for open connections to finish.
    pub drain_timeout: Duration,
}

impl Limits {
    /// For listeners a few people or scrapers use (admin pages, forkd's API): 64 connections,
    /// 10 s to send a request head, 60 s per connection, 16 streams, 5 s to drain.
    pub fn control() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 16 * 1024,
            max_concurrent_streams: 16,
            max_connections: Some(64),
            connection_lifetime: Some(Duration::from_secs(60)),
            drain_timeout: Duration::from_secs(5),
        }
    }
}

/// An HTTP server: the connection settings and the limits. Build one per listener with
/// [`HttpServer::new`] (or [`HttpServer::with_executor`], to run HTTP/2 streams another
/// way), then [`HttpServer::serve`].
#[derive(Debug)]
pub struct HttpServer<E = TokioExecutor> {
    protocols: Arc<Protocols<E>>,
    limits: Limits,
    name: &'static str,
    /// Serve HTTP/1.1 only (no HTTP/2, no upgrades).
    http1_only: bool,
    /// Terminate TLS on every connection.
    tls: Option<Tls>,
}

/// How a served connection ended.
type ConnectionResult = Result<(), Box<dyn StdError + Send + Sync>>;

/// A connection being told its protocol (or its TLS handshake), then served in it: boxed, so
/// that the task running it under its lifetime stays small. It holds what it needs until
/// then, and the connection hyper serves in a box of its own (`Protocols::serve`).
type Served = Pin<Box<dyn Future<Output = ConnectionResult> + Send>>;

impl HttpServer {
    /// A server with `limits`; `name` says which listener it is in logs.
    pub fn new(name: &'static str, limits: Limits) -> Self {
        Self::with_executor(name, limits, TokioExecutor::new())
    }
}

impl<E> HttpServer<E> {
    /// A server whose HTTP/2 streams, each a task of its own, are started by `executor`.
    pub fn with_executor(name: &'static str, limits: Limits, executor: E) -> Self {
        let mut http1 = http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            // hyper's floor for its read buffer; it caps the request head.
            .max_buf_size(limits.max_header_bytes.max(MIN_HEAD_BUFFER));
        let mut http2 = http2::Builder::new(executor);
        http2
            .timer(TokioTimer::new())
            .max_concurrent_streams(limits.max_concurrent_streams)
            .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
        Self {
            protocols: Arc::new(Protocols { http1, http2 }),
            limits,
            name,
            http1_only: false,
            tls: None,
        }
    }

    /// Serves HTTP/1.1 only, for an API whose clients speak nothing else: an idle
    /// connection then closes after the header-read timeout, as HTTP/1 keep-alive does,
    /// where an idle HTTP/2 connection would be held until the end of its life.
    pub fn http1_only(mut self) -> Self {
        self.http1_only = true;
        self
    }

    /// Terminates TLS on every connection (see [`Tls`]): the handshake runs in the
    /// connection's task, bounded by the header-read timeout, and the connection then speaks
    /// what ALPN chose. Without it, connections speak HTTP/1.1 or HTTP/2 with prior knowledge.
    pub fn tls(mut self, tls: Tls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// The limits this server enforces.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Serves `listener` until `shutdown`, then drains (see the module docs). `connection`
    /// turns each accepted stream into the I/O object to serve (the stream itself, or a
    /// wrapper) and the service that answers its requests. Returns whether every
    /// connection finished within the drain timeout.
    pub async fn serve<I, S, B>(
        &self,
        listener: TcpListener,
        shutdown: &Shutdown,
        connection: impl FnMut(Stream, SocketAddr) -> (I, S),
    ) -> bool
    where
        I: Transport,
        S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<Box<dyn StdError + Send + Sync>>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn StdError + Send + Sync>>,
        E: HttpServerConnExec<S::Future, B> + Clone + Send + Sync + 'static,
    {
        self.accept(listener, shutdown, connection, Hyper).await
    }

    /// Like [`HttpServer::serve`], with HTTP/1 requests that have no body answered on
    /// Squall's own path by the service's [`Bodiless`] side, and the rest by hyper (see
    /// [`crate::http1`]). Not with [`HttpServer::http1_only`], which serves hyper alone.
    pub async fn serve_bodiless<I, S, B>(
        &self,
        listener: TcpListener,
        shutdown: &Shutdown,
        connection: impl FnMut(Stream, SocketAddr) -> (I, S),
    ) -> bool
    where
        I: Transport,
        S: Service<Request<Incoming>, Response = Response<B>>
            + Bodiless<ResponseBody = B>
            + Send
            + 'static,
        S::Future: Send + 'static,
        S::Error: Into<Box<dyn StdError + Send + Sync>>,
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn StdError + Send + Sync>>,
        E: HttpServerConnExec<S::Future, B> + Clone + Send + Sync + 'static,
    {
        let bounds = Bounds {
            header_read_timeout: self.limits.header_read_timeout,
            max_head: self.limits.max_header_bytes.max(MIN_HEAD_BUFFER),
        };
        self.accept(listener, shutdown, connection, Own(bounds))
            .await
    }

    /// The accept loop of both, serving each connection along `path`.
    async fn accept<I, S, B, P>(
        &self,
        listener: TcpListener,
        shutdown: &Shutdown,
        mut connection: impl FnMut(Stream, SocketAddr) -> (I, S),
        path: P,
    ) -> bool
    where
        I: Transport,
        S: Send + 'static,
        P: Path<S, B, E>,
        E: Send + Sync + 'static,
    {
        let drain = Drain::new();
        let slots = self
            .limits
            .max_connections
            .map(|n| Arc::new(Semaphore::new(n)));
        let listener = match Listener::new(listener, self.name) {
            Ok(listener) => listener,
            Err(error) => {
                tracing::error!(listener = self.name, %error, "cannot watch the listener");
                return false;
            }
        };
        let mut nodelay = NoDelay::on_listener(SockRef::from(&listener.socket()));
        let stop = shutdown.wait();
        tokio::pin!(stop);
        loop {
            // Wait for a free slot before accepting, so a full listener leaves connections
            // in the kernel's queue.
            let slot = match &slots {
                Some(slots) => tokio::select! {
                    slot = Arc::clone(slots).acquire_owned() => match slot {
                        Ok(slot) => Some(slot),
                        Err(_) => break, // never closed
                    },
                    () = &mut stop => break,
                },
                None => None,
            };
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        tracing::warn!(listener = self.name, %error, "accept failed");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                },
                () = &mut stop => break,
            };
            if let Some(socket) = stream.socket() {
                nodelay.set(socket, self.name);
            }
            let (io, service) = connection(stream, peer);
            let (limit, upgrades, name) =
                (self.limits.header_read_timeout, !self.http1_only, self.name);
            let protocols = Arc::clone(&self.protocols);
            // Watched from now, so a shutdown waits for a handshake under way too.
            let mut watcher = drain.watcher();
            // Two futures, each boxed on its own, so that what is moved per connection is
            // only what it holds (see `Protocols::serve`).
            let served: Served = match self.tls.clone() {
                None => {
                    let mut io = FirstByte::new(io, limit);
                    Box::pin(async move {
                        let protocol = if upgrades {
                            // A connection that has not said what it speaks has nothing in
                            // flight: a drain closes it at once.
                            let opening = tokio::select! {
                                opening = io.opening() => opening?,
                                _ = watcher.changed() => return Ok(()),
                            };
                            match opening {
                                Opening::Speaks(protocol) => protocol,
                                Opening::Closed => return Ok(()),
                            }
                        } else {
                            Protocol::Http1
                        };
                        path.serve(&protocols, protocol, upgrades, io, service, watcher)
                            .await
                    })
                }
                Some(tls) => Box::pin(async move {
                    let Some((io, negotiated)) = tls.handshake(io, peer, limit, name).await else {
                        return Ok(());
                    };
                    let protocol = match negotiated {
                        Negotiated::Http2 if upgrades => Protocol::Http2,
                        _ => Protocol::Http1,
                    };
                    let io = FirstByte::new(io, limit);
                    path.serve(&protocols, protocol, upgrades, io, service, watcher)
                        .await
                }),
            };
            let lifetime = self.limits.connection_lifetime;
            tokio::spawn(async move {
                let result = match lifetime {
                    Some(lifetime) => match tokio::time::timeout(lifetime, served).await {
                        Ok(result) => result,
                        Err(_) => {
                            tracing::debug!(listener = name, %peer, "connection closed at the end of its life");
                            Ok(())
                        }
                    },
                    None => served.await,
                };
                if let Err(error) = result {
                    tracing::debug!(listener = name, %peer, %error, "connection ended");
                }
                drop(slot);
            });
        }
        drop(listener);
        let open = drain.open();
        if open > 0 {
            tracing::info!(
                listener = self.name,
                connections = open,
                "shutting down: finishing open connections"
            );
        }
        tokio::select! {
            () = drain.finish_all() => true,
            () = tokio::time::sleep(self.limits.drain_timeout) => {
                tracing::warn!(listener = self.name, "drain timeout passed with connections still open");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests;
