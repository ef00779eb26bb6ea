//! The admission layer: a per-worker concurrency limit, and a bounded FIFO queue for the
//! requests that arrive while every worker is at its limit.
//!
//! This is how a flash crowd is held, Knative-activator style, for the milliseconds a clone
//! takes: requests wait in arrival order, each for at most `queue_timeout`, and a request that
//! finds the queue full is refused at once (`503` with `Retry-After`) rather than piling up.
//! With no worker in the pool at all requests wait the same way, so a scaler can start from
//! zero and add the first worker while they wait.
//!
//! The inner service reserves a worker's slot as it picks the worker (a [`Lease`]); when no
//! worker has room it hands the attempt back ([`AttemptError::NoRoom`]) on its first poll.
//! Admission then puts the request in the queue and waits for room: a lease dropped, a worker
//! added, an ejected worker readmitted or the limit raised ([`Queue::room`]) wakes the request
//! at the head of the queue, which tries again; when it gets a slot it leaves the queue and
//! wakes the next one, which may find room too. While anyone waits, new requests go straight
//! to the back of the queue, so the order is kept and no newcomer takes a slot freed for the
//! head. A waiter joins the queue *before* it tries again, so room made between its failed
//! try and its sleep wakes it (the queue's depth and the workers' in-flight counts are
//! sequentially consistent for this).
//!
//! The common case takes no lock: when nobody is waiting a request goes straight to the
//! inner service, which picks with atomics only. The queue's mutex is taken only when workers
//! are full, by requests joining or leaving the queue and by room made while someone waits.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use http::Response;
use tokio::time::Sleep;
use tower::Service;

use crate::Core;
use crate::stack::{Attempt, AttemptError, Refusal};
use crate::upstream::http2::OpenStream;
use crate::worker::Worker;

/// A reserved slot on one worker. Dropping it frees the slot and makes room for the head of
/// the queue, if anyone waits.
#[derive(Debug)]
pub(crate) struct Lease {
    pub(crate) worker: Arc<Worker>,
    core: Arc<Core>,
    /// The HTTP/2 stream the request holds on an h2c worker's connection, freed with the
    /// slot.
    stream: Option<OpenStream>,
}

impl Lease {
    /// Takes over a slot already reserved on `worker`.
    pub(crate) fn new(worker: Arc<Worker>, core: &Arc<Core>) -> Self {
        core.queue.in_flight.fetch_add(1, Ordering::AcqRel);
        Self {
            worker,
            core: Arc::clone(core),
            stream: None,
        }
    }

    /// Holds `stream` open as long as the slot (until the response body has been sent).
    pub(crate) fn hold(&mut self, stream: Option<OpenStream>) {
        self.stream = stream;
    }

    /// The balancer the slot belongs to.
    pub(crate) fn core(&self) -> &Arc<Core> {
        &self.core
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // Sequentially consistent with a waiter's joining the queue: either it sees this
        // slot free when it tries again, or this sees it waiting and wakes it.
        self.worker.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.core.queue.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.core.queue.room();
    }
}

#[derive(Debug)]
struct Waiter {
    ticket: u64,
    waker: Waker,
}

/// The queue of requests waiting for a worker, and the balancer-wide in-flight count.
#[derive(Debug, Default)]
pub(crate) struct Queue {
    waiters: Mutex<VecDeque<Waiter>>,
    /// `waiters.len()`, readable without the lock.
    depth: AtomicUsize,
    /// Leases alive right now.
    in_flight: AtomicUsize,
    next_ticket: AtomicU64,
    /// Notified when a request joins the queue ([`crate::Balancer::activation`]).
    pub(crate) activation: Arc<tokio::sync::Notify>,
}

/// The queue already holds `queue_capacity` requests.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
#[error("the queue is full")]
struct QueueFull;

impl Queue {
    /// Requests waiting in the queue.
    pub(crate) fn depth(&self) -> usize {
        self.depth.load(Ordering::SeqCst)
    }

