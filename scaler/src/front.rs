//! The balancer in front of the workers, as the scaler acts on it: the worker pool it adds
//! to, drains and removes from, the measurements it reads every tick, and the tuning a
//! policy gives it. Two small traits, so that the scaler's tests drive it with a fake and
//! the balancer knows nothing of the scaler.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use balancer::{Balancer, PoolError, Signals, WorkerId};

/// The pool of workers the balancer sends requests to.
pub trait WorkerPool: Send + Sync + 'static {
    /// Adds a ready worker listening at `addr`.
    fn add(&self, id: &WorkerId, addr: SocketAddr) -> Result<(), PoolError>;
    /// Stops sending new requests to a worker; the ones it holds finish.
    fn drain(&self, id: &WorkerId) -> Result<(), PoolError>;
    /// Forgets a worker (it is gone, or about to be). Unknown ids are ignored.
    fn remove(&self, id: &WorkerId);
    /// Requests a worker holds right now; `None` if the pool does not know it.
    fn in_flight(&self, id: &WorkerId) -> Option<usize>;
}

/// What the scaler reads from the balancer and tells it, besides the pool.
pub trait Front: WorkerPool {
    /// The measurements of both windows and the worker counts, now.
    fn signals(&self) -> Signals;
    /// Applies a policy's tuning (a policy reload changed it).
    fn retune(&self, tuning: &Tuning) -> Result<(), String>;
}

/// What a policy sets in the balancer: the windows it measures over and how many requests
/// one worker takes at once before the balancer queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    /// The long window the scaler steers by (`window.stable`).
    pub stable_window: Duration,
    /// The short window that notices a flash crowd (`window.panic`).
    pub panic_window: Duration,
    /// Requests one worker serves at once.
    pub max_concurrency_per_worker: usize,
}

impl Tuning {
    /// The tuning `policy` asks for; `max_concurrency` (`squall up --max-concurrency`)
    /// overrides the policy's target concurrency as the per-worker limit.
    pub fn of(policy: &policies::Policy, max_concurrency: Option<usize>) -> Self {
        Self {
            stable_window: policy.window.stable.get(),
            panic_window: policy.window.panic.get(),
            // A target of 2.5 in flight means up to 3 at once; at least one.
            max_concurrency_per_worker: max_concurrency
                .unwrap_or(policy.target.concurrency().ceil() as usize)
                .max(1),
        }
    }

    /// The balancer's configuration with this tuning and everything else at its default.
    pub fn config(&self) -> balancer::Config {
        balancer::Config {
            max_concurrency_per_worker: self.max_concurrency_per_worker,
            stable_window: self.stable_window,
            panic_window: self.panic_window,
            ..balancer::Config::default()
        }
    }
}

/// A worker's id: the forkd host it runs on and its clone id there (every forkd numbers its
/// clones from 1, so the clone id alone is not unique). Cheap to clone.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Worker {
    host: Arc<str>,
    id: Arc<str>,
}

impl Worker {
    /// Clone `id` of host `host`.
    pub fn new(host: impl Into<Arc<str>>, id: impl Into<Arc<str>>) -> Self {
        Self {
            host: host.into(),
            id: id.into(),
        }
    }

    /// The host's name.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The clone id on that host.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Its id in the balancer's pool.
    pub(crate) fn in_pool(&self) -> WorkerId {
        WorkerId::from(format!("{}@{}", self.id, self.host))
    }
}

impl std::fmt::Display for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.id, self.host)
    }
}

impl WorkerPool for Balancer {
    fn add(&self, id: &WorkerId, addr: SocketAddr) -> Result<(), PoolError> {
        self.pool().add_worker(id.clone(), addr)
    }

    fn drain(&self, id: &WorkerId) -> Result<(), PoolError> {
        self.pool().drain(id)
    }

    fn remove(&self, id: &WorkerId) {
        // Unknown already: nothing to forget.
        let _ = self.pool().remove(id);
    }

    fn in_flight(&self, id: &WorkerId) -> Option<usize> {
        self.pool().in_flight(id)
    }
}

impl Front for Balancer {
    fn signals(&self) -> Signals {
        Balancer::signals(self)
    }

    fn retune(&self, tuning: &Tuning) -> Result<(), String> {
        let config = self.config();
        if config.stable_window == tuning.stable_window
            && config.panic_window == tuning.panic_window
            && config.max_concurrency_per_worker == tuning.max_concurrency_per_worker
        {
            return Ok(());
        }
        Err("the balancer cannot change its windows or concurrency while it runs".to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tuning_follows_the_policy_unless_overridden() {
        let policy = policies::load(
            "p.yaml",
            "name: p\ntemplate: t\ntarget: {concurrency: 2.5}\nwindow: {stable: 20s, panic: 2s}\n",
        )
        .unwrap();
        let tuning = Tuning::of(&policy, None);
        assert_eq!(tuning.stable_window, Duration::from_secs(20));
        assert_eq!(tuning.panic_window, Duration::from_secs(2));
        assert_eq!(tuning.max_concurrency_per_worker, 3);
        assert_eq!(Tuning::of(&policy, Some(7)).max_concurrency_per_worker, 7);
        let config = tuning.config();
        assert_eq!(config.stable_window, Duration::from_secs(20));
        assert!(config.validate().is_ok());
    }
}
