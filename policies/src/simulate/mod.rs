//! The offline simulator: replays a load trace through a policy and a simple queueing model
//! of the worker pool, to see what the policy would do before trusting it.
//!
//! The model is a discrete-event simulation, deterministic for a given seed:
//! - requests arrive as a Poisson process at the trace's rate (linearly interpolated between
//!   rows);
//! - each worker serves up to `worker_concurrency` requests at once, each taking the trace's
//!   mean service time scaled by a uniform factor in [0.5, 1.5] drawn as it starts (and a
//!   comparison replays the requests of its first run in the others, so that every
//!   autoscaler serves the very same requests);
//! - the balancer hands a request to the least-loaded ready worker with a free slot, and
//!   otherwise queues it (FIFO), exactly as Squall's balancer admits requests;
//! - every decision period the [`Autoscaler`] sees windowed measurements (as the balancer
//!   computes them, over its own windows) and its decision is acted on: new workers become
//!   ready after `clone_delay`; extra workers drain (no new requests) and leave when idle, or
//!   are killed after `drain_timeout`, failing what they still held;
//! - between ticks, a request that has to queue wakes an autoscaler that activates, as it
//!   wakes the scaler ([`crate::activate`] for Squall's decider; at most once per
//!   [`crate::ACTIVATION_INTERVAL`]), and a decision that grows the pool is acted on;
//! - every policy `tick` is recorded (with the decision in force) and judged, whatever the
//!   autoscaler's own period, so runs of different autoscalers compare tick for tick;
//! - when the trace ends, what arrived is still served (and judged), but worker-seconds stop.
//!
//! [`simulate`] runs Squall's decider; [`simulate_with`] runs any [`Autoscaler`], such as
//! the models of Knative's and Kubernetes' autoscalers in [`models`], and [`compare`] runs
//! Squall's decider and models on the same trace, seed and pool model.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::time::Duration;

use crate::decide::{ACTIVATION_INTERVAL, Decision, Now, Observation, WindowStats, WorkerCounts};
use crate::fleet::{DrainEnd, Fleet, Phase, Plan};
use crate::policy::{Policy, Windows};
use crate::recent::Recent;

mod autoscaler;
pub mod models;
mod report;
mod requests;
mod trace;

use report::summarize;
use requests::{Request, Source};

pub use report::comparison_text;

pub use autoscaler::{Autoscaler, Squall};
pub use models::{Compared, Model, UnknownModel, compare};

pub use trace::{MAX_TRACE_RATE, MAX_TRACE_ROWS, MAX_TRACE_SPAN, Trace, TraceError, TracePoint};

/// The most requests one simulation may generate (the trace's rate integrated over its span):
/// it bounds the run's time and memory.
pub const MAX_SIMULATED_REQUESTS: f64 = 10_000_000.0;

/// Why a simulation cannot run.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SimError {
    /// The trace asks for more requests than [`MAX_SIMULATED_REQUESTS`].
    #[error(
        "the trace asks for about {0:.0} requests; a simulation handles at most 10000000 (shorten the trace or lower its rates)"
    )]
    TooManyRequests(f64),
}

/// How the simulated pool behaves.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SimConfig {
    /// From a scale-up decision to the new worker serving.
    pub clone_delay: Duration,
    /// Requests a worker serves at once; by default the policy's concurrency target.
    pub worker_concurrency: Option<u32>,
    /// The SLO the summary judges p95 against; by default the policy's `latency_p95`.
    pub slo: Option<Duration>,
    /// Seed of the arrival and service-time randomness.
    pub seed: u64,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            clone_delay: Duration::from_millis(5),
            worker_concurrency: None,
            slo: None,
            seed: 1,
        }
    }
}

/// What happened at one tick.
#[derive(Clone, Debug, PartialEq)]
pub struct TickRecord {
    /// Time since the start.
    pub at: Duration,
    /// The trace's request rate.
    pub rate: f64,
    /// In-flight plus queued requests right now.
    pub demand: u32,
    /// The decision.
    pub decision: Decision,
    /// The pool after acting on it.
    pub workers: WorkerCounts,
    /// p95 of the requests that arrived during this tick, once they completed.
    pub p95: Option<Duration>,
}

