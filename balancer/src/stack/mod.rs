//! The request path, as a stack of tower layers around Squall's own balancing service.
//!
//! Every client request goes through, outermost first:
//!
//! | layer | module | what it does |
//! |---|---|---|
//! | telemetry | [`telemetry`] | measures from arrival to response head and records it, whatever the answer |
//! | proxy | [`proxy`] | HTTP proxy semantics: refuses an oversized body, rewrites the heads, times and limits the upload, tunnels upgrades |
//! | retry | [`retry`] | sends a request that reached no worker, or (if it may be sent twice) whose worker was lost before answering, to another one, within a budget |
//! | admission | [`admission`] | when every worker is at its limit, queues the request (FIFO, bounded, timed) until one has room |
//! | timeout | [`timeout`] | bounds one attempt: the worker's response head, then each pause of its body |
//! | balance | [`balance`] | the inner service: P2C on peak-EWMA over the pool snapshot, reserves the worker's slot, sends |
//!
//! Why this order:
//! - **Telemetry outermost**, so it measures what the client lives through — queue wait,
//!   retries and the balancer's own refusals included (a `503` from a full queue counts as an
//!   error in the windows the scaler reads, and its latency as latency).
//! - **Proxy next**, because a request is rewritten once, however many attempts it takes; a
//!   body declared too large is refused before it waits anywhere; and the request body is
//!   wrapped once, so that a retry can send the very same body on.
//! - **Retry outside admission**, because each retry needs a slot on another worker: it goes
//!   back through admission (and may wait there) with the failed worker excluded.
//! - **Admission outside the timeout**, so the time a request waits in the queue is bounded
//!   by `queue_timeout` and does not eat into the worker's `response_timeout`, which starts
//!   when an attempt starts.
//! - **Balance innermost**: choosing a worker and reserving its slot are one step (a
//!   compare-and-swap on the worker's in-flight count), so that the per-worker limit holds
//!   however many requests pick at once. When no worker has room, balance hands the attempt
//!   back untouched ([`AttemptError::NoRoom`]) and admission queues it; when a connect fails,
//!   it hands the attempt back unsent ([`AttemptError::Unsent`]) and retry decides. This is
//!   linkerd2-proxy's split — a queue with a fail-fast timeout in front of a peak-EWMA P2C
//!   balancer — made request-aware, since a retry must exclude the worker that failed.
//!
//! Every service here is always ready (`poll_ready` returns `Ready` at once): back-pressure is
//! the admission queue's, which waits inside `call`, per request, with its own timeout.
//! [`Serve`] is what hyper runs for one connection: it owns one stack, answers a
//! [`Refusal`] with the balancer's own short response, and paces every response body by its
//! client ([`ClientPaced`]: an HTTP/2 stream whose client takes nothing is reset).

pub(crate) mod admission;
pub(crate) mod balance;
pub(crate) mod budget;
pub(crate) mod proxy;
pub(crate) mod retry;
pub(crate) mod telemetry;
pub(crate) mod timeout;

use std::cell::RefCell;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use tower::{Service, ServiceBuilder};

use crate::Core;
use crate::body::{IdleTimeout, Leased, RequestBody, ResponseBody};
use crate::stall::ClientPaced;
use crate::upstream::ConnectError;
use crate::worker::Worker;

/// The whole request path for one client connection.
pub(crate) type Stack = telemetry::Telemetry<
    proxy::Proxy<retry::Retry<admission::Admission<timeout::Timeouts<balance::Balance>>>>,
>;

/// The body a worker's response reaches the client with.
pub(crate) type WorkerBody = IdleTimeout<Leased<crate::upstream::Body>>;

/// Builds the stack for a connection from `client`, in the order the module docs explain.
pub(crate) fn stack(core: &Arc<Core>, client: SocketAddr) -> Stack {
    let config = &core.config;
    ServiceBuilder::new()
        .layer_fn(|inner| telemetry::Telemetry::new(inner, core))
        .layer_fn(|inner| proxy::Proxy::new(inner, config, client))
        .layer_fn(|inner| retry::Retry::new(inner, core))
        .layer_fn(|inner| admission::Admission::new(inner, core))
        .layer_fn(|inner| timeout::Timeouts::new(inner, config))
        .service(balance::Balance::new(core))
}

