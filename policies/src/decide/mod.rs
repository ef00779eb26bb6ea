//! The decider: how many workers a policy wants, given what the balancer measured.
//!
//! [`decide`] is a pure function of the policy, an [`Observation`], the previous [`State`] and
//! the time: no clock, no I/O, the same inputs always give the same output. Its shape follows
//! Knative's autoscaler (a stable and a panic window; panic at a multiple of ready capacity,
//! never scaling down while in panic) and Kubernetes HPA's `behavior` (scale-down
//! stabilization over a delay, step limits per decision), adding a latency SLO.
//!
//! Each decision (every tick, and between ticks when requests queue: *activation*):
//! 1. **Need.** Demand is in-flight plus queued requests. The stable need is
//!    `ceil(stable demand / target.concurrency)`. With `target.latency_p95`, when the workers'
//!    own p95 (queue wait excluded: waiting for capacity is the demand rule's business) is over
//!    the SLO, the latency need is `ceil(ready × p95 / SLO)`. It is re-judged once per panic
//!    window, since a window's p95 describes the workers that were there during it, and grows
//!    again only if the last increase lowered p95 by a tenth or more: an app that is slow
//!    whatever its load does not drive the pool to `max`. While requests wait in the queue
//!    right now, the queued need is the Little's-law need of step 2 (before any worker has
//!    answered: a slot for every request there is; with no worker there or coming, at least
//!    one). This is what a decision between ticks reacts to, from zero workers as from many.
//! 2. **Panic.** Panic starts when panic-window demand ≥ `panic_threshold` × ready capacity
//!    (ready × concurrency), and ends once a whole stable window passes without that
//!    happening again. The panic need is sized by Little's law, not by the queue's length:
//!    `ceil((λ + backlog / drain) × S / target.concurrency)`, where λ is the arrival rate (the
//!    panic window's, or that of the arrivals since the newest reading at least [`RECENT`]
//!    old ([`crate::Recent`]), read two standard deviations low, whichever is higher: a flash
//!    crowd shows within tens of milliseconds, noise does not), S the workers' mean service
//!    time, the backlog the queue that was already there at that reading and still is (the
//!    requests queued since are arrivals in λ) and `drain` the time it should take to clear
//!    them (the SLO less S, so that the last of them still meets the SLO, but no less than
//!    [`DRAIN_SHARE`] of it; the panic window without an SLO). Before any worker
//!    has answered (S unknown) it is the demand over the panic window, as in step 1. In
//!    panic the count goes straight to the panic need (bounded by `workers.max` and
//!    `scale_up.max_step`) and never goes down.
//! 3. **Up.** Toward the need, at most `scale_up.max_step` per decision, after `scale_up.cooldown`.
//!    Cloning workers count as capacity, so nothing is forked twice.
//! 4. **Down.** Never in panic; only once the decider has watched for `scale_down.delay`,
//!    never below the highest need seen during that delay (the steady and latency needs, or
//!    what the workers served over the panic window, whichever is highest), at most
//!    `scale_down.max_step` per decision, after `scale_down.cooldown`.
//! 5. **Bounds.** The result is always within `[workers.min, workers.max]`.

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use crate::policy::Policy;

mod reason;

pub use reason::{Cause, Reason};

/// The least share of the latency SLO in which the panic rule plans to clear the queue.
pub const DRAIN_SHARE: f64 = 0.5;

/// The least time between two decisions when requests queue between ticks (see [`activate`]).
pub const ACTIVATION_INTERVAL: Duration = Duration::from_millis(5);

/// How far back [`Now::arrived`] counts: short enough to see a flash crowd within a few
/// activations, long enough to count a few dozen requests at the rates where that matters.
pub const RECENT: Duration = Duration::from_millis(40);

/// The arrival rate to act on, given `arrivals` counted over `span`: two standard deviations
/// (of a Poisson count) below the count. Decisions between ticks come when requests queue,
/// which is when the count happens to be high; read this low, such a count rarely asks for
/// more workers than the rate needs, while a crowd many times the calm rate still shows at
/// once. Zero for an empty span.
fn recent_rate(arrivals: u64, span: Duration) -> f64 {
    let secs = span.as_secs_f64();
    if secs <= 0.0 {
        return 0.0;
    }
    let n = arrivals as f64;
    (n - 2.0 * n.sqrt()).max(0.0) / secs
}

