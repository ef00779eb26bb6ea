//! Connections to HTTP/1.1 workers: keep-alive pools, and sending a request so that the
//! caller knows whether any byte of it reached the worker.
//!
//! Each worker keeps a list of connections (the most recently used idle one is taken first,
//! so a burst reuses warm ones). A request takes an idle one, or connects a new one, and
//! puts it back as soon as the response head has arrived; once the response body has been
//! read to the end the connection is idle again. A pooled
//! connection the worker closed in the meantime gives the request back unsent (hyper's
//! `try_send_request`), and the request moves on to the next connection; a request that could
//! not be written on a *new* connection either is returned to the caller as a connect
//! failure, which is safe to retry on another worker.
//!
//! A connection that closes or resets after the request went out and before any byte of the
//! response came back lost the request: the worker died with it, or (on a reused connection)
//! closed that connection just as the request went out, the keep-alive race. A request that
//! may be sent twice ([`super::may_resend`]) is kept until the answer starts ([`super::lent`])
//! and, after a reused connection lost it, sent once more on a new connection to the same
//! worker: a live worker answers it, a dead one refuses the connect, and the request goes to
//! another worker either way. A loss on a new connection is handed back as
//! [`SendError::Lost`], with the copy, for another worker.
//!
//! A request without a body that asks for no upgrade (most GETs) goes over the balancer's
//! own client instead ([`super::direct`]), on connections of its own, with the same meaning
//! for every failure: nothing written is not sent, a connection closed before any answer
//! lost the request, the keep-alive race is sent again on a new connection.

use std::error::Error as StdError;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

use super::acking::Acking;
use super::closing::Closing;
use super::direct::{self, Conn, Exchange, Failure, Pool};
use super::lent::{Lent, Resend};
use super::{Body, ConnectError, SendError, WorkerProtocol, connect_tcp, may_resend, shard_index};
use crate::body::RequestBody;

type Sender = http1::SendRequest<Lent>;

/// Keep-alive connections to one worker, idle or still streaming a response body, and how to
/// open more.
///
/// A connection is taken out only while a request is being written and its response head
/// awaited, then put back at once; it becomes usable again by itself once its response body
/// has been read to the end (`is_ready`). Keeping busy ones in the list costs a short scan
/// but no task per request to watch for the end of each body.
///
/// The list is sharded by thread: with one runtime per thread ([`crate::Balancer::serve_threads`])
/// a request then reuses a connection whose I/O runs on its own thread, and threads do not
/// contend for one lock.
#[derive(Debug)]
pub(crate) struct Http1Connections {
    addr: SocketAddr,
    connect_timeout: Duration,
    max_per_shard: usize,
    shards: Box<[Mutex<Vec<Sender>>]>,
    /// The idle connections of the balancer's own client ([`super::direct`]).
    direct: Arc<Pool>,
    /// Ends every connection when the worker leaves the pool.
    closing: Closing,
}

impl Http1Connections {
    /// No connection yet to the worker at `addr`; at most `max` kept open, spread over
    /// `shards` lists.
    pub(crate) fn new(
        addr: SocketAddr,
        connect_timeout: Duration,
        max: usize,
        shards: usize,
    ) -> Self {
        let shards = shards.max(1);
        let max_per_shard = max.div_ceil(shards);
        Self {
            addr,
            connect_timeout,
            max_per_shard,
            shards: (0..shards).map(|_| Mutex::new(Vec::new())).collect(),
            direct: Arc::new(Pool::new(max_per_shard, shards)),
            closing: Closing::default(),
        }
    }

    /// Where the worker listens.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Sender>> {
        let shard = &self.shards[shard_index() % self.shards.len()];
        // A list of connection handles stays usable after a panic elsewhere.
        shard
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The most recently used connection that is open and idle. The scan starts at the most
    /// recently put back and stops at the first idle one, dropping the closed ones it passes,
    /// so a busy pool is not walked end to end for every request.
    fn take(&self) -> Option<Sender> {
        let mut senders = self.lock();
        let mut index = senders.len();
        while index > 0 {
            index -= 1;
            if senders[index].is_closed() {
                // The last one, moved here, has been looked at already.
                senders.swap_remove(index);
            } else if senders[index].is_ready() {
                return Some(senders.swap_remove(index));
            }
        }
        None
    }

