//! One worker as the balancer sees it: its typed id, its address and keep-alive
//! connections, and what changes on every request — slots in use, responses, latency
//! estimate, ejection — in atomics, so a request never takes a lock to read or update them.
//!
//! A [`Worker`] is shared by every pool snapshot that lists it and by the requests it serves,
//! so it outlives its removal from the pool until its last request ends.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use crate::load::{Nanos, PeakEwma};
use crate::upstream::Connections;

/// The name a worker is known by: the host it runs on and its id there (the scaler's forkd
/// host and clone id). `squall balance` names its workers by address, with no host.
///
/// Cheap to clone: both parts are shared strings. Shown as `id@host`, or `id` alone when the
/// host is empty.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkerId {
    host: Arc<str>,
    id: Arc<str>,
}

impl WorkerId {
    /// The worker `id` on `host`.
    pub fn new(host: impl Into<Arc<str>>, id: impl Into<Arc<str>>) -> Self {
        Self {
            host: host.into(),
            id: id.into(),
        }
    }

    /// The host the worker runs on; empty when it was named without one.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Its id on that host (the clone id, for the scaler's workers).
    pub fn id(&self) -> &str {
        &self.id
    }
}

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.is_empty() {
            f.write_str(&self.id)
        } else {
            write!(f, "{}@{}", self.id, self.host)
        }
    }
}

/// A host-less id (`squall balance`'s workers, named by address, and tests).
impl From<String> for WorkerId {
    fn from(id: String) -> Self {
        Self::new("", id)
    }
}

/// A host-less id (`squall balance`'s workers, named by address, and tests).
impl From<&str> for WorkerId {
    fn from(id: &str) -> Self {
        Self::new("", id)
    }
}

/// One worker, shared by the snapshots that list it and by the requests it serves, so it
/// outlives its removal from the pool until its last request ends.
#[derive(Debug)]
pub(crate) struct Worker {
    pub(crate) id: WorkerId,
    pub(crate) addr: SocketAddr,
    pub(crate) in_flight: AtomicUsize,
    pub(crate) responses: AtomicU64,
    pub(crate) load: PeakEwma,
    pub(crate) health: Health,
    /// Keep-alive connections to it.
    pub(crate) connections: Connections,
}

impl Worker {
    /// A worker at `connections`' address, with no request yet and no latency sample.
    pub(crate) fn new(id: WorkerId, connections: Connections, latency_decay: Duration) -> Self {
        Self {
            id,
            addr: connections.addr(),
            in_flight: AtomicUsize::new(0),
            responses: AtomicU64::new(0),
            load: PeakEwma::new(latency_decay),
            health: Health::default(),
            connections,
        }
    }

    /// Takes one of the worker's `limit` slots, unless all are taken. A compare-and-swap
    /// loop rather than add-then-undo, so a full worker never looks fuller than it is to a
    /// request that is releasing a slot at the same time.
    pub(crate) fn try_reserve(&self, limit: usize) -> bool {
        // Sequentially consistent with a waiter joining the admission queue (see there).
        self.in_flight
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < limit).then_some(n + 1)
            })
            .is_ok()
    }
}

/// Outlier ejection: a worker whose connections fail is left out for a while, and the
/// ticker probes it with a TCP connect once that while has passed.
#[derive(Debug, Default)]
pub(crate) struct Health {
    /// Zero when not ejected, [`PROBING`] while a probe runs, else when the ejection ends
    /// (nanoseconds since the epoch).
    ejected_until: AtomicU64,
    /// Consecutive failed connects and probes; doubles the next ejection.
    failures: AtomicU32,
}

/// `ejected_until` while a probe is running: still ejected, and not due for another probe.
const PROBING: u64 = u64::MAX;

impl Health {
    pub(crate) fn is_ejected(&self) -> bool {
        self.ejected_until.load(Ordering::Acquire) != 0
    }