/// The outcome of a whole run.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    /// The SLO the run was judged against, if any.
    pub slo: Option<Duration>,
    /// For each surge: when it began, and how long until the p95 of arriving requests was
    /// back under the SLO for a whole second (`None`: never, or no SLO).
    pub recoveries: Vec<(Duration, Option<Duration>)>,
    /// Ticks whose arriving requests had a p95 over the SLO.
    pub ticks_over_slo: usize,
    /// Ticks in the run.
    pub ticks: usize,
    /// Time integral of ready + cloning + draining workers.
    pub worker_seconds: f64,
    /// The most workers at once.
    pub peak_workers: u32,
    /// Requests completed.
    pub completed: u64,
    /// Requests failed: killed with a worker at its drain timeout.
    pub failed: u64,
    /// Decisions between ticks, made because requests queued, that grew the pool.
    pub activations: u64,
    /// Latency over the whole run, queue wait included.
    pub p50: Option<Duration>,
    /// See `p50`.
    pub p95: Option<Duration>,
    /// See `p50`.
    pub p99: Option<Duration>,
}

/// A finished run: the tick-by-tick record and its summary.
#[derive(Clone, Debug, PartialEq)]
pub struct Run {
    /// One record per tick.
    pub ticks: Vec<TickRecord>,
    /// The outcome.
    pub summary: Summary,
}

#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Completion {
    at: Duration,
    worker: usize,
    arrived: Duration,
    started: Duration,
}

/// Per-tick measurements, the raw material of the windows.
#[derive(Default, Clone)]
struct Bucket {
    arrivals: u64,
    in_flight_time: f64,
    queue_time: f64,
    latencies: Vec<f64>,
    service_times: Vec<f64>,
    failed: u64,
}

fn percentile(values: &mut [f64], q: f64) -> Option<Duration> {
    if values.is_empty() {
        return None;
    }
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len()) - 1;
    let (_, v, _) = values.select_nth_unstable_by(rank, f64::total_cmp);
    Some(Duration::from_secs_f64(*v))
}

struct Sim<'a> {
    policy: &'a Policy,
    concurrency: u32,
    clone_delay: Duration,
    /// Where the requests come from.
    source: Source<'a>,
    now: Duration,
    /// The workers' life cycle, by the same rules as the scaler's; a worker's id is its index
    /// in `in_flight`.
    fleet: Fleet<usize>,
    /// Requests each worker holds, by id (kept after it is gone, so ids stay indices).
    in_flight: Vec<u32>,
    /// When each clone asked for becomes ready, earliest first.
    cloning: VecDeque<Duration>,
    queue: VecDeque<Request>,
    completions: BinaryHeap<Reverse<Completion>>,
    buckets: Vec<Bucket>,
    /// Latencies by the tick the request arrived in.
    by_arrival: Vec<Vec<f64>>,
    worker_seconds: f64,
    peak_workers: u32,
    failed: u64,
    /// Decisions between ticks that grew the pool.
    activations: u64,
    /// Past the trace's end: no worker-time is counted.
    ended: bool,
    /// Requests that arrived since the start.
    arrivals: u64,
    /// Readings of arrivals and queue at decisions, as the scaler keeps them.
    recent: Recent,
}

