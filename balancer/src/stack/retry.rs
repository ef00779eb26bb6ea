//! The retry layer: a request that reached no worker, or whose worker was lost before it
//! answered, is sent to another one.
//!
//! Two failures are retried. A failed connect (or an HTTP/2 stream refused unprocessed,
//! twice): nothing of the request reached an application, so sending it elsewhere cannot make
//! the application act twice ([`AttemptError::Unsent`]). And a worker lost before it answered
//! (its connection closed or reset before any byte of the response), for a request that may
//! be sent twice — an idempotent method, or an `Idempotency-Key` header — with a body small
//! enough to have been kept ([`AttemptError::Lost`]): this is what keeps every `GET` whole
//! when a worker is killed with requests in flight, as Envoy's `retry_on: reset` and
//! HAProxy's `retry-on empty-response` do. The inner service has already ejected the worker
//! that failed and hands back the request (or its copy); the next attempt excludes that
//! worker and goes back through admission, so it may wait for a slot like any request.
//!
//! A request is retried at most `retries` times, not at all when no other worker was ready
//! (then the answer, `502`, is known at once), and only within the retry budget
//! ([`super::budget`]: a share of recent requests), so that retries cannot amplify an
//! overload or carry a request that crashes its worker around the whole pool. Any other
//! failure is final, since the worker may have acted on the request.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::{Request, Response};
use tower::Service;

use crate::Core;
use crate::body::RequestBody;
use crate::stack::{Attempt, AttemptError, Refusal};
use crate::worker::Worker;

/// Retries unsent requests on other workers; see the module docs.
#[derive(Debug, Clone)]
pub(crate) struct Retry<S> {
    inner: S,
    core: Arc<Core>,
}

impl<S> Retry<S> {
    /// At most `core.config.retries` retries per request, within `core.retry_budget`.
    pub(crate) fn new(inner: S, core: &Arc<Core>) -> Self {
        Self {
            inner,
            core: Arc::clone(core),
        }
    }
}

impl<S, B> Service<Request<RequestBody>> for Retry<S>
where
    S: Service<Attempt, Response = Response<B>, Error = AttemptError> + Clone,
{
    type Response = Response<B>;
    type Error = Refusal;
    type Future = Retrying<S>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Refusal>> {
        self.inner.poll_ready(cx).map_err(final_refusal)
    }

    fn call(&mut self, request: Request<RequestBody>) -> Self::Future {
        let attempt = Attempt {
            request,
            exclude: None,
        };
        Retrying {
            state: State::Calling {
                future: self.inner.call(attempt),
            },
            service: self.inner.clone(),
            retries_left: self.core.config.retries,
            retried: false,
            core: Arc::clone(&self.core),
        }
    }
}

/// The refusal for an error no retry can mend.
fn final_refusal(error: AttemptError) -> Refusal {
    match error {
        AttemptError::Refused(refusal) => refusal,
        // Admission never lets `NoRoom` out; were it to, the request found no worker.
        AttemptError::NoRoom(_) => Refusal::QueueFull,
        AttemptError::Unsent { .. } => Refusal::Unreachable,
        AttemptError::Lost { .. } => Refusal::WorkerLost,
    }
}

pin_project_lite::pin_project! {
    /// The future of [`Retry::call`].
    #[project = RetryingProjection]
    pub(crate) struct Retrying<S: Service<Attempt>> {
        #[pin]
        state: State<S::Future>,
        service: S,
        retries_left: u32,
        retried: bool,
        core: Arc<Core>,
    }
}

pin_project_lite::pin_project! {
    #[project = StateProjection]
    enum State<F> {
        Calling { #[pin] future: F },
        // Waiting for the service to be ready for the next attempt.
        Retrying { attempt: Option<Attempt> },
    }
}

impl<S: Service<Attempt>> RetryingProjection<'_, S> {
    /// Takes one retry from the request's allowance and from the budget; `false` (counted)
    /// when the budget has none left.
    fn spend(&mut self) -> bool {
        let core = &self.core;
        if !core
            .retry_budget
            .try_spend(core.clock.now(), core.windows.arrivals())
        {
            core.metrics.retry_budget_exhausted.inc();
            tracing::debug!("retry budget exhausted");
            return false;
        }
        *self.retries_left -= 1;
        *self.retried = true;
        core.metrics.retries.inc();
        true
    }
}

impl<F> State<F> {
    /// The next attempt, which leaves out `failed`.
    fn retrying(mut attempt: Attempt, failed: Arc<Worker>) -> Self {
        attempt.exclude = Some(failed);
        Self::Retrying {
            attempt: Some(attempt),
        }
    }
}

impl<S, B> Future for Retrying<S>
where
    S: Service<Attempt, Response = Response<B>, Error = AttemptError>,
{
    type Output = Result<Response<B>, Refusal>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProjection::Calling { future } => match ready!(future.poll(cx)) {
                    Ok(response) => return Poll::Ready(Ok(response)),
                    Err(AttemptError::Unsent {
                        attempt,
                        worker,
                        others_ready,
                        ..
                    }) if *this.retries_left > 0 && others_ready => {
                        if !this.spend() {
                            return Poll::Ready(Err(Refusal::RetryBudget));
                        }
                        this.state.set(State::retrying(*attempt, worker));
                    }
                    Err(AttemptError::Lost {
                        attempt,
                        worker,
                        others_ready,
                        ..
                    }) if *this.retries_left > 0 && others_ready => {
                        if !this.spend() {
                            return Poll::Ready(Err(Refusal::RetryBudget));
                        }
                        this.state.set(State::retrying(*attempt, worker));
                    }
                    // A retry that finds no slot in time could reach no worker either.
                    Err(AttemptError::Refused(Refusal::QueueFull | Refusal::QueueTimeout))
                        if *this.retried =>
                    {
                        return Poll::Ready(Err(Refusal::Unreachable));
                    }
                    Err(error) => return Poll::Ready(Err(final_refusal(error))),
                },
                StateProjection::Retrying { attempt } => {
                    if let Err(error) = ready!(this.service.poll_ready(cx)) {
                        return Poll::Ready(Err(final_refusal(error)));
                    }
                    let Some(attempt) = attempt.take() else {
                        // Only reachable if polled again after completing.
                        return Poll::Ready(Err(Refusal::Unreachable));
                    };
                    let future = this.service.call(attempt);
                    this.state.set(State::Calling { future });
                }
            }
        }
    }
}
