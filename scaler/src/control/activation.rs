//! Activation: a decision between ticks when a request has to wait in the balancer's queue
//! (see the module docs of [`super`]). The loop calls [`Scaler::queued`] when the balancer
//! notifies, and [`Scaler::activate`] when a deferred activation is due.

use std::sync::Arc;

use policies::{ACTIVATION_INTERVAL, Observation, Plan, activate};
use tokio::time::Instant;

use super::Scaler;
use crate::front::Front;
use crate::host::CloneHost;
use crate::observation;

impl<F: Front, H: CloneHost> Scaler<F, H> {
    /// What the decider sees now: the balancer's signals, the fleet's counts, and what the
    /// pool took in since the newest decision at least `RECENT` old ([`Recent`]).
    pub(super) fn observe(&mut self, now: Instant) -> Observation {
        let signals = self.front.signals();
        let queued = u32::try_from(signals.queue_depth).unwrap_or(u32::MAX);
        let reading = self
            .recent
            .read(self.since_start(now), signals.arrivals, queued);
        self.last_decision = Some(now);
        let fleet = self.fleet.counts();
        observation(&signals, reading, fleet.pending, fleet.draining)
    }

    /// A request queued: decide now, or as soon as [`ACTIVATION_INTERVAL`] has passed since
    /// the last decision; nothing while the pool is at `workers.max` with what is coming.
    pub(super) fn queued(&mut self, now: Instant) {
        let fleet = self.fleet.counts();
        if fleet.ready.saturating_add(fleet.pending) >= self.applied.workers.max {
            return;
        }
        match self.last_decision.map(|at| at + ACTIVATION_INTERVAL) {
            Some(due) if due > now => self.activate_at = Some(due),
            _ => self.activate(now),
        }
    }

    /// A decision between ticks: clones if the decider, seeing requests queue, grows the pool.
    pub(super) fn activate(&mut self, now: Instant) {
        let policy = Arc::clone(&self.applied);
        let observation = self.observe(now);
        let Some((decision, state)) =
            activate(&policy, &observation, &self.state, self.since_start(now))
        else {
            return;
        };
        self.state = state;
        self.metrics.activated();
        self.last = Some(decision);
        if let Plan::Grow(count) = Plan::of(&decision, observation.workers) {
            self.scale_up(count, &decision, now);
        }
        self.publish(&policy, &observation, &decision);
    }
}

/// Waits until `at`, or for ever without one.
pub(super) async fn until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