    /// Requests holding a worker slot.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    fn lock(&self) -> MutexGuard<'_, VecDeque<Waiter>> {
        // The queue holds only tickets and wakers; one left by a panicking thread is valid.
        self.waiters
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Room was made (a slot freed, a worker added or readmitted, the limit raised): wakes
    /// the request at the head of the queue, if any.
    pub(crate) fn room(&self) {
        if self.depth() == 0 {
            return;
        }
        if let Some(head) = self.lock().front() {
            head.waker.wake_by_ref();
        }
    }

    /// Joins the back of the queue, unless it holds `capacity` requests already.
    fn join(&self, waker: &Waker, capacity: usize) -> Result<u64, QueueFull> {
        let mut waiters = self.lock();
        if waiters.len() >= capacity {
            return Err(QueueFull);
        }
        let ticket = self.next_ticket.fetch_add(1, Ordering::Relaxed);
        waiters.push_back(Waiter {
            ticket,
            waker: waker.clone(),
        });
        self.depth.store(waiters.len(), Ordering::SeqCst);
        drop(waiters);
        self.activation.notify_one();
        Ok(ticket)
    }

    /// Whether `ticket` is at the head; keeps its waker up to date either way.
    fn is_head(&self, ticket: u64, waker: &Waker) -> bool {
        let mut waiters = self.lock();
        let head = waiters.front().map(|w| w.ticket);
        if let Some(waiter) = waiters.iter_mut().find(|w| w.ticket == ticket) {
            waiter.waker.clone_from(waker);
        }
        head == Some(ticket)
    }

    /// Leaves the queue; if that makes another request the head, wakes it, since the room
    /// that may be left is now its to take.
    fn leave(&self, ticket: u64) {
        let mut waiters = self.lock();
        let was_head = waiters.front().is_some_and(|w| w.ticket == ticket);
        waiters.retain(|w| w.ticket != ticket);
        self.depth.store(waiters.len(), Ordering::SeqCst);
        if was_head && let Some(next) = waiters.front() {
            next.waker.wake_by_ref();
        }
    }
}

/// Queues attempts while no worker has room; see the module docs.
#[derive(Debug, Clone)]
pub(crate) struct Admission<S> {
    inner: S,
    core: Arc<Core>,
}

impl<S> Admission<S> {
    pub(crate) fn new(inner: S, core: &Arc<Core>) -> Self {
        Self {
            inner,
            core: Arc::clone(core),
        }
    }
}

impl<S, B> Service<Attempt> for Admission<S>
where
    S: Service<Attempt, Response = Response<B>, Error = AttemptError> + Clone,
{
    type Response = Response<B>;
    type Error = AttemptError;
    type Future = Admitted<S>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), AttemptError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, attempt: Attempt) -> Self::Future {
        let state = if self.core.queue.depth() == 0 {
            State::Calling {
                future: self.inner.call(attempt),
            }
        } else {
            // Others are waiting: behind them, not before.
            State::Waiting {
                attempt: Some(attempt),
            }
        };
        Admitted {
            state,
            service: self.inner.clone(),
            queued: Queued {
                core: Arc::clone(&self.core),
                ticket: None,
            },
            deadline: None,
        }
    }
}

/// A place in the queue, given up when dropped (the request answered, timed out, or its
/// client gone).
#[derive(Debug)]
struct Queued {
    core: Arc<Core>,
    ticket: Option<u64>,
}

impl Queued {
    fn leave(&mut self) {
        if let Some(ticket) = self.ticket.take() {
            self.core.queue.leave(ticket);
        }
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        self.leave();
    }
}

pin_project_lite::pin_project! {
    /// The future of [`Admission::call`].
    #[project = AdmittedProjection]
    pub(crate) struct Admitted<S: Service<Attempt>> {
        #[pin]
        state: State<S::Future>,
        service: S,
        queued: Queued,
        // When the wait in the queue ends, armed when the request joins it.
        deadline: Option<Pin<Box<Sleep>>>,
    }
}

