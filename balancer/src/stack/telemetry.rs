//! The telemetry layer: measures every request from its arrival to its response head and
//! records the latency and the status in the windows the scaler reads and in the Prometheus
//! metrics.
//!
//! It is the outermost layer, so what it measures is what the client lived through: the
//! queue wait, retries and the balancer's own refusals included (a refusal is recorded with
//! the status it will be answered with).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::Response;
use tokio::time::Instant;
use tower::Service;

use crate::Core;
use crate::stack::Refusal;

/// Records what each request measured; see the module docs.
#[derive(Debug, Clone)]
pub(crate) struct Telemetry<S> {
    inner: S,
    core: Arc<Core>,
}

impl<S> Telemetry<S> {
    pub(crate) fn new(inner: S, core: &Arc<Core>) -> Self {
        Self {
            inner,
            core: Arc::clone(core),
        }
    }
}

impl<S, R, B> Service<R> for Telemetry<S>
where
    S: Service<R, Response = Response<B>, Error = Refusal>,
{
    type Response = Response<B>;
    type Error = Refusal;
    type Future = Recorded<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Refusal>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: R) -> Self::Future {
        self.core.windows.arrived();
        Recorded {
            arrived: Instant::now(),
            future: self.inner.call(request),
            core: Arc::clone(&self.core),
        }
    }
}

pin_project_lite::pin_project! {
    /// The future of [`Telemetry::call`]: the inner future, and when the request arrived.
    pub(crate) struct Recorded<F> {
        #[pin]
        future: F,
        arrived: Instant,
        core: Arc<Core>,
    }
}

impl<F, B> Future for Recorded<F>
where
    F: Future<Output = Result<Response<B>, Refusal>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let outcome = ready!(this.future.poll(cx));
        let status = match &outcome {
            Ok(response) => response.status(),
            Err(refusal) => refusal.status(),
        };
        let latency = this.arrived.elapsed();
        this.core.windows.record(latency, status);
        this.core.metrics.record(latency, status);
        Poll::Ready(outcome)
    }
}
