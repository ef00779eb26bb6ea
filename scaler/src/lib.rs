//! The scaler: the one place where the balancer's measurements, the scaling policy and the
//! forkd hosts meet. Every tick it reads the balancer's windows, asks the pure decider in
//! `policies` for a decision and acts on it by cloning, draining and killing workers.
//!
//! Where things are:
//! - [`control`]: the loop ([`Scaler`]) — ticks, reloads, scaling up and down, host checks;
//! - [`front`]: the balancer as the scaler sees it ([`WorkerPool`], [`Front`], [`Tuning`](balancer::Tuning));
//! - [`host`]: a forkd host as the scaler sees it ([`CloneHost`], [`HostError`]);
//! - [`hosts`]: the hosts' health and room, and where new clones go;
//! - [`discovery`]: creating or adopting the template on hosts, and finding new hosts by DNS;
//! - [`reload`]: the policy file watched for changes and SIGHUP;
//! - [`up`]: `squall up` assembled — forkd (embedded or remote), the balancer, the scaler and
//!   the admin listener ([`admin`]) — from one typed [`UpConfig`];
//! - `metrics`: the scaler's Prometheus metrics.
//!
//! The mechanisms know nothing of policy: the balancer proxies and measures, forkd clones
//! and kills; only this crate joins them.
#![forbid(unsafe_code)]

pub mod admin;
pub mod control;
pub mod discovery;
pub mod front;
pub mod host;
pub mod hosts;
mod metrics;
pub mod reload;
pub mod up;

#[cfg(test)]
mod fake;

use std::time::Duration;

use balancer::Signals;
use policies::{Decision, Now, Observation, Reading, WindowStats, WorkerCounts};

pub use control::{Scaler, ScalerConfig};
pub use front::{Front, WorkerPool, config, tuning};
pub use host::{CloneHost, HostError, Listing};
pub use hosts::{Host, Origin};
pub use metrics::Metrics;
pub use up::{ForkdHosts, Running, UpConfig, UpError};

/// Converts one window of the balancer's measurements into the decider's terms.
fn window(w: &balancer::WindowSignals) -> WindowStats {
    let measured = |d: Duration| (w.requests > 0).then_some(d);
    WindowStats {
        request_rate: w.arrival_rate,
        mean_in_flight: w.mean_in_flight,
        queue_depth: w.mean_queue_depth,
        latency_p50: measured(w.latency_p50),
        latency_p95: measured(w.latency_p95),
        latency_p99: measured(w.latency_p99),
        service_p95: (w.worker_responses > 0).then_some(w.service_p95),
        service_mean: (w.worker_responses > 0).then_some(w.service_mean),
        error_rate: w.error_rate,
    }
}

/// What the decider sees: the balancer's windows, what it holds now, and its ready workers
/// (ejected ones do not serve, so they are not capacity), plus the scaler's own pending and
/// draining counts and its reading of what arrived lately ([`policies::Recent`]).
pub fn observation(signals: &Signals, recent: Reading, pending: u32, draining: u32) -> Observation {
    let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    Observation {
        stable: window(&signals.stable),
        panic: window(&signals.panic),
        now: Now {
            in_flight: count(signals.in_flight),
            queued: count(signals.queue_depth),
            arrived: recent.arrived,
            queued_before: recent.queued_before,
            span: recent.span,
        },
        workers: WorkerCounts {
            ready: u32::try_from(signals.workers.ready).unwrap_or(u32::MAX),
            pending,
            draining,
        },
    }
}

/// What the scaler last decided, for status pages and the demo.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Status {
    /// The last decision, once there is one.
    pub decision: Option<Decision>,
    /// Clones asked for and not yet answered.
    pub pending: u32,
    /// Workers draining.
    pub draining: u32,
}