/// One try at getting a worker's response for a request.
#[derive(Debug)]
pub(crate) struct Attempt {
    pub(crate) request: Request<RequestBody>,
    /// The worker an earlier attempt could not reach; not picked again.
    pub(crate) exclude: Option<Arc<Worker>>,
}

/// Why an attempt produced no response. The first two hand the request back untouched, for
/// the layer that knows what to do next.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AttemptError {
    /// Every eligible worker is at its concurrency limit (admission queues the request).
    #[error("no worker has room")]
    NoRoom(Box<Attempt>),
    /// Connecting to `worker` failed and nothing was sent; it has been ejected (retry may
    /// send the request to another worker).
    #[error("worker {} could not be reached", .worker.id)]
    Unsent {
        attempt: Box<Attempt>,
        worker: Arc<Worker>,
        /// Whether another worker was ready when it failed.
        others_ready: bool,
        #[source]
        source: ConnectError,
    },
    /// The worker's connection closed or reset before any of its answer, and the request may
    /// be sent twice: `attempt` holds a copy of it (retry may send it to another worker).
    #[error("worker {} was lost before it answered", .worker.id)]
    Lost {
        attempt: Box<Attempt>,
        worker: Arc<Worker>,
        /// Whether another worker was ready when it failed.
        others_ready: bool,
        #[source]
        source: crate::body::BoxError,
    },
    /// The balancer answers the request itself.
    #[error(transparent)]
    Refused(#[from] Refusal),
}

/// Why the balancer answers a request itself; the message is the body it sends.
#[derive(Debug, thiserror::Error, PartialEq)]
pub(crate) enum Refusal {
    /// `400`: an HTTP/1.1 request without `Host`, or a request with more than one (RFC 9112
    /// §3.2): which site it is for is not known, so it is not guessed.
    #[error("the request needs exactly one Host header")]
    BadHost,
    /// `413`: the body is, or grew, larger than `max_body_bytes`.
    #[error("request body too large")]
    BodyTooLarge,
    /// `408`: the client paused its body for longer than `body_timeout`.
    #[error("request body too slow")]
    BodyTooSlow,
    /// `503`: every worker is busy and the queue is full.
    #[error("all workers busy")]
    QueueFull,
    /// `503`: the request waited `queue_timeout` in the queue.
    #[error("no worker became free in time")]
    QueueTimeout,
    /// `502`: no worker accepted a connection, retry included.
    #[error("no worker could be reached")]
    Unreachable,
    /// `502`: the worker broke the exchange after the request had been sent.
    #[error("the worker failed to answer")]
    WorkerFailed,
    /// `502`: the worker's connection closed before any of its answer, and the request may
    /// not be sent twice (its method is not idempotent and it has no `Idempotency-Key`, or
    /// its body was too large to keep), so it went to no other worker.
    #[error(
        "the worker closed the connection before answering; the request was not sent to another worker, as it may not be sent twice"
    )]
    WorkerLost,
    /// `502`: the request needed another worker, and retries were at their budget.
    #[error("the worker could not answer, and retries are at their budget")]
    RetryBudget,
    /// `504`: the worker did not answer within `response_timeout`.
    #[error("the worker did not answer in time")]
    WorkerTimeout,
}

impl Refusal {
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            Self::BadHost => StatusCode::BAD_REQUEST,
            Self::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BodyTooSlow => StatusCode::REQUEST_TIMEOUT,
            Self::QueueFull | Self::QueueTimeout => StatusCode::SERVICE_UNAVAILABLE,
            Self::Unreachable | Self::WorkerFailed | Self::WorkerLost | Self::RetryBudget => {
                StatusCode::BAD_GATEWAY
            }
            Self::WorkerTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The short plain-text answer; a `503` says when to try again.
    fn response<B>(&self, retry_after: Duration) -> Response<ResponseBody<B>> {
        let status = self.status();
        let text = format!(
            "{} {}: {self}\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or("")
        );
        let mut response = Response::new(Either::Right(Full::new(Bytes::from(text))));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if status == StatusCode::SERVICE_UNAVAILABLE {
            headers.insert(
                header::RETRY_AFTER,
                HeaderValue::from(retry_after.as_secs().max(1)),
            );
        }
        response
    }
}

