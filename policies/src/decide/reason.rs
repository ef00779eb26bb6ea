//! Why the decider decides what it does: what drives a scale-up ([`Cause`]) and the reason
//! each decision carries ([`Reason`]), for logs, the status page and the simulator's records.

use std::fmt;
use std::time::Duration;

use crate::simulate::models::ModelReason;

/// What drives a scale-up.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Cause {
    /// Stable-window demand over capacity.
    Demand {
        /// In-flight plus queued requests.
        demand: f64,
        /// `target.concurrency`.
        per_worker: f64,
    },
    /// Requests waiting in the queue now, more than the workers there are and coming can
    /// take.
    Queued {
        /// Requests queued now.
        queued: f64,
        /// Requests in flight now.
        in_flight: f64,
        /// Requests arriving per second (when sized by Little's law).
        rate: f64,
        /// The workers' mean service time; `None` before any answered: then each request
        /// there is gets a slot.
        service: Option<Duration>,
    },
    /// p95 over the SLO.
    Latency {
        /// Measured over the panic window.
        p95: Duration,
        /// `target.latency_p95`.
        slo: Duration,
    },
    /// Panic-window demand over the panic threshold; the need sized by Little's law.
    Panic {
        /// In-flight plus queued requests over the panic window.
        demand: f64,
        /// Ready workers × concurrency.
        capacity: f64,
        /// Requests arriving per second.
        rate: f64,
        /// The workers' mean service time; `None` before any answered (the need is then the
        /// demand over the concurrency).
        service: Option<Duration>,
        /// Requests queued now, to clear within the drain time.
        backlog: f64,
    },
}

/// Why the decision is what it is.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Reason {
    /// The workers there are match the need.
    Steady {
        /// Workers the demand needs.
        need: u32,
    },
    /// Raised to `workers.min`.
    BelowMin {
        /// `workers.min`.
        min: u32,
    },
    /// Held at, or lowered to, `workers.max` although more are needed or there are more.
    AboveMax {
        /// `workers.max`.
        max: u32,
    },
    /// Growing toward the need.
    ScaleUp {
        /// Workers wanted before step limits.
        need: u32,
        /// What asked for them.
        cause: Cause,
    },
    /// Growth wanted but `scale_up.cooldown` has not passed.
    UpCooldown {
        /// Workers wanted.
        need: u32,
        /// Time left.
        remaining: Duration,
    },
    /// Fewer workers would do, but panic mode never scales down.
    PanicHold {
        /// Workers the demand needs.
        need: u32,
    },
    /// Fewer workers would do; the decider has not yet watched for `scale_down.delay`.
    DownWaiting {
        /// Workers the demand needs.
        need: u32,
        /// Time left.
        remaining: Duration,
    },
    /// Fewer workers would do now, but more were needed within `scale_down.delay`.
    DownHeld {
        /// The highest need within the delay.
        peak: u32,
    },
    /// Shrinking wanted but `scale_down.cooldown` has not passed.
    DownCooldown {
        /// Workers wanted.
        need: u32,
        /// Time left.
        remaining: Duration,
    },
    /// Shrinking toward the highest need of the delay window.
    ScaleDown {
        /// Workers wanted before step limits.
        need: u32,
    },
    /// Decided by a model of another autoscaler, in the simulator's comparisons (never by
    /// [`decide`](crate::decide::decide)).
    Model(ModelReason),
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = |d: &Duration| d.as_secs_f64();
        match self {
            Reason::Steady { need } => write!(f, "steady: demand needs {need} workers"),
            Reason::BelowMin { min } => write!(f, "raised to workers.min ({min})"),
            Reason::AboveMax { max } => write!(f, "capped at workers.max ({max})"),
            Reason::ScaleUp { need, cause } => {
                write!(f, "scale up toward {need} workers: ")?;
                match cause {
                    Cause::Demand { demand, per_worker } => write!(
                        f,
                        "{demand:.1} requests in flight or queued at {per_worker} per worker"
                    ),
                    Cause::Queued {
                        queued,
                        in_flight,
                        rate,
                        service,
                    } => {
                        write!(
                            f,
                            "{queued:.0} requests queued now, {in_flight:.0} in flight; "
                        )?;
                        match service {
                            Some(s) => write!(
                                f,
                                "{rate:.0} req/s × {:.1}ms and the queue cleared",
                                secs(s) * 1e3
                            ),
                            None => write!(f, "a slot for each"),
                        }
                    }
                    Cause::Latency { p95, slo } => write!(
                        f,
                        "p95 {:.0}ms is over the {:.0}ms SLO",
                        secs(p95) * 1e3,
                        secs(slo) * 1e3
                    ),
                    Cause::Panic {
                        demand,
                        capacity,
                        rate,
                        service,
                        backlog,
                    } => {
                        write!(
                            f,
                            "panic: {demand:.1} requests in flight or queued against a ready capacity of {capacity:.1}; "
                        )?;
                        match service {
                            Some(s) => write!(
                                f,
                                "{rate:.0} req/s × {:.1}ms and a backlog of {backlog:.0}",
                                secs(s) * 1e3
                            ),
                            None => write!(f, "no answer yet to size by"),
                        }
                    }
                }
            }
            Reason::UpCooldown { need, remaining } => write!(
                f,
                "{need} workers wanted; scale_up.cooldown has {:.1}s left",
                secs(remaining)
            ),
            Reason::PanicHold { need } => write!(
                f,
                "panic mode: holding workers although {need} would do, until the stable window is calm"
            ),
            Reason::DownWaiting { need, remaining } => write!(
                f,
                "only {need} workers needed; scale_down.delay has {:.1}s left",
                secs(remaining)
            ),
            Reason::DownHeld { peak } => write!(
                f,
                "demand needed {peak} workers within scale_down.delay; holding"
            ),
            Reason::DownCooldown { need, remaining } => write!(
                f,
                "{need} workers would do; scale_down.cooldown has {:.1}s left",
                secs(remaining)
            ),
            Reason::ScaleDown { need } => write!(
                f,
                "scale down toward {need} workers: demand stayed low for scale_down.delay"
            ),
            Reason::Model(reason) => write!(f, "{reason}"),
        }
    }
}
