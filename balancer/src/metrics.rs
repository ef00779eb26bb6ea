//! The Prometheus metrics: what every request measured, as counters and a histogram, plus
//! gauges set from the pool and the queue when `/metrics` is read.
//!
//! No metric has a per-worker label: workers come and go, so such labels would grow without
//! bound in a time-series database; per-worker detail is in `/status`.

use std::time::Duration;

use http::StatusCode;
use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

use crate::pool::{WorkerState, WorkerStatus};

/// The Prometheus metrics, registered in a registry of their own. No metric has a per-worker
/// label: workers come and go, so such labels would grow without bound in a time-series
/// database; per-worker detail is in `/status`.
pub(crate) struct Metrics {
    registry: Registry,
    request_duration: Histogram,
    /// Counters for status classes 1xx to 5xx, resolved once so the hot path takes no lock.
    requests_by_class: [IntCounter; 5],
    in_flight: IntGauge,
    queue_depth: IntGauge,
    workers: IntGaugeVec,
    pub(crate) retries: IntCounter,
    pub(crate) retry_budget_exhausted: IntCounter,
    pub(crate) ejections: IntCounter,
    pub(crate) tls_handshake_failures: IntCounter,
    /// TLS certificate reloads that were applied, and that were refused.
    tls_reloads: [IntCounter; 2],
    /// Admin requests refused for a missing or wrong bearer token.
    pub(crate) admin_refusals: IntCounter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// A metric could not be registered; only possible if two metrics share a name.
#[derive(Debug, thiserror::Error)]
#[error("registering metric {name}")]
pub struct MetricsError {
    name: &'static str,
    #[source]
    source: prometheus::Error,
}

fn register<M: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    name: &'static str,
    metric: Result<M, prometheus::Error>,
) -> Result<M, MetricsError> {
    lifecycle::metrics::try_register(registry, metric)
        .map_err(|source| MetricsError { name, source })
}

impl Metrics {
    pub(crate) fn new() -> Result<Self, MetricsError> {
        let registry = Registry::new();
        let request_duration = register(
            &registry,
            "squall_request_duration_seconds",
            Histogram::with_opts(
                HistogramOpts::new(
                    "squall_request_duration_seconds",
                    "Time from a request's arrival to its response head, queue wait included.",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0,
                ]),
            ),
        )?;
        let requests = register(
            &registry,
            "squall_requests_total",
            IntCounterVec::new(
                Opts::new(
                    "squall_requests_total",
                    "Requests answered, by status class (2xx, 5xx, ...).",
                ),
                &["code"],
            ),
        )?;
        let requests_by_class =
            ["1xx", "2xx", "3xx", "4xx", "5xx"].map(|class| requests.with_label_values(&[class]));
        let in_flight = register(
            &registry,
            "squall_in_flight_requests",
            IntGauge::new(
                "squall_in_flight_requests",
                "Requests holding a worker slot.",
            ),
        )?;
        let queue_depth = register(
            &registry,
            "squall_queue_depth",
            IntGauge::new("squall_queue_depth", "Requests waiting for a worker."),
        )?;
        let workers = register(
            &registry,
            "squall_workers",
            IntGaugeVec::new(
                Opts::new("squall_workers", "Workers in the pool, by state."),
                &["state"],
            ),
        )?;
        let retries = register(
            &registry,
            "squall_retries_total",
            IntCounter::new(
                "squall_retries_total",
                "Requests retried on another worker: after a failed connect, a stream refused \
                 unprocessed twice, or (requests that may be sent twice) a worker lost before \
                 it answered.",
            ),
        )?;
        let retry_budget_exhausted = register(
            &registry,
            "squall_retry_budget_exhausted_total",
            IntCounter::new(
                "squall_retry_budget_exhausted_total",
                "Requests that needed a retry and got a 502 because retries had reached their \
                 budget (a share of recent requests).",
            ),
        )?;
        let ejections = register(
            &registry,
            "squall_ejections_total",
            IntCounter::new(
                "squall_ejections_total",
                "Times a worker was ejected: a connect failed, or its connection was lost before it answered.",
            ),
        )?;
        let tls_handshake_failures = register(
            &registry,
            "squall_tls_handshake_failures_total",
            IntCounter::new(
                "squall_tls_handshake_failures_total",
                "TLS handshakes with clients that failed or did not finish in time.",
            ),
        )?;
        let tls_reloads = register(
            &registry,
            "squall_tls_reloads_total",
            IntCounterVec::new(
                Opts::new(
                    "squall_tls_reloads_total",
                    "TLS certificate reloads (files changed or SIGHUP), by outcome: applied, or refused (the old certificate stays).",
                ),
                &["outcome"],
            ),
        )?;
        let tls_reloads =
            ["applied", "refused"].map(|outcome| tls_reloads.with_label_values(&[outcome]));
        let admin_refusals = register(
            &registry,
            "squall_admin_unauthorized_total",
            IntCounter::new(
                "squall_admin_unauthorized_total",
                "Requests to the admin listener refused for a missing or wrong bearer token.",
            ),
        )?;
        Ok(Self {
            registry,
            request_duration,
            requests_by_class,
            in_flight,
            queue_depth,
            workers,
            retries,
            retry_budget_exhausted,
            ejections,
            tls_handshake_failures,
            tls_reloads,
            admin_refusals,
        })
    }

    /// Records one answered request; atomics only.
    pub(crate) fn record(&self, latency: Duration, status: StatusCode) {
        self.request_duration.observe(latency.as_secs_f64());
        let class = (status.as_u16() / 100).clamp(1, 5) as usize - 1;
        self.requests_by_class[class].inc();
    }

    /// Records a TLS certificate reload: applied, or refused.
    pub(crate) fn tls_reloaded(&self, applied: bool) {
        self.tls_reloads[usize::from(!applied)].inc();
    }

    /// Renders the text exposition format, after setting the gauges to the present values.
    pub(crate) fn render(
        &self,
        in_flight: usize,
        queue_depth: usize,
        workers: &[WorkerStatus],
    ) -> String {
        self.in_flight.set(in_flight as i64);
        self.queue_depth.set(queue_depth as i64);
        for state in [
            WorkerState::Ready,
            WorkerState::Draining,
            WorkerState::Ejected,
        ] {
            let count = workers.iter().filter(|w| w.state == state).count();
            self.workers
                .with_label_values(&[state.as_str()])
                .set(count as i64);
        }
        lifecycle::metrics::render(&self.registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_render_in_prometheus_format() {
        let metrics = Metrics::new().expect("unique names");
        metrics.record(Duration::from_millis(3), StatusCode::OK);
        metrics.record(Duration::from_millis(3), StatusCode::SERVICE_UNAVAILABLE);
        let text = metrics.render(2, 1, &[]);
        assert!(text.contains("squall_requests_total{code=\"2xx\"} 1"));
        assert!(text.contains("squall_requests_total{code=\"5xx\"} 1"));
        assert!(text.contains("squall_request_duration_seconds_bucket{le=\"0.005\"} 2"));
        assert!(text.contains("squall_in_flight_requests 2"));
        assert!(text.contains("squall_queue_depth 1"));
        assert!(text.contains("squall_workers{state=\"ready\"} 0"));
        assert!(text.contains("squall_admin_unauthorized_total 0"));
    }
}