impl Sim<'_> {
    fn tick_of(&self, t: Duration) -> usize {
        (t.as_nanos() / self.policy.tick.get().as_nanos().max(1)) as usize
    }

    fn bucket(&mut self, t: Duration) -> &mut Bucket {
        let i = self.tick_of(t);
        if self.buckets.len() <= i {
            self.buckets.resize_with(i + 1, Bucket::default);
        }
        &mut self.buckets[i]
    }

    fn counts(&self) -> WorkerCounts {
        self.fleet.counts()
    }

    fn in_flight(&self) -> u32 {
        self.in_flight.iter().sum()
    }

    /// Moves time forward to `t`, integrating the time-weighted measurements.
    fn advance(&mut self, t: Duration) {
        if t <= self.now {
            return;
        }
        let dt = (t - self.now).as_secs_f64();
        let (in_flight, queued) = (f64::from(self.in_flight()), self.queue.len() as f64);
        let c = self.counts();
        if !self.ended {
            self.worker_seconds += dt * f64::from(c.ready + c.pending + c.draining);
        }
        let now = self.now;
        let b = self.bucket(now);
        b.in_flight_time += dt * in_flight;
        b.queue_time += dt * queued;
        self.now = t;
    }

    fn start(&mut self, worker: usize, request: Request) {
        let done = self.now + self.source.service(request);
        self.in_flight[worker] += 1;
        self.completions.push(Reverse(Completion {
            at: done,
            worker,
            arrived: request.arrived,
            started: self.now,
        }));
    }

    /// The least-loaded ready worker with a free slot.
    fn free_worker(&self) -> Option<usize> {
        self.fleet
            .iter()
            .filter(|&(&i, m)| m.phase == Phase::Ready && self.in_flight[i] < self.concurrency)
            .min_by_key(|&(&i, _)| (self.in_flight[i], i))
            .map(|(&i, _)| i)
    }

    fn dispatch(&mut self) {
        while !self.queue.is_empty() {
            let Some(worker) = self.free_worker() else {
                break;
            };
            if let Some(request) = self.queue.pop_front() {
                self.start(worker, request);
            }
        }
    }

    fn complete(&mut self, c: Completion) {
        let latency = (c.at - c.arrived).as_secs_f64();
        let arrival_tick = self.tick_of(c.arrived);
        if self.by_arrival.len() <= arrival_tick {
            self.by_arrival.resize_with(arrival_tick + 1, Vec::new);
        }
        self.by_arrival[arrival_tick].push(latency);
        let bucket = self.bucket(c.at);
        bucket.latencies.push(latency);
        bucket.service_times.push((c.at - c.started).as_secs_f64());
        self.in_flight[c.worker] -= 1;
        self.end_drains();
        self.dispatch();
    }

    fn window(&self, upto_tick: usize, window: Duration) -> WindowStats {
        let ticks = (window.as_nanos() / self.policy.tick.get().as_nanos().max(1)).max(1) as usize;
        let from = upto_tick.saturating_sub(ticks);
        let span = self.policy.tick.get().as_secs_f64() * (upto_tick - from).max(1) as f64;
        let buckets =
            &self.buckets[from.min(self.buckets.len())..upto_tick.min(self.buckets.len())];
        let mut latencies: Vec<f64> = buckets
            .iter()
            .flat_map(|b| b.latencies.iter().copied())
            .collect();
        let mut service_times: Vec<f64> = buckets
            .iter()
            .flat_map(|b| b.service_times.iter().copied())
            .collect();
        let arrivals: u64 = buckets.iter().map(|b| b.arrivals).sum();
        let failed: u64 = buckets.iter().map(|b| b.failed).sum();
        let done = latencies.len() as u64 + failed;
        WindowStats {
            request_rate: arrivals as f64 / span,
            mean_in_flight: buckets.iter().map(|b| b.in_flight_time).sum::<f64>() / span,
            queue_depth: buckets.iter().map(|b| b.queue_time).sum::<f64>() / span,
            latency_p50: percentile(&mut latencies, 0.50),
            latency_p95: percentile(&mut latencies, 0.95),
            latency_p99: percentile(&mut latencies, 0.99),
            service_p95: percentile(&mut service_times, 0.95),
            service_mean: (!service_times.is_empty()).then(|| {
                Duration::from_secs_f64(
                    service_times.iter().sum::<f64>() / service_times.len() as f64,
                )
            }),
            error_rate: if done > 0 {
                failed as f64 / done as f64
            } else {
                0.0
            },
        }
    }

    fn act(&mut self, decision: &Decision) {
        match Plan::of(decision, self.counts()) {
            Plan::Grow(count) => {
                self.fleet.asked(count);
                let ready_at = self.now + self.clone_delay;
                self.cloning.extend((0..count).map(|_| ready_at));
            }
            Plan::Shrink(count) => {
                let deadline = self.now + self.policy.scale_down.drain_timeout.get();
                let in_flight = &self.in_flight;
                for id in self.fleet.choose_drains(count, |&i| in_flight[i] as usize) {
                    // Chosen among the ready ones just now: it can be drained.
                    let _ = self.fleet.drain(&id, deadline);
                }
                self.end_drains();
            }
            Plan::Hold => {}
        }
        let live = self.counts();
        self.peak_workers = self
            .peak_workers
            .max(live.ready + live.pending + live.draining);
    }

    /// A new worker joins, with the next id.
    fn join(&mut self) {
        let id = self.in_flight.len();
        self.in_flight.push(0);
        // A fresh id: never a duplicate.
        let _ = self.fleet.joined(id, self.now);
    }

    /// Ends the drains that are over: idle workers leave; workers past their drain timeout
    /// are killed, failing what they still held.
    fn end_drains(&mut self) {
        let in_flight = &self.in_flight;
        let ended = self
            .fleet
            .finished_drains(self.now, |&i| in_flight[i] as usize);
        let mut killed = Vec::new();
        for (id, end) in ended {
            self.fleet.gone(&id);
            if end == DrainEnd::TimedOut {
                killed.push(id);
            }
        }
        if !killed.is_empty() {
            // Requests on a killed worker fail; drop their completions.
            let (lost, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.completions)
                .into_iter()
                .partition(|Reverse(c)| killed.contains(&c.worker));
            self.completions = kept.into_iter().collect();
            for Reverse(c) in lost {
                self.in_flight[c.worker] -= 1;
                self.failed += 1;
                let now = self.now;
                self.bucket(now).failed += 1;
            }
        }
    }

    /// What an autoscaler sees at `t`: both of its windows up to the last whole tick, and now.
    fn observe(&mut self, t: Duration, windows: Windows) -> Observation {
        let upto = self.tick_of(t);
        let queued = u32::try_from(self.queue.len()).unwrap_or(u32::MAX);
        let reading = self.recent.read(t, self.arrivals, queued);
        Observation {
            stable: self.window(upto, windows.stable.get()),
            panic: self.window(upto, windows.panic.get()),
            now: Now {
                in_flight: self.in_flight(),
                queued,
                arrived: reading.arrived,
                queued_before: reading.queued_before,
                span: reading.span,
            },
            workers: self.counts(),
        }
    }

    /// Clones whose delay passed join as ready workers; drains that are over end.
    fn housekeeping(&mut self) {
        while self.cloning.front().is_some_and(|&at| at <= self.now) {
            self.cloning.pop_front();
            self.fleet.answered(1);
            self.join();
        }
        self.end_drains();
        self.dispatch();
    }
}

