//! Telemetry: what every request measured, summed over two sliding windows for the scaler
//! ([`Signals`]) and exported to Prometheus.
//!
//! The windows are a ring of buckets, one per tick (100 ms by default). A request adds to
//! the current bucket with atomic increments only: a count, an error count and one slot of a
//! fixed log-scale latency histogram. The ticker samples in-flight and queue depth into the
//! bucket, then rotates: it clears the oldest bucket and makes it current. A summary reads
//! the last N *completed* buckets — N = window / tick — so the stable window (10 s) and the
//! panic window (1 s) come from the same ring, as in Knative's autoscaler, and a summary is
//! at most one tick behind. Percentiles are read off the merged histogram, accurate to the
//! bucket width (12% apart).
//!
//! A recorder that loaded the index just before a rotation adds to the bucket that was
//! current a moment ago; nothing is lost, it only lands one tick early.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use http::StatusCode;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::Config;
use crate::pool::{WorkerState, WorkerStatus};

/// Lowest latency histogram bound: 100 µs.
const FIRST_BOUND_SECS: f64 = 1e-4;
/// Ratio between consecutive bounds.
const BOUND_GROWTH: f64 = 1.12;
/// Number of bounded slots: 100 µs × 1.12^120 ≈ 800 s; one more slot holds the rest.
const BOUNDS: usize = 120;

fn bound(slot: usize) -> f64 {
    FIRST_BOUND_SECS * BOUND_GROWTH.powi(slot as i32)
}

fn slot_of(latency: Duration) -> usize {
    let secs = latency.as_secs_f64();
    if secs <= FIRST_BOUND_SECS {
        return 0;
    }
    let slot = ((secs / FIRST_BOUND_SECS).ln() / BOUND_GROWTH.ln()).ceil() as usize;
    slot.min(BOUNDS)
}

/// What one tick's worth of requests added up to.
#[derive(Debug)]
struct Bucket {
    requests: AtomicU64,
    errors: AtomicU64,
    latency: [AtomicU64; BOUNDS + 1],
    /// Workers' answers: from sending the request to the response head, queue wait excluded.
    service: AtomicU64,
    service_latency: [AtomicU64; BOUNDS + 1],
    in_flight_sum: AtomicU64,
    queue_depth_sum: AtomicU64,
    samples: AtomicU64,
}

impl Bucket {
    fn new() -> Self {
        Self {
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
            service: AtomicU64::new(0),
            service_latency: std::array::from_fn(|_| AtomicU64::new(0)),
            in_flight_sum: AtomicU64::new(0),
            queue_depth_sum: AtomicU64::new(0),
            samples: AtomicU64::new(0),
        }
    }

    fn clear(&self) {
        for counter in [
            &self.requests,
            &self.errors,
            &self.in_flight_sum,
            &self.queue_depth_sum,
            &self.samples,
            &self.service,
        ]
        .into_iter()
        .chain(&self.latency)
        .chain(&self.service_latency)
        {
            counter.store(0, Ordering::Relaxed);
        }
    }
}

/// Aggregates over one window, as the scaler reads them.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct WindowSignals {
    /// How much time the window covers.
    pub window: Duration,
    /// Requests answered in the window.
    pub requests: u64,
    /// Requests answered per second.
    pub request_rate: f64,
    /// Share of answered requests whose status was 5xx (the balancer's own 502/503/504
    /// included), 0.0 to 1.0; 0.0 when nothing was answered.
    pub error_rate: f64,
    /// Mean number of requests holding a worker slot, sampled every tick.
    pub mean_in_flight: f64,
    /// Mean number of requests waiting in the queue, sampled every tick.
    pub mean_queue_depth: f64,
    /// Median latency, queue wait included (zero when nothing was answered).
    pub latency_p50: Duration,
    /// 95th percentile latency, queue wait included.
    pub latency_p95: Duration,
    /// 99th percentile latency, queue wait included.
    pub latency_p99: Duration,
    /// Worker answers in the window: requests that reached a worker and got a response head.
    pub worker_responses: u64,
    /// 95th percentile of the workers' own latency, from sending the request to the response
    /// head: queue wait excluded, so it is the latency more workers can lower (zero when no
    /// worker answered).
    pub service_p95: Duration,
}

/// How many workers are in each state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WorkerCounts {
    /// Taking new requests.
    pub ready: usize,
    /// Finishing their requests, taking no new ones.
    pub draining: usize,
    /// Left out after failed connects, waiting for a probe to succeed.
    pub ejected: usize,
}

/// Everything the scaler needs from the balancer at one moment: the two windows and the
/// instantaneous counts. Produced by [`crate::Balancer::signals`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Signals {
    /// The long window the scaler steers by (`Config::stable_window`).
    pub stable: WindowSignals,
    /// The short window that detects a flash crowd (`Config::panic_window`).
    pub panic: WindowSignals,
    /// Requests holding a worker slot right now.
    pub in_flight: usize,
    /// Requests waiting in the queue right now.
    pub queue_depth: usize,
    /// Workers by state right now.
    pub workers: WorkerCounts,
}

