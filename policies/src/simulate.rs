//! The offline simulator: replays a load trace through a policy and a simple queueing model
//! of the worker pool, to see what the policy would do before trusting it.
//!
//! The model is a discrete-event simulation, deterministic for a given seed:
//! - requests arrive as a Poisson process at the trace's rate (linearly interpolated between
//!   rows);
//! - each worker serves up to `worker_concurrency` requests at once, each taking the trace's
//!   mean service time scaled by a uniform factor in [0.5, 1.5];
//! - the balancer hands a request to the least-loaded ready worker with a free slot, and
//!   otherwise queues it (FIFO), exactly as Squall's balancer admits requests;
//! - every `tick` the decider sees windowed measurements (as the balancer computes them) and
//!   its decision is acted on: new workers become ready after `clone_delay`; extra workers
//!   drain (no new requests) and leave when idle, or are killed after `drain_timeout`,
//!   failing what they still held;
//! - when the trace ends, what arrived is still served (and judged), but worker-seconds stop.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::fmt::Write as _;
use std::time::Duration;

use crate::decide::{Decision, Observation, State, WindowStats, WorkerCounts, decide};
use crate::policy::Policy;

/// One row of a load trace.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TracePoint {
    /// Time since the trace began.
    pub at: Duration,
    /// Requests per second at that time.
    pub rate: f64,
    /// Mean time a worker takes to serve one request at that time.
    pub service: Duration,
}

/// A load trace: rows in time order, linearly interpolated; a step is two rows at the same
/// time. The trace ends at its last row.
#[derive(Clone, Debug, PartialEq)]
pub struct Trace {
    points: Vec<TracePoint>,
}

/// The most rows a trace may hold, and the highest rate and longest span it may describe:
/// bounds that keep a simulation's memory and time in check.
pub const MAX_TRACE_ROWS: usize = 100_000;
/// See [`MAX_TRACE_ROWS`].
pub const MAX_TRACE_RATE: f64 = 100_000.0;
/// See [`MAX_TRACE_ROWS`].
pub const MAX_TRACE_SPAN: Duration = Duration::from_secs(24 * 3600);

/// Why a trace could not be read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TraceError {
    /// A row that is not `time,rate,service`.
    #[error("{source_name}:{line}: {message}")]
    Row {
        /// The file name.
        source_name: String,
        /// 1-based line.
        line: usize,
        /// What is wrong and what was expected.
        message: String,
    },
    /// Fewer than two rows.
    #[error("{0}: a trace needs at least two rows (a start and an end), as `time,rate,service`")]
    TooShort(String),
}

impl Trace {
    /// Builds a trace from rows; see [`Trace::parse_csv`] for the rules.
    pub fn new(points: Vec<TracePoint>) -> Result<Self, TraceError> {
        let text: String = points
            .iter()
            .map(|p| {
                format!(
                    "{}ms,{},{}ms\n",
                    p.at.as_millis(),
                    p.rate,
                    p.service.as_millis()
                )
            })
            .collect();
        Self::parse_csv("<trace>", &text)
    }

