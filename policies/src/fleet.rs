//! The workers' life cycle, as the scaler acts on a decision: one pure type that both the
//! real scaler and the simulator use, so the rules they follow cannot drift apart.
//!
//! A worker is *pending* (asked for, not yet answered: only a count, since it has no id
//! yet), then *ready* (in the balancer's pool), then *draining* (no new requests; ended when
//! it has nothing in flight or its drain deadline passes), then *killing* (its end was asked
//! for), then gone. [`Plan::of`] turns a [`Decision`] into how many to add or drain;
//! [`Fleet::choose_drains`] picks whom to drain: the ready workers with the fewest requests
//! in flight, the most recently joined first among equals (a last-in-first-out pool keeps
//! the workers whose caches have seen the most traffic); [`Fleet::finished_drains`] says
//! which drains are over and why.
//!
//! Time is an offset from any fixed origin, as for [`crate::decide`]; nothing here reads a
//! clock.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::decide::{Decision, WorkerCounts};

/// Where a worker with an id is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// In the balancer's pool, taking requests.
    Ready,
    /// Taking no new requests; ended once idle or at `deadline`.
    Draining {
        /// When its drain times out and it is killed whatever it holds.
        deadline: Duration,
    },
    /// Its end was asked for; it leaves the fleet when that is done.
    Killing,
}

/// One worker the fleet knows by id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    /// Where it is in its life.
    pub phase: Phase,
    /// When it joined the pool.
    pub joined: Duration,
}

/// What a decision asks of the fleet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Nothing to do.
    Hold,
    /// Ask for this many more workers.
    Grow(u32),
    /// Drain this many ready workers.
    Shrink(u32),
}

impl Plan {
    /// What `decision` asks of a pool with `counts` workers: ready and pending workers are
    /// the capacity it is compared with (draining ones are on their way out).
    pub fn of(decision: &Decision, counts: WorkerCounts) -> Self {
        let current = counts.ready + counts.pending;
        match decision.desired.cmp(&current) {
            std::cmp::Ordering::Greater => Plan::Grow(decision.desired - current),
            std::cmp::Ordering::Less => Plan::Shrink(current - decision.desired),
            std::cmp::Ordering::Equal => Plan::Hold,
        }
    }
}

/// How a drain ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DrainEnd {
    /// The worker finished everything it held.
    Idle,
    /// Its deadline passed with requests still in flight; they are lost with it.
    TimedOut,
}

/// Why a change to the fleet was refused: the worker is not where the change needs it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FleetError<Id: std::fmt::Debug> {
    /// A worker with this id is already in the fleet.
    #[error("worker {0:?} is already in the fleet")]
    Duplicate(Id),
    /// No worker with this id is in the fleet.
    #[error("no worker {0:?} in the fleet")]
    Unknown(Id),
    /// Only a ready worker can be drained.
    #[error("worker {0:?} is not ready, so it cannot be drained")]
    NotReady(Id),
}

/// The workers of one pool and the clones asked for on its behalf. `Id` is however the
/// caller names a worker: the scaler's typed worker id, the simulator's index.
#[derive(Clone, Debug)]
pub struct Fleet<Id: Ord> {
    members: BTreeMap<Id, Member>,
    pending: u32,
}

impl<Id: Ord> Default for Fleet<Id> {
    fn default() -> Self {
        Self {
            members: BTreeMap::new(),
            pending: 0,
        }
    }
}

impl<Id: Ord + Clone + std::fmt::Debug> Fleet<Id> {
    /// An empty fleet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Workers by phase, as the decider counts them (killing ones count nowhere).
    pub fn counts(&self) -> WorkerCounts {
        let mut counts = WorkerCounts {
            pending: self.pending,
            ..WorkerCounts::default()
        };
        for member in self.members.values() {
            match member.phase {
                Phase::Ready => counts.ready += 1,
                Phase::Draining { .. } => counts.draining += 1,
                Phase::Killing => {}
            }
        }
        counts
    }

