//! Connections to h2c workers (HTTP/2 with prior knowledge, as gRPC servers speak it):
//! multiplexed, so a few connections carry every request.
//!
//! Each shard keeps a list of open connections. A connection is used once the worker's
//! first SETTINGS have arrived. A request opens a stream on the first one with a free stream
//! slot: fewer streams than the worker's `SETTINGS_MAX_CONCURRENT_STREAMS` ([`watch`] reads
//! it off the connection), counted from when the request is sent until its
//! response body has been read or dropped ([`OpenStream`]). When every connection is full,
//! one request at a time per shard connects another (the others wait for it and then share
//! it, or, if it failed, are handed back unsent with its error at once: a worker that accepts
//! connections but never speaks would otherwise cost each of them a `connect_timeout` in
//! turn); past `max` connections the least busy one takes the stream and hyper queues it
//! until the worker has room. A connection that closed, or whose worker sent `GOAWAY`, takes
//! no new stream and is dropped from the list; its streams in flight finish.
//!
//! Flow control and trailers are hyper's: DATA frames are released as the client reads
//! them, and trailer frames pass through the bodies as they are.
//!
//! A request the worker refused before processing it — `REFUSED_STREAM`, or a `GOAWAY` that
//! left its stream out — reached no application. It is sent once more to the same worker
//! (on another connection if that one is going away: the worker may have been shutting it
//! down gracefully); refused again, it is handed back unsent, for another worker. Its body comes back from
//! hyper through [`super::lent`], which keeps a copy of what it handed out up to 64 KiB until the
//! response head arrives; a refused request whose body was larger cannot be sent again, so
//! that refusal is final. Any other failure before the response head is handed back as
//! [`SendError::Lost`], with the request for another worker when it may be sent twice
//! ([`super::may_resend`]); the worker counts as down when the connection itself failed,
//! not when only the stream was reset.

mod watch;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use http::header;
use http::uri::{Authority, Scheme};
use http::{Request, Uri, Version};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};

use super::closing::Closing;
use super::lent::{Lender, Lent};
use super::{ConnectError, Reply, SendError, WorkerProtocol, connect_tcp, may_resend, shard_index};
use crate::body::RequestBody;
use watch::{PeerState, Watched};

type Sender = http2::SendRequest<Lent>;

/// Multiplexed HTTP/2 connections to one h2c worker; see the module docs.
#[derive(Debug)]
pub(crate) struct Http2Connections {
    addr: SocketAddr,
    connect_timeout: Duration,
    max_per_shard: usize,
    shards: Box<[Shard]>,
    /// Ends every connection when the worker leaves the pool.
    closing: Closing,
}

#[derive(Debug, Default)]
struct Shard {
    open: Mutex<Vec<Arc<Connection>>>,
    /// Held by the one request that connects for the shard while every connection is full;
    /// it holds the error of the last connect that failed.
    connecting: tokio::sync::Mutex<Option<Arc<ConnectError>>>,
    /// How many of the shard's connects failed; counted with `connecting` held, and read
    /// before waiting for it, so that a waiter knows whether one failed meanwhile.
    failed_connects: AtomicU64,
}

/// One HTTP/2 connection and the streams the balancer has open on it.
#[derive(Debug)]
struct Connection {
    sender: Sender,
    peer: Arc<PeerState>,
    streams: AtomicUsize,
}

impl Connection {
    fn usable(&self) -> bool {
        !self.sender.is_closed() && !self.peer.going_away()
    }

    fn has_room(&self) -> bool {
        let limit = usize::try_from(self.peer.max_streams()).unwrap_or(usize::MAX);
        self.streams.load(Ordering::Relaxed) < limit
    }

    /// Counts one more stream on it.
    fn open_stream(self: &Arc<Self>) -> OpenStream {
        self.streams.fetch_add(1, Ordering::Relaxed);
        OpenStream(Arc::clone(self))
    }
}

