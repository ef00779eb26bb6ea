//! A model of Knative's Pod Autoscaler (KPA): the algorithm Knative Serving publishes, with
//! its default configuration, driven by the simulator. It is not Knative's code, and it
//! leaves out what is listed below.
//!
//! Where the algorithm is written down: Knative Serving's documentation, section *Serving →
//! Autoscaling*, in particular the page "Additional autoscaling configuration for Knative Pod
//! Autoscaler" (stable and panic modes, the stable window, the panic window percentage and
//! the panic threshold percentage; "the Revision will not scale down" in panic, which ends
//! once the stable window has passed without a reason to react quickly), the pages on
//! targets (the target utilization percentage) and on scale to zero (the grace period); the
//! defaults as shipped in the `config-autoscaler` ConfigMap of knative/serving
//! (`config/core/configmaps/autoscaler.yaml`); and the decision itself in knative/serving's
//! `pkg/autoscaler/scaling/autoscaler.go` (its `Scale` method), which this model follows
//! step by step.
//!
//! Every [`TICK`] (2 s, the `tick-interval`):
//! 1. **Target.** A pod is sized for `target.concurrency` × [`TARGET_UTILIZATION`] (70 %,
//!    `container-concurrency-target-percentage`) requests at once.
//! 2. **Wants.** The stable want is `ceil(mean concurrency over the STABLE_WINDOW / target)`
//!    and the panic want the same over the [`PANIC_WINDOW`] (60 s and 6 s: `stable-window`
//!    and 10 % of it, `panic-window-percentage`). Concurrency is in flight plus queued: with
//!    the activator in the path (Knative's default `target-burst-capacity` keeps it there
//!    while spare capacity is low) the requests it buffers count, as the ones this
//!    simulator's balancer queues do here.
//! 3. **Rates.** Both wants are kept within `[floor(ready / MAX_SCALE_DOWN_RATE),
//!    ceil(ready × MAX_SCALE_UP_RATE)]` (`max-scale-down-rate` 2: at most halve per tick;
//!    `max-scale-up-rate` 1000), `ready` being the ready pods, at least 1.
//! 4. **Panic.** Panic begins when the unbounded panic want is at least
//!    [`PANIC_THRESHOLD`] × ready pods (`panic-threshold-percentage` 200 %); every tick that
//!    meets it again extends it, and it ends at the first tick that does not once a whole
//!    stable window has passed since the last that did. In panic the count is the larger of
//!    the two wants, and never lower than what this panic has already asked for (it starts
//!    from the pods there are): it never scales down.
//! 5. **Bounds.** The policy's `workers.min` and `workers.max` stand for the `min-scale` and
//!    `max-scale` annotations.
//! 6. **To zero.** Only when `workers.min` is 0 (`enable-scale-to-zero`): a want of zero
//!    (no request over the whole stable window) keeps one pod until it has lasted
//!    [`SCALE_TO_ZERO_GRACE`] (30 s, `scale-to-zero-grace-period`), then removes it.
//!    Requests that arrive at zero wait in the queue (the activator buffers them) and poke
//!    the autoscaler, which decides at once ([`Kpa::activate`]; Knative's multiscaler
//!    `Poke`): at least one pod.
//!
//! New pods become ready after the cold start the caller gives (the simulator's clone
//! delay); the pool model (which pod is drained, the drain timeout) is the simulator's, the
//! same as for Squall's decider.
//!
//! Left out: the metric pipeline (queue-proxies scraped every second, the autoscaler's
//! sampling of large deployments; here the windows are exact), the averaging of the window's
//! buckets by an exponential weighting (an option; the default, a plain mean, is modelled),
//! `scale-down-delay` and `activation-scale` (defaults that do nothing), `initial-scale`
//! (a run starts at the policy's `workers.min`), the panic mode an autoscaler (re)started
//! with more than one ready pod begins in, the activator's own capacity and its
//! target burst capacity's routing, the scale-to-zero pod retention period (default 0),
//! requests-per-second scaling (the default is concurrency), and the time the reconciler,
//! the Deployment and the scheduler take to act beyond the cold start.

use std::fmt;
use std::time::Duration;

use super::ModelReason;
use crate::decide::{Decision, Observation, Reason, WorkerCounts};
use crate::policy::{Policy, Windows};
use crate::simulate::Autoscaler;