    /// Puts a connection back; beyond the limit (once the closed ones are dropped) it is
    /// dropped, which closes it once its response has been read.
    fn put(&self, sender: Sender) {
        let mut senders = self.lock();
        if senders.len() >= self.max_per_shard {
            senders.retain(|sender| !sender.is_closed());
        }
        if senders.len() < self.max_per_shard {
            senders.push(sender);
        }
    }

    /// Closes every connection not in use (after the worker failed).
    pub(crate) fn clear(&self) {
        self.direct.clear();
        for shard in &self.shards {
            shard
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .clear();
        }
    }

    /// Ends every connection, those in use included, and opens no more: the worker left the
    /// pool ([`super::closing`]).
    pub(crate) fn close(&self) {
        self.closing.close();
        self.direct.close();
        self.clear();
    }

    /// Sends `request` to the worker; the future resolves to its response head, and the body
    /// streams on.
    ///
    /// The usual case is done at once, in place: an idle pooled connection takes the
    /// request now, and the future only waits for the answer. A connect, and whatever follows
    /// a failure, runs boxed ([`Self::send_from`]), so that the future every request carries
    /// (and that the balance layer boxes) holds the request once and stays small.
    pub(crate) fn send(
        self: &Arc<Self>,
        request: Request<RequestBody>,
    ) -> Sending<impl Future<Output = Result<Response<Incoming>, TrySend>> + Send + use<>> {
        let resendable = may_resend(request.method(), request.headers());
        if direct::suits(&request) {
            let Some(conn) = self.direct.take() else {
                let connections = Arc::clone(self);
                return Sending::Slow {
                    future: Box::pin(connections.send_direct(request, resendable, false)),
                };
            };
            return Sending::Direct {
                exchange: Exchange::new(conn, &request, &self.direct),
                unanswered: Some(Unanswered {
                    connections: Arc::clone(self),
                    request,
                    resendable,
                }),
            };
        }
        let Some(mut sender) = self.take() else {
            let connections = Arc::clone(self);
            return Sending::Slow {
                future: Box::pin(
                    async move { connections.send_from(request, resendable, false).await },
                ),
            };
        };
        let (outgoing, resend) = Resend::lend(request, resendable);
        Sending::Pooled {
            response: sender.try_send_request(outgoing),
            pooled: Some(Pooled {
                connections: Arc::clone(self),
                sender,
                resend,
                resendable,
            }),
        }
    }

    /// Sends `request` on a pooled connection or a new one, and on until it is answered or
    /// cannot be; see the module docs. `new_only` is set once a reused connection lost the
    /// request before any answer: the next try is on a new connection, which tells a worker
    /// that closed an idle connection just as the request went out (the keep-alive race)
    /// from one that died.
    async fn send_from(
        &self,
        mut request: Request<RequestBody>,
        resendable: bool,
        mut new_only: bool,
    ) -> Sent {
        loop {
            let pooled = if new_only { None } else { self.take() };
            let reused = pooled.is_some();
            let mut sender = match pooled {
                Some(sender) => sender,
                None => match connect(self.addr, self.connect_timeout, &self.closing).await {
                    Ok(sender) => sender,
                    Err(source) => {
                        return Err(SendError::NotSent {
                            request: Box::new(request),
                            source,
                        });
                    }
                },
            };
            let (outgoing, resend) = Resend::lend(request, resendable);
            let failed = match sender.try_send_request(outgoing).await {
                Ok(response) => {
                    self.answered(sender, resend);
                    return Ok(response.map(Body::Hyper));
                }
                Err(failed) => failed,
            };
            match self.after_failure(failed, resend, reused).await {
                Next::Again {
                    request: again,
                    new_only: only_new,
                } => {
                    request = *again;
                    new_only = only_new;
                }
                Next::Done(error) => return Err(error),
            }
        }
    }

    /// The worker's response head came on `sender`: the request need not be kept for
    /// sending again, and the connection goes back to the list.
    fn answered(&self, sender: Sender, resend: Resend) {
        resend.answered();
        self.put(sender);
    }