/// What the balancer measured over one window.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct WindowStats {
    /// Requests arriving per second (all of them, the ones that wait in the queue included).
    pub request_rate: f64,
    /// Mean number of requests being served by workers.
    pub mean_in_flight: f64,
    /// Mean number of requests waiting in the balancer for a free worker.
    pub queue_depth: f64,
    /// Latency percentiles of the requests that completed, queue wait included; `None` when
    /// no request completed in the window.
    pub latency_p50: Option<Duration>,
    /// See `latency_p50`.
    pub latency_p95: Option<Duration>,
    /// See `latency_p50`.
    pub latency_p99: Option<Duration>,
    /// p95 of the time workers took to answer, queue wait excluded: the latency that more
    /// workers can lower. When `None`, the latency rule falls back to `latency_p95`.
    pub service_p95: Option<Duration>,
    /// Mean time workers took to answer, queue wait excluded: the S of Little's law in the
    /// panic rule. `None` when no worker answered in the window.
    pub service_mean: Option<Duration>,
    /// Share of requests that failed, from 0 to 1.
    pub error_rate: f64,
}

impl WindowStats {
    /// Requests that want a worker: in flight plus queued. Negative or non-finite
    /// measurements count as none.
    pub fn demand(&self) -> f64 {
        let sane = |x: f64| if x.is_finite() && x > 0.0 { x } else { 0.0 };
        sane(self.mean_in_flight) + sane(self.queue_depth)
    }
}

/// How many workers there are, by state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct WorkerCounts {
    /// Serving requests.
    pub ready: u32,
    /// Being cloned; they count as capacity.
    pub pending: u32,
    /// Finishing their requests before they are killed; they do not count.
    pub draining: u32,
}

/// The balancer right now, and what arrived lately: what a decision between ticks reacts to,
/// and the freshest arrival rate the panic rule sizes by.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct Now {
    /// Requests holding a worker slot.
    pub in_flight: u32,
    /// Requests waiting in the queue for a worker.
    pub queued: u32,
    /// Requests that arrived over the last `span` (about [`RECENT`]), queued ones included:
    /// a faster reading of the arrival rate than the panic window's.
    pub arrived: u64,
    /// The queue depth `span` ago. The backlog is what of it still waits (at most `queued`);
    /// requests queued since are in `arrived`, so none is counted twice.
    pub queued_before: u32,
    /// What `arrived` was counted over.
    pub span: Duration,
}

/// Everything the decider sees at one decision.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct Observation {
    /// Over `window.stable`.
    pub stable: WindowStats,
    /// Over `window.panic`.
    pub panic: WindowStats,
    /// The balancer right now.
    pub now: Now,
    /// The pool right now.
    pub workers: WorkerCounts,
}

/// What the decider remembers between ticks. Start with `State::default()` and pass each
/// returned state to the next call. Times are offsets from any fixed origin, the same one
/// as `now`.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct State {
    /// The first tick this state saw.
    started: Option<Duration>,
    /// When panic mode began, while it lasts.
    panic_since: Option<Duration>,
    /// The last tick whose demand met the panic threshold.
    panic_last_trigger: Option<Duration>,
    last_scale_up: Option<Duration>,
    last_scale_down: Option<Duration>,
    /// The latest `now` seen: time never goes back.
    last_now: Option<Duration>,
    /// The latency-driven need, when it was judged, and the p95 it was judged on.
    latency_need: u32,
    latency_judged: Option<Duration>,
    latency_judged_p95: Option<Duration>,
    /// Needs seen within `scale_down.delay`, oldest first, each lower than the one before
    /// (a monotonic queue: the front is the window's maximum).
    recent_needs: VecDeque<(Duration, u32)>,
}

impl State {
    /// True while panic mode lasts.
    pub fn in_panic(&self) -> bool {
        self.panic_since.is_some()
    }
}

/// The decider's answer for one tick.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Decision {
    /// Workers wanted: ready plus cloning. More than there are means clone the difference;
    /// fewer means drain the difference.
    pub desired: u32,
    /// Whether panic mode is on.
    pub panic: bool,
    /// Why, for logs and the status page.
    pub reason: Reason,
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "desired {} ({})", self.desired, self.reason)
    }
}

/// Workers needed for `demand` at `per_worker` each, saturating at `u32::MAX`.
fn workers_for(demand: f64, per_worker: f64) -> u32 {
    let n = (demand / per_worker).ceil();
    // Demand is finite and non-negative and per_worker positive (validated); the float to
    // int conversion saturates.
    if n.is_finite() && n > 0.0 {
        n as u32
    } else {
        0
    }
}

/// A measurement that is negative or not finite counts as none.
fn sane(x: f64) -> f64 {
    if x.is_finite() && x > 0.0 { x } else { 0.0 }
}