/// How often the KPA decides (`tick-interval`).
pub const TICK: Duration = Duration::from_secs(2);
/// The stable window (`stable-window`).
pub const STABLE_WINDOW: Duration = Duration::from_secs(60);
/// The panic window: 10 % of the stable window (`panic-window-percentage`).
pub const PANIC_WINDOW: Duration = Duration::from_secs(6);
/// The share of a pod's concurrency the KPA aims for (`container-concurrency-target-percentage`).
pub const TARGET_UTILIZATION: f64 = 0.70;
/// Panic when the panic want reaches this multiple of the ready pods
/// (`panic-threshold-percentage` 200 %).
pub const PANIC_THRESHOLD: f64 = 2.0;
/// The most the pod count may grow per tick, as a multiple of the ready pods
/// (`max-scale-up-rate`).
pub const MAX_SCALE_UP_RATE: f64 = 1000.0;
/// The most the pod count may shrink per tick, as a divisor of the ready pods
/// (`max-scale-down-rate`).
pub const MAX_SCALE_DOWN_RATE: f64 = 2.0;
/// How long the last pod stays once nothing is wanted (`scale-to-zero-grace-period`).
pub const SCALE_TO_ZERO_GRACE: Duration = Duration::from_secs(30);

/// Why the KPA model decided what it did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum KpaReason {
    /// Stable mode: the stable window's mean concurrency over the per-pod target.
    Stable {
        /// Mean requests in flight or queued over the stable window.
        concurrency: f64,
        /// Requests per pod aimed for.
        per_pod: f64,
        /// Pods wanted, before the rate limits and bounds.
        want: u32,
    },
    /// Panic mode: the larger of the panic and stable wants, never below what this panic
    /// already asked for.
    Panic {
        /// Mean requests in flight or queued over the panic window.
        concurrency: f64,
        /// Requests per pod aimed for.
        per_pod: f64,
        /// Pods the panic window wants, before the rate limits and bounds.
        want: u32,
        /// Ready pods when it was judged.
        ready: u32,
    },
    /// Nothing wanted: one pod stays until the grace period has passed.
    ZeroGrace {
        /// Time left.
        remaining: Duration,
    },
    /// Requests wait at zero pods: the activator poked the autoscaler.
    Poke {
        /// Requests waiting.
        queued: u32,
    },
}

impl fmt::Display for KpaReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KpaReason::Stable {
                concurrency,
                per_pod,
                want,
            } => write!(
                f,
                "stable mode: {concurrency:.1} requests in flight or queued over the {}s window at {per_pod:.1} per pod want {want} pods",
                STABLE_WINDOW.as_secs()
            ),
            KpaReason::Panic {
                concurrency,
                per_pod,
                want,
                ready,
            } => write!(
                f,
                "panic mode: {concurrency:.1} requests in flight or queued over the {}s window at {per_pod:.1} per pod want {want} pods ({ready} ready); never scaling down in panic",
                PANIC_WINDOW.as_secs()
            ),
            KpaReason::ZeroGrace { remaining } => write!(
                f,
                "no request over the stable window: one pod stays for the scale-to-zero grace period ({:.1}s left)",
                remaining.as_secs_f64()
            ),
            KpaReason::Poke { queued } => write!(
                f,
                "{queued} requests wait at zero pods: the activator poked the autoscaler"
            ),
        }
    }
}

/// A model of Knative's Pod Autoscaler with its defaults (see the module's documentation).
/// Pure and deterministic: it remembers only what its own earlier decisions set.
#[derive(Clone, Debug, PartialEq)]
pub struct Kpa {
    min: u32,
    max: u32,
    per_pod: f64,
    /// The last tick whose panic want met the threshold, while panic lasts.
    panic_last_over: Option<Duration>,
    /// The most pods this panic has asked for.
    max_panic_pods: u32,
    /// Since when nothing has been wanted (for scale to zero).
    idle_since: Option<Duration>,
}

impl Kpa {
    /// The model for `policy`: its target concurrency and worker bounds.
    pub fn new(policy: &Policy) -> Self {
        Self {
            min: policy.workers.min,
            max: policy.workers.max.max(policy.workers.min),
            per_pod: policy.target.concurrency() * TARGET_UTILIZATION,
            panic_last_over: None,
            max_panic_pods: 0,
            idle_since: None,
        }
    }

    /// Requests per pod it aims for: `target.concurrency` × [`TARGET_UTILIZATION`].
    pub fn per_pod(&self) -> f64 {
        self.per_pod
    }

    /// Whether panic mode is on.
    pub fn in_panic(&self) -> bool {
        self.panic_last_over.is_some()
    }

