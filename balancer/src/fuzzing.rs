//! What the `admission` fuzz target (`fuzz/`) checks on every input, kept here so that the
//! normal test suite checks it too, over the seeds in `fuzz/seeds/admission/` (hand-written
//! scenarios, and every input a fuzzer once failed on). Not part of the crate's API: built for
//! this crate's tests and with the `fuzzing` feature only.
//!
//! [`check_admission`] reads a script of events and plays it against the real admission
//! layer ([`Admission`] over a real pool), on tokio's paused clock, with workers faked by an
//! inner service that only reserves a slot and answers when told to. Each request's future is
//! polled when it is made and afterwards **only when its waker was woken**, as a runtime
//! would, so a lost wake-up shows as a request left waiting. After every event the script
//! checks the layer's promises (see [`check_admission`]).
//!
//! A script is ASCII: a letter and an optional number per event, anything else ignored.
//! Before the first event, capital letters set the balancer up: `L` the per-worker limit
//! (1 to 4, default 2), `Q` the queue's capacity (0 to 8, default 4), `W` the workers at the
//! start (0 to 3, default 1), `T` the queue timeout in ms (1 to 10000, default 100). Events:
//!
//! | event | what happens |
//! |---|---|
//! | `a` | a request arrives; a worker answers it at once |
//! | `s` | a request arrives; a worker answers it only at `r` |
//! | `A`, `S` | the same, arriving before the requests woken by the event before it have run (a race a runtime with several threads allows) |
//! | `r<i>` | the i-th request a worker holds unanswered gets its answer |
//! | `c<i>` | the i-th answered request's response ends (its slot is freed) |
//! | `x<i>` | the i-th unanswered request's client goes away |
//! | `t<ms>` | time passes |
//! | `w` | a worker is added (at most 6) |
//! | `d<i>` | the i-th worker is drained |
//! | `l<n>` | the per-worker limit is re-tuned to n (1 to 4) |
//!
//! `<i>` counts from 0 in arrival order (or joining order for workers), modulo how many
//! there are.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use http::{Request, Response};
use tower::Service;

use crate::body::RequestBody;
use crate::stack::admission::{Admission, Admitted, Lease};
use crate::stack::{Attempt, AttemptError, Refusal};
use crate::{Balancer, Config, Core, Tuning};

mod script;

use script::{Event, Setup, parse};

/// Most requests one script makes, so that every input runs quickly.
const MAX_REQUESTS: usize = 64;
const MAX_WORKERS: usize = 6;

/// Plays `script` (see the module docs) and panics if the admission layer breaks a promise:
///
/// - **the limit**: a slot is given only on a worker below the per-worker limit, and the
///   balancer's counts (queue depth, in flight, each worker's in-flight) match what the
///   requests hold;
/// - **FIFO**: no request gets a slot while one that arrived before it still waits, and a
///   newcomer never overtakes the queue;
/// - **the bound**: never more than the capacity wait, and a request is refused as
///   `QueueFull` only when exactly that many wait;
/// - **every waiter answered**: no request waits while a worker has room (a lost wake-up),
///   none is refused as `QueueTimeout` before the timeout nor waits past it, and at the end,
///   once time passes, every request is answered and the balancer holds nothing.
pub fn check_admission(script: &[u8]) {
    let (setup, events) = parse(script);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build();
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(e) => panic!("cannot build a runtime: {e}"),
    };
    runtime.block_on(play(setup, events));
}

/// Which request an attempt is, and whether its worker answers only when told.
#[derive(Clone, Copy, Debug)]
struct Tag {
    id: usize,
    slow: bool,
}

/// What the fake workers and the script share.
#[derive(Default)]
struct Shared {
    /// Requests waiting in the queue, by arrival.
    waiting: BTreeSet<usize>,
    /// Slow requests a worker holds, and the waker of each once it asked.
    held: BTreeMap<usize, Option<Waker>>,
    /// Slow requests told to answer.
    answered: BTreeSet<usize>,
}

/// The inner service: reserves a slot (or hands the attempt back) and answers, at once or
/// when the script says; the response holds the slot, as a streaming body would.
#[derive(Clone)]
struct Workers {
    core: Arc<Core>,
    shared: Arc<Mutex<Shared>>,
}