    /// Clones asked for and not yet answered.
    pub fn pending(&self) -> u32 {
        self.pending
    }

    /// `count` more clones were asked for.
    pub fn asked(&mut self, count: u32) {
        self.pending = self.pending.saturating_add(count);
    }

    /// A request for `count` clones was answered (whatever the answer): they are no longer
    /// pending. Those that came become members through [`Fleet::joined`].
    pub fn answered(&mut self, count: u32) {
        self.pending = self.pending.saturating_sub(count);
    }

    /// A worker joined the pool at `now`: it is ready.
    pub fn joined(&mut self, id: Id, now: Duration) -> Result<(), FleetError<Id>> {
        if self.members.contains_key(&id) {
            return Err(FleetError::Duplicate(id));
        }
        self.members.insert(
            id,
            Member {
                phase: Phase::Ready,
                joined: now,
            },
        );
        Ok(())
    }

    /// The `count` ready workers to drain: fewest in flight first, then the most recently
    /// joined, then the greatest id (so the choice is the same for the same input).
    /// `in_flight` says how many requests a worker holds.
    pub fn choose_drains(&self, count: u32, in_flight: impl Fn(&Id) -> usize) -> Vec<Id> {
        let mut ready: Vec<(usize, std::cmp::Reverse<Duration>, std::cmp::Reverse<&Id>)> = self
            .members
            .iter()
            .filter(|(_, m)| m.phase == Phase::Ready)
            .map(|(id, m)| {
                (
                    in_flight(id),
                    std::cmp::Reverse(m.joined),
                    std::cmp::Reverse(id),
                )
            })
            .collect();
        ready.sort();
        ready
            .into_iter()
            .take(count as usize)
            .map(|(_, _, std::cmp::Reverse(id))| id.clone())
            .collect()
    }

    /// Starts draining a ready worker; it must be ended by `deadline`.
    pub fn drain(&mut self, id: &Id, deadline: Duration) -> Result<(), FleetError<Id>> {
        let member = self
            .members
            .get_mut(id)
            .ok_or_else(|| FleetError::Unknown(id.clone()))?;
        if member.phase != Phase::Ready {
            return Err(FleetError::NotReady(id.clone()));
        }
        member.phase = Phase::Draining { deadline };
        Ok(())
    }

    /// The draining workers whose drain is over at `now`, and how it ended. They stay
    /// draining until [`Fleet::killing`] or [`Fleet::gone`] says otherwise.
    pub fn finished_drains(
        &self,
        now: Duration,
        in_flight: impl Fn(&Id) -> usize,
    ) -> Vec<(Id, DrainEnd)> {
        self.members
            .iter()
            .filter_map(|(id, m)| match m.phase {
                Phase::Draining { .. } if in_flight(id) == 0 => Some((id.clone(), DrainEnd::Idle)),
                Phase::Draining { deadline } if now >= deadline => {
                    Some((id.clone(), DrainEnd::TimedOut))
                }
                _ => None,
            })
            .collect()
    }

    /// The worker's end was asked for (a drain that finished, a worker that exited on its
    /// own, an orphan). Returns whether it was not already being killed.
    pub fn killing(&mut self, id: &Id) -> bool {
        match self.members.get_mut(id) {
            Some(member) if member.phase != Phase::Killing => {
                member.phase = Phase::Killing;
                true
            }
            _ => false,
        }
    }

    /// The worker is gone (killed, or lost with its host); returns what the fleet knew of it.
    pub fn gone(&mut self, id: &Id) -> Option<Member> {
        self.members.remove(id)
    }

    /// What the fleet knows of a worker.
    pub fn get(&self, id: &Id) -> Option<&Member> {
        self.members.get(id)
    }

    /// Every worker the fleet knows, in id order.
    pub fn iter(&self) -> impl Iterator<Item = (&Id, &Member)> {
        self.members.iter()
    }