/// A stream the balancer has open on an HTTP/2 connection: it counts against the
/// connection's stream limit until dropped, with the response body that holds it.
#[derive(Debug)]
pub(crate) struct OpenStream(Arc<Connection>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Http2Connections {
    /// No connection yet to the h2c worker at `addr`; at most `max` kept open, spread over
    /// `shards` lists.
    pub(crate) fn new(
        addr: SocketAddr,
        connect_timeout: Duration,
        max: usize,
        shards: usize,
    ) -> Self {
        let shards = shards.max(1);
        Self {
            addr,
            connect_timeout,
            max_per_shard: max.div_ceil(shards).max(1),
            shards: (0..shards).map(|_| Shard::default()).collect(),
            closing: Closing::default(),
        }
    }

    /// Where the worker listens.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn shard(&self) -> &Shard {
        &self.shards[shard_index() % self.shards.len()]
    }

    /// Closes every connection: streams in flight finish, new ones go to new connections.
    pub(crate) fn clear(&self) {
        for shard in &self.shards {
            lock(&shard.open).clear();
        }
    }

    /// Ends every connection, streams in flight included, and opens no more: the worker left
    /// the pool ([`super::closing`]).
    pub(crate) fn close(&self) {
        self.closing.close();
        self.clear();
    }

    /// A stream on the first usable connection with room; unusable ones are dropped.
    fn take(&self, shard: &Shard) -> Option<OpenStream> {
        let mut open = lock(&shard.open);
        open.retain(|connection| connection.usable());
        let connection = open.iter().find(|connection| connection.has_room())?;
        Some(connection.open_stream())
    }

    /// A stream on a new connection, or, while another request connected, on one with room
    /// by now; past the limit of connections, on the least busy one. Also says whether the
    /// connection is new. If a connect failed while this request waited for its turn, its
    /// error, without trying again.
    async fn connect_or_take(&self, shard: &Shard) -> Result<(OpenStream, bool), ConnectError> {
        let failed_before = shard.failed_connects.load(Ordering::Acquire);
        let mut last_failure = shard.connecting.lock().await;
        if let Some(stream) = self.take(shard) {
            return Ok((stream, false));
        }
        if shard.failed_connects.load(Ordering::Acquire) != failed_before
            && let Some(failure) = &*last_failure
        {
            return Err(ConnectError::FailedMeanwhile {
                addr: self.addr,
                source: Arc::clone(failure),
            });
        }
        {
            let open = lock(&shard.open);
            if open.len() >= self.max_per_shard
                && let Some(busy) = open
                    .iter()
                    .min_by_key(|connection| connection.streams.load(Ordering::Relaxed))
            {
                return Ok((busy.open_stream(), false));
            }
        }
        let connection = match connect(self.addr, self.connect_timeout, &self.closing).await {
            Ok(connection) => Arc::new(connection),
            Err(error) => {
                let error = Arc::new(error);
                *last_failure = Some(Arc::clone(&error));
                shard.failed_connects.fetch_add(1, Ordering::Release);
                return Err(ConnectError::Failed(error));
            }
        };
        // A worker that answers again starts afresh.
        *last_failure = None;
        let stream = connection.open_stream();
        lock(&shard.open).push(connection);
        Ok((stream, true))
    }

    /// Sends `request` to the worker on a stream of its own; see the module docs for what
    /// a refusal does.
    pub(crate) async fn send(&self, request: Request<RequestBody>) -> Result<Reply, SendError> {
        let (head, mut body) = origin_to_absolute(request, self.addr).into_parts();
        let shard = self.shard();
        let mut refused_once = false;
        loop {
            let taken = match self.take(shard) {
                Some(stream) => Ok((stream, false)),
                None => self.connect_or_take(shard).await,
            };
            let (stream, fresh) = match taken {
                Ok(taken) => taken,
                Err(source) => {
                    return Err(SendError::NotSent {
                        request: Box::new(Request::from_parts(head, body)),
                        source,
                    });
                }
            };
            let (lent, lender) = Lent::new(body);
            let mut sender = stream.0.sender.clone();
            let mut failed = match sender.try_send_request(copy_head(&head, lent)).await {
                Ok(response) => {
                    lender.answered();
                    return Ok(Reply {
                        response: response.map(super::Body::Hyper),
                        stream: Some(stream),
                    });
                }
                Err(failed) => failed,
            };
            if let Some(unsent) = failed.take_message() {
                body = unsent.into_body().into_inner();
                if fresh {
                    // A new connection that closed before the request went out: the worker
                    // accepts connections but serves none.
                    return Err(SendError::NotSent {
                        request: Box::new(Request::from_parts(head, body)),
                        source: ConnectError::Http {
                            addr: self.addr,
                            protocol: WorkerProtocol::H2c,
                            source: failed.into_error(),
                        },
                    });
                }
                // A pooled connection that closed before the request went out: try another.
                continue;
            }
            let source = failed.into_error();
            if !refused_unprocessed(&source) {
                let request = if may_resend(&head.method, &head.headers) {
                    recover(&head, lender, self.connect_timeout).await
                } else {
                    None
                };
                return Err(SendError::Lost {
                    request: request.map(Box::new),
                    // One that left the pool is out already.
                    worker_down: connection_failed(&source) && !self.closing.is_closed(),
                    source: source.into(),
                });
            }
            // hyper gives the body back when it drops it, as the refused stream ends.
            body = match tokio::time::timeout(self.connect_timeout, lender.returned()).await {
                Ok(Ok(replayed)) => RequestBody::Replayed(Box::new(replayed)),
                // Too large to have been kept: it cannot be sent again.
                _ => {
                    return Err(SendError::Lost {
                        request: None,
                        worker_down: false,
                        source: source.into(),
                    });
                }
            };
            if refused_once {
                return Err(SendError::NotSent {
                    request: Box::new(Request::from_parts(head, body)),
                    source: ConnectError::Refused {
                        addr: self.addr,
                        source,
                    },
                });
            }
            tracing::debug!(worker = %self.addr, error = %source, "stream refused; sending again");
            refused_once = true;
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A list of connection handles stays usable after a panic elsewhere.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Opens a TCP connection to `addr` and starts HTTP/2 on it with prior knowledge; the
/// connection ends when `closing` closes.
async fn connect(
    addr: SocketAddr,
    timeout: Duration,
    closing: &Closing,
) -> Result<Connection, ConnectError> {
    let stream = connect_tcp(addr, timeout, closing).await?;
    let peer = Arc::new(PeerState::default());
    let io = TokioIo::new(Watched::new(stream, Arc::clone(&peer)));
    let (sender, connection) =
        http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(|source| ConnectError::Http {
                addr,
                protocol: WorkerProtocol::H2c,
                source,
            })?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%addr, %error, "worker connection ended");
        }
    });
    // Its stream limit is known before the first request goes out, so that a burst opens
    // as many connections as it needs; a worker that never sends SETTINGS speaks no HTTP/2.
    if tokio::time::timeout(timeout, peer.settled()).await.is_err() {
        return Err(ConnectError::NoSettings { addr, timeout });
    }
    Ok(Connection {
        sender,
        peer,
        streams: AtomicUsize::new(0),
    })
}

