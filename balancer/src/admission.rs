//! Admission: a per-worker concurrency limit, and a bounded FIFO queue for the requests
//! that arrive while every worker is at its limit.
//!
//! This is how a flash crowd is held, Knative-activator style, for the milliseconds a clone
//! takes: requests wait in arrival order, each for at most `queue_timeout`, and a request
//! that finds the queue full is refused at once (`503` with `Retry-After`) rather than
//! piling up. With no worker in the pool at all requests wait the same way, so a scaler
//! can start from zero and add the first worker while they wait. A slot is handed over directly from the request that frees it to the head of
//! the queue, so the order is kept and no woken waiter races a newcomer for the slot.
//!
//! The common case takes no lock: when nobody is waiting a request picks and reserves a
//! worker with atomics only. The queue's mutex is taken only when workers are full, by
//! requests joining the queue and by requests finishing while someone waits.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

use crate::Core;
use crate::pick::pick;
use crate::worker::{Worker, WorkerId};

/// Why a request got no worker.
#[derive(Debug, thiserror::Error, PartialEq)]
pub(crate) enum AdmissionError {
    /// The queue already holds `queue_capacity` requests.
    #[error("every worker is busy and the queue is full")]
    QueueFull,
    /// The request waited `queue_timeout` without a worker becoming free.
    #[error("no worker became free within the queue timeout")]
    QueueTimeout,
}

/// A reserved slot on one worker. Dropping it frees the slot and hands it to the head of
/// the queue, if anyone waits.
#[derive(Debug)]
pub(crate) struct Lease {
    pub(crate) worker: Arc<Worker>,
    core: Arc<Core>,
}

impl Lease {
    fn new(worker: Arc<Worker>, core: &Arc<Core>) -> Self {
        core.admission.in_flight.fetch_add(1, Ordering::AcqRel);
        Self {
            worker,
            core: Arc::clone(core),
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.worker.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.core.admission.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.core.admission.dispatch(&self.core);
    }
}

#[derive(Debug)]
struct Waiter {
    ticket: u64,
    exclude: Option<WorkerId>,
    slot: oneshot::Sender<Lease>,
}

/// The queue of requests waiting for a worker, and the balancer-wide in-flight count.
#[derive(Debug, Default)]
pub(crate) struct Admission {
    waiters: Mutex<VecDeque<Waiter>>,
    /// `waiters.len()`, readable without the lock.
    depth: AtomicUsize,
    /// Leases alive right now.
    in_flight: AtomicUsize,
    next_ticket: AtomicU64,
}

impl Admission {
    /// Requests waiting in the queue.
    pub(crate) fn depth(&self) -> usize {
        self.depth.load(Ordering::Acquire)
    }

    /// Requests holding a worker slot.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    fn lock(&self) -> MutexGuard<'_, VecDeque<Waiter>> {
        // The queue holds only channel ends; one left by a panicking thread is still valid.
        self.waiters
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Reserves a slot on a worker other than `exclude`, waiting in the queue when every
    /// worker is full.
    pub(crate) async fn acquire(
        core: &Arc<Core>,
        exclude: Option<&WorkerId>,
    ) -> Result<Lease, AdmissionError> {
        let admission = &core.admission;
        if admission.depth() == 0 {
            if let Some(lease) = admission.try_pick(core, exclude) {
                return Ok(lease);
            }
        }
        let ticket = admission.next_ticket.fetch_add(1, Ordering::Relaxed);
        let (slot, mut granted) = oneshot::channel();
        {
            let mut waiters = admission.lock();
            // Checked again under the lock: a slot freed since the fast path looked would
            // otherwise be handed to nobody. Only when nobody waits, to keep FIFO order.
            if waiters.is_empty() {
                if let Some(lease) = admission.try_pick(core, exclude) {
                    return Ok(lease);
                }
            }
            if waiters.len() >= core.config.queue_capacity {
                return Err(AdmissionError::QueueFull);
            }
            waiters.push_back(Waiter {
                ticket,
                exclude: exclude.cloned(),
                slot,
            });
            admission.depth.store(waiters.len(), Ordering::Release);
        }
        let queued = Queued { ticket, core };
        match tokio::time::timeout(core.config.queue_timeout, &mut granted).await {
            Ok(Ok(lease)) => Ok(lease),
            // The sender is only dropped unsent when the waiter leaves the queue itself.
            Ok(Err(_)) => Err(AdmissionError::QueueTimeout),
            Err(_elapsed) => {
                drop(queued);
                // A slot may have been handed over between the timeout and leaving the
                // queue; take it rather than waste it.
                granted.try_recv().map_err(|_| AdmissionError::QueueTimeout)
            }
        }
    }

