//! The scaler's Prometheus metrics: what it decided and why, and how long clones took to join.
//!
//! Kept in a registry of their own so that `squall up` can serve them next to the balancer's
//! (and an embedded forkd's) on one `/metrics` page. Ready and draining workers are the
//! balancer's `squall_workers{state}`; the scaler adds what only it knows. Every label has a fixed, small set of
//! values: drivers, outcomes, windows, host states.

use std::time::Duration;

use lifecycle::metrics::register;
use policies::{Decision, Observation, Policy};
use prometheus::{
    Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry,
};

/// Clone latencies span a forked process (a millisecond) to a cold start (seconds).
const CLONE_BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0,
];

/// The scaler's metrics. Cloning shares them.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    desired: IntGauge,
    pending: IntGauge,
    panic: IntGauge,
    observed: GaugeVec,
    target_concurrency: Gauge,
    latency_slo: Gauge,
    bounds: IntGaugeVec,
    hosts: IntGaugeVec,
    clone_duration: HistogramVec,
    clones: IntCounterVec,
    drains: IntCounterVec,
    reloads: IntCounterVec,
    checks: IntCounterVec,
    activations: IntCounter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Fresh metrics in a registry of their own.
    pub fn new() -> Self {
        let registry = Registry::new();
        let gauge = |name: &str, help: &str| register(&registry, IntGauge::new(name, help));
        let desired = gauge(
            "squall_desired_workers",
            "Workers the policy wants now (ready plus cloning).",
        );
        let pending = gauge(
            "squall_pending_workers",
            "Clones asked of forkd and not yet answered.",
        );
        let panic = gauge(
            "squall_panic_mode",
            "1 while the policy is in panic mode (a flash crowd), 0 otherwise.",
        );
        let observed = register(
            &registry,
            GaugeVec::new(
                Opts::new(
                    "squall_observed_concurrency",
                    "Mean requests in flight or queued over the stable or the panic window.",
                ),
                &["window"],
            ),
        );
        let target_concurrency = register(
            &registry,
            Gauge::new(
                "squall_target_concurrency",
                "The policy's target of requests in flight per worker.",
            ),
        );
        let latency_slo = register(
            &registry,
            Gauge::new(
                "squall_latency_slo_seconds",
                "The policy's p95 latency target; 0 when the policy has none.",
            ),
        );
        let bounds = register(
            &registry,
            IntGaugeVec::new(
                Opts::new(
                    "squall_worker_bounds",
                    "The policy's fewest (bound=\"min\") and most (bound=\"max\") workers.",
                ),
                &["bound"],
            ),
        );
        let hosts = register(
            &registry,
            IntGaugeVec::new(
                Opts::new(
                    "squall_forkd_hosts",
                    "forkd hosts by state: up (clones may go there) or down.",
                ),
                &["state"],
            ),
        );
        let clone_duration = register(
            &registry,
            HistogramVec::new(
                HistogramOpts::new(
                    "squall_scale_up_duration_seconds",
                    "Time from asking forkd for a clone to the clone joining the pool, by driver.",
                )
                .buckets(CLONE_BUCKETS.to_vec()),
                &["driver"],
            ),
        );
        let clones = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "squall_scaler_clones_total",
                    "Clones the scaler asked for, by outcome: joined the pool, failed, or refused by a forkd host without room.",
                ),
                &["outcome"],
            ),
        );
        let drains = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "squall_scaler_drains_total",
                    "Workers drained and killed, by how the drain ended: idle or timeout.",
                ),
                &["end"],
            ),
        );
        let reloads = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "squall_policy_reloads_total",
                    "Policy reloads (file changed or SIGHUP), by outcome: applied, or refused (the old policy stays).",
                ),
                &["outcome"],
            ),
        );
        let checks = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "squall_forkd_host_checks_total",
                    "Health checks of forkd hosts (one a second per host), by outcome: ok, or failed (the host is down).",
                ),
                &["outcome"],
            ),
        );
        let activations = register(
            &registry,
            IntCounter::new(
                "squall_activations_total",
                "Decisions made between ticks, because requests queued, that grew the pool.",
            ),
        );
        // Every label value exists from the start, so rates and sums never miss a series.
        for o in ["applied", "refused"] {
            reloads.with_label_values(&[o]);
        }
        for o in ["ok", "failed"] {
            checks.with_label_values(&[o]);
        }
        for w in ["stable", "panic"] {
            observed.with_label_values(&[w]);
        }
        for o in ["joined", "failed", "refused"] {
            clones.with_label_values(&[o]);
        }
        for e in ["idle", "timeout"] {
            drains.with_label_values(&[e]);
        }
        Self {
            registry,
            desired,
            pending,
            panic,
            observed,
            target_concurrency,
            latency_slo,
            bounds,
            hosts,
            clone_duration,
            clones,
            drains,
            reloads,
            checks,
            activations,
        }
    }

    /// Records one tick: the decision, what it was based on, the policy in force, and the
    /// clones pending once the tick has acted.
    pub(crate) fn tick(
        &self,
        policy: &Policy,
        observation: &Observation,
        decision: &Decision,
        pending: u32,
    ) {
        self.desired.set(i64::from(decision.desired));
        self.pending.set(i64::from(pending));
        self.panic.set(i64::from(decision.panic));
        let demand = |w: &policies::WindowStats| w.mean_in_flight + w.queue_depth;
        self.observed
            .with_label_values(&["stable"])
            .set(demand(&observation.stable));
        self.observed
            .with_label_values(&["panic"])
            .set(demand(&observation.panic));
        self.target_concurrency.set(policy.target.concurrency());
        self.latency_slo.set(
            policy
                .target
                .latency_p95
                .map_or(0.0, |d| d.get().as_secs_f64()),
        );
        self.bounds
            .with_label_values(&["min"])
            .set(i64::from(policy.workers.min));
        self.bounds
            .with_label_values(&["max"])
            .set(i64::from(policy.workers.max));
    }

    /// Records the hosts' states.
    pub(crate) fn hosts(&self, up: usize, down: usize) {
        self.hosts.with_label_values(&["up"]).set(up as i64);
        self.hosts.with_label_values(&["down"]).set(down as i64);
    }

    /// Records a clone that joined the pool `took` after it was asked for.
    pub(crate) fn joined(&self, driver: forkd::Driver, took: Duration) {
        self.clone_duration
            .with_label_values(&[driver.as_str()])
            .observe(took.as_secs_f64());
        self.clones.with_label_values(&["joined"]).inc();
    }

    /// Records `count` clones that failed.
    pub(crate) fn failed(&self, count: u32) {
        self.clones
            .with_label_values(&["failed"])
            .inc_by(u64::from(count));
    }

    /// Records `count` clones a host refused for want of room (asked elsewhere instead).
    pub(crate) fn refused(&self, count: u32) {
        self.clones
            .with_label_values(&["refused"])
            .inc_by(u64::from(count));
    }

    /// Records a finished drain.
    pub(crate) fn drained(&self, timed_out: bool) {
        let end = if timed_out { "timeout" } else { "idle" };
        self.drains.with_label_values(&[end]).inc();
    }

    /// Records a policy reload: applied, or refused.
    pub(crate) fn reloaded(&self, applied: bool) {
        let outcome = if applied { "applied" } else { "refused" };
        self.reloads.with_label_values(&[outcome]).inc();
    }

    /// Records a decision between ticks that grew the pool.
    pub(crate) fn activated(&self) {
        self.activations.inc();
    }

    /// Records a host check: answered, or not.
    pub(crate) fn checked(&self, ok: bool) {
        let outcome = if ok { "ok" } else { "failed" };
        self.checks.with_label_values(&[outcome]).inc();
    }

    /// The sum and count of clone latencies for `driver` so far: a mean over any interval is
    /// the difference of two readings.
    pub fn clone_latency_totals(&self, driver: forkd::Driver) -> (f64, u64) {
        let h = self.clone_duration.with_label_values(&[driver.as_str()]);
        (h.get_sample_sum(), h.get_sample_count())
    }

    /// The metrics in Prometheus's text format.
    pub fn render(&self) -> String {
        lifecycle::metrics::render(&self.registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use policies::{Reason, WindowStats};

    /// The value of the sample `series` (name and labels, as rendered) in `text`.
    fn value(text: &str, series: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("{series} not in:\n{text}"))
            .parse()
            .unwrap()
    }

    #[test]
    fn a_tick_shows_the_decision_the_demand_and_the_policy() {
        let policy = policies::load(
            "p.yaml",
            "name: p\ntemplate: t\nworkers: {min: 2, max: 9}\ntarget: {concurrency: 4, latency_p95: 250ms}\n",
        )
        .unwrap();
        let observation = Observation {
            now: policies::Now::default(),
            stable: WindowStats {
                mean_in_flight: 3.0,
                queue_depth: 1.0,
                ..WindowStats::default()
            },
            panic: WindowStats {
                mean_in_flight: 8.0,
                queue_depth: 12.0,
                ..WindowStats::default()
            },
            workers: policies::WorkerCounts::default(),
        };
        let decision = Decision {
            desired: 7,
            panic: true,
            reason: Reason::Steady { need: 7 },
        };
        let metrics = Metrics::new();
        metrics.tick(&policy, &observation, &decision, 3);
        metrics.hosts(2, 1);
        let text = metrics.render();
        for (series, expected) in [
            ("squall_desired_workers", 7.0),
            ("squall_pending_workers", 3.0),
            ("squall_panic_mode", 1.0),
            ("squall_observed_concurrency{window=\"stable\"}", 4.0),
            ("squall_observed_concurrency{window=\"panic\"}", 20.0),
            ("squall_target_concurrency", 4.0),
            ("squall_latency_slo_seconds", 0.25),
            ("squall_worker_bounds{bound=\"min\"}", 2.0),
            ("squall_worker_bounds{bound=\"max\"}", 9.0),
            ("squall_forkd_hosts{state=\"up\"}", 2.0),
            ("squall_forkd_hosts{state=\"down\"}", 1.0),
        ] {
            assert_eq!(value(&text, series), expected, "{series}");
        }
    }

    #[test]
    fn clones_and_drains_are_counted_by_outcome() {
        let metrics = Metrics::new();
        metrics.joined(forkd::Driver::Fork, Duration::from_millis(2));
        metrics.joined(forkd::Driver::Fork, Duration::from_millis(4));
        metrics.failed(3);
        metrics.refused(4);
        metrics.drained(false);
        metrics.drained(true);
        metrics.drained(true);
        let text = metrics.render();
        for (series, expected) in [
            ("squall_scaler_clones_total{outcome=\"joined\"}", 2.0),
            ("squall_scaler_clones_total{outcome=\"failed\"}", 3.0),
            ("squall_scaler_clones_total{outcome=\"refused\"}", 4.0),
            ("squall_scaler_drains_total{end=\"idle\"}", 1.0),
            ("squall_scaler_drains_total{end=\"timeout\"}", 2.0),
            (
                "squall_scale_up_duration_seconds_count{driver=\"fork\"}",
                2.0,
            ),
        ] {
            assert_eq!(value(&text, series), expected, "{series}");
        }
        let (sum, count) = metrics.clone_latency_totals(forkd::Driver::Fork);
        assert_eq!(count, 2);
        assert!((sum - 0.006).abs() < 1e-9);
    }
}
