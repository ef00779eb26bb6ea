//! The retry layer: a request that reached no worker is sent to another one.
//!
//! Only a failed connect is retried: nothing of the request was sent, so sending it elsewhere
//! cannot make the application act twice. The inner service has already ejected the worker
//! that failed and hands the request back unsent ([`AttemptError::Unsent`]); the next
//! attempt excludes that worker and goes back through admission, so it may wait for a slot
//! like any request. A request is retried at most `connect_retries` times, and not at all
//! when no other worker was ready, since then the answer (`502`) is known at once. Any later
//! failure is final, since the worker may have acted on the request.
//!
//! Each failed worker is ejected, so a host that died with several workers costs its clients
//! a retry each, not an error.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::{Request, Response};
use prometheus::IntCounter;
use tower::Service;

use crate::body::RequestBody;
use crate::stack::{Attempt, AttemptError, Refusal};

/// Retries unsent requests on other workers; see the module docs.
#[derive(Debug, Clone)]
pub(crate) struct Retry<S> {
    inner: S,
    retries: u32,
    retried: IntCounter,
}

impl<S> Retry<S> {
    /// At most `retries` retries per request, each counted in `retried`.
    pub(crate) fn new(inner: S, retries: u32, retried: IntCounter) -> Self {
        Self {
            inner,
            retries,
            retried,
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
            retries_left: self.retries,
            retried: false,
            counter: self.retried.clone(),
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
    }
}

pin_project_lite::pin_project! {
    /// The future of [`Retry::call`].
    pub(crate) struct Retrying<S: Service<Attempt>> {
        #[pin]
        state: State<S::Future>,
        service: S,
        retries_left: u32,
        retried: bool,
        counter: IntCounter,
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
                        mut attempt,
                        worker,
                        others_ready,
                        ..
                    }) => {
                        if *this.retries_left == 0 || !others_ready {
                            return Poll::Ready(Err(Refusal::Unreachable));
                        }
                        *this.retries_left -= 1;
                        *this.retried = true;
                        this.counter.inc();
                        attempt.exclude = Some(worker);
                        this.state.set(State::Retrying {
                            attempt: Some(*attempt),
                        });
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
