//! The worker pool: which workers exist, which take new requests, and what each is doing.
//!
//! The set of workers is one immutable [`Snapshot`] behind one `ArcSwap`. Readers (every
//! request) load it without a lock; a change (add, drain, remove) builds a whole new snapshot
//! and stores it, under a writer mutex so two changes never lose each other. What changes on
//! every request — in-flight count, latency estimate, ejection — lives in atomics inside the
//! shared [`Worker`], never in the snapshot, so membership and draining are decided in one
//! place and per-request counters in another, and no two copies must agree.
//!
//! A worker is *ready* (takes new requests), *draining* (finishes its in-flight requests but
//! gets no new ones; the scaler removes it when [`Pool::in_flight`] reaches zero) or
//! *ejected* (its connections failed; it is left out until a probe connects again).

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::Core;
use crate::upstream::{Connections, WorkerProtocol};
use crate::worker::{Worker, WorkerId};

/// Whether a worker takes new requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WorkerState {
    /// Takes new requests.
    Ready,
    /// Finishes its in-flight requests and takes no new ones.
    Draining,
    /// Its connections failed; it takes no requests until a probe connects again.
    Ejected,
}

impl WorkerState {
    /// The lowercase name used in metrics labels and `/status`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ready => "ready",
            Self::Draining => "draining",
            Self::Ejected => "ejected",
        }
    }
}

/// What the pool knows about one worker at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerStatus {
    /// The worker's id.
    pub id: WorkerId,
    /// Where the balancer connects to it.
    pub addr: SocketAddr,
    /// The protocol the balancer speaks to it.
    pub protocol: WorkerProtocol,
    /// Ready, draining or ejected.
    pub state: WorkerState,
    /// Requests sent to it and not yet finished (response body included).
    pub in_flight: usize,
    /// Its peak-EWMA response time, `None` until it has answered once.
    pub latency: Option<Duration>,
    /// Responses it has returned since it joined the pool.
    pub responses: u64,
}

/// Why a change to the pool was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PoolError {
    /// A worker with this id is already in the pool.
    #[error("worker {0} is already in the pool")]
    Duplicate(WorkerId),
    /// No worker with this id is in the pool.
    #[error("no worker {0} in the pool")]
    Unknown(WorkerId),
}

/// One worker's place in a snapshot.
#[derive(Debug, Clone)]
pub(crate) struct Member {
    pub(crate) worker: Arc<Worker>,
    pub(crate) draining: bool,
}

impl Member {
    pub(crate) fn state(&self) -> WorkerState {
        if self.draining {
            WorkerState::Draining
        } else if self.worker.health.is_ejected() {
            WorkerState::Ejected
        } else {
            WorkerState::Ready
        }
    }
}

/// The set of workers at one moment, in the order they joined. Immutable once stored.
#[derive(Debug, Default)]
pub(crate) struct Snapshot {
    pub(crate) members: Vec<Member>,
}

impl Snapshot {
    fn position(&self, id: &WorkerId) -> Option<usize> {
        self.members.iter().position(|m| &m.worker.id == id)
    }
}

/// A handle on the balancer's worker pool, cheap to clone; the scaler keeps one.
#[derive(Clone)]
pub struct Pool {
    pub(crate) core: Arc<Core>,
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("workers", &self.workers())
            .finish()
    }
}

impl Pool {
    /// Adds a ready worker at `addr`, speaking the configured
    /// [`crate::Config::worker_protocol`]. Requests waiting in the queue are sent to it at
    /// once.
    pub fn add_worker(&self, id: impl Into<WorkerId>, addr: SocketAddr) -> Result<(), PoolError> {
        let protocol = self.core.config.worker_protocol;
        self.add_worker_speaking(id, addr, protocol)
    }

    /// Adds a ready worker at `addr` that speaks `protocol`, whatever the configured default.
    pub fn add_worker_speaking(
        &self,
        id: impl Into<WorkerId>,
        addr: SocketAddr,
        protocol: WorkerProtocol,
    ) -> Result<(), PoolError> {
        let id = id.into();
        self.change(|members| {
            if members.iter().any(|m| m.worker.id == id) {
                return Err(PoolError::Duplicate(id.clone()));
            }
            let core = &self.core;
            let connections = Connections::new(
                protocol,
                addr,
                core.config.connect_timeout,
                core.config.max_idle_connections_per_worker,
                core.connection_shards,
            );
            let worker = Worker::new(id.clone(), connections, core.config.latency_decay);
            let worker = Arc::new(worker);
            members.push(Member {
                worker,
                draining: false,
            });
            Ok(())
        })?;
        self.core.queue.room();
        Ok(())
    }

    /// Stops sending new requests to a worker; its in-flight requests finish. Draining a
    /// draining worker is not an error.
    pub fn drain(&self, id: &WorkerId) -> Result<(), PoolError> {
        self.change_worker(id, |members, at| members[at].draining = true)
    }