/// What hyper serves on one client connection: the connection's [`Stack`], with every
/// [`Refusal`] turned into the balancer's own answer.
///
/// hyper calls a service through `&self` and tower through `&mut self`; hyper-util's
/// `TowerToHyperService` bridges the two by cloning the whole stack for every request. The
/// stack is always ready and its futures own what they need, so `Serve` instead keeps one
/// stack per connection in a `RefCell` and borrows it just for the call (hyper never calls
/// re-entrantly), which saves a clone of every layer per request.
pub(crate) struct Serve {
    stack: RefCell<Stack>,
    retry_after: Duration,
}

impl Serve {
    pub(crate) fn new(core: &Arc<Core>, client: SocketAddr) -> Self {
        Self {
            stack: RefCell::new(stack(core, client)),
            retry_after: core.config.retry_after,
        }
    }
}

impl Serve {
    /// Sends `request` down the stack; what hyper and the own HTTP/1 path both call.
    fn answer<C>(&self, request: Request<C>) -> Answer<<Stack as Service<Request<C>>>::Future>
    where
        Stack: Service<Request<C>, Error = Refusal>,
    {
        let mut stack = self.stack.borrow_mut();
        let retry_after = self.retry_after;
        // Always `Ready` (see the module docs); asked anyway, as tower's contract wants.
        match Service::<Request<C>>::poll_ready(
            &mut *stack,
            &mut Context::from_waker(Waker::noop()),
        ) {
            Poll::Ready(Ok(())) | Poll::Pending => Answer::Pending {
                future: stack.call(request),
                retry_after,
            },
            Poll::Ready(Err(refusal)) => Answer::Refused {
                refusal: Some(refusal),
                retry_after,
            },
        }
    }
}

impl hyper::service::Service<Request<Incoming>> for Serve {
    type Response = Response<ClientPaced<ResponseBody<WorkerBody>>>;
    type Error = Infallible;
    type Future = Answer<<Stack as Service<Request<Incoming>>>::Future>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        self.answer(request)
    }
}

/// Body-less HTTP/1 requests, read by the own path ([`lifecycle::http1`]), go down the same
/// stack.
impl lifecycle::Bodiless for Serve {
    type ResponseBody = ClientPaced<ResponseBody<WorkerBody>>;
    type Answer = Infallibly<Answer<<Stack as Service<Request<()>>>::Future>>;

    fn call_bodiless(&self, request: Request<()>) -> Self::Answer {
        Infallibly {
            future: self.answer(request),
        }
    }
}

pin_project_lite::pin_project! {
    /// A future that cannot fail, giving its value without the `Result`.
    pub(crate) struct Infallibly<F> {
        #[pin]
        future: F,
    }
}

impl<F, T> Future for Infallibly<F>
where
    F: Future<Output = Result<T, Infallible>>,
{
    type Output = T;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let Ok(value) = ready!(self.project().future.poll(cx));
        Poll::Ready(value)
    }
}

pin_project_lite::pin_project! {
    /// The future of [`Serve::call`].
    #[project = AnswerProjection]
    pub(crate) enum Answer<F> {
        Pending { #[pin] future: F, retry_after: Duration },
        Refused { refusal: Option<Refusal>, retry_after: Duration },
    }
}

impl<F, B> Future for Answer<F>
where
    F: Future<Output = Result<Response<ResponseBody<B>>, Refusal>>,
{
    type Output = Result<Response<ClientPaced<ResponseBody<B>>>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let (outcome, retry_after) = match self.project() {
            AnswerProjection::Pending {
                future,
                retry_after,
            } => (ready!(future.poll(cx)), *retry_after),
            AnswerProjection::Refused {
                refusal,
                retry_after,
            } => (
                Err(refusal.take().unwrap_or(Refusal::WorkerFailed)),
                *retry_after,
            ),
        };
        let response = outcome.unwrap_or_else(|refusal| refusal.response(retry_after));
        // Made here, in the task that serves the request: an HTTP/2 stream's own task,
        // whose stall watch the body joins (see `stall`).
        Poll::Ready(Ok(response.map(ClientPaced::new)))
    }
}
