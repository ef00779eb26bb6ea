//! forkd's Prometheus metrics, in a registry of their own so that several daemons can live in
//! one process (as they do in tests).

use lifecycle::metrics::register;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};

/// The daemon's metrics.
pub(crate) struct Metrics {
    registry: Registry,
    /// `squall_clone_duration_seconds{driver}`: from the clone request to the clone being ready.
    pub(crate) clone_duration: HistogramVec,
    /// `squall_clones_total{driver,outcome}`: clone attempts, `ready` or `failed`.
    pub(crate) clones: IntCounterVec,
    /// `squall_clone_exits_total{driver,cause}`: clones that ended, `killed` on request,
    /// `crashed` (signal or non-zero exit) or `exited` (code 0) on their own.
    pub(crate) exits: IntCounterVec,
    /// `squall_live_clones{driver}`: clones starting, ready or stopping.
    pub(crate) live: IntGaugeVec,
    /// `squall_template_restarts_total{driver}`: templates started again after they died on
    /// their own.
    pub(crate) template_restarts: IntCounterVec,
    /// `squall_snapshot_transfers_total{direction,outcome}`: `vm` snapshots `sent` to peers
    /// or `received` from them (a template made from one), `ok` or `failed`.
    pub(crate) snapshot_transfers: IntCounterVec,
    /// `squall_snapshot_bytes_total{direction}`: bytes of the snapshots sent and received.
    pub(crate) snapshot_bytes: IntCounterVec,
}

impl Metrics {
    pub(crate) fn new() -> Metrics {
        let registry = Registry::new();
        let buckets = vec![
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            2.5, 5.0, 10.0, 30.0,
        ];
        // The options below are constants with valid names and label sets, and the registry is
        // fresh, so neither building nor registering a metric can fail.
        let clone_duration = register(
            &registry,
            HistogramVec::new(
                HistogramOpts::new(
                    "squall_clone_duration_seconds",
                    "Time from a clone request to the clone being ready.",
                )
                .buckets(buckets),
                &["driver"],
            ),
        );
        let clones = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "squall_clones_total",
                    "Clone attempts by driver and outcome (ready, failed).",
                ),
                &["driver", "outcome"],
            ),
        );
        let exits = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "squall_clone_exits_total",
                    "Clones that ended, by driver and cause (killed, crashed, exited).",
                ),
                &["driver", "cause"],
            ),
        );
        let live = register(
            &registry,
            IntGaugeVec::new(
                Opts::new(
                    "squall_live_clones",
                    "Clones starting, ready or stopping, by driver.",
                ),
                &["driver"],
            ),
        );
        let template_restarts = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "squall_template_restarts_total",
                    "Templates started again after their process died on its own, by driver.",
                ),
                &["driver"],
            ),
        );
        let snapshot_transfers = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "squall_snapshot_transfers_total",
                    "vm template snapshots sent to peers or received from them, by outcome (ok, failed).",
                ),
                &["direction", "outcome"],
            ),
        );
        let snapshot_bytes = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "squall_snapshot_bytes_total",
                    "Bytes of the vm template snapshots sent to peers or received from them.",
                ),
                &["direction"],
            ),
        );
        Metrics {
            registry,
            snapshot_transfers,
            snapshot_bytes,
            clone_duration,
            clones,
            exits,
            live,
            template_restarts,
        }
    }

    /// The metrics in Prometheus's text format.
    pub(crate) fn render(&self) -> String {
        lifecycle::metrics::render(&self.registry)
    }
}