    /// One pass of the algorithm at `now`: what a tick and a poke both run.
    fn scale(&mut self, observation: &Observation, now: Duration) -> (u32, KpaReason) {
        let WorkerCounts { ready, pending, .. } = observation.workers;
        let current = ready.saturating_add(pending);
        let ready_pods = f64::from(ready.max(1));
        let most = (ready_pods * MAX_SCALE_UP_RATE).ceil();
        let least = (ready_pods / MAX_SCALE_DOWN_RATE).floor();
        let (stable, panic) = (observation.stable.demand(), observation.panic.demand());
        let stable_want = (stable / self.per_pod).ceil();
        let panic_want = (panic / self.per_pod).ceil();
        // Saturating conversions of finite, non-negative values within [least, most].
        let stable_pods = stable_want.clamp(least, most) as u32;
        let panic_pods = panic_want.clamp(least, most) as u32;

        if panic_want / ready_pods >= PANIC_THRESHOLD {
            if self.panic_last_over.is_none() {
                self.max_panic_pods = current;
            }
            self.panic_last_over = Some(now);
        } else if self
            .panic_last_over
            .is_some_and(|last| last.saturating_add(STABLE_WINDOW) < now)
        {
            self.panic_last_over = None;
            self.max_panic_pods = 0;
        }

        let (want, reason) = if self.in_panic() {
            self.max_panic_pods = self.max_panic_pods.max(stable_pods.max(panic_pods));
            (
                self.max_panic_pods,
                KpaReason::Panic {
                    concurrency: panic,
                    per_pod: self.per_pod,
                    want: panic_want as u32,
                    ready,
                },
            )
        } else {
            (
                stable_pods,
                KpaReason::Stable {
                    concurrency: stable,
                    per_pod: self.per_pod,
                    want: stable_want as u32,
                },
            )
        };
        let desired = want.clamp(self.min, self.max);
        if desired > 0 {
            self.idle_since = None;
            return (desired, reason);
        }
        let since = *self.idle_since.get_or_insert(now);
        let waited = now.saturating_sub(since);
        if current > 0 && waited < SCALE_TO_ZERO_GRACE {
            let remaining = SCALE_TO_ZERO_GRACE - waited;
            return (1, KpaReason::ZeroGrace { remaining });
        }
        (0, reason)
    }

    fn decision(&self, desired: u32, reason: KpaReason) -> Decision {
        Decision {
            desired,
            panic: self.in_panic(),
            reason: Reason::Model(ModelReason::Kpa(reason)),
        }
    }
}

impl Autoscaler for Kpa {
    fn tick(&self) -> Duration {
        TICK
    }

    fn windows(&self) -> Windows {
        Windows {
            stable: crate::Duration::from_secs(STABLE_WINDOW.as_secs()),
            panic: crate::Duration::from_secs(PANIC_WINDOW.as_secs()),
        }
    }

    fn initial_workers(&self) -> u32 {
        self.min
    }

    fn decide(&mut self, observation: &Observation, now: Duration) -> Decision {
        let (desired, reason) = self.scale(observation, now);
        self.decision(desired, reason)
    }

    /// Only at zero pods: the activator pokes the autoscaler when a request arrives for a
    /// revision scaled to zero.
    fn activates(&self, workers: WorkerCounts) -> bool {
        workers.ready == 0 && workers.pending == 0
    }

    fn activate(&mut self, observation: &Observation, now: Duration) -> Option<Decision> {
        let WorkerCounts { ready, pending, .. } = observation.workers;
        if ready > 0 || pending > 0 || self.max == 0 {
            return None;
        }
        let (desired, reason) = self.scale(observation, now);
        if desired > 0 {
            return Some(self.decision(desired, reason));
        }
        // The activator's report of the waiting requests makes the windows' mean concurrency
        // positive, so the want is at least one pod.
        self.idle_since = None;
        let queued = observation.now.queued;
        Some(self.decision(1, KpaReason::Poke { queued }))
    }

    fn label(&self) -> String {
        "model of Knative KPA (published algorithm, defaults)".to_owned()
    }

    fn notes(&self) -> Vec<String> {
        vec![format!(
            "kpa: {:.1} requests per pod ({:.0}% of target.concurrency), a {}s tick, {}s stable and {}s panic windows, workers.min/max as min-scale/max-scale",
            self.per_pod,
            TARGET_UTILIZATION * 100.0,
            TICK.as_secs(),
            STABLE_WINDOW.as_secs(),
            PANIC_WINDOW.as_secs()
        )]
    }
}