    /// Parses CSV rows `time,rate,service` such as `10s,2000,20ms`: time since the start
    /// and service time with units, rate in requests per second. A first row of column names
    /// and lines starting with `#` are skipped. Times must not decrease.
    pub fn parse_csv(source_name: &str, text: &str) -> Result<Self, TraceError> {
        let mut points: Vec<TracePoint> = Vec::new();
        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            let row = raw.trim();
            if row.is_empty() || row.starts_with('#') {
                continue;
            }
            let bad = |message: String| TraceError::Row {
                source_name: source_name.to_owned(),
                line,
                message,
            };
            let fields: Vec<&str> = row.split(',').map(str::trim).collect();
            if points.is_empty()
                && fields
                    .first()
                    .is_some_and(|f| f.eq_ignore_ascii_case("time"))
            {
                continue;
            }
            let [at, rate, service] = fields[..] else {
                return Err(bad(format!(
                    "expected 3 fields `time,rate,service` (such as `10s,2000,20ms`), found {}",
                    fields.len()
                )));
            };
            let at: crate::Duration = at.parse().map_err(|e| bad(format!("time: {e}")))?;
            let service: crate::Duration =
                service.parse().map_err(|e| bad(format!("service: {e}")))?;
            let rate: f64 = rate.parse().map_err(|_| {
                bad(format!(
                    "rate: `{rate}` is not a number of requests per second"
                ))
            })?;
            if !(rate.is_finite() && (0.0..=MAX_TRACE_RATE).contains(&rate)) {
                return Err(bad(format!(
                    "rate: {rate} is outside 0..={MAX_TRACE_RATE} requests per second"
                )));
            }
            if service.is_zero() {
                return Err(bad("service: must be longer than 0ms".into()));
            }
            if at.get() > MAX_TRACE_SPAN {
                return Err(bad("time: a trace may span at most 24h".into()));
            }
            if let Some(last) = points.last()
                && at.get() < last.at
            {
                return Err(bad(format!(
                    "time: {at} comes before the previous row's {}",
                    crate::Duration::from_millis(last.at.as_millis() as u64)
                )));
            }
            if points.len() == MAX_TRACE_ROWS {
                return Err(bad(format!(
                    "a trace may have at most {MAX_TRACE_ROWS} rows"
                )));
            }
            points.push(TracePoint {
                at: at.get(),
                rate,
                service: service.get(),
            });
        }
        if points.len() < 2 || points.last().map(|p| p.at) == points.first().map(|p| p.at) {
            return Err(TraceError::TooShort(source_name.to_owned()));
        }
        Ok(Self { points })
    }

    /// The rows.
    pub fn points(&self) -> &[TracePoint] {
        &self.points
    }

    /// When the trace ends.
    pub fn end(&self) -> Duration {
        self.points.last().map_or(Duration::ZERO, |p| p.at)
    }

    /// Rate and mean service time at `t`, interpolated.
    pub fn at(&self, t: Duration) -> (f64, Duration) {
        let after = self.points.partition_point(|p| p.at <= t);
        match (
            after.checked_sub(1).map(|i| self.points[i]),
            self.points.get(after),
        ) {
            (Some(a), Some(b)) => {
                let span = (b.at - a.at).as_secs_f64();
                let f = if span > 0.0 {
                    (t - a.at).as_secs_f64() / span
                } else {
                    0.0
                };
                let service = a.service.as_secs_f64()
                    + f * (b.service.as_secs_f64() - a.service.as_secs_f64());
                (
                    a.rate + f * (b.rate - a.rate),
                    Duration::from_secs_f64(service),
                )
            }
            (Some(a), None) => (a.rate, a.service),
            (None, Some(b)) => (b.rate, b.service),
            (None, None) => (0.0, Duration::from_millis(1)),
        }
    }

    /// The number of requests the trace describes: its rate integrated over time.
    pub fn expected_requests(&self) -> f64 {
        self.points
            .windows(2)
            .map(|w| (w[1].at - w[0].at).as_secs_f64() * (w[0].rate + w[1].rate) / 2.0)
            .sum()
    }

    /// The surges: times where the rate at least doubles within a second.
    pub fn surges(&self) -> Vec<Duration> {
        self.points
            .windows(2)
            .filter(|w| {
                w[1].at - w[0].at <= Duration::from_secs(1)
                    && w[1].rate >= 2.0 * w[0].rate
                    && w[1].rate > 0.0
            })
            .map(|w| w[0].at)
            .collect()
    }
}

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

/// SplitMix64: small, fast, good enough for arrivals, and the same on every platform.
struct Rng(u64);

