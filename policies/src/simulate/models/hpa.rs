//! A model of Kubernetes' Horizontal Pod Autoscaler (HPA): the algorithm Kubernetes
//! publishes, with its default configuration, scaling on a custom per-pod metric ("requests
//! in flight per pod") whose target is the policy's `target.concurrency`. It is not
//! Kubernetes' code, and it leaves out what is listed below.
//!
//! Where the algorithm is written down: the Kubernetes documentation's page "Horizontal Pod
//! Autoscaling" (*Concepts → Workloads → Autoscaling workloads*), its sections "Algorithm
//! details" (the ratio of the current to the desired metric value, the tolerance, pods that
//! are not ready or have no metrics yet) and on configurable scaling behavior (scaling
//! policies, the stabilization window, and the default behavior it lists); the sync period,
//! tolerance and scale-down stabilization as the kube-controller-manager's
//! `--horizontal-pod-autoscaler-sync-period` (15 s), `--horizontal-pod-autoscaler-tolerance`
//! (0.1) and `--horizontal-pod-autoscaler-downscale-stabilization` (5 m); the default
//! behavior's policies in kubernetes/kubernetes `pkg/apis/autoscaling/v2/defaults.go` (15 s
//! periods: the API reference's field comment still says 60 s, but the code and the HPA page
//! say 15 s); and the controller in `pkg/controller/podautoscaler/` (`replica_calculator.go`
//! for the ratio and the tolerance, `horizontal.go` for the behavior), which this model
//! follows.
//!
//! Every [`SYNC_PERIOD`] (15 s):
//! 1. **Metric.** The mean, over the last sync period, of the requests each ready pod holds:
//!    in flight plus queued over the ready pods. (Behind a Kubernetes Service nothing holds a
//!    request in front of the pods: a request this simulator's balancer queues would be
//!    waiting inside a pod, so it counts in that pod's "in flight".) Only ready pods report;
//!    with none, there is no metric and nothing changes.
//! 2. **Ratio.** `ratio = metric / target`. Within the [`TOLERANCE`] (`|1 − ratio| ≤ 0.1`)
//!    the recommendation is the current count; otherwise `ceil(ratio × ready pods)`, which is
//!    `ceil(current × metric / target)` when every pod is ready. With pods not yet ready
//!    (no metric yet), the ratio is recomputed counting each of them at 0 on a scale-up and
//!    at the target on a scale-down; if that ratio is within the tolerance or reverses the
//!    direction, the recommendation is the current count, else `ceil(ratio × all pods)`.
//! 3. **Stabilization.** Every recommendation is remembered for [`DOWN_STABILIZATION`]
//!    (300 s). A scale-down goes no lower than the highest recommendation of that window; a
//!    scale-up is not stabilized (window 0).
//! 4. **Rates.** The default behavior: up by at most the larger of 100 % and 4 pods per 15 s
//!    ([`UP_PERCENT`], [`UP_PODS`]); down by up to 100 % per 15 s. The period equals the sync
//!    period, so these are per decision.
//! 5. **Bounds.** `workers.min` and `workers.max` stand for `minReplicas` and `maxReplicas`.
//!    The HPA cannot scale to zero (only behind the `HPAScaleToZero` alpha feature gate, and
//!    then only on object or external metrics), so a `workers.min` of 0 becomes 1, and the
//!    model says so in its notes.
//!
//! New pods become ready after the cold start the caller gives (the simulator's clone
//! delay); the pool model (which pod is drained, the drain timeout) is the simulator's, the
//! same as for Squall's decider.
//!
//! Left out: the metrics pipeline's own delay (a custom-metrics adapter, its scrape
//! interval and query window: here the metric is exact and current at each sync — generous
//! to the HPA), the CPU-only rules (the initialization period and the readiness delay), the
//! controller's jitter around the sync period, and the Deployment's rollout and the
//! scheduler beyond the cold start.

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use super::ModelReason;
use crate::decide::{Decision, Observation, Reason, WorkerCounts};
use crate::policy::{Policy, Windows};
use crate::simulate::Autoscaler;