    /// Reserves a slot without queueing: the lock-free path.
    fn try_pick(&self, core: &Arc<Core>, exclude: Option<&WorkerId>) -> Option<Lease> {
        let snapshot = core.snapshot.load();
        let limit = core.config.max_concurrency_per_worker;
        let now = core.clock.now();
        let worker = pick(&snapshot, limit, exclude, now, &mut rand::rng())?;
        Some(Lease::new(worker, core))
    }

    /// Hands free slots to the waiters at the head of the queue, in order. Called when a
    /// slot is freed, a worker is added or an ejected worker comes back.
    pub(crate) fn dispatch(&self, core: &Arc<Core>) {
        if self.depth() == 0 {
            return;
        }
        // Leases whose waiter left; dropped after the lock is released, since dropping one
        // dispatches again.
        let mut unwanted = Vec::new();
        {
            let mut waiters = self.lock();
            while let Some(head) = waiters.front() {
                if head.slot.is_closed() {
                    waiters.pop_front();
                    continue;
                }
                let Some(lease) = self.try_pick(core, head.exclude.as_ref()) else {
                    break;
                };
                if let Some(head) = waiters.pop_front() {
                    if let Err(lease) = head.slot.send(lease) {
                        unwanted.push(lease);
                    }
                }
            }
            self.depth.store(waiters.len(), Ordering::Release);
        }
        drop(unwanted);
    }
}

/// A place in the queue; leaving the scope (timeout, or the client going away) gives it up.
struct Queued<'a> {
    ticket: u64,
    core: &'a Arc<Core>,
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        let admission = &self.core.admission;
        let mut waiters = admission.lock();
        waiters.retain(|w| w.ticket != self.ticket);
        admission.depth.store(waiters.len(), Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Balancer, Config};
    use std::time::Duration;

    fn one_worker_balancer(config: Config) -> Balancer {
        let balancer = Balancer::new(config).expect("valid config");
        let addr = "127.0.0.1:9".parse().expect("address");
        balancer.pool().add_worker("w", addr).expect("new id");
        balancer
    }

    #[tokio::test(start_paused = true)]
    async fn queue_releases_in_arrival_order() {
        let balancer = one_worker_balancer(Config {
            max_concurrency_per_worker: 1,
            queue_capacity: 8,
            ..Config::default()
        });
        let core = Arc::clone(&balancer.core);
        let first = Admission::acquire(&core, None).await.expect("free worker");
        let (order_tx, mut order_rx) = tokio::sync::mpsc::unbounded_channel();
        for n in 0..5 {
            let task_core = Arc::clone(&core);
            let order_tx = order_tx.clone();
            tokio::spawn(async move {
                let lease = Admission::acquire(&task_core, None).await.expect("queued");
                order_tx.send(n).expect("test alive");
                // Hold the slot until the next turn of the scheduler so order is visible.
                tokio::task::yield_now().await;
                drop(lease);
            });
            while core.admission.depth() != n + 1 {
                tokio::task::yield_now().await;
            }
        }
        drop(first);
        let mut order = Vec::new();
        for _ in 0..5 {
            order.push(order_rx.recv().await.expect("sent"));
        }
        assert_eq!(order, vec![0, 1, 2, 3, 4]);
        assert_eq!(core.admission.depth(), 0);
        // The last task drops its slot a turn after reporting; every slot comes back.
        while core.admission.in_flight() != 0 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn full_queue_refuses_and_waiting_times_out() {
        let balancer = one_worker_balancer(Config {
            max_concurrency_per_worker: 1,
            queue_capacity: 1,
            queue_timeout: Duration::from_secs(5),
            ..Config::default()
        });
        let core = Arc::clone(&balancer.core);
        let _held = Admission::acquire(&core, None).await.expect("free worker");
        let waiting = tokio::spawn({
            let core = Arc::clone(&core);
            async move { Admission::acquire(&core, None).await.map(drop) }
        });
        while core.admission.depth() != 1 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            Admission::acquire(&core, None).await.map(drop),
            Err(AdmissionError::QueueFull)
        );
        // The paused clock jumps ahead to the queue timeout.
        assert_eq!(
            waiting.await.expect("task"),
            Err(AdmissionError::QueueTimeout)
        );
        assert_eq!(core.admission.depth(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_worker_takes_the_waiting_requests() {
        let balancer = one_worker_balancer(Config {
            max_concurrency_per_worker: 1,
            ..Config::default()
        });
        let core = Arc::clone(&balancer.core);
        let _held = Admission::acquire(&core, None).await.expect("free worker");
        let waiting = tokio::spawn({
            let core = Arc::clone(&core);
            async move {
                Admission::acquire(&core, None)
                    .await
                    .map(|l| l.worker.id.clone())
            }
        });
        while core.admission.depth() != 1 {
            tokio::task::yield_now().await;
        }
        let addr = "127.0.0.1:10".parse().expect("address");
        balancer.pool().add_worker("new", addr).expect("new id");
        assert_eq!(waiting.await.expect("task"), Ok(WorkerId::from("new")));
    }
}