impl Service<Attempt> for Workers {
    type Response = Response<Lease>;
    type Error = AttemptError;
    type Future = Reply;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), AttemptError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, attempt: Attempt) -> Reply {
        Reply {
            workers: self.clone(),
            attempt: Some(attempt),
            lease: None,
        }
    }
}

struct Reply {
    workers: Workers,
    attempt: Option<Attempt>,
    lease: Option<Lease>,
}

impl Future for Reply {
    type Output = Result<Response<Lease>, AttemptError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let Some(attempt) = &this.attempt else {
            panic!("a reply was polled after it completed");
        };
        let Some(tag) = attempt.request.extensions().get::<Tag>().copied() else {
            panic!("an attempt without its tag");
        };
        let mut shared = this
            .workers
            .shared
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if this.lease.is_none() {
            let core = &this.workers.core;
            let Some(worker) = core.pick(None) else {
                drop(shared);
                let Some(attempt) = this.attempt.take() else {
                    unreachable!("the attempt was there above");
                };
                return Poll::Ready(Err(AttemptError::NoRoom(Box::new(attempt))));
            };
            let limit = core.concurrency_limit.load(Ordering::Acquire);
            let held = worker.in_flight.load(Ordering::SeqCst);
            assert!(
                held <= limit,
                "request {} got a slot on {} beyond the limit: {held} > {limit}",
                tag.id,
                worker.id
            );
            if let Some(first) = shared.waiting.iter().find(|&&w| w < tag.id) {
                panic!(
                    "request {} got a slot while request {first}, which arrived before it, waits",
                    tag.id
                );
            }
            this.lease = Some(Lease::new(worker, core));
            if tag.slow {
                shared.held.insert(tag.id, None);
            }
        }
        if tag.slow && !shared.answered.contains(&tag.id) {
            shared.held.insert(tag.id, Some(cx.waker().clone()));
            return Poll::Pending;
        }
        shared.held.remove(&tag.id);
        this.attempt = None;
        let Some(lease) = this.lease.take() else {
            unreachable!("a slot was reserved above");
        };
        Poll::Ready(Ok(Response::new(lease)))
    }
}

/// Set when a request's waker is woken.
#[derive(Default)]
struct Woken(AtomicBool);

impl Wake for Woken {
    fn wake(self: Arc<Self>) {
        self.0.store(true, Ordering::SeqCst);
    }
}

enum Phase {
    /// Not answered yet: in the queue, or held by a worker.
    Pending(Pin<Box<Admitted<Workers>>>),
    /// Answered by a worker; the response holds its slot until it ends.
    Answered(Option<Response<Lease>>),
    /// Refused, ended or gone.
    Done,
}

struct Live {
    phase: Phase,
    woken: Arc<Woken>,
    arrived: tokio::time::Instant,
}

struct Play {
    balancer: Balancer,
    admission: Admission<Workers>,
    shared: Arc<Mutex<Shared>>,
    setup: Setup,
    requests: Vec<Live>,
    workers: Vec<String>,
}

async fn play(setup: Setup, events: Vec<Event>) {
    let config = Config {
        max_concurrency_per_worker: setup.limit,
        queue_capacity: setup.capacity,
        queue_timeout: setup.timeout,
        ..Config::default()
    };
    let balancer = match Balancer::new(config) {
        Ok(balancer) => balancer,
        Err(e) => panic!("the set-up is a valid configuration: {e}"),
    };
    let shared = Arc::new(Mutex::new(Shared::default()));
    let core = Arc::clone(&balancer.core);
    let workers = Workers {
        core: Arc::clone(&core),
        shared: Arc::clone(&shared),
    };
    let mut play = Play {
        balancer,
        admission: Admission::new(workers, &core),
        shared,
        setup,
        requests: Vec::new(),
        workers: Vec::new(),
    };
    for _ in 0..setup.workers {
        play.add_worker();
    }
    for (at, &event) in events.iter().enumerate() {
        play.apply(event).await;
        let racing = matches!(events.get(at + 1), Some(Event::Arrive { racing: true, .. }));
        if !racing {
            play.settle();
            play.check();
        }
    }
    // Every request still waiting is answered once the timeout has passed.
    for at in 0..play.requests.len() {
        play.end_response(at);
    }
    play.settle();
    play.check();
    play.wait(setup.timeout + Duration::from_millis(1)).await;
    let unanswered: Vec<usize> = (0..play.requests.len())
        .filter(|&at| matches!(play.requests[at].phase, Phase::Pending(_)))
        .collect();
    let held = play.shared().held.keys().copied().collect::<BTreeSet<_>>();
    let stuck: Vec<_> = unanswered.iter().filter(|id| !held.contains(id)).collect();
    assert!(stuck.is_empty(), "requests {stuck:?} were never answered");
    for at in 0..play.requests.len() {
        play.requests[at].phase = Phase::Done;
    }
    let queue = &play.balancer.core.queue;
    assert_eq!(queue.depth(), 0, "the queue holds requests that are gone");
    assert_eq!(
        queue.in_flight(),
        0,
        "slots are held by requests that are gone"
    );
}