    /// Removes a worker from the pool, for good: the worker is gone, or about to be killed.
    /// Its connections end at once, as if it had died with them: a request still waiting for
    /// its answer goes to another worker if it may be sent twice (an idempotent method or an
    /// `Idempotency-Key`, a small body), and gets `502` otherwise; a response body still
    /// streaming is cut. So that nothing is cut, drain it first and remove it once
    /// [`Pool::in_flight`] is zero. A worker that returns (the same id, or the same address)
    /// is added again as a new one.
    pub fn remove(&self, id: &WorkerId) -> Result<(), PoolError> {
        let mut removed = None;
        self.change_worker(id, |members, at| {
            removed = Some(members.remove(at).worker);
        })?;
        if let Some(worker) = removed {
            worker.connections.close();
        }
        Ok(())
    }

    /// Requests in flight on a worker, `None` if it is not in the pool.
    pub fn in_flight(&self, id: &WorkerId) -> Option<usize> {
        let snapshot = self.core.snapshot.load();
        let at = snapshot.position(id)?;
        Some(
            snapshot.members[at]
                .worker
                .in_flight
                .load(Ordering::Acquire),
        )
    }

    /// The status of every worker, in the order they joined.
    pub fn workers(&self) -> Vec<WorkerStatus> {
        let now = self.core.clock.now();
        self.core
            .snapshot
            .load()
            .members
            .iter()
            .map(|m| WorkerStatus {
                id: m.worker.id.clone(),
                addr: m.worker.addr,
                protocol: m.worker.connections.protocol(),
                state: m.state(),
                in_flight: m.worker.in_flight.load(Ordering::Acquire),
                latency: m.worker.load.estimate(now),
                responses: m.worker.responses.load(Ordering::Acquire),
            })
            .collect()
    }

    /// [`Pool::change`] that edits the members knowing where the worker `id` is among them;
    /// `Unknown` if it is not in the pool.
    fn change_worker(
        &self,
        id: &WorkerId,
        edit: impl FnOnce(&mut Vec<Member>, usize),
    ) -> Result<(), PoolError> {
        self.change(|members| {
            let at = members
                .iter()
                .position(|m| &m.worker.id == id)
                .ok_or_else(|| PoolError::Unknown(id.clone()))?;
            edit(members, at);
            Ok(())
        })
    }

    /// Builds the next snapshot from a copy of the current members and stores it.
    fn change(
        &self,
        edit: impl FnOnce(&mut Vec<Member>) -> Result<(), PoolError>,
    ) -> Result<(), PoolError> {
        // A poisoned writer lock only means another change panicked; the snapshot itself
        // is always whole, so carry on with it.
        let _writer = self
            .core
            .pool_writer
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut members = self.core.snapshot.load().members.clone();
        edit(&mut members)?;
        self.core.snapshot.store(Arc::new(Snapshot { members }));
        Ok(())
    }
}

/// Serialises pool changes; readers never take it.
pub(crate) type PoolWriter = Mutex<()>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Balancer, Config};

    #[test]
    fn changes_are_checked_and_each_builds_a_new_snapshot() {
        let balancer = Balancer::new(Config::default()).expect("valid config");
        let pool = balancer.pool();
        let addr: SocketAddr = "127.0.0.1:8000".parse().expect("address");
        pool.add_worker("a", addr).expect("new id");
        let before = balancer.core.snapshot.load_full();
        assert_eq!(
            pool.add_worker("a", addr),
            Err(PoolError::Duplicate("a".into()))
        );
        let unknown = WorkerId::from("zz");
        assert_eq!(
            pool.drain(&unknown),
            Err(PoolError::Unknown(unknown.clone()))
        );
        assert_eq!(
            pool.remove(&unknown),
            Err(PoolError::Unknown(unknown.clone()))
        );
        assert_eq!(pool.in_flight(&unknown), None);
        // Refused changes store nothing.
        assert!(Arc::ptr_eq(&before, &balancer.core.snapshot.load_full()));

        pool.drain(&"a".into()).expect("known");
        let after = balancer.core.snapshot.load_full();
        assert!(!Arc::ptr_eq(&before, &after));
        // The old snapshot is untouched: readers holding it see a consistent set.
        assert!(!before.members[0].draining);
        assert!(after.members[0].draining);
        // The worker itself is shared, so its counters carry over.
        assert!(Arc::ptr_eq(
            &before.members[0].worker,
            &after.members[0].worker
        ));
        let status = pool.workers();
        assert_eq!(status.len(), 1);
        assert_eq!(status[0].state, WorkerState::Draining);
        assert_eq!(status[0].in_flight, 0);
        pool.remove(&"a".into()).expect("known");
        assert!(pool.workers().is_empty());
    }
}
