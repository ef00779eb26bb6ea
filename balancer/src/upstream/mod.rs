//! Connections to workers, in the protocol each worker speaks, and sending a request so that
//! the caller knows whether any of it reached the worker.
//!
//! A worker speaks HTTP/1.1 ([`WorkerProtocol::Http1`], the default: keep-alive connections,
//! one request at a time on each; [`http1`]) or HTTP/2 with prior knowledge
//! ([`WorkerProtocol::H2c`], as gRPC servers do: a few connections, many concurrent streams
//! on each; [`http2`]). Either way the connection lists are sharded by thread: with one
//! runtime per thread ([`crate::Balancer::serve_threads`]) a request then uses a connection
//! whose I/O runs on its own thread, and threads do not contend for one lock.
//!
//! What a failure means is the same for both: [`SendError::NotSent`] hands the request back
//! because nothing of it reached the worker's application (a failed connect, an HTTP/2
//! stream the worker refused before processing it), so it may go to another worker;
//! [`SendError::Lost`] says the worker's connection closed or reset before any of the
//! response arrived, with a copy of the request when it may be sent twice (its method is
//! idempotent, or it carries an `Idempotency-Key`, and its body was small enough to keep:
//! [`lent`]); [`SendError::Exchange`] is final, since the worker may have acted on it.
//! A worker removed from the pool has every connection ended ([`closing`]), so that what
//! waits on it fails in the same way, at once.

mod acking;
mod closing;
mod direct;
pub(crate) mod http1;
pub(crate) mod http2;
mod lent;
mod wire;

use std::cell::Cell;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::Request;
use hyper::Response;
use hyper::body::Incoming;
use tokio::net::TcpStream;

use crate::body::{BoxError, RequestBody};
use closing::{Closable, Closing};

/// The protocol the balancer speaks to a worker. Clients may speak HTTP/1.1 or h2c to the
/// balancer whatever the worker speaks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum WorkerProtocol {
    /// HTTP/1.1 over keep-alive connections, one request at a time on each.
    #[default]
    Http1,
    /// HTTP/2 over cleartext TCP with prior knowledge (no upgrade; gRPC servers speak it):
    /// a few connections, each carrying as many concurrent streams as the worker's
    /// `SETTINGS_MAX_CONCURRENT_STREAMS` allows. Trailers pass both ways. HTTP/1.1 upgrades
    /// (WebSocket) need an `http1` worker.
    H2c,
}

impl WorkerProtocol {
    /// The name used on the command line and in `/status`: `http1` or `h2c`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http1 => "http1",
            Self::H2c => "h2c",
        }
    }
}

impl fmt::Display for WorkerProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A worker protocol name that is neither `http1` nor `h2c`.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("unknown worker protocol {0:?}: expected http1 or h2c")]
pub struct UnknownProtocol(String);

impl FromStr for WorkerProtocol {
    type Err = UnknownProtocol;

    fn from_str(name: &str) -> Result<Self, UnknownProtocol> {
        match name {
            "http1" => Ok(Self::Http1),
            "h2c" => Ok(Self::H2c),
            other => Err(UnknownProtocol(other.to_owned())),
        }
    }
}

/// One worker's connections, in its protocol.
#[derive(Debug)]
pub(crate) enum Connections {
    /// Keep-alive HTTP/1.1 connections.
    Http1(Arc<http1::Http1Connections>),
    /// Multiplexed HTTP/2 connections.
    H2c(Arc<http2::Http2Connections>),
}

/// A worker's response body: read by hyper's client (HTTP/2, and HTTP/1.1 requests with a
/// body), or straight from the connection by the balancer's own client ([`direct`]).
#[derive(Debug)]
pub(crate) enum Body {
    Hyper(Incoming),
    Direct(direct::Body),
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Self::Hyper(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            Self::Direct(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Hyper(body) => body.is_end_stream(),
            Self::Direct(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Hyper(body) => body.size_hint(),
            Self::Direct(body) => body.size_hint(),
        }
    }
}

/// A worker's response head, and the HTTP/2 stream it keeps open until its body has been
/// read (`None` for HTTP/1.1, whose connection tracks that itself).
pub(crate) struct Reply {
    pub(crate) response: Response<Body>,
    pub(crate) stream: Option<http2::OpenStream>,
}

impl Connections {
    /// No connection yet to the worker at `addr`, speaking `protocol`; at most `max` kept
    /// open, spread over `shards` lists.
    pub(crate) fn new(
        protocol: WorkerProtocol,
        addr: SocketAddr,
        connect_timeout: Duration,
        max: usize,
        shards: usize,
    ) -> Self {
        match protocol {
            WorkerProtocol::Http1 => Self::Http1(Arc::new(http1::Http1Connections::new(
                addr,
                connect_timeout,
                max,
                shards,
            ))),
            WorkerProtocol::H2c => Self::H2c(Arc::new(http2::Http2Connections::new(
                addr,
                connect_timeout,
                max,
                shards,
            ))),
        }
    }