impl Play {
    fn shared(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn add_worker(&mut self) {
        if self.workers.len() >= MAX_WORKERS {
            return;
        }
        let id = format!("w{}", self.workers.len());
        // Never dialled: the fake workers answer in place of a connection.
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 9));
        match self.balancer.pool().add_worker(id.as_str(), addr) {
            Ok(()) => self.workers.push(id),
            Err(e) => panic!("adding worker {id}: {e}"),
        }
    }

    async fn wait(&mut self, time: Duration) {
        tokio::time::advance(time).await;
        self.settle();
    }

    async fn apply(&mut self, event: Event) {
        match event {
            Event::Arrive { slow, .. } if self.requests.len() < MAX_REQUESTS => self.arrive(slow),
            Event::Arrive { .. } => {}
            Event::Respond(i) => {
                let held: Vec<usize> = self.shared().held.keys().copied().collect();
                if let Some(&id) = nth(&held, i) {
                    let mut shared = self.shared();
                    shared.answered.insert(id);
                    if let Some(Some(waker)) = shared.held.get(&id) {
                        waker.wake_by_ref();
                    }
                }
            }
            Event::Complete(i) => {
                let answered: Vec<usize> = (0..self.requests.len())
                    .filter(|&at| matches!(self.requests[at].phase, Phase::Answered(_)))
                    .collect();
                if let Some(&at) = nth(&answered, i) {
                    self.end_response(at);
                }
            }
            Event::Cancel(i) => {
                let pending: Vec<usize> = (0..self.requests.len())
                    .filter(|&at| matches!(self.requests[at].phase, Phase::Pending(_)))
                    .collect();
                if let Some(&at) = nth(&pending, i) {
                    // The client went away: hyper drops the request's future.
                    self.requests[at].phase = Phase::Done;
                    let mut shared = self.shared();
                    shared.waiting.remove(&at);
                    shared.held.remove(&at);
                }
            }
            Event::Wait(ms) => self.wait(Duration::from_millis(ms.min(60_000))).await,
            Event::AddWorker => self.add_worker(),
            Event::Drain(i) => {
                if let Some(id) = nth(&self.workers, i) {
                    let id = crate::WorkerId::from(id.as_str());
                    if let Err(e) = self.balancer.pool().drain(&id) {
                        panic!("draining {id}: {e}");
                    }
                }
            }
            Event::Limit(limit) => {
                let tuning = Tuning {
                    max_concurrency_per_worker: limit,
                    ..self.balancer.tuning()
                };
                if let Err(e) = self.balancer.retune(tuning) {
                    panic!("re-tuning the limit to {limit}: {e}");
                }
            }
        }
    }

    fn arrive(&mut self, slow: bool) {
        let id = self.requests.len();
        let mut request = Request::new(RequestBody::Empty);
        request.extensions_mut().insert(Tag { id, slow });
        let attempt = Attempt {
            request,
            exclude: None,
        };
        let woken = Arc::new(Woken::default());
        let waker = Waker::from(Arc::clone(&woken));
        let ready = self.admission.poll_ready(&mut Context::from_waker(&waker));
        assert!(
            matches!(ready, Poll::Ready(Ok(()))),
            "admission is always ready"
        );
        let future = Box::pin(self.admission.call(attempt));
        self.requests.push(Live {
            phase: Phase::Pending(future),
            woken,
            arrived: tokio::time::Instant::now(),
        });
        // A runtime polls a new request's future at once.
        self.poll(id);
    }

    fn end_response(&mut self, at: usize) {
        if let Phase::Answered(response) = &mut self.requests[at].phase {
            drop(response.take());
            self.requests[at].phase = Phase::Done;
        }
    }

    /// Polls request `at` once and records what became of it.
    fn poll(&mut self, at: usize) {
        let live = &mut self.requests[at];
        let waker = Waker::from(Arc::clone(&live.woken));
        let Phase::Pending(future) = &mut live.phase else {
            return;
        };
        let outcome = future.as_mut().poll(&mut Context::from_waker(&waker));
        let waited = self.requests[at].arrived.elapsed();
        let held = self.shared().held.contains_key(&at);
        match outcome {
            Poll::Pending => {
                let mut shared = self.shared();
                if held {
                    shared.waiting.remove(&at);
                } else {
                    shared.waiting.insert(at);
                }
            }
            Poll::Ready(outcome) => {
                let was_waiting = self.shared().waiting.remove(&at);
                self.requests[at].phase = match outcome {
                    Ok(response) => Phase::Answered(Some(response)),
                    Err(AttemptError::Refused(Refusal::QueueFull)) => {
                        let waiting = self.shared().waiting.len();
                        assert_eq!(
                            waiting, self.setup.capacity,
                            "request {at} refused as QueueFull with {waiting} waiting"
                        );
                        Phase::Done
                    }
                    Err(AttemptError::Refused(Refusal::QueueTimeout)) => {
                        assert!(
                            was_waiting && waited >= self.setup.timeout,
                            "request {at} refused as QueueTimeout after {waited:?} (waiting: {was_waiting})"
                        );
                        Phase::Done
                    }
                    Err(e) => panic!("request {at} ended with {e}"),
                };
            }
        }
    }

    /// Polls every request whose waker was woken, until none is.
    fn settle(&mut self) {
        for _ in 0..100_000 {
            let woken = (0..self.requests.len())
                .find(|&at| self.requests[at].woken.0.swap(false, Ordering::SeqCst));
            match woken {
                Some(at) => self.poll(at),
                None => return,
            }
        }
        panic!("the requests keep waking each other");
    }

    /// The promises that hold whenever nothing is left to run (see [`check_admission`]).
    fn check(&self) {
        let core = &self.balancer.core;
        let shared = self.shared();
        let waiting = shared.waiting.len();
        assert!(
            waiting <= self.setup.capacity,
            "{waiting} requests wait, more than the capacity {}",
            self.setup.capacity
        );
        assert_eq!(core.queue.depth(), waiting, "the queue's depth");
        let leases = self
            .requests
            .iter()
            .filter(|r| matches!(r.phase, Phase::Answered(Some(_))))
            .count()
            + shared.held.len();
        assert_eq!(core.queue.in_flight(), leases, "slots held");
        let limit = core.concurrency_limit.load(Ordering::Acquire);
        let snapshot = core.snapshot.load();
        let sum: usize = snapshot
            .members
            .iter()
            .map(|m| m.worker.in_flight.load(Ordering::SeqCst))
            .sum();
        assert_eq!(sum, leases, "the workers' in-flight counts");
        let room = snapshot
            .members
            .iter()
            .find(|m| !m.draining && m.worker.in_flight.load(Ordering::SeqCst) < limit);
        if let (Some(first), Some(member)) = (shared.waiting.first(), room) {
            panic!(
                "request {first} waits while worker {} has room ({} of {limit})",
                member.worker.id,
                member.worker.in_flight.load(Ordering::SeqCst)
            );
        }
        for &at in &shared.waiting {
            let waited = self.requests[at].arrived.elapsed();
            assert!(
                waited < self.setup.timeout + Duration::from_millis(1),
                "request {at} still waits after {waited:?}, past the timeout"
            );
        }
    }
}

fn nth<T>(items: &[T], i: usize) -> Option<&T> {
    (!items.is_empty()).then(|| &items[i % items.len()])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every seed of the fuzz target, and every input it once failed on, passes the checks.
    #[test]
    fn the_fuzz_seeds_pass_the_checks() {
        test_support::check_fuzz_seeds("admission", check_admission);
    }
}