/// The ring of buckets behind both windows.
#[derive(Debug)]
pub(crate) struct Windows {
    buckets: Box<[Bucket]>,
    current: AtomicUsize,
    tick: Duration,
    stable_ticks: usize,
    panic_ticks: usize,
}

impl Windows {
    pub(crate) fn new(config: &Config) -> Self {
        let stable_ticks = config.ticks_in(config.stable_window);
        Self {
            // One more than the stable window: the current bucket is still filling.
            buckets: (0..=stable_ticks).map(|_| Bucket::new()).collect(),
            current: AtomicUsize::new(0),
            tick: config.tick,
            stable_ticks,
            panic_ticks: config.ticks_in(config.panic_window),
        }
    }

    fn current(&self) -> &Bucket {
        &self.buckets[self.current.load(Ordering::Acquire)]
    }

    /// Records one answered request: latency from arrival (queue wait included) to the
    /// response head, and its status.
    pub(crate) fn record(&self, latency: Duration, status: StatusCode) {
        let bucket = self.current();
        bucket.requests.fetch_add(1, Ordering::Relaxed);
        if status.is_server_error() {
            bucket.errors.fetch_add(1, Ordering::Relaxed);
        }
        bucket.latency[slot_of(latency)].fetch_add(1, Ordering::Relaxed);
    }

    /// Records one worker answer: from sending the request to its response head.
    pub(crate) fn record_service(&self, latency: Duration) {
        let bucket = self.current();
        bucket.service.fetch_add(1, Ordering::Relaxed);
        bucket.service_latency[slot_of(latency)].fetch_add(1, Ordering::Relaxed);
    }

    /// Samples the instantaneous counts into the current bucket; the ticker calls it just
    /// before [`Windows::rotate`].
    pub(crate) fn sample(&self, in_flight: usize, queue_depth: usize) {
        let bucket = self.current();
        bucket
            .in_flight_sum
            .fetch_add(in_flight as u64, Ordering::Relaxed);
        bucket
            .queue_depth_sum
            .fetch_add(queue_depth as u64, Ordering::Relaxed);
        bucket.samples.fetch_add(1, Ordering::Relaxed);
    }

    /// Ends the current bucket and starts a fresh one. Only the ticker calls it.
    pub(crate) fn rotate(&self) {
        let next = (self.current.load(Ordering::Acquire) + 1) % self.buckets.len();
        self.buckets[next].clear();
        self.current.store(next, Ordering::Release);
    }

    pub(crate) fn stable(&self) -> WindowSignals {
        self.summarize(self.stable_ticks)
    }

    pub(crate) fn panic(&self) -> WindowSignals {
        self.summarize(self.panic_ticks)
    }

    /// Sums the `ticks` completed buckets before the current one.
    fn summarize(&self, ticks: usize) -> WindowSignals {
        let len = self.buckets.len();
        let current = self.current.load(Ordering::Acquire);
        let mut requests = 0;
        let mut errors = 0;
        let mut in_flight_sum = 0;
        let mut queue_depth_sum = 0;
        let mut samples = 0;
        let mut histogram = [0u64; BOUNDS + 1];
        let mut service = 0;
        let mut service_histogram = [0u64; BOUNDS + 1];
        for back in 1..=ticks {
            let bucket = &self.buckets[(current + len - back) % len];
            requests += bucket.requests.load(Ordering::Relaxed);
            errors += bucket.errors.load(Ordering::Relaxed);
            in_flight_sum += bucket.in_flight_sum.load(Ordering::Relaxed);
            queue_depth_sum += bucket.queue_depth_sum.load(Ordering::Relaxed);
            samples += bucket.samples.load(Ordering::Relaxed);
            for (sum, slot) in histogram.iter_mut().zip(&bucket.latency) {
                *sum += slot.load(Ordering::Relaxed);
            }
            service += bucket.service.load(Ordering::Relaxed);
            for (sum, slot) in service_histogram.iter_mut().zip(&bucket.service_latency) {
                *sum += slot.load(Ordering::Relaxed);
            }
        }
        let window = self.tick * ticks as u32;
        let ratio = |part: u64, whole: u64| {
            if whole == 0 {
                0.0
            } else {
                part as f64 / whole as f64
            }
        };
        WindowSignals {
            window,
            requests,
            request_rate: requests as f64 / window.as_secs_f64(),
            error_rate: ratio(errors, requests),
            mean_in_flight: ratio(in_flight_sum, samples),
            mean_queue_depth: ratio(queue_depth_sum, samples),
            latency_p50: quantile(&histogram, requests, 0.50),
            latency_p95: quantile(&histogram, requests, 0.95),
            latency_p99: quantile(&histogram, requests, 0.99),
            worker_responses: service,
            service_p95: quantile(&service_histogram, service, 0.95),
        }
    }
}

