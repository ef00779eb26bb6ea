//! The inner service: Squall's own balancing, under the layers.
//!
//! For each attempt it loads the pool's current snapshot (one `ArcSwap` load, no lock), picks
//! a worker by power of two choices on peak-EWMA cost ([`crate::pick`]) and reserves one of
//! its slots in the same step, then sends the request over one of the worker's connections
//! ([`crate::upstream`]: keep-alive HTTP/1.1, or a stream on a multiplexed h2c connection,
//! which the slot's lease holds until the response body ends). The time from sending to the
//! response head feeds the worker's latency estimate (what the next picks compare) and the
//! service-time histogram.
//!
//! What it cannot do it hands back for the layers above: no worker with room
//! ([`AttemptError::NoRoom`], on the first poll, for admission), or a request that reached
//! no application — a connect that failed before any byte was sent, or an HTTP/2 stream the
//! worker refused unprocessed, twice ([`AttemptError::Unsent`], for retry; the worker is
//! ejected first, unless it only refused a stream); or a request the worker was lost with
//! before it answered, when the request may be sent twice ([`AttemptError::Lost`], for retry;
//! the worker is ejected when its connection, not just a stream, failed). Any other failure
//! after the request was sent is final, and becomes the refusal that names its cause: the
//! client's body too large or too slow, or the worker's failure.

use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};

use http::Response;
use http_body_util::LengthLimitError;
use tokio::time::Instant;
use tower::Service;

use crate::Core;
use crate::body::{BodyTimeout, BoxError, Leased};
use crate::stack::admission::Lease;
use crate::stack::{Attempt, AttemptError, Refusal};
use crate::upstream::{self, ConnectError, Reply, SendError};
use crate::worker::Worker;

/// Picks a worker and sends; see the module docs.
#[derive(Debug, Clone)]
pub(crate) struct Balance {
    core: Arc<Core>,
}

impl Balance {
    pub(crate) fn new(core: &Arc<Core>) -> Self {
        Self {
            core: Arc::clone(core),
        }
    }
}

/// What sending one attempt resolves to.
type Sent = Result<Response<Leased<upstream::Body>>, AttemptError>;

impl Service<Attempt> for Balance {
    type Response = Response<Leased<upstream::Body>>;
    type Error = AttemptError;
    type Future = Sending;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), AttemptError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, attempt: Attempt) -> Sending {
        match self.core.pick(attempt.exclude.as_ref()) {
            Some(worker) => {
                let lease = Lease::new(worker, &self.core);
                let Attempt { request, exclude } = attempt;
                let sent = Instant::now();
                let sending = lease.worker.connections.send(request);
                Sending::Sending {
                    future: Box::pin(Attempted {
                        sending,
                        lease: Some(lease),
                        exclude,
                        sent,
                    }),
                }
            }
            None => Sending::NoRoom {
                attempt: Some(Box::new(attempt)),
            },
        }
    }
}

/// The future of [`Balance::call`]. An attempt is boxed ([`Attempted`], over hyper's
/// client, whose futures have no name): the one allocation of the stack's own per request.
pub(crate) enum Sending {
    NoRoom {
        attempt: Option<Box<Attempt>>,
    },
    Sending {
        future: Pin<Box<dyn Future<Output = Sent> + Send>>,
    },
}

impl Future for Sending {
    type Output = Sent;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Sent> {
        match self.get_mut() {
            Self::NoRoom { attempt } => Poll::Ready(match attempt.take() {
                Some(attempt) => Err(AttemptError::NoRoom(attempt)),
                // Only reachable if polled again after completing.
                None => Err(Refusal::WorkerLost.into()),
            }),
            Self::Sending { future } => future.as_mut().poll(cx),
        }
    }
}

pin_project_lite::pin_project! {
    /// One attempt on the worker it picked: the sending (under way since
    /// [`Balance::call`]), then what its outcome means ([`outcome`]). Written out rather than
    /// as an `async fn`, whose state would keep the request once more for each layer it
    /// passes through: this way the box holds it once, and stays in the allocator's small
    /// sizes.
    struct Attempted<F> {
        #[pin]
        sending: F,
        // Taken when the outcome comes.
        lease: Option<Lease>,
        exclude: Option<Arc<Worker>>,
        sent: Instant,
    }
}