/// How often the HPA decides (`--horizontal-pod-autoscaler-sync-period`).
pub const SYNC_PERIOD: Duration = Duration::from_secs(15);
/// No change while the metric is within this share of its target
/// (`--horizontal-pod-autoscaler-tolerance`).
pub const TOLERANCE: f64 = 0.1;
/// A scale-down goes no lower than the highest recommendation of this window (the default
/// `behavior.scaleDown.stabilizationWindowSeconds`).
pub const DOWN_STABILIZATION: Duration = Duration::from_secs(300);
/// The default scale-up policies: this percentage of the pods, or [`UP_PODS`], per period,
/// whichever is more.
pub const UP_PERCENT: f64 = 100.0;
/// See [`UP_PERCENT`].
pub const UP_PODS: u32 = 4;
/// The default scale-down policy: up to this percentage of the pods per period.
pub const DOWN_PERCENT: f64 = 100.0;

/// Why the HPA model decided what it did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum HpaReason {
    /// Fewer pods than `minReplicas`: raised to it.
    BelowMin {
        /// `minReplicas`.
        min: u32,
    },
    /// No ready pod reports the metric yet: nothing changes.
    NoMetrics,
    /// The ratio is within the tolerance (or, counting pods not yet ready, reverses the
    /// direction): the current count is recommended.
    WithinTolerance {
        /// Requests per ready pod.
        per_pod: f64,
        /// The ratio judged (counting pods not yet ready, when there are any).
        ratio: f64,
        /// Pods not yet ready.
        unready: u32,
    },
    /// The ratio asks for a count; rate limits and bounds may hold it back.
    Ratio {
        /// Requests per ready pod.
        per_pod: f64,
        /// The metric's target: `target.concurrency`.
        target: f64,
        /// The ratio judged.
        ratio: f64,
        /// Pods recommended.
        want: u32,
    },
    /// A scale-down held at the highest recommendation of the stabilization window.
    Stabilized {
        /// Pods recommended now.
        want: u32,
        /// The highest recommendation within the window.
        highest: u32,
    },
}

impl fmt::Display for HpaReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HpaReason::BelowMin { min } => write!(f, "raised to minReplicas ({min})"),
            HpaReason::NoMetrics => write!(f, "no ready pod reports the metric yet; holding"),
            HpaReason::WithinTolerance {
                per_pod,
                ratio,
                unready,
            } => {
                write!(f, "{per_pod:.1} requests per ready pod: ratio {ratio:.2} ")?;
                if *unready > 0 {
                    write!(
                        f,
                        "(counting {unready} pods not yet ready) is within the tolerance or reverses the direction; holding"
                    )
                } else {
                    write!(
                        f,
                        "is within the {:.0}% tolerance; holding",
                        TOLERANCE * 100.0
                    )
                }
            }
            HpaReason::Ratio {
                per_pod,
                target,
                ratio,
                want,
            } => write!(
                f,
                "{per_pod:.1} requests per ready pod against a target of {target}: ratio {ratio:.2} wants {want} pods"
            ),
            HpaReason::Stabilized { want, highest } => write!(
                f,
                "{want} pods would do, but the highest recommendation of the last {}s is {highest}",
                DOWN_STABILIZATION.as_secs()
            ),
        }
    }
}

/// A model of Kubernetes' Horizontal Pod Autoscaler with its defaults (see the module's
/// documentation). Pure and deterministic: it remembers only its own recommendations.
#[derive(Clone, Debug, PartialEq)]
pub struct Hpa {
    min: u32,
    max: u32,
    target: f64,
    /// `workers.min` was 0 and became 1.
    min_raised: bool,
    /// Recommendations within the stabilization window, oldest first.
    recommendations: VecDeque<(Duration, u32)>,
}

impl Hpa {
    /// The model for `policy`: its target concurrency as the metric's target, its worker
    /// bounds as `minReplicas` (at least 1) and `maxReplicas`.
    pub fn new(policy: &Policy) -> Self {
        let min = policy.workers.min.max(1);
        Self {
            min,
            max: policy.workers.max.max(min),
            target: policy.target.concurrency(),
            min_raised: policy.workers.min == 0,
            recommendations: VecDeque::new(),
        }
    }

    /// `minReplicas`: the policy's `workers.min`, at least 1.
    pub fn min_replicas(&self) -> u32 {
        self.min
    }