impl Rng {
    fn next_f64(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Pending { ready_at: Duration },
    Ready,
    Draining { since: Duration },
    Gone,
}

struct Worker {
    phase: Phase,
    in_flight: u32,
}

/// A request waiting in the queue, or in service.
#[derive(Clone, Copy)]
struct Request {
    arrived: Duration,
    service: Duration,
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
    trace: &'a Trace,
    concurrency: u32,
    clone_delay: Duration,
    rng: Rng,
    now: Duration,
    workers: Vec<Worker>,
    queue: VecDeque<Request>,
    completions: BinaryHeap<Reverse<Completion>>,
    buckets: Vec<Bucket>,
    /// Latencies by the tick the request arrived in.
    by_arrival: Vec<Vec<f64>>,
    worker_seconds: f64,
    peak_workers: u32,
    failed: u64,
    /// The trace's highest rate, for generating arrivals by thinning.
    peak_rate: f64,
    /// Past the trace's end: no worker-time is counted.
    ended: bool,
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
        let mut c = WorkerCounts::default();
        for w in &self.workers {
            match w.phase {
                Phase::Pending { .. } => c.pending += 1,
                Phase::Ready => c.ready += 1,
                Phase::Draining { .. } => c.draining += 1,
                Phase::Gone => {}
            }
        }
        c
    }

    fn in_flight(&self) -> u32 {
        self.workers.iter().map(|w| w.in_flight).sum()
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
        let factor = 0.5 + self.rng.next_f64();
        let done = self.now + request.service.mul_f64(factor);
        self.workers[worker].in_flight += 1;
        self.completions.push(Reverse(Completion {
            at: done,
            worker,
            arrived: request.arrived,
            started: self.now,
        }));
    }

    /// The least-loaded ready worker with a free slot.
    fn free_worker(&self) -> Option<usize> {
        self.workers
            .iter()
            .enumerate()
            .filter(|(_, w)| w.phase == Phase::Ready && w.in_flight < self.concurrency)
            .min_by_key(|(i, w)| (w.in_flight, *i))
            .map(|(i, _)| i)
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
        let w = &mut self.workers[c.worker];
        w.in_flight -= 1;
        if matches!(w.phase, Phase::Draining { .. }) && w.in_flight == 0 {
            w.phase = Phase::Gone;
        }
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
            error_rate: if done > 0 {
                failed as f64 / done as f64
            } else {
                0.0
            },
        }
    }

    fn act(&mut self, decision: &Decision) {
        let c = self.counts();
        let current = c.ready + c.pending;
        if decision.desired > current {
            for _ in current..decision.desired {
                self.workers.push(Worker {
                    phase: Phase::Pending {
                        ready_at: self.now + self.clone_delay,
                    },
                    in_flight: 0,
                });
            }
        } else {
            for _ in decision.desired..current {
                let idlest = self
                    .workers
                    .iter()
                    .enumerate()
                    .filter(|(_, w)| w.phase == Phase::Ready)
                    .min_by_key(|(i, w)| (w.in_flight, Reverse(*i)))
                    .map(|(i, _)| i);
                let Some(i) = idlest else { break };
                let w = &mut self.workers[i];
                w.phase = if w.in_flight == 0 {
                    Phase::Gone
                } else {
                    Phase::Draining { since: self.now }
                };
            }
        }
        let live = self.counts();
        self.peak_workers = self
            .peak_workers
            .max(live.ready + live.pending + live.draining);
    }

    /// Pending workers whose clone delay passed become ready; draining ones past their
    /// timeout are killed.
    fn housekeeping(&mut self) {
        let drain_timeout = self.policy.scale_down.drain_timeout.get();
        let mut killed = Vec::new();
        for (i, w) in self.workers.iter_mut().enumerate() {
            match w.phase {
                Phase::Pending { ready_at } if ready_at <= self.now => w.phase = Phase::Ready,
                Phase::Draining { since } if since + drain_timeout <= self.now => {
                    w.phase = Phase::Gone;
                    killed.push(i);
                }
                _ => {}
            }
        }
        if !killed.is_empty() {
            // Requests on a killed worker fail; drop their completions.
            let (lost, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.completions)
                .into_iter()
                .partition(|Reverse(c)| killed.contains(&c.worker));
            self.completions = kept.into_iter().collect();
            for Reverse(c) in lost {
                self.workers[c.worker].in_flight -= 1;
                self.failed += 1;
                let now = self.now;
                self.bucket(now).failed += 1;
            }
        }
        self.dispatch();
    }
}