    /// Ejects a worker that was not ejected yet, after a failed connect. Returns whether
    /// this call ejected it (concurrent failures of the same worker eject it once).
    pub(crate) fn eject(&self, now: Nanos, base: Duration, max: Duration) -> bool {
        if self.is_ejected() {
            return false;
        }
        let until = self.next_ejection_end(now, base, max);
        self.ejected_until
            .compare_exchange(0, until, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Marks the start of a probe if the ejection is over at `now`; only one caller wins.
    pub(crate) fn start_probe(&self, now: Nanos) -> bool {
        let until = self.ejected_until.load(Ordering::Acquire);
        until != 0
            && until != PROBING
            && until <= now
            && self
                .ejected_until
                .compare_exchange(until, PROBING, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }

    /// Ejects the worker again after a failed probe, for longer.
    pub(crate) fn eject_again(&self, now: Nanos, base: Duration, max: Duration) {
        let until = self.next_ejection_end(now, base, max);
        self.ejected_until.store(until, Ordering::Release);
    }

    /// `base` doubled per previous consecutive failure, capped at `max`, from `now`.
    fn next_ejection_end(&self, now: Nanos, base: Duration, max: Duration) -> Nanos {
        let failures = self.failures.fetch_add(1, Ordering::AcqRel).min(16);
        let length = base.saturating_mul(1 << failures).min(max);
        now.saturating_add(length.as_nanos() as u64)
            .clamp(1, PROBING - 1)
    }

    /// Readmits the worker after a successful probe.
    pub(crate) fn recover(&self) {
        self.failures.store(0, Ordering::Release);
        self.ejected_until.store(0, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Nanos = 1_000_000_000;

    #[test]
    fn a_worker_id_has_a_host_and_an_id_and_shows_both() {
        let id = WorkerId::new("host-a", "clone-7");
        assert_eq!((id.host(), id.id()), ("host-a", "clone-7"));
        assert_eq!(id.to_string(), "clone-7@host-a");
        // A host-less id shows the id alone, and equals one built with an empty host.
        let bare = WorkerId::from("127.0.0.1:8080");
        assert_eq!(bare.host(), "");
        assert_eq!(bare.to_string(), "127.0.0.1:8080");
        assert_eq!(bare, WorkerId::new("", "127.0.0.1:8080"));
        assert_eq!(WorkerId::from(String::from("x")), WorkerId::from("x"));
        // The same clone id on two hosts names two workers.
        assert_ne!(WorkerId::new("a", "1"), WorkerId::new("b", "1"));
        // Clones share their strings.
        let copy = id.clone();
        assert!(Arc::ptr_eq(&copy.host, &id.host) && Arc::ptr_eq(&copy.id, &id.id));
    }

    #[test]
    fn ejection_doubles_until_the_cap_and_a_probe_readmits() {
        let health = Health::default();
        let (base, max) = (Duration::from_secs(1), Duration::from_secs(3));
        assert!(health.eject(0, base, max));
        assert!(!health.eject(0, base, max), "already ejected");
        assert!(!health.start_probe(SECOND - 1), "not due yet");
        assert!(health.start_probe(SECOND));
        assert!(!health.start_probe(SECOND), "one probe at a time");
        assert!(health.is_ejected(), "still ejected while probing");
        // The probe fails: ejected for 2 s, then 3 s (capped), from the probe's time.
        health.eject_again(SECOND, base, max);
        assert!(!health.start_probe(3 * SECOND - 1));
        assert!(health.start_probe(3 * SECOND));
        health.eject_again(3 * SECOND, base, max);
        assert!(!health.start_probe(6 * SECOND - 1));
        assert!(health.start_probe(6 * SECOND));
        health.recover();
        assert!(!health.is_ejected());
        // A fresh failure starts from the base length again.
        assert!(health.eject(10 * SECOND, base, max));
        assert!(health.start_probe(11 * SECOND));
    }
}