    /// Where the worker listens.
    pub(crate) fn addr(&self) -> SocketAddr {
        match self {
            Self::Http1(connections) => connections.addr(),
            Self::H2c(connections) => connections.addr(),
        }
    }

    /// The protocol they speak.
    pub(crate) fn protocol(&self) -> WorkerProtocol {
        match self {
            Self::Http1(_) => WorkerProtocol::Http1,
            Self::H2c(_) => WorkerProtocol::H2c,
        }
    }

    /// Closes every connection not in use (after the worker failed).
    pub(crate) fn clear(&self) {
        match self {
            Self::Http1(connections) => connections.clear(),
            Self::H2c(connections) => connections.clear(),
        }
    }

    /// Ends every connection, those in use included, and opens no more: the worker left the
    /// pool, and requests waiting for its answer fail over as if it had died
    /// ([`closing`]).
    pub(crate) fn close(&self) {
        match self {
            Self::Http1(connections) => connections.close(),
            Self::H2c(connections) => connections.close(),
        }
    }

    /// Sends `request` to the worker; the future resolves to its response head, and the body
    /// streams on. What can be done at once is done now (an HTTP/1.1 request is handed to an
    /// idle pooled connection here), and the future owns what it needs.
    pub(crate) fn send(
        &self,
        request: Request<RequestBody>,
    ) -> Sending<impl Future<Output = Result<Response<Incoming>, http1::TrySend>> + Send + use<>>
    {
        match self {
            Self::Http1(connections) => Sending::Http1 {
                future: connections.send(request),
            },
            // Boxed so that its larger state does not grow the future of every HTTP/1.1
            // request, which the balance layer boxes once per attempt.
            Self::H2c(connections) => {
                let connections = Arc::clone(connections);
                Sending::H2c {
                    future: Box::pin(async move { connections.send(request).await }),
                }
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// The future of [`Connections::send`]; `F` is hyper's answer on a pooled HTTP/1.1
    /// connection.
    #[project = SendingProjection]
    pub(crate) enum Sending<F> {
        Http1 {
            #[pin]
            future: http1::Sending<F>,
        },
        H2c {
            future: Pin<Box<dyn Future<Output = Result<Reply, SendError>> + Send>>,
        },
    }
}

impl<F> Future for Sending<F>
where
    F: Future<Output = Result<Response<Incoming>, http1::TrySend>>,
{
    type Output = Result<Reply, SendError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            SendingProjection::Http1 { future } => future.poll(cx).map_ok(|response| Reply {
                response,
                stream: None,
            }),
            SendingProjection::H2c { future } => future.as_mut().poll(cx),
        }
    }
}

thread_local! {
    /// This thread's shard; set by `serve_threads`, else drawn from `NEXT_SHARD`.
    static SHARD: Cell<Option<usize>> = const { Cell::new(None) };
}
static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

/// Pins the calling thread to connection shard `index` (taken modulo the shard count).
pub(crate) fn set_shard(index: usize) {
    SHARD.with(|shard| shard.set(Some(index)));
}

/// The calling thread's connection shard, before it is taken modulo the shard count.
fn shard_index() -> usize {
    SHARD.with(|shard| match shard.get() {
        Some(index) => index,
        None => {
            let index = NEXT_SHARD.fetch_add(1, Ordering::Relaxed);
            shard.set(Some(index));
            index
        }
    })
}

/// The header a client sends to say that its request may be sent twice: the application
/// recognises a second arrival by its key (the IETF HTTPAPI working group's draft
/// "The Idempotency-Key HTTP Header Field").
pub(crate) const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// Whether `request` may be sent again after its worker was lost before answering: its method
/// is idempotent (RFC 9110 §9.2.2: GET, HEAD, OPTIONS, TRACE, PUT, DELETE), or the client
/// marked it with an `Idempotency-Key` header.
pub(crate) fn may_resend(method: &http::Method, headers: &http::HeaderMap) -> bool {
    method.is_idempotent() || headers.contains_key(IDEMPOTENCY_KEY)
}

/// Opens a TCP connection to `addr` within `timeout`, with Nagle's algorithm off (requests
/// and responses are small writes that must leave at once), that ends when `closing` closes
/// (none is opened once it has: the worker left the pool).
async fn connect_tcp(
    addr: SocketAddr,
    timeout: Duration,
    closing: &Closing,
) -> Result<Closable<TcpStream>, ConnectError> {
    if closing.is_closed() {
        return Err(ConnectError::Left { addr });
    }
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(source)) => return Err(ConnectError::Tcp { addr, source }),
        Err(_) => return Err(ConnectError::Timeout { addr, timeout }),
    };
    if let Err(source) = stream.set_nodelay(true) {
        return Err(ConnectError::Tcp { addr, source });
    }
    Ok(closing.wrap(stream))
}

