//! Squall's scaling policies: the YAML language a user writes, its validation, the pure
//! decider the scaler calls every tick, and an offline simulator to replay a load trace
//! through a policy before trusting it.
//!
//! Nothing here does I/O except [`load_file`] and the simulator's writers; the decider takes
//! the time as an argument. [`Fleet`] is the workers' life cycle (pending, ready, draining,
//! killed, and whom to drain), shared by the scaler and the simulator. The simulator drives
//! any [`Autoscaler`]: Squall's decider, or the [`models`] of Knative's KPA and Kubernetes'
//! HPA published algorithms, which [`compare`] runs on the same requests.
//!
//! # The policy language
//!
//! ```yaml
//! name: web                # required: names the policy in logs and metrics
//! template: web            # required: the forkd template new workers are cloned from
//! workers: {min: 1, max: 32}
//! target:
//!   concurrency: 8         # in-flight requests per worker (queued ones count as demand)
//!   latency_p95: 150ms     # optional SLO, measured at the balancer, queue wait included
//! window: {stable: 10s, panic: 1s}
//! panic_threshold: 2.0     # panic when panic-window demand >= 2 x ready capacity
//! scale_up:   {max_step: 100%, cooldown: 0s}
//! scale_down: {delay: 30s, max_step: 2, cooldown: 0s, drain_timeout: 30s}
//! tick: 100ms
//! ```
//!
//! | field | default | meaning |
//! |---|---|---|
//! | `name` | required | the policy's name |
//! | `template` | required | forkd template to clone |
//! | `workers.min` / `workers.max` | 1 / 32 | bounds on ready + cloning workers (`max` ≤ 10000) |
//! | `target.concurrency` | 8 | in-flight requests per worker the pool is sized for |
//! | `target.latency_p95` | none | p95 SLO; exceeded while concurrency looks fine → scale up in proportion |
//! | `window.stable` | 10s | window for steady decisions, and the calm needed to leave panic |
//! | `window.panic` | 1s | short window that notices a flash crowd; shorter than `stable` |
//! | `panic_threshold` | 2.0 | panic when panic-window demand ≥ this × ready capacity; > 1 |
//! | `scale_up.max_step` | 100% | most workers added per decision (count or percent; ≥ 1); decisions come every tick and, while requests queue, as often as every 5 ms |
//! | `scale_up.cooldown` | 0s | least time between scale-ups, those between ticks included |
//! | `scale_down.delay` | 30s | demand must stay low this long before any removal |
//! | `scale_down.max_step` | 2 | most workers removed per decision (count or percent ≤ 100%) |
//! | `scale_down.cooldown` | 0s | least time between scale-downs |
//! | `scale_down.drain_timeout` | 30s | a draining worker is killed after this (enforced by the scaler) |
//! | `tick` | 100ms | how often to decide; at least 10ms and no longer than `window.panic` |
//!
//! Durations need a unit (`ms`, `s`, `m`, `h`); steps are a worker count (`2`) or a
//! percentage (`100%`). Unknown keys are errors, with the closest known key suggested.
#![forbid(unsafe_code)]

mod load;
mod policy;
mod units;
mod yaml;

pub use load::{Diagnostic, LoadError, MAX_POLICY_BYTES, load, load_file};
pub use policy::{
    DEFAULT_CONCURRENCY, DEFAULT_PANIC_THRESHOLD, MAX_WORKERS, MIN_TICK, Policy, ScaleDown,
    ScaleUp, Target, Violation, Windows, Workers,
};
pub use units::{Duration, DurationError, MAX_DURATION, Step};
pub use yaml::Mark;

mod decide;
mod fleet;
// The checks the fuzz targets in `fuzz/` run, for them and for this crate's tests.
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
mod recent;
mod simulate;
mod svg;

pub use decide::{
    ACTIVATION_INTERVAL, Cause, DRAIN_SHARE, Decision, Now, Observation, RECENT, Reason, State,
    WindowStats, WorkerCounts, activate, decide,
};
pub use fleet::{DrainEnd, Fleet, FleetError, Member, Phase, Plan};
pub use recent::{Reading, Recent};
pub use simulate::models;
pub use simulate::models::{Hpa, HpaReason, Kpa, KpaReason, ModelReason};
pub use simulate::{
    Autoscaler, Compared, MAX_SIMULATED_REQUESTS, MAX_TRACE_RATE, MAX_TRACE_ROWS, MAX_TRACE_SPAN,
    Model, Run, SimConfig, SimError, Squall, Summary, TickRecord, Trace, TraceError, TracePoint,
    UnknownModel, compare, comparison_text, simulate, simulate_with,
};

/// The policy `squall up` and `squall demo` use when given none (`policies/default.yaml`).
pub const DEFAULT_POLICY_YAML: &str = include_str!("../default.yaml");

/// The flash-crowd trace the demo and the tests replay (`policies/examples/traces/flash-crowd.csv`).
pub const FLASH_CROWD_TRACE_CSV: &str = include_str!("../examples/traces/flash-crowd.csv");

/// The embedded default policy, parsed.
pub fn default_policy() -> Policy {
    // The embedded file is checked by this crate's tests, so it always loads.
    load("default.yaml", DEFAULT_POLICY_YAML).expect("the embedded default policy is valid")
}
