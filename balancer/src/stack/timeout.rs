//! The timeout layer: the worker's deadlines for one attempt.
//!
//! - `response_timeout` bounds the wait for the response head, counted from when the attempt
//!   starts (after any queue wait): an upload the worker reads whole before answering counts
//!   too. Beyond it the attempt is dropped (which frees the worker's slot) and the client
//!   gets `504`.
//! - `worker_body_timeout` bounds each pause of the response body (nginx's
//!   `proxy_read_timeout`): a worker that stops sending has its response cut off.
//!
//! The client's deadlines are elsewhere: the request head's in the listener's limits, the
//! request body's pauses in the proxy layer (the body is wrapped once, before any retry), and
//! a client that stops reading in the connection's write-stall guard.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Response;
use tokio::time::Sleep;
use tower::Service;

use crate::Config;
use crate::body::{IdleTimeout, Sender};
use crate::stack::{Attempt, AttemptError, Refusal};

/// Bounds the worker's answer; see the module docs.
#[derive(Debug, Clone)]
pub(crate) struct Timeouts<S> {
    inner: S,
    response: Duration,
    response_body: Duration,
}

impl<S> Timeouts<S> {
    pub(crate) fn new(inner: S, config: &Config) -> Self {
        Self {
            inner,
            response: config.response_timeout,
            response_body: config.worker_body_timeout,
        }
    }
}

impl<S, B> Service<Attempt> for Timeouts<S>
where
    S: Service<Attempt, Response = Response<B>, Error = AttemptError>,
{
    type Response = Response<IdleTimeout<B>>;
    type Error = AttemptError;
    type Future = Timed<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), AttemptError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, attempt: Attempt) -> Self::Future {
        Timed {
            future: self.inner.call(attempt),
            // Registered with the timer only if the inner future has to wait.
            deadline: tokio::time::sleep(self.response),
            response_body: self.response_body,
        }
    }
}

pin_project_lite::pin_project! {
    /// The future of [`Timeouts::call`].
    pub(crate) struct Timed<F> {
        #[pin]
        future: F,
        #[pin]
        deadline: Sleep,
        response_body: Duration,
    }
}

impl<F, B> Future for Timed<F>
where
    F: Future<Output = Result<Response<B>, AttemptError>>,
{
    type Output = Result<Response<IdleTimeout<B>>, AttemptError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(outcome) = this.future.poll(cx) {
            let pause = *this.response_body;
            return Poll::Ready(outcome.map(|response| {
                response.map(|body| IdleTimeout::new(body, Sender::Worker, pause))
            }));
        }
        match this.deadline.poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(Refusal::WorkerTimeout.into())),
            Poll::Pending => Poll::Pending,
        }
    }
}