/// Replays `trace` through `policy`'s decider, starting with `workers.min` ready workers.
pub fn simulate(policy: &Policy, trace: &Trace, config: &SimConfig) -> Result<Run, SimError> {
    simulate_with(policy, trace, config, &mut Squall::new(policy))
}

/// Replays `trace` through `autoscaler`, starting with its initial workers. `policy` gives
/// the pool model and the record: the tick every record is made at, the workers' concurrency
/// (unless `config` gives it), the drain timeout and the SLO (unless `config` gives it).
pub fn simulate_with(
    policy: &Policy,
    trace: &Trace,
    config: &SimConfig,
    autoscaler: &mut dyn Autoscaler,
) -> Result<Run, SimError> {
    let source = Source::drawn(config.seed, trace, false);
    Ok(run(policy, trace, config, autoscaler, source)?.0)
}

/// A run of `autoscaler` on the requests of `source`; with the requests it served, when
/// `source` writes them down.
fn run<'a>(
    policy: &'a Policy,
    trace: &'a Trace,
    config: &SimConfig,
    autoscaler: &mut dyn Autoscaler,
    source: Source<'a>,
) -> Result<(Run, Option<Vec<Request>>), SimError> {
    let requests = trace.expected_requests();
    if requests > MAX_SIMULATED_REQUESTS {
        return Err(SimError::TooManyRequests(requests));
    }
    let concurrency = config
        .worker_concurrency
        .unwrap_or_else(|| policy.target.concurrency().ceil() as u32)
        .max(1);
    let mut sim = Sim {
        policy,
        concurrency,
        clone_delay: config.clone_delay,
        source,
        now: Duration::ZERO,
        fleet: Fleet::new(),
        in_flight: Vec::new(),
        cloning: VecDeque::new(),
        queue: VecDeque::new(),
        completions: BinaryHeap::new(),
        buckets: Vec::new(),
        by_arrival: Vec::new(),
        worker_seconds: 0.0,
        peak_workers: autoscaler.initial_workers(),
        failed: 0,
        activations: 0,
        ended: false,
        arrivals: 0,
        recent: Recent::new(),
    };
    for _ in 0..autoscaler.initial_workers() {
        sim.join();
    }
    let tick = policy.tick.get();
    let (period, windows) = (
        autoscaler.tick().max(Duration::from_millis(1)),
        autoscaler.windows(),
    );
    let end = trace.end();
    let mut records = Vec::new();
    let mut next_arrival = sim.source.next_after(trace, Duration::ZERO);
    // Records are made every policy tick; decisions every period of the autoscaler's, the
    // first at the first tick (for Squall's decider the two are the same).
    let mut next_tick = tick;
    let mut next_decision = tick;
    let mut decided_at = Duration::ZERO;
    let mut in_force: Option<Decision> = None;

    while sim.now < end {
        let next_ready = sim.cloning.front().copied();
        let next_completion = sim.completions.peek().map(|Reverse(c)| c.at);
        let t = [
            Some(next_tick),
            Some(next_decision),
            next_arrival.map(|r| r.arrived),
            next_ready,
            next_completion,
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(end)
        .min(end);
        sim.advance(t);
        if next_completion == Some(t)
            && let Some(Reverse(c)) = sim.completions.pop()
        {
            sim.complete(c);
        } else if next_ready.is_some_and(|r| r <= t) {
            sim.housekeeping();
        } else if let Some(request) = next_arrival.filter(|r| r.arrived == t) {
            let now = sim.now;
            sim.bucket(now).arrivals += 1;
            sim.arrivals += 1;
            sim.queue.push_back(request);
            sim.dispatch();
            next_arrival = sim.source.next_after(trace, t);
            if !sim.queue.is_empty()
                && t >= decided_at + ACTIVATION_INTERVAL
                && autoscaler.activates(sim.counts())
            {
                // Every look counts toward the interval, as in the scaler.
                decided_at = t;
                let observation = sim.observe(t, windows);
                if let Some(decision) = autoscaler.activate(&observation, t) {
                    sim.act(&decision);
                    sim.activations += 1;
                    in_force = Some(decision);
                }
            }
        } else if t == next_tick || t == next_decision {
            sim.housekeeping();
            if t == next_decision {
                let observation = sim.observe(t, windows);
                let decision = autoscaler.decide(&observation, t);
                decided_at = t;
                sim.act(&decision);
                in_force = Some(decision);
                next_decision += period;
            }
            if t == next_tick {
                // The first decision is made at the first tick, so one is always in force.
                if let Some(decision) = in_force {
                    records.push(TickRecord {
                        at: t,
                        rate: trace.at(t).0,
                        demand: sim.in_flight() + sim.queue.len() as u32,
                        decision,
                        workers: sim.counts(),
                        p95: None,
                    });
                }
                next_tick += tick;
            }
        }
    }
    // Every request that arrived is served, so each is judged; the pool's time after the
    // trace's end does not count toward worker-seconds.
    sim.advance(end);
    sim.ended = true;
    while let Some(Reverse(c)) = sim.completions.pop() {
        sim.advance(c.at);
        sim.complete(c);
    }
    let source = std::mem::replace(&mut sim.source, Source::replayed(&[]));
    let served = source.into_log(sim.queue.drain(..));
    let slo = config.slo.or(policy.target.latency_p95.map(|d| d.get()));
    Ok((summarize(sim, records, trace, slo), served))
}