pin_project_lite::pin_project! {
    #[project = StateProjection]
    enum State<F> {
        Calling { #[pin] future: F },
        Waiting { attempt: Option<Attempt> },
    }
}

impl<S, B> Future for Admitted<S>
where
    S: Service<Attempt, Response = Response<B>, Error = AttemptError>,
{
    type Output = Result<Response<B>, AttemptError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProjection::Calling { future } => match future.poll(cx) {
                    Poll::Ready(Err(AttemptError::NoRoom(attempt))) => {
                        let attempt = Some(*attempt);
                        let first_try = this.queued.ticket.is_none();
                        this.state.set(State::Waiting { attempt });
                        if first_try {
                            // Joined now: try once more, so room made since is not missed.
                            continue;
                        }
                        return this.wait_for_room(cx);
                    }
                    Poll::Ready(outcome) => {
                        this.queued.leave();
                        return Poll::Ready(outcome);
                    }
                    Poll::Pending => {
                        // The attempt has its slot: the next in line may find room too.
                        this.queued.leave();
                        return Poll::Pending;
                    }
                },
                StateProjection::Waiting { attempt } => {
                    let core = &this.queued.core;
                    let ticket = match this.queued.ticket {
                        Some(ticket) => ticket,
                        None => match core.queue.join(cx.waker(), core.config.queue_capacity) {
                            Ok(ticket) => {
                                let timeout = core.config.queue_timeout;
                                *this.deadline = Some(Box::pin(tokio::time::sleep(timeout)));
                                *this.queued.ticket.insert(ticket)
                            }
                            Err(QueueFull) => {
                                return Poll::Ready(Err(Refusal::QueueFull.into()));
                            }
                        },
                    };
                    if !core.queue.is_head(ticket, cx.waker()) {
                        return this.wait_for_room(cx);
                    }
                    if let Err(error) = std::task::ready!(this.service.poll_ready(cx)) {
                        this.queued.leave();
                        return Poll::Ready(Err(error));
                    }
                    let Some(attempt) = attempt.take() else {
                        // Only reachable if polled again after completing.
                        return Poll::Ready(Err(Refusal::QueueTimeout.into()));
                    };
                    let future = this.service.call(attempt);
                    this.state.set(State::Calling { future });
                }
            }
        }
    }
}

