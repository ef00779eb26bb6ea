//! The simulator's seam for decision-making: an [`Autoscaler`] is what decides how many workers
//! the simulated pool should have. Squall's own decider is one ([`Squall`]: [`crate::decide`]
//! and [`crate::activate`] with their [`State`]); the models of other autoscalers' published
//! algorithms in [`super::models`] are others. The simulator gives each the same trace, the
//! same seed and the same pool model, and measures each over that autoscaler's own windows.

use std::time::Duration;

use crate::decide::{Decision, Observation, State, WorkerCounts, activate, decide};
use crate::policy::{Policy, Windows};

/// Something that decides how many workers a pool should have, driven by the simulator.
///
/// Implementations are pure and deterministic: what they decide depends only on the
/// observations and times they are given (and what they remember of earlier ones).
pub trait Autoscaler {
    /// How often it decides (the simulator calls [`Autoscaler::decide`] at the first tick of
    /// the run and every `tick()` after).
    fn tick(&self) -> Duration;

    /// The windows its observations are measured over: the `stable` and `panic` windows of
    /// the [`Observation`] it is given.
    fn windows(&self) -> Windows;

    /// Ready workers at the start of a run: the least it keeps.
    fn initial_workers(&self) -> u32;

    /// One decision at `now` (an offset from the start of the run).
    fn decide(&mut self, observation: &Observation, now: Duration) -> Decision;

    /// Whether a request that has to queue while the pool holds `workers` wakes it between
    /// ticks (then [`Autoscaler::activate`] is asked). By default it never does.
    fn activates(&self, workers: WorkerCounts) -> bool {
        let _ = workers;
        false
    }

    /// A decision between ticks, because requests queue: `Some` when it grows the pool (and
    /// is acted on), `None` when there is nothing to do until the next tick.
    fn activate(&mut self, observation: &Observation, now: Duration) -> Option<Decision> {
        let _ = (observation, now);
        None
    }

    /// What it is, for a report: `squall (policy web)`.
    fn label(&self) -> String;

    /// What a reader of a comparison should know about how it was run (a bound changed, a
    /// feature left out); empty by default.
    fn notes(&self) -> Vec<String> {
        Vec::new()
    }
}

/// Squall's own decider as an [`Autoscaler`]: [`decide`] every policy tick and [`activate`]
/// whenever requests queue, remembering its [`State`] between calls.
#[derive(Clone, Debug)]
pub struct Squall<'a> {
    policy: &'a Policy,
    state: State,
}

impl<'a> Squall<'a> {
    /// The decider for `policy`, with a fresh state.
    pub fn new(policy: &'a Policy) -> Self {
        Self {
            policy,
            state: State::default(),
        }
    }
}

impl Autoscaler for Squall<'_> {
    fn tick(&self) -> Duration {
        self.policy.tick.get()
    }

    fn windows(&self) -> Windows {
        self.policy.window
    }

    fn initial_workers(&self) -> u32 {
        self.policy.workers.min
    }

    fn decide(&mut self, observation: &Observation, now: Duration) -> Decision {
        let (decision, next) = decide(self.policy, observation, &self.state, now);
        self.state = next;
        decision
    }

    fn activates(&self, _workers: WorkerCounts) -> bool {
        true
    }

    fn activate(&mut self, observation: &Observation, now: Duration) -> Option<Decision> {
        let (decision, next) = activate(self.policy, observation, &self.state, now)?;
        self.state = next;
        Some(decision)
    }

    fn label(&self) -> String {
        format!("squall (policy {})", self.policy.name)
    }
}