impl<F> Future for Attempted<F>
where
    F: Future<Output = Result<Reply, SendError>>,
{
    type Output = Sent;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Sent> {
        let this = self.project();
        let sending = ready!(this.sending.poll(cx));
        let Some(lease) = this.lease.take() else {
            // Only reachable if polled again after it completed, which a future need not
            // answer.
            return Poll::Pending;
        };
        Poll::Ready(outcome(lease, this.exclude.take(), *this.sent, sending))
    }
}

/// What the outcome of sending an attempt, `sent` at that instant, means; see the module
/// docs.
fn outcome(
    mut lease: Lease,
    exclude: Option<Arc<Worker>>,
    sent: Instant,
    sending: Result<Reply, SendError>,
) -> Sent {
    match sending {
        Ok(Reply { response, stream }) => {
            lease.hold(stream);
            let took = sent.elapsed();
            let (worker, core) = (&lease.worker, lease.core());
            core.windows.record_service(took);
            worker.load.observe(took, core.clock.now());
            worker.responses.fetch_add(1, Ordering::Relaxed);
            Ok(response.map(|body| Leased::new(body, lease)))
        }
        Err(SendError::NotSent { request, source }) => {
            let (worker, core) = (Arc::clone(&lease.worker), Arc::clone(lease.core()));
            if matches!(
                source,
                ConnectError::Refused { .. } | ConnectError::Left { .. }
            ) {
                // The worker is up and answered: it refused this stream (it is busy or going
                // away). Ejecting it would take a working worker out of rotation, and under
                // load could take them all out one after another. Or it left the pool just
                // after this request picked it: it is out already.
                tracing::debug!(worker = %worker.id, error = %source, "not sent");
            } else {
                tracing::warn!(worker = %worker.id, error = %source, "connect failed");
                core.eject(&worker);
            }
            drop(lease);
            Err(AttemptError::Unsent {
                others_ready: core.has_worker_besides(&worker),
                attempt: Box::new(Attempt {
                    request: *request,
                    exclude,
                }),
                worker,
                source,
            })
        }
        Err(SendError::Lost {
            request,
            worker_down,
            source,
        }) => {
            if let Some(refusal) = clients_fault(&source) {
                return Err(refusal.into());
            }
            let (worker, core) = (Arc::clone(&lease.worker), Arc::clone(lease.core()));
            if worker_down {
                tracing::warn!(worker = %worker.id, error = %source, "worker lost before it answered");
                core.eject(&worker);
            } else {
                tracing::debug!(worker = %worker.id, error = %source, "request lost before an answer");
            }
            drop(lease);
            match request {
                Some(request) => Err(AttemptError::Lost {
                    others_ready: core.has_worker_besides(&worker),
                    attempt: Box::new(Attempt {
                        request: *request,
                        exclude,
                    }),
                    worker,
                    source,
                }),
                None => Err(Refusal::WorkerLost.into()),
            }
        }
        Err(SendError::Exchange(error)) => Err(clients_fault(&error)
            .unwrap_or_else(|| {
                tracing::debug!(worker = %lease.worker.id, %error, "exchange failed");
                Refusal::WorkerFailed
            })
            .into()),
    }
}

/// The refusal for a failure the client's body caused: too large, or too slow.
fn clients_fault(error: &BoxError) -> Option<Refusal> {
    if caused_by::<LengthLimitError>(error) {
        Some(Refusal::BodyTooLarge)
    } else if caused_by::<BodyTimeout>(error) {
        Some(Refusal::BodyTooSlow)
    } else {
        None
    }
}

/// Whether `error` was caused, at any depth, by an `E`.
fn caused_by<E: StdError + 'static>(error: &BoxError) -> bool {
    let mut cause: Option<&(dyn StdError + 'static)> = Some(error.as_ref());
    while let Some(current) = cause {
        if current.is::<E>() {
            return true;
        }
        cause = current.source();
    }
    false
}