/// The request as HTTP/2 sends it: its target in absolute form (the `:scheme` and
/// `:authority` pseudo-headers), the authority taken from `Host`, which it replaces, or from
/// a target already in absolute form, or else the worker's address.
fn origin_to_absolute(request: Request<RequestBody>, worker: SocketAddr) -> Request<RequestBody> {
    let (mut parts, body) = request.into_parts();
    let authority = parts
        .headers
        .remove(header::HOST)
        .and_then(|host| Authority::try_from(host.as_bytes()).ok())
        // A request sent once already (to a worker that was lost) is in absolute form.
        .or_else(|| parts.uri.authority().cloned())
        .or_else(|| Authority::try_from(worker.to_string()).ok());
    let mut target = std::mem::take(&mut parts.uri).into_parts();
    target.scheme = Some(Scheme::HTTP);
    target.authority = authority;
    if target.path_and_query.is_none() {
        target.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
    }
    parts.uri = Uri::from_parts(target).unwrap_or_else(|_| Uri::from_static("/"));
    parts.version = Version::HTTP_2;
    // HTTP/2 has no `Connection` header (RFC 9113 §8.2.2); the proxy layer set it for an
    // HTTP/1.1 worker (`te`, with `TE: trailers`).
    parts.headers.remove(header::CONNECTION);
    Request::from_parts(parts, body)
}