/// Workers to serve arrivals at their rate and clear the backlog within the drain time, by
/// Little's law: `(λ + backlog / drain) × S / concurrency`. λ is the panic window's arrival
/// rate or that of the recent reading ([`Now::arrived`], read low), whichever is higher; the
/// backlog is the queue that was already there at the start of that reading and still is
/// (requests queued since are arrivals in λ, so none counts twice, and the need never falls
/// as the queue grows); S the workers' mean service time. Returns the need and the cause to
/// report; `None` when no worker has answered yet (S unknown or measured as nothing).
fn little_need(
    policy: &Policy,
    observation: &Observation,
    per_worker: f64,
    capacity: f64,
) -> Option<(u32, Cause)> {
    let service = observation
        .panic
        .service_mean
        .or(observation.stable.service_mean)
        .filter(|s| !s.is_zero())?;
    let now = &observation.now;
    let recent = recent_rate(now.arrived, now.span);
    let rate = sane(observation.panic.request_rate).max(recent);
    let backlog = f64::from(now.queued.min(now.queued_before));
    // A queued request meets the SLO if it starts within the SLO less its own service
    // time; never plan on less than DRAIN_SHARE of the SLO.
    let drain = policy
        .target
        .latency_p95
        .map_or(policy.window.panic.get(), |slo| {
            let slo = slo.get();
            slo.saturating_sub(service).max(slo.mul_f64(DRAIN_SHARE))
        })
        .as_secs_f64()
        .max(1e-3);
    let need = workers_for((rate + backlog / drain) * service.as_secs_f64(), per_worker);
    Some((
        need,
        Cause::Panic {
            demand: observation.panic.demand(),
            capacity,
            rate,
            service: Some(service),
            backlog,
        },
    ))
}

/// Time left until `since + wait`, or `None` when it has passed (or never started).
fn left(since: Option<Duration>, wait: Duration, now: Duration) -> Option<Duration> {
    let end = since?.checked_add(wait)?;
    end.checked_sub(now).filter(|d| !d.is_zero())
}