/// Replays `trace` through `policy`, starting with `workers.min` ready workers.
pub fn simulate(policy: &Policy, trace: &Trace, config: &SimConfig) -> Result<Run, SimError> {
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
        trace,
        concurrency,
        clone_delay: config.clone_delay,
        rng: Rng(config.seed),
        now: Duration::ZERO,
        workers: (0..policy.workers.min)
            .map(|_| Worker {
                phase: Phase::Ready,
                in_flight: 0,
            })
            .collect(),
        queue: VecDeque::new(),
        completions: BinaryHeap::new(),
        buckets: Vec::new(),
        by_arrival: Vec::new(),
        worker_seconds: 0.0,
        peak_workers: policy.workers.min,
        failed: 0,
        peak_rate: trace.points.iter().map(|p| p.rate).fold(0.0, f64::max),
        ended: false,
    };
    let tick = policy.tick.get();
    let end = trace.end();
    let mut state = State::default();
    let mut records = Vec::new();
    let mut next_arrival = next_arrival_after(&mut sim, Duration::ZERO);
    let mut next_tick = tick;

    while sim.now < end {
        let next_ready = sim
            .workers
            .iter()
            .filter_map(|w| match w.phase {
                Phase::Pending { ready_at } => Some(ready_at),
                _ => None,
            })
            .min();
        let next_completion = sim.completions.peek().map(|Reverse(c)| c.at);
        let t = [Some(next_tick), next_arrival, next_ready, next_completion]
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
        } else if next_arrival == Some(t) {
            let (_, service) = trace.at(t);
            let now = sim.now;
            sim.bucket(now).arrivals += 1;
            sim.queue.push_back(Request {
                arrived: t,
                service,
            });
            sim.dispatch();
            next_arrival = next_arrival_after(&mut sim, t);
        } else if t == next_tick {
            sim.housekeeping();
            let upto = sim.tick_of(t);
            let observation = Observation {
                stable: sim.window(upto, policy.window.stable.get()),
                panic: sim.window(upto, policy.window.panic.get()),
                workers: sim.counts(),
            };
            let (decision, next) = decide(policy, &observation, &state, t);
            state = next;
            sim.act(&decision);
            records.push(TickRecord {
                at: t,
                rate: trace.at(t).0,
                demand: sim.in_flight() + sim.queue.len() as u32,
                decision,
                workers: sim.counts(),
                p95: None,
            });
            next_tick += tick;
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
    Ok(summarize(
        sim,
        records,
        trace,
        config.slo.or(policy.target.latency_p95.map(|d| d.get())),
    ))
}

fn next_arrival_after(sim: &mut Sim<'_>, t: Duration) -> Option<Duration> {
    // Thinning against the trace's peak rate gives an exact non-homogeneous Poisson process.
    let peak = sim.peak_rate;
    if peak <= 0.0 {
        return None;
    }
    let mut at = t;
    loop {
        let gap = -(1.0 - sim.rng.next_f64()).ln() / peak;
        at += Duration::from_secs_f64(gap);
        if at >= sim.trace.end() {
            return None;
        }
        if sim.rng.next_f64() * peak < sim.trace.at(at).0 {
            return Some(at);
        }
    }
}