    /// How many workers the fleet knows (pending ones excluded).
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether the fleet knows no worker (pending ones excluded).
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Forgets every worker and pending clone, returning the workers' ids (at shutdown,
    /// when all are killed at once).
    pub fn clear(&mut self) -> Vec<Id> {
        self.pending = 0;
        std::mem::take(&mut self.members).into_keys().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::Reason;

    fn decision(desired: u32) -> Decision {
        Decision {
            desired,
            panic: false,
            reason: Reason::Steady { need: desired },
        }
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn a_decision_is_compared_with_ready_plus_pending() {
        let mut fleet = Fleet::new();
        assert_eq!(Plan::of(&decision(3), fleet.counts()), Plan::Grow(3));
        fleet.asked(2);
        fleet.joined("a", secs(0)).unwrap();
        assert_eq!(Plan::of(&decision(3), fleet.counts()), Plan::Hold);
        fleet.drain(&"a", secs(10)).unwrap();
        // A draining worker is no capacity.
        assert_eq!(Plan::of(&decision(3), fleet.counts()), Plan::Grow(1));
        assert_eq!(Plan::of(&decision(1), fleet.counts()), Plan::Shrink(1));
        assert_eq!(
            fleet.counts(),
            WorkerCounts {
                ready: 0,
                pending: 2,
                draining: 1
            }
        );
        fleet.answered(5);
        assert_eq!(fleet.pending(), 0, "answers never make pending negative");
    }

    #[test]
    fn the_idlest_then_the_newest_is_drained_first() {
        let mut fleet = Fleet::new();
        for (id, joined) in [("a", 1), ("b", 2), ("c", 3), ("d", 4)] {
            fleet.joined(id, secs(joined)).unwrap();
        }
        let held = |id: &&str| match *id {
            "a" => 0,
            "b" => 3,
            "c" => 0,
            _ => 1,
        };
        assert_eq!(fleet.choose_drains(2, held), vec!["c", "a"]);
        assert_eq!(fleet.choose_drains(9, held), vec!["c", "a", "d", "b"]);
        fleet.drain(&"c", secs(10)).unwrap();
        assert_eq!(fleet.choose_drains(1, held), vec!["a"], "only ready ones");
    }

    #[test]
    fn a_drain_ends_when_idle_or_at_its_deadline() {
        let mut fleet = Fleet::new();
        fleet.joined("idle", secs(0)).unwrap();
        fleet.joined("busy", secs(0)).unwrap();
        fleet.drain(&"idle", secs(30)).unwrap();
        fleet.drain(&"busy", secs(30)).unwrap();
        let held = |id: &&str| usize::from(*id == "busy");
        assert_eq!(
            fleet.finished_drains(secs(1), held),
            vec![("idle", DrainEnd::Idle)]
        );
        assert_eq!(
            fleet.finished_drains(secs(30), held),
            vec![("busy", DrainEnd::TimedOut), ("idle", DrainEnd::Idle)]
        );
        assert!(fleet.killing(&"busy"));
        assert!(!fleet.killing(&"busy"), "already being killed");
        assert!(fleet.finished_drains(secs(60), held).len() == 1);
        assert_eq!(fleet.gone(&"busy").map(|m| m.phase), Some(Phase::Killing));
    }

    #[test]
    fn changes_to_workers_not_where_they_need_be_are_refused() {
        let mut fleet = Fleet::new();
        fleet.joined(1, secs(0)).unwrap();
        assert_eq!(fleet.joined(1, secs(1)), Err(FleetError::Duplicate(1)));
        assert_eq!(fleet.drain(&2, secs(1)), Err(FleetError::Unknown(2)));
        fleet.drain(&1, secs(1)).unwrap();
        assert_eq!(fleet.drain(&1, secs(1)), Err(FleetError::NotReady(1)));
        assert!(!fleet.killing(&2));
        fleet.asked(3);
        assert_eq!(fleet.clear(), vec![1]);
        assert_eq!(fleet.counts(), WorkerCounts::default());
    }
}