    /// What follows a request that `reused` (or a new) connection failed to get answered.
    async fn after_failure(&self, mut failed: TrySend, resend: Resend, reused: bool) -> Next {
        if let Some(unsent) = failed.take_message() {
            let request = unsent.map(Lent::into_inner);
            if reused {
                // A pooled connection the worker had closed: try the next one.
                return Next::Again {
                    request: Box::new(request),
                    new_only: false,
                };
            }
            return Next::Done(SendError::NotSent {
                request: Box::new(request),
                source: ConnectError::Http {
                    addr: self.addr,
                    protocol: WorkerProtocol::Http1,
                    source: failed.into_error(),
                },
            });
        }
        let source = failed.into_error();
        // A worker that left the pool had its connections ended under its requests.
        let left = self.closing.is_closed();
        if !closed_before_answer(&source) && !left {
            return Next::Done(SendError::Exchange(source.into()));
        }
        match resend.recover(self.connect_timeout).await {
            Some(copy) if reused && !left => {
                tracing::debug!(worker = %self.addr, "reused connection was closed; sending again");
                Next::Again {
                    request: Box::new(copy),
                    new_only: true,
                }
            }
            copy => Next::Done(SendError::Lost {
                request: copy.map(Box::new),
                // A new connection lost: the worker is gone. A reused one lost with nothing
                // to send again could have been the keep-alive race. One that left the pool
                // is out already.
                worker_down: !reused && !left,
                source: source.into(),
            }),
        }
    }

    /// [`Self::send_from`] for a request that goes over the balancer's own client
    /// ([`direct::suits`]).
    async fn send_direct(
        self: Arc<Self>,
        mut request: Request<RequestBody>,
        resendable: bool,
        mut new_only: bool,
    ) -> Sent {
        loop {
            let pooled = if new_only { None } else { self.direct.take() };
            let reused = pooled.is_some();
            let conn = match pooled {
                Some(conn) => conn,
                None => match Conn::connect(self.addr, self.connect_timeout, &self.closing).await {
                    Ok(conn) => conn,
                    Err(source) => {
                        return Err(SendError::NotSent {
                            request: Box::new(request),
                            source,
                        });
                    }
                },
            };
            let failure = match Exchange::new(conn, &request, &self.direct).await {
                Ok(response) => return Ok(response.map(Body::Direct)),
                Err(failure) => failure,
            };
            match self.direct_failed(failure, request, resendable, reused) {
                Next::Again {
                    request: again,
                    new_only: only_new,
                } => {
                    request = *again;
                    new_only = only_new;
                }
                Next::Done(error) => return Err(error),
            }
        }
    }

    /// What follows a request over the balancer's own client that `reused` (or a new)
    /// connection failed to get answered: as [`Self::after_failure`], and the request, which
    /// has no body, is still whole.
    fn direct_failed(
        &self,
        failure: Failure,
        request: Request<RequestBody>,
        resendable: bool,
        reused: bool,
    ) -> Next {
        let Failure {
            unsent,
            before_answer,
            error,
        } = failure;
        if unsent {
            if reused {
                // A pooled connection the worker had closed: try the next one.
                return Next::Again {
                    request: Box::new(request),
                    new_only: false,
                };
            }
            let source = if self.closing.is_closed() {
                ConnectError::Left { addr: self.addr }
            } else {
                ConnectError::Closed {
                    addr: self.addr,
                    source: error,
                }
            };
            return Next::Done(SendError::NotSent {
                request: Box::new(request),
                source,
            });
        }
        let left = self.closing.is_closed();
        if !before_answer && !left {
            return Next::Done(SendError::Exchange(error.into()));
        }
        if reused && !left && resendable {
            tracing::debug!(worker = %self.addr, "reused connection was closed; sending again");
            return Next::Again {
                request: Box::new(request),
                new_only: true,
            };
        }
        Next::Done(SendError::Lost {
            request: resendable.then(|| Box::new(request)),
            worker_down: !reused && !left,
            source: error.into(),
        })
    }
}

/// hyper's answer to one try: the response head, or the failure (with the request when
/// none of it was sent).
pub(crate) type TrySend = hyper::client::conn::TrySendError<Request<Lent>>;

/// After a failed try: send again (on a new connection only, after the keep-alive race), or
/// give up with this error.
enum Next {
    Again {
        request: Box<Request<RequestBody>>,
        new_only: bool,
    },
    Done(SendError),
}

/// What a request sent on a pooled connection holds until its answer.
pub(crate) struct Pooled {
    connections: Arc<Http1Connections>,
    sender: Sender,
    resend: Resend,
    resendable: bool,
}