fn summarize(
    mut sim: Sim<'_>,
    mut records: Vec<TickRecord>,
    trace: &Trace,
    slo: Option<Duration>,
) -> Run {
    for r in &mut records {
        let i = sim.tick_of(r.at).saturating_sub(1);
        r.p95 = sim.by_arrival.get_mut(i).and_then(|l| percentile(l, 0.95));
    }
    let over = |r: &TickRecord| matches!((r.p95, slo), (Some(p), Some(s)) if p > s);
    let ticks_over_slo = records.iter().filter(|r| over(r)).count();
    let per_second = (Duration::from_secs(1).as_nanos() / sim.policy.tick.get().as_nanos().max(1))
        .max(1) as usize;
    let recoveries = trace
        .surges()
        .into_iter()
        .map(|start| {
            let recovered = slo.and_then(|_| {
                let from = records.iter().position(|r| r.at > start)?;
                (from..records.len())
                    .find(|&k| {
                        let stretch = &records[k..(k + per_second).min(records.len())];
                        stretch.len() == per_second && !stretch.iter().any(over)
                    })
                    .map(|k| records[k].at.saturating_sub(start + sim.policy.tick.get()))
            });
            (start, recovered)
        })
        .collect();
    let mut all: Vec<f64> = sim.by_arrival.iter().flatten().copied().collect();
    let completed = all.len() as u64;
    let summary = Summary {
        slo,
        recoveries,
        ticks_over_slo,
        ticks: records.len(),
        worker_seconds: sim.worker_seconds,
        peak_workers: sim.peak_workers,
        completed,
        failed: sim.failed,
        p50: percentile(&mut all, 0.50),
        p95: percentile(&mut all, 0.95),
        p99: percentile(&mut all, 0.99),
    };
    sim.by_arrival.clear();
    Run {
        ticks: records,
        summary,
    }
}

fn ms(d: Option<Duration>) -> String {
    d.map_or_else(
        || "-".to_owned(),
        |d| format!("{:.0}", d.as_secs_f64() * 1e3),
    )
}

impl Run {
    /// The tick-by-tick record as CSV, one row per tick.
    pub fn to_csv(&self) -> String {
        let mut out = String::from(
            "time_s,rate_rps,demand,desired,ready,pending,draining,panic,p95_ms,reason\n",
        );
        for r in &self.ticks {
            let reason = r.decision.reason.to_string().replace('"', "'");
            let _ = writeln!(
                out,
                "{:.3},{:.1},{},{},{},{},{},{},{},\"{}\"",
                r.at.as_secs_f64(),
                r.rate,
                r.demand,
                r.decision.desired,
                r.workers.ready,
                r.workers.pending,
                r.workers.draining,
                u8::from(r.decision.panic),
                ms(r.p95),
                reason
            );
        }
        out
    }

    /// The summary as a few lines of text.
    pub fn summary_text(&self) -> String {
        let s = &self.summary;
        let mut out = String::new();
        match s.slo {
            Some(slo) => {
                for (start, recovered) in &s.recoveries {
                    let _ = writeln!(
                        out,
                        "surge at {:.1}s: p95 back under the {:.0}ms SLO {}",
                        start.as_secs_f64(),
                        slo.as_secs_f64() * 1e3,
                        recovered.map_or_else(
                            || "never (within the trace)".to_owned(),
                            |d| format!("after {:.1}s", d.as_secs_f64())
                        )
                    );
                }
                let _ = writeln!(out, "ticks over SLO: {} of {}", s.ticks_over_slo, s.ticks);
            }
            None => {
                let _ = writeln!(
                    out,
                    "no latency SLO: recovery not judged (pass --slo to judge one)"
                );
            }
        }
        let _ = writeln!(
            out,
            "worker-seconds: {:.1}   peak workers: {}",
            s.worker_seconds, s.peak_workers
        );
        let _ = writeln!(
            out,
            "requests: {} completed, {} failed   latency p50 {}ms  p95 {}ms  p99 {}ms",
            s.completed,
            s.failed,
            ms(s.p50),
            ms(s.p95),
            ms(s.p99)
        );
        out
    }
}
