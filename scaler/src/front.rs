//! The balancer in front of the workers, as the scaler acts on it: the worker pool it adds
//! to, drains and removes from, the measurements it reads every tick, and the tuning a
//! policy gives it. Two small traits, so that the scaler's tests drive it with a fake and
//! the balancer knows nothing of the scaler.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::Notify;

use balancer::{Balancer, PoolError, Signals, Tuning, TuningError, WorkerId};

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
    /// Applies a policy's tuning (a policy reload changed it); nothing of it if it refuses.
    fn retune(&self, tuning: Tuning) -> Result<(), TuningError>;
    /// Notified when a request has to wait for a worker, so the scaler can add capacity at
    /// once rather than at its next tick (notifications while nobody waits count as one).
    fn activation(&self) -> Arc<Notify>;
}

/// The tuning `policy` asks of the balancer: the windows it measures over, and how many
/// requests one worker takes at once before the balancer queues (`max_concurrency`, from
/// `squall up --max-concurrency`, overrides the policy's target concurrency).
pub fn tuning(policy: &policies::Policy, max_concurrency: Option<usize>) -> Tuning {
    Tuning {
        stable_window: policy.window.stable.get(),
        panic_window: policy.window.panic.get(),
        // A target of 2.5 in flight means up to 3 at once; at least one.
        max_concurrency_per_worker: max_concurrency
            .unwrap_or(policy.target.concurrency().ceil() as usize)
            .max(1),
    }
}

/// The balancer's configuration with `tuning` and everything else at its default.
pub fn config(tuning: &Tuning) -> balancer::Config {
    balancer::Config {
        max_concurrency_per_worker: tuning.max_concurrency_per_worker,
        stable_window: tuning.stable_window,
        panic_window: tuning.panic_window,
        ..balancer::Config::default()
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

    fn retune(&self, tuning: Tuning) -> Result<(), TuningError> {
        Balancer::retune(self, tuning)
    }

    fn activation(&self) -> Arc<Notify> {
        Balancer::activation(self)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn tuning_follows_the_policy_unless_overridden() {
        let policy = policies::load(
            "p.yaml",
            "name: p\ntemplate: t\ntarget: {concurrency: 2.5}\nwindow: {stable: 20s, panic: 2s}\n",
        )
        .unwrap();
        let tuning = tuning(&policy, None);
        assert_eq!(tuning.stable_window, Duration::from_secs(20));
        assert_eq!(tuning.panic_window, Duration::from_secs(2));
        assert_eq!(tuning.max_concurrency_per_worker, 3);
        assert_eq!(
            super::tuning(&policy, Some(7)).max_concurrency_per_worker,
            7
        );
        let config = config(&tuning);
        assert_eq!(config.stable_window, Duration::from_secs(20));
        assert!(config.validate().is_ok());
    }
}