/// A request with `head`'s method, target, version and headers, and `body`.
fn copy_head<B>(head: &http::request::Parts, body: B) -> Request<B> {
    let mut request = Request::new(body);
    *request.method_mut() = head.method.clone();
    *request.uri_mut() = head.uri.clone();
    *request.version_mut() = head.version;
    *request.headers_mut() = head.headers.clone();
    request
}

/// The request `head` was, with its body as hyper gives it back (waiting at most `within`);
/// `None` if the body was too large to keep.
async fn recover(
    head: &http::request::Parts,
    lender: Lender,
    within: Duration,
) -> Option<Request<RequestBody>> {
    let replayed = tokio::time::timeout(within, lender.returned())
        .await
        .ok()?
        .ok()?;
    Some(copy_head(head, RequestBody::Replayed(Box::new(replayed))))
}

/// Whether the failure was the connection's (closed, reset, or a `GOAWAY` for an error),
/// rather than one stream's reset.
fn connection_failed(error: &hyper::Error) -> bool {
    let mut cause = std::error::Error::source(error);
    while let Some(current) = cause {
        if let Some(h2) = current.downcast_ref::<h2::Error>() {
            return h2.is_io() || h2.is_go_away();
        }
        if current.is::<std::io::Error>() {
            return true;
        }
        cause = current.source();
    }
    // No h2 error underneath: hyper saw the connection close.
    true
}

/// Whether the worker refused the stream before processing it (RFC 9113 §8.7): a
/// `REFUSED_STREAM` reset, or the error h2 gives the streams a `GOAWAY` left out.
fn refused_unprocessed(error: &hyper::Error) -> bool {
    let mut cause = std::error::Error::source(error);
    while let Some(current) = cause {
        if let Some(h2) = current.downcast_ref::<h2::Error>() {
            return h2.is_remote()
                && (h2.reason() == Some(h2::Reason::REFUSED_STREAM)
                    || (h2.is_go_away() && h2.reason() == Some(h2::Reason::NO_ERROR)));
        }
        cause = current.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::HeaderValue;

    #[test]
    fn the_target_is_made_absolute_from_the_host_header() {
        let request = Request::builder()
            .uri("/helloworld.Greeter/SayHello?x=1")
            .header("host", "app.example:50051")
            .header("te", "trailers")
            .body(RequestBody::Empty)
            .expect("valid request");
        let worker: SocketAddr = "127.0.0.1:9".parse().expect("address");
        let sent = origin_to_absolute(request, worker);
        assert_eq!(
            sent.uri(),
            "http://app.example:50051/helloworld.Greeter/SayHello?x=1"
        );
        assert!(!sent.headers().contains_key("host"), "`:authority` says it");
        assert_eq!(sent.headers()["te"], HeaderValue::from_static("trailers"));
        assert_eq!(sent.version(), Version::HTTP_2);
        // Without Host, the worker's address.
        let bare = Request::builder()
            .uri("/")
            .body(RequestBody::Empty)
            .expect("valid request");
        assert_eq!(
            origin_to_absolute(bare, worker).uri(),
            "http://127.0.0.1:9/"
        );
    }
}
