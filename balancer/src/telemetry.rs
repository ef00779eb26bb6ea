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
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::StatusCode;

use crate::Config;

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
    /// Requests that arrived (answered or not yet).
    arrivals: AtomicU64,
    requests: AtomicU64,
    errors: AtomicU64,
    latency: [AtomicU64; BOUNDS + 1],
    /// Workers' answers: from sending the request to the response head, queue wait excluded.
    service: AtomicU64,
    /// The workers' answer times, summed, in microseconds.
    service_micros: AtomicU64,
    service_latency: [AtomicU64; BOUNDS + 1],
    in_flight_sum: AtomicU64,
    queue_depth_sum: AtomicU64,
    samples: AtomicU64,
}

impl Bucket {
    fn new() -> Self {
        Self {
            arrivals: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
            service: AtomicU64::new(0),
            service_micros: AtomicU64::new(0),
            service_latency: std::array::from_fn(|_| AtomicU64::new(0)),
            in_flight_sum: AtomicU64::new(0),
            queue_depth_sum: AtomicU64::new(0),
            samples: AtomicU64::new(0),
        }
    }

    /// Makes this bucket hold what `other` holds.
    fn copy_from(&self, other: &Bucket) {
        for (to, from) in self.counters().zip(other.counters()) {
            to.store(from.load(Ordering::Relaxed), Ordering::Relaxed);
        }
    }

    /// Every counter, in one order.
    fn counters(&self) -> impl Iterator<Item = &AtomicU64> {
        [
            &self.arrivals,
            &self.requests,
            &self.errors,
            &self.in_flight_sum,
            &self.queue_depth_sum,
            &self.samples,
            &self.service,
            &self.service_micros,
        ]
        .into_iter()
        .chain(&self.latency)
        .chain(&self.service_latency)
    }