/// The upper bound of the histogram slot holding the `q` quantile.
fn quantile(histogram: &[u64; BOUNDS + 1], total: u64, q: f64) -> Duration {
    if total == 0 {
        return Duration::ZERO;
    }
    let rank = ((total as f64) * q).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (slot, count) in histogram.iter().enumerate() {
        seen += count;
        if seen >= rank {
            return Duration::from_secs_f64(bound(slot));
        }
    }
    Duration::from_secs_f64(bound(BOUNDS))
}

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
    pub(crate) ejections: IntCounter,
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
    let metric = metric.map_err(|source| MetricsError { name, source })?;
    registry
        .register(Box::new(metric.clone()))
        .map_err(|source| MetricsError { name, source })?;
    Ok(metric)
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
                "Requests retried on another worker after a failed connect.",
            ),
        )?;
        let ejections = register(
            &registry,
            "squall_ejections_total",
            IntCounter::new(
                "squall_ejections_total",
                "Times a worker was ejected after failed connects.",
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
            ejections,
        })
    }

    /// Records one answered request; atomics only.
    pub(crate) fn record(&self, latency: Duration, status: StatusCode) {
        self.request_duration.observe(latency.as_secs_f64());
        let class = (status.as_u16() / 100).clamp(1, 5) as usize - 1;
        self.requests_by_class[class].inc();
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
        let mut text = Vec::new();
        // Encoding into a Vec cannot fail for I/O; an error would mean a malformed metric,
        // which then shows as an empty page rather than a crash.
        if let Err(error) = TextEncoder::new().encode(&self.registry.gather(), &mut text) {
            tracing::error!(%error, "encoding metrics");
        }
        String::from_utf8_lossy(&text).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn windows() -> Windows {
        Windows::new(&Config {
            tick: Duration::from_millis(100),
            stable_window: Duration::from_secs(1),
            panic_window: Duration::from_millis(200),
            ..Config::default()
        })
    }

    #[test]
    fn slots_cover_their_latency() {
        for ms in [0.05, 0.1, 1.0, 7.3, 150.0, 2_000.0] {
            let latency = Duration::from_secs_f64(ms / 1000.0);
            let slot = slot_of(latency);
            assert!(bound(slot) >= latency.as_secs_f64() * 0.999_999);
            if slot > 0 {
                assert!(bound(slot - 1) < latency.as_secs_f64());
            }
        }
    }

    #[test]
    fn stable_and_panic_windows_see_different_spans() {
        let windows = windows();
        // Eight quiet ticks with one 10 ms request each, then two busy ticks of ten 1 s ones.
        for _ in 0..8 {
            windows.record(Duration::from_millis(10), StatusCode::OK);
            windows.sample(1, 0);
            windows.rotate();
        }
        for _ in 0..2 {
            for _ in 0..10 {
                windows.record(Duration::from_secs(1), StatusCode::BAD_GATEWAY);
            }
            windows.sample(10, 4);
            windows.rotate();
        }
        // Not yet completed: must not count.
        windows.record(Duration::from_secs(5), StatusCode::OK);

        let panic = windows.panic();
        assert_eq!(panic.requests, 20);
        assert!((panic.request_rate - 100.0).abs() < 1e-9);
        assert!((panic.error_rate - 1.0).abs() < 1e-9);
        assert!((panic.mean_in_flight - 10.0).abs() < 1e-9);
        assert!((panic.mean_queue_depth - 4.0).abs() < 1e-9);
        let p50 = panic.latency_p50.as_secs_f64();
        assert!((1.0..1.12).contains(&p50), "p50 {p50}");

        let stable = windows.stable();
        assert_eq!(stable.requests, 28);
        assert!((stable.request_rate - 28.0).abs() < 1e-9);
        assert!((stable.error_rate - 20.0 / 28.0).abs() < 1e-9);
        assert!((stable.mean_in_flight - 2.8).abs() < 1e-9);
        // 8 of 28 are fast: the median is a slow one, the 25th percentile would be fast.
        assert!(stable.latency_p50 >= Duration::from_secs(1));
        assert!(quantile_of(&windows, 0.25) < Duration::from_millis(12));
    }

    fn quantile_of(windows: &Windows, q: f64) -> Duration {
        let mut histogram = [0u64; BOUNDS + 1];
        let len = windows.buckets.len();
        let current = windows.current.load(Ordering::Acquire);
        for back in 1..=windows.stable_ticks {
            for (sum, slot) in histogram
                .iter_mut()
                .zip(&windows.buckets[(current + len - back) % len].latency)
            {
                *sum += slot.load(Ordering::Relaxed);
            }
        }
        let total = histogram.iter().sum();
        quantile(&histogram, total, q)
    }

    #[test]
    fn old_buckets_fall_out_of_the_window() {
        let windows = windows();
        windows.record(Duration::from_millis(1), StatusCode::OK);
        windows.rotate();
        assert_eq!(windows.stable().requests, 1);
        for _ in 0..10 {
            windows.rotate();
        }
        assert_eq!(
            windows.stable(),
            WindowSignals {
                window: Duration::from_secs(1),
                ..WindowSignals::default()
            }
        );
    }

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
    }
}