/// Decides how many workers `policy` wants at time `now`.
///
/// `now` is any monotonic time as an offset from a fixed origin. Successive calls should not
/// go back in time; if one does, it is treated as happening at the latest time seen.
pub fn decide(
    policy: &Policy,
    observation: &Observation,
    state: &State,
    now: Duration,
) -> (Decision, State) {
    let mut s = state.clone();
    let now = now.max(s.last_now.unwrap_or_default());
    s.last_now = Some(now);
    let started = *s.started.get_or_insert(now);
    let per_worker = policy.target.concurrency();
    let (min, max) = (
        policy.workers.min,
        policy.workers.max.max(policy.workers.min),
    );
    let ready = observation.workers.ready;
    let current = ready.saturating_add(observation.workers.pending);
    let stable_demand = observation.stable.demand();
    let panic_demand = observation.panic.demand();
    let capacity = f64::from(ready) * per_worker;
    let little = little_need(policy, observation, per_worker, capacity);

    let need_stable = workers_for(stable_demand, per_worker);
    // Requests waiting now: sized by Little's law once workers have answered, else a slot
    // for each request there is. With no worker there or coming, at least one: the first
    // request after zero is never left for the next tick.
    let now_demand = f64::from(observation.now.in_flight) + f64::from(observation.now.queued);
    let (need_queued, queued_cause) = if observation.now.queued == 0 {
        (0, None)
    } else {
        let (need, rate, service) = match little {
            Some((need, Cause::Panic { rate, service, .. })) => (need, rate, service),
            _ => (workers_for(now_demand, per_worker), 0.0, None),
        };
        let need = if current == 0 { need.max(1) } else { need };
        let cause = Cause::Queued {
            queued: f64::from(observation.now.queued),
            in_flight: f64::from(observation.now.in_flight),
            rate,
            service,
        };
        (need, Some(cause))
    };
    let (need_panic, panic_cause) = little.unwrap_or((
        workers_for(panic_demand, per_worker),
        Cause::Panic {
            demand: panic_demand,
            capacity,
            rate: sane(observation.panic.request_rate),
            service: None,
            backlog: f64::from(observation.now.queued),
        },
    ));

    // Latency: re-judged once per panic window, from the workers that produced it.
    let workers_p95 = observation
        .panic
        .service_p95
        .or(observation.panic.latency_p95);
    if let Some(slo) = policy.target.latency_p95 {
        if left(s.latency_judged, policy.window.panic.get(), now).is_none() {
            s.latency_need = match workers_p95 {
                Some(p95) if p95 > slo.get() && ready > 0 => {
                    let ratio = p95.as_secs_f64() / slo.get().as_secs_f64();
                    let proposal = workers_for(f64::from(ready) * ratio, 1.0);
                    let helped = s
                        .latency_judged_p95
                        .is_none_or(|before| p95.as_secs_f64() < before.as_secs_f64() * 0.9);
                    if s.latency_need == 0 || helped {
                        proposal.max(s.latency_need)
                    } else {
                        s.latency_need
                    }
                }
                _ => 0,
            };
            s.latency_judged_p95 = workers_p95.filter(|_| s.latency_need > 0);
            s.latency_judged = Some(now);
        }
    } else {
        s.latency_need = 0;
    }

    // Panic.
    if panic_demand > 0.0 && panic_demand >= policy.panic_threshold * capacity {
        s.panic_since.get_or_insert(now);
        s.panic_last_trigger = Some(now);
    } else if s.panic_since.is_some()
        && left(s.panic_last_trigger, policy.window.stable.get(), now).is_none()
    {
        s.panic_since = None;
    }
    let in_panic = s.panic_since.is_some();

    let (mut need, mut cause) = (
        need_stable,
        Cause::Demand {
            demand: stable_demand,
            per_worker,
        },
    );
    if s.latency_need > need
        && let (Some(slo), Some(p95)) = (policy.target.latency_p95, workers_p95)
    {
        need = s.latency_need;
        cause = Cause::Latency {
            p95,
            slo: slo.get(),
        };
    }

    if let Some(queued) = queued_cause
        && need_queued > need
    {
        need = need_queued;
        cause = queued;
    }

    // Remember the need for scale-down stabilization: the steady, latency and queued needs
    // (the queued one sized by Little's law, its backlog included), and what the workers
    // actually served over the panic window. The panic need itself is left out: it is sized
    // for the whole panic window's arrivals, which may be gone.
    let delay = policy.scale_down.delay.get();
    let served = workers_for(
        WindowStats {
            queue_depth: 0.0,
            ..observation.panic
        }
        .demand(),
        per_worker,
    );
    let remembered = need.max(served);
    while s.recent_needs.back().is_some_and(|&(_, n)| n <= remembered) {
        s.recent_needs.pop_back();
    }
    s.recent_needs.push_back((now, remembered));
    while s
        .recent_needs
        .front()
        .is_some_and(|&(t, _)| t.saturating_add(delay) <= now && t != now)
    {
        s.recent_needs.pop_front();
    }
    let peak = s.recent_needs.front().map_or(need, |&(_, n)| n);

    if in_panic && need_panic > need {
        need = need_panic;
        cause = panic_cause;
    }

    let target = need.clamp(min, max);
    let (desired, reason) = if target > current {
        if let Some(remaining) = left(s.last_scale_up, policy.scale_up.cooldown.get(), now) {
            (
                current,
                Reason::UpCooldown {
                    need: target,
                    remaining,
                },
            )
        } else {
            let step = policy.scale_up.max_step.allowance(current);
            (
                target.min(current.saturating_add(step)),
                Reason::ScaleUp {
                    need: target,
                    cause,
                },
            )
        }
    } else if target < current {
        if in_panic {
            (current, Reason::PanicHold { need: target })
        } else if let Some(remaining) = left(Some(started), delay, now) {
            (
                current,
                Reason::DownWaiting {
                    need: target,
                    remaining,
                },
            )
        } else if peak.clamp(min, max) >= current {
            (current, Reason::DownHeld { peak })
        } else if let Some(remaining) =
            left(s.last_scale_down, policy.scale_down.cooldown.get(), now)
        {
            (
                current,
                Reason::DownCooldown {
                    need: target,
                    remaining,
                },
            )
        } else {
            let floor = peak.clamp(min, max);
            let step = policy.scale_down.max_step.allowance(current);
            (
                floor.max(current.saturating_sub(step)),
                Reason::ScaleDown { need: floor },
            )
        }
    } else if need > max {
        (current, Reason::AboveMax { max })
    } else {
        (current, Reason::Steady { need })
    };

    // Bounds win over every other rule.
    let (desired, reason) = if desired < min {
        (min, Reason::BelowMin { min })
    } else if desired > max {
        (max, Reason::AboveMax { max })
    } else {
        (desired, reason)
    };
    if desired > current {
        s.last_scale_up = Some(now);
    } else if desired < current {
        s.last_scale_down = Some(now);
    }
    (
        Decision {
            desired,
            panic: in_panic,
            reason,
        },
        s,
    )
}

/// A decision between ticks, when requests queue: [`decide`] on the observation of the moment,
/// kept only if it grows the pool (then the returned state is the next one); `None` means
/// nothing to do until the next tick, and the state stays as it was. The caller makes these
/// decisions no more than once per [`ACTIVATION_INTERVAL`].
pub fn activate(
    policy: &Policy,
    observation: &Observation,
    state: &State,
    now: Duration,
) -> Option<(Decision, State)> {
    let current = observation
        .workers
        .ready
        .saturating_add(observation.workers.pending);
    let (decision, next) = decide(policy, observation, state, now);
    (decision.desired > current).then_some((decision, next))
}