impl<S: Service<Attempt>> AdmittedProjection<'_, S> {
    /// Sleeps until woken by room, or answers `503` once the queue timeout has passed.
    fn wait_for_room<T>(&mut self, cx: &mut Context<'_>) -> Poll<Result<T, AttemptError>> {
        let expired = self
            .deadline
            .as_mut()
            .is_some_and(|deadline| deadline.as_mut().poll(cx).is_ready());
        if expired {
            self.queued.leave();
            return Poll::Ready(Err(Refusal::QueueTimeout.into()));
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::Request;

    use super::*;
    use crate::{Balancer, Config, Tuning};

    /// An inner service that only reserves: the response holds the lease (as a body would).
    #[derive(Clone)]
    struct Reserve {
        core: Arc<Core>,
    }

    impl Service<Attempt> for Reserve {
        type Response = Response<Lease>;
        type Error = AttemptError;
        type Future = std::future::Ready<Result<Response<Lease>, AttemptError>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), AttemptError>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, attempt: Attempt) -> Self::Future {
            std::future::ready(match self.core.pick(attempt.exclude.as_ref()) {
                Some(worker) => Ok(Response::new(Lease::new(worker, &self.core))),
                None => Err(AttemptError::NoRoom(Box::new(attempt))),
            })
        }
    }

    fn one_worker(config: Config) -> (Balancer, Admission<Reserve>) {
        let balancer = Balancer::new(config).expect("valid config");
        let addr = "127.0.0.1:9".parse().expect("address");
        balancer.pool().add_worker("w", addr).expect("new id");
        let core = Arc::clone(&balancer.core);
        let admission = Admission::new(
            Reserve {
                core: Arc::clone(&core),
            },
            &core,
        );
        (balancer, admission)
    }

    fn attempt() -> Attempt {
        Attempt {
            request: Request::new(crate::body::RequestBody::Empty),
            exclude: None,
        }
    }

    async fn admit(admission: &Admission<Reserve>) -> Result<Lease, AttemptError> {
        let mut admission = admission.clone();
        std::future::poll_fn(|cx| admission.poll_ready(cx)).await?;
        Ok(admission.call(attempt()).await?.into_body())
    }

    #[tokio::test(start_paused = true)]
    async fn the_queue_releases_in_arrival_order() {
        let (balancer, admission) = one_worker(Config {
            max_concurrency_per_worker: 1,
            queue_capacity: 8,
            ..Config::default()
        });
        let queue = &balancer.core.queue;
        let first = admit(&admission).await.expect("a free worker");
        let (order_tx, mut order_rx) = tokio::sync::mpsc::unbounded_channel();
        for n in 0..5 {
            let (admission, order_tx) = (admission.clone(), order_tx.clone());
            tokio::spawn(async move {
                let lease = admit(&admission).await.expect("queued");
                order_tx.send(n).expect("test alive");
                // Hold the slot until the next turn of the scheduler so order is visible.
                tokio::task::yield_now().await;
                drop(lease);
            });
            while queue.depth() != n + 1 {
                tokio::task::yield_now().await;
            }
        }
        drop(first);
        let mut order = Vec::new();
        for _ in 0..5 {
            order.push(order_rx.recv().await.expect("sent"));
        }
        assert_eq!(order, vec![0, 1, 2, 3, 4]);
        assert_eq!(queue.depth(), 0);
        while queue.in_flight() != 0 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_refuses_and_a_wait_ends_at_the_queue_timeout() {
        let (balancer, admission) = one_worker(Config {
            max_concurrency_per_worker: 1,
            queue_capacity: 1,
            queue_timeout: Duration::from_secs(5),
            ..Config::default()
        });
        let _held = admit(&admission).await.expect("a free worker");
        let started = tokio::time::Instant::now();
        let waiting = tokio::spawn({
            let admission = admission.clone();
            async move { admit(&admission).await.map(drop).map_err(|e| e.to_string()) }
        });
        while balancer.core.queue.depth() != 1 {
            tokio::task::yield_now().await;
        }
        let refused = admit(&admission).await.map(drop).map_err(|e| e.to_string());
        assert_eq!(refused, Err(Refusal::QueueFull.to_string()));
        // The paused clock jumps ahead to the queue timeout, not before.
        let waited = waiting.await.expect("task");
        assert_eq!(waited, Err(Refusal::QueueTimeout.to_string()));
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        assert_eq!(balancer.core.queue.depth(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_worker_or_a_raised_limit_takes_the_waiting_requests() {
        let (balancer, admission) = one_worker(Config {
            max_concurrency_per_worker: 1,
            ..Config::default()
        });
        let _held = admit(&admission).await.expect("a free worker");
        let wait = || {
            let admission = admission.clone();
            tokio::spawn(async move {
                admit(&admission)
                    .await
                    .map(|lease| lease.worker.id.clone())
                    .map_err(|e| e.to_string())
            })
        };
        let waiting = wait();
        while balancer.core.queue.depth() != 1 {
            tokio::task::yield_now().await;
        }
        let addr = "127.0.0.1:10".parse().expect("address");
        balancer.pool().add_worker("new", addr).expect("new id");
        assert_eq!(waiting.await.expect("task"), Ok("new".into()));

        // Both workers full now; a raised limit lets the next waiter in.
        let _new_full = admit(&admission).await;
        let waiting = wait();
        while balancer.core.queue.depth() != 1 {
            tokio::task::yield_now().await;
        }
        let raised = Tuning {
            max_concurrency_per_worker: 2,
            ..balancer.tuning()
        };
        balancer.retune(raised).expect("applicable");
        assert!(waiting.await.expect("task").is_ok());
    }
}