/// Nothing of a request reached the worker's application: opening a connection failed, or
/// the worker refused the HTTP/2 stream before processing it.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    /// The TCP connect was refused or reset.
    #[error("connecting to {addr}")]
    Tcp {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The TCP connect took longer than `connect_timeout`.
    #[error("connecting to {addr} timed out after {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
    /// The HTTP handshake failed, or the new connection closed before the request was
    /// written.
    #[error("starting {protocol} with {addr}")]
    Http {
        addr: SocketAddr,
        protocol: WorkerProtocol,
        #[source]
        source: hyper::Error,
    },
    /// The worker sent no HTTP/2 SETTINGS within `connect_timeout` of the connect: it does
    /// not speak h2c.
    #[error("{addr} sent no HTTP/2 SETTINGS within {timeout:?}")]
    NoSettings { addr: SocketAddr, timeout: Duration },
    /// The worker refused the HTTP/2 stream unprocessed (`REFUSED_STREAM`, or a `GOAWAY`
    /// that left it out), twice.
    #[error("{addr} refused the request unprocessed")]
    Refused {
        addr: SocketAddr,
        #[source]
        source: hyper::Error,
    },
    /// A new connection closed before any byte of the request could be written.
    #[error("{addr} closed the new connection before the request was written")]
    Closed {
        addr: SocketAddr,
        #[source]
        source: wire::WireError,
    },
    /// The worker left the pool (after this request picked it): no connection is opened.
    #[error("{addr} left the pool")]
    Left { addr: SocketAddr },
    /// A connect that failed, kept so that the HTTP/2 requests waiting for it can be told
    /// too.
    #[error(transparent)]
    Failed(Arc<ConnectError>),
    /// The connect another request made to the HTTP/2 worker while this one waited for its
    /// turn failed; this one was not tried again.
    #[error("connecting to {addr} failed for another request while this one waited")]
    FailedMeanwhile {
        addr: SocketAddr,
        #[source]
        source: Arc<ConnectError>,
    },
}

/// Sending a request to a worker failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SendError {
    /// Nothing of the request reached the worker's application; the request is handed back
    /// for a retry.
    #[error("request not sent")]
    NotSent {
        request: Box<Request<RequestBody>>,
        #[source]
        source: ConnectError,
    },
    /// The request was sent (or partly) and the worker's connection closed or reset before
    /// any byte of the response arrived: the worker died with it, most likely. `request` is a
    /// copy to send to another worker, when the request may be sent twice ([`may_resend`])
    /// and its body could be kept; `worker_down` says whether the failure was the worker's
    /// connection itself (so the worker should be left out), not one stream.
    #[error("worker lost before it answered")]
    Lost {
        request: Option<Box<Request<RequestBody>>>,
        worker_down: bool,
        #[source]
        source: BoxError,
    },
    /// The request was (at least partly) sent and then the exchange failed; it must not be
    /// retried, as the worker may have acted on it.
    #[error("exchange with worker failed")]
    Exchange(#[source] BoxError),
}