    fn clear(&self) {
        for counter in self.counters() {
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
    /// Requests that arrived per second, answered or not (yet): in a flash crowd, more than
    /// are answered.
    pub arrival_rate: f64,
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
    /// Mean of the workers' own latency (zero when no worker answered).
    pub service_mean: Duration,
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
    /// Requests that arrived since the balancer started: two readings give the arrival rate
    /// between them, however short.
    pub arrivals: u64,
}

/// The ring of buckets behind both windows, sized for the stable window.
#[derive(Debug)]
struct Ring {
    buckets: Box<[Bucket]>,
    current: AtomicUsize,
    stable_ticks: usize,
    panic_ticks: usize,
}

impl Ring {
    fn new(stable_ticks: usize, panic_ticks: usize) -> Self {
        Self {
            // One more than the stable window: the current bucket is still filling.
            buckets: (0..=stable_ticks).map(|_| Bucket::new()).collect(),
            current: AtomicUsize::new(0),
            stable_ticks,
            panic_ticks,
        }
    }

    fn current(&self) -> &Bucket {
        &self.buckets[self.current.load(Ordering::Acquire)]
    }

    /// The bucket `back` ticks before the current one.
    fn back(&self, back: usize) -> &Bucket {
        let len = self.buckets.len();
        &self.buckets[(self.current.load(Ordering::Acquire) + len - back % len) % len]
    }
}

/// Both windows, resizable while requests record into them (see [`Windows::resize`]).
#[derive(Debug)]
pub(crate) struct Windows {
    ring: ArcSwap<Ring>,
    tick: Duration,
    /// Requests that arrived since the start.
    arrivals: AtomicU64,
    /// Serialises the ticker's rotation with a resize, so a resize copies a still ring.
    rotation: Mutex<()>,
}

impl Windows {
    pub(crate) fn new(config: &Config) -> Self {
        let ring = Ring::new(
            config.ticks_in(config.stable_window),
            config.ticks_in(config.panic_window),
        );
        Self {
            ring: ArcSwap::from_pointee(ring),
            tick: config.tick,
            arrivals: AtomicU64::new(0),
            rotation: Mutex::new(()),
        }
    }

    fn rotation(&self) -> std::sync::MutexGuard<'_, ()> {
        // Guards no data of its own: a panic elsewhere leaves nothing inconsistent.
        self.rotation
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The windows' lengths, in ticks: (stable, panic).
    pub(crate) fn ticks(&self) -> (usize, usize) {
        let ring = self.ring.load();
        (ring.stable_ticks, ring.panic_ticks)
    }

    /// Records one request's arrival.
    pub(crate) fn arrived(&self) {
        self.arrivals.fetch_add(1, Ordering::Relaxed);
        self.ring
            .load()
            .current()
            .arrivals
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Requests that arrived since the start.
    pub(crate) fn arrivals(&self) -> u64 {
        self.arrivals.load(Ordering::Relaxed)
    }

    /// Records one answered request: latency from arrival (queue wait included) to the
    /// response head, and its status.
    pub(crate) fn record(&self, latency: Duration, status: StatusCode) {
        let ring = self.ring.load();
        let bucket = ring.current();
        bucket.requests.fetch_add(1, Ordering::Relaxed);
        if status.is_server_error() {
            bucket.errors.fetch_add(1, Ordering::Relaxed);
        }
        bucket.latency[slot_of(latency)].fetch_add(1, Ordering::Relaxed);
    }

    /// Records one worker answer: from sending the request to its response head.
    pub(crate) fn record_service(&self, latency: Duration) {
        let ring = self.ring.load();
        let bucket = ring.current();
        bucket.service.fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        bucket.service_micros.fetch_add(micros, Ordering::Relaxed);
        bucket.service_latency[slot_of(latency)].fetch_add(1, Ordering::Relaxed);
    }

    /// Samples the instantaneous counts into the current bucket, then ends it and starts a
    /// fresh one. Only the ticker calls it.
    pub(crate) fn sample_and_rotate(&self, in_flight: usize, queue_depth: usize) {
        let _rotation = self.rotation();
        let ring = self.ring.load();
        let bucket = ring.current();
        bucket
            .in_flight_sum
            .fetch_add(in_flight as u64, Ordering::Relaxed);
        bucket
            .queue_depth_sum
            .fetch_add(queue_depth as u64, Ordering::Relaxed);
        bucket.samples.fetch_add(1, Ordering::Relaxed);
        let next = (ring.current.load(Ordering::Acquire) + 1) % ring.buckets.len();
        ring.buckets[next].clear();
        ring.current.store(next, Ordering::Release);
    }

    /// Gives the windows new lengths (whole numbers of ticks, panic no longer than stable,
    /// checked by the caller) while requests keep recording.
    ///
    /// What the old ring holds that the new windows still cover is kept: the current bucket
    /// and the most recent completed ones, up to the shorter of the old and new stable
    /// windows. So a longer window starts with the history there is and fills up as time
    /// passes (its rate still divides by its full length, as at start-up), and a shorter one
    /// is complete at once. A request that records while the ring is being copied may land
    /// in the old ring and be lost; the copy takes microseconds, ten times a second at most.
    pub(crate) fn resize(&self, stable_ticks: usize, panic_ticks: usize) {
        let _rotation = self.rotation();
        let old = self.ring.load_full();
        if (old.stable_ticks, old.panic_ticks) == (stable_ticks, panic_ticks) {
            return;
        }
        let new = Ring::new(stable_ticks, panic_ticks);
        let kept = old.stable_ticks.min(stable_ticks);
        let len = new.buckets.len();
        for back in 0..=kept {
            new.buckets[(len - back) % len].copy_from(old.back(back));
        }
        self.ring.store(Arc::new(new));
    }

    pub(crate) fn stable(&self) -> WindowSignals {
        let ring = self.ring.load();
        self.summarize(&ring, ring.stable_ticks)
    }

    pub(crate) fn panic(&self) -> WindowSignals {
        let ring = self.ring.load();
        self.summarize(&ring, ring.panic_ticks)
    }

    /// Sums the `ticks` completed buckets before the current one.
    fn summarize(&self, ring: &Ring, ticks: usize) -> WindowSignals {
        let mut arrivals = 0;
        let mut requests = 0;
        let mut errors = 0;
        let mut service_micros: u64 = 0;
        let mut in_flight_sum = 0;
        let mut queue_depth_sum = 0;
        let mut samples = 0;
        let mut histogram = [0u64; BOUNDS + 1];
        let mut service = 0;
        let mut service_histogram = [0u64; BOUNDS + 1];
        for back in 1..=ticks {
            let bucket = ring.back(back);
            arrivals += bucket.arrivals.load(Ordering::Relaxed);
            requests += bucket.requests.load(Ordering::Relaxed);
            service_micros =
                service_micros.saturating_add(bucket.service_micros.load(Ordering::Relaxed));
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
            arrival_rate: arrivals as f64 / window.as_secs_f64(),
            error_rate: ratio(errors, requests),
            mean_in_flight: ratio(in_flight_sum, samples),
            mean_queue_depth: ratio(queue_depth_sum, samples),
            latency_p50: quantile(&histogram, requests, 0.50),
            latency_p95: quantile(&histogram, requests, 0.95),
            latency_p99: quantile(&histogram, requests, 0.99),
            worker_responses: service,
            service_p95: quantile(&service_histogram, service, 0.95),
            service_mean: Duration::from_micros(service_micros.checked_div(service).unwrap_or(0)),
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
            windows.sample_and_rotate(1, 0);
        }
        for _ in 0..2 {
            for _ in 0..10 {
                windows.record(Duration::from_secs(1), StatusCode::BAD_GATEWAY);
            }
            windows.sample_and_rotate(10, 4);
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
        let ring = windows.ring.load();
        for back in 1..=ring.stable_ticks {
            for (sum, slot) in histogram.iter_mut().zip(&ring.back(back).latency) {
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
        windows.sample_and_rotate(0, 0);
        assert_eq!(windows.stable().requests, 1);
        for _ in 0..10 {
            windows.sample_and_rotate(0, 0);
        }
        assert_eq!(
            windows.stable(),
            WindowSignals {
                window: Duration::from_secs(1),
                ..WindowSignals::default()
            }
        );
    }
}