/// What a request sent over the balancer's own client holds until its answer: the request
/// itself (it has no body), to send again after a failure that allows it.
pub(crate) struct Unanswered {
    connections: Arc<Http1Connections>,
    request: Request<RequestBody>,
    resendable: bool,
}

/// What [`Http1Connections::send`] resolves to.
type Sent = Result<Response<Body>, SendError>;

pin_project_lite::pin_project! {
    /// The future of [`Http1Connections::send`]: `F` is hyper's answer on a pooled
    /// connection; anything else is boxed.
    #[project = SendingProjection]
    pub(crate) enum Sending<F> {
        Pooled {
            #[pin]
            response: F,
            // Taken when the answer comes.
            pooled: Option<Pooled>,
        },
        Direct {
            exchange: Exchange,
            // Taken when the answer comes.
            unanswered: Option<Unanswered>,
        },
        Slow {
            future: Pin<Box<dyn Future<Output = Sent> + Send>>,
        },
    }
}

impl<F> Future for Sending<F>
where
    F: Future<Output = Result<Response<Incoming>, TrySend>>,
{
    type Output = Sent;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Sent> {
        let (answer, pooled) = match self.as_mut().project() {
            SendingProjection::Slow { future } => return future.as_mut().poll(cx),
            SendingProjection::Direct {
                exchange,
                unanswered,
            } => {
                let answer = ready!(Pin::new(exchange).poll(cx));
                let Some(Unanswered {
                    connections,
                    request,
                    resendable,
                }) = unanswered.take()
                else {
                    // Only reachable if polled again after it completed.
                    return Poll::Pending;
                };
                let failure = match answer {
                    Ok(response) => return Poll::Ready(Ok(response.map(Body::Direct))),
                    Err(failure) => failure,
                };
                let future = match connections.direct_failed(failure, request, resendable, true) {
                    Next::Again { request, new_only } => {
                        Box::pin(connections.send_direct(*request, resendable, new_only))
                            as Pin<Box<dyn Future<Output = Sent> + Send>>
                    }
                    Next::Done(error) => return Poll::Ready(Err(error)),
                };
                self.set(Sending::Slow { future });
                return self.poll(cx);
            }
            SendingProjection::Pooled { response, pooled } => {
                let answer = ready!(response.poll(cx));
                (answer, pooled.take())
            }
        };
        let Some(Pooled {
            connections,
            sender,
            resend,
            resendable,
        }) = pooled
        else {
            // Only reachable if polled again after it completed, which a future need not
            // answer.
            return Poll::Pending;
        };
        match answer {
            Ok(response) => {
                connections.answered(sender, resend);
                Poll::Ready(Ok(response.map(Body::Hyper)))
            }
            Err(failed) => {
                let future = Box::pin(async move {
                    match connections.after_failure(failed, resend, true).await {
                        Next::Again { request, new_only } => {
                            connections.send_from(*request, resendable, new_only).await
                        }
                        Next::Done(error) => Err(error),
                    }
                });
                self.set(Sending::Slow { future });
                self.poll(cx)
            }
        }
    }
}

/// Opens a TCP connection to `addr` and starts HTTP/1.1 on it; the connection ends when
/// `closing` closes.
async fn connect(
    addr: SocketAddr,
    timeout: Duration,
    closing: &Closing,
) -> Result<Sender, ConnectError> {
    let stream = connect_tcp(addr, timeout, closing).await?;
    let (sender, connection) = http1::handshake(TokioIo::new(Acking::new(stream)))
        .await
        .map_err(|source| ConnectError::Http {
            addr,
            protocol: WorkerProtocol::Http1,
            source,
        })?;
    tokio::spawn(async move {
        // Upgrades are allowed on every connection: a 101 answer hands the socket over to
        // the tunnel, and the connection simply never becomes idle again.
        if let Err(error) = connection.with_upgrades().await {
            tracing::debug!(%addr, %error, "worker connection ended");
        }
    });
    Ok(sender)
}

/// Whether the connection failed before any of the response arrived: closed, reset or
/// broken while writing.
fn closed_before_answer(error: &hyper::Error) -> bool {
    use std::io::ErrorKind;
    if error.is_incomplete_message() || error.is_canceled() {
        return true;
    }
    let mut cause = error.source();
    while let Some(current) = cause {
        if let Some(io) = current.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted
            );
        }
        cause = current.source();
    }
    false
}
