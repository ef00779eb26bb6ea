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
//! failure, which is safe to retry on another worker. A bodiless idempotent request whose
//! reused connection closed under it before any answer (the keep-alive race: the worker
//! closed or died just as the request went out) is sent once more, as hyper's own client and
//! nginx do.

use std::error::Error as StdError;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

use super::{ConnectError, SendError, WorkerProtocol, bodiless_copy, connect_tcp, shard_index};
use crate::body::RequestBody;

type Sender = http1::SendRequest<RequestBody>;

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
        Self {
            addr,
            connect_timeout,
            max_per_shard: max.div_ceil(shards),
            shards: (0..shards).map(|_| Mutex::new(Vec::new())).collect(),
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
        for shard in &self.shards {
            shard
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .clear();
        }
    }

    /// Sends `request` to the worker and returns its response head; the body streams on.
    pub(crate) async fn send(
        &self,
        mut request: Request<RequestBody>,
    ) -> Result<Response<Incoming>, SendError> {
        // A copy of a request that may be sent again if a reused connection turns out to have
        // been closed by the worker while the request was being written (the keep-alive race);
        // made only for bodiless idempotent requests, and used at most once.
        // Kept in the sending future itself, which is boxed already: no allocation of its own.
        let mut replay: Option<Request<RequestBody>> = None;
        let mut looked_for_replay = false;
        loop {
            let (mut sender, pooled) = match self.take() {
                Some(sender) => (sender, true),
                None => match connect(self.addr, self.connect_timeout).await {
                    Ok(sender) => (sender, false),
                    Err(source) => {
                        return Err(SendError::NotSent {
                            request: Box::new(request),
                            source,
                        });
                    }
                },
            };
            if pooled && !looked_for_replay {
                looked_for_replay = true;
                replay = replayable_copy(&request);
            }
            match sender.try_send_request(request).await {
                Ok(response) => {
                    self.put(sender);
                    return Ok(response);
                }
                Err(mut failed) => match failed.take_message() {
                    // A pooled connection the worker had closed: try the next one.
                    Some(unsent) if pooled => request = unsent,
                    Some(unsent) => {
                        return Err(SendError::NotSent {
                            request: Box::new(unsent),
                            source: ConnectError::Http {
                                addr: self.addr,
                                protocol: WorkerProtocol::Http1,
                                source: failed.into_error(),
                            },
                        });
                    }
                    None => match replay.take() {
                        Some(copy) if pooled && closed_before_answer(failed.error()) => {
                            tracing::debug!(worker = %self.addr, "reused connection was closed; sending again");
                            request = copy;
                        }
                        _ => return Err(SendError::Exchange(failed.into_error())),
                    },
                },
            }
        }
    }
}

/// Opens a TCP connection to `addr` and starts HTTP/1.1 on it.
async fn connect(addr: SocketAddr, timeout: Duration) -> Result<Sender, ConnectError> {
    let stream = connect_tcp(addr, timeout).await?;
    let (sender, connection) = http1::handshake(TokioIo::new(stream))
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

/// A copy of a request with no body and an idempotent method (RFC 9110 §9.2.2), which can
/// be sent again without changing its meaning.
fn replayable_copy(request: &Request<RequestBody>) -> Option<Request<RequestBody>> {
    if !request.method().is_idempotent() {
        return None;
    }
    bodiless_copy(request)
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