    /// The replica calculator: a recommendation from the metric, before stabilization.
    fn recommend(&self, observation: &Observation, current: u32) -> (u32, HpaReason) {
        let WorkerCounts { ready, pending, .. } = observation.workers;
        let demand = observation.stable.demand();
        let per_pod = demand / f64::from(ready);
        let ratio = per_pod / self.target;
        let within = |r: f64| (1.0 - r).abs() <= TOLERANCE;
        if pending == 0 {
            if within(ratio) {
                let reason = HpaReason::WithinTolerance {
                    per_pod,
                    ratio,
                    unready: 0,
                };
                return (current, reason);
            }
            let want = ceil_pods(ratio * f64::from(ready));
            let target = self.target;
            return (
                want,
                HpaReason::Ratio {
                    per_pod,
                    target,
                    ratio,
                    want,
                },
            );
        }
        // Pods not yet ready have no metric: at 0 on a scale-up, at the target on a
        // scale-down.
        let all = f64::from(ready) + f64::from(pending);
        let assumed = if ratio < 1.0 {
            f64::from(pending) * self.target
        } else {
            0.0
        };
        let recounted = (demand + assumed) / (all * self.target);
        let reverses = (ratio < 1.0 && recounted > 1.0) || (ratio > 1.0 && recounted < 1.0);
        if within(recounted) || reverses {
            let reason = HpaReason::WithinTolerance {
                per_pod,
                ratio: recounted,
                unready: pending,
            };
            return (current, reason);
        }
        let want = ceil_pods(recounted * all);
        let target = self.target;
        (
            want,
            HpaReason::Ratio {
                per_pod,
                target,
                ratio: recounted,
                want,
            },
        )
    }
}

/// `ceil(x)` pods, saturating; a non-finite or negative `x` is none.
fn ceil_pods(x: f64) -> u32 {
    let n = x.ceil();
    if n.is_finite() && n > 0.0 {
        n as u32
    } else {
        0
    }
}

impl Autoscaler for Hpa {
    fn tick(&self) -> Duration {
        SYNC_PERIOD
    }

    /// The metric is the mean over the last sync period; the panic window is not used.
    fn windows(&self) -> Windows {
        let period = crate::Duration::from_secs(SYNC_PERIOD.as_secs());
        Windows {
            stable: period,
            panic: period,
        }
    }

    fn initial_workers(&self) -> u32 {
        self.min
    }

    fn decide(&mut self, observation: &Observation, now: Duration) -> Decision {
        let WorkerCounts { ready, pending, .. } = observation.workers;
        let current = ready.saturating_add(pending);
        let decision = |desired: u32, reason: HpaReason| Decision {
            desired,
            panic: false,
            reason: Reason::Model(ModelReason::Hpa(reason)),
        };
        if current < self.min {
            return decision(self.min, HpaReason::BelowMin { min: self.min });
        }
        if ready == 0 {
            return decision(current.min(self.max), HpaReason::NoMetrics);
        }
        let (want, mut reason) = self.recommend(observation, current);

        // Stabilization: the window's recommendations, this one included, bound a
        // scale-down from below; scale-ups are not stabilized (a window of 0).
        while self
            .recommendations
            .front()
            .is_some_and(|&(t, _)| t.saturating_add(DOWN_STABILIZATION) <= now)
        {
            self.recommendations.pop_front();
        }
        let highest = self
            .recommendations
            .iter()
            .map(|&(_, r)| r)
            .fold(want, u32::max);
        self.recommendations.push_back((now, want));
        let mut desired = current;
        if want > current {
            desired = want;
        }
        if highest < current {
            desired = highest;
        }
        if want < current && highest > want {
            reason = HpaReason::Stabilized { want, highest };
        }

        // Rates, per period (the period is the sync period, so no earlier change counts).
        if desired > current {
            let by_percent = (f64::from(current) * (1.0 + UP_PERCENT / 100.0)).ceil();
            let limit = (by_percent as u32).max(current.saturating_add(UP_PODS));
            desired = desired.min(limit);
        } else if desired < current {
            let limit = (f64::from(current) * (1.0 - DOWN_PERCENT / 100.0)).floor() as u32;
            desired = desired.max(limit);
        }
        decision(desired.clamp(self.min, self.max), reason)
    }

    fn label(&self) -> String {
        "model of Kubernetes HPA (published algorithm, defaults)".to_owned()
    }

    fn notes(&self) -> Vec<String> {
        let mut notes = vec![format!(
            "hpa: target {} requests in flight per pod (target.concurrency), a {}s sync period, {:.0}% tolerance, {}s scale-down stabilization, workers.min/max as minReplicas/maxReplicas",
            self.target,
            SYNC_PERIOD.as_secs(),
            TOLERANCE * 100.0,
            DOWN_STABILIZATION.as_secs()
        )];
        if self.min_raised {
            notes.push(
                "hpa: workers.min is 0, but the HPA cannot scale to zero without the HPAScaleToZero alpha feature gate: the model keeps minReplicas 1".to_owned(),
            );
        }
        notes
    }
}
