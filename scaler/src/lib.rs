//! The scaler: every tick it reads the balancer's signals, asks the policy for a decision and
//! acts on it through forkd. It is the only place where measurement, policy and cloning meet.
//!
//! The loop owns all of its state (which clone is where and in what phase); slow work —
//! asking a forkd host for clones, killing one — runs in tasks that report back over a
//! channel, so a tick never waits on the network.
//!
//! - **Up:** the difference between the decision and ready + pending workers is cloned on the
//!   hosts with the most free room, spread across them; a clone joins the balancer's pool when
//!   forkd reports it ready. A failed request goes to another host at the next tick.
//! - **Down:** the ready workers with the fewest requests in flight are drained in the
//!   balancer; each is killed through forkd once it has nothing in flight or its drain
//!   timeout passes.
//! - **Hosts:** a host whose requests fail is marked down; its workers leave the pool and no
//!   clone is placed on it until a later health check succeeds.
#![forbid(unsafe_code)]

mod metrics;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use balancer::{Balancer, Signals, WorkerId};
use forkd::{Client, CloneInfo, CloneState};
use policies::{Decision, Observation, Policy, State, WindowStats, WorkerCounts, decide};
use tokio::sync::mpsc;

pub use metrics::Metrics;

/// How often each forkd host is asked whether it is alive and which clones exited.
const HOST_CHECK: Duration = Duration::from_secs(1);
/// How long a host has to answer a check.
const CHECK_LIMIT: Duration = Duration::from_secs(2);
/// How long a host that came back has to answer a check and create the template again.
const TEMPLATE_CHECK_LIMIT: Duration = Duration::from_secs(120);

/// A forkd host the scaler may place clones on.
#[derive(Debug, Clone)]
pub struct Host {
    /// A name for logs (its address, usually).
    pub name: String,
    /// Its API client.
    pub client: Client,
    /// The most clones the scaler places on it.
    pub capacity: usize,
    /// The template to create again when the host comes back without it (its daemon
    /// restarted). `None`: the host is expected to keep it.
    pub template: Option<forkd::TemplateSpec>,
    /// Drop the host for good once it has been down this long (hosts found by DNS, whose
    /// addresses come and go); `None` keeps checking it forever.
    pub retire_after: Option<Duration>,
}

/// Converts one window of the balancer's measurements into the decider's terms.
fn window(w: &balancer::WindowSignals) -> WindowStats {
    let measured = |d: Duration| (w.requests > 0).then_some(d);
    WindowStats {
        request_rate: w.request_rate,
        mean_in_flight: w.mean_in_flight,
        queue_depth: w.mean_queue_depth,
        latency_p50: measured(w.latency_p50),
        latency_p95: measured(w.latency_p95),
        latency_p99: measured(w.latency_p99),
        service_p95: (w.worker_responses > 0).then_some(w.service_p95),
        error_rate: w.error_rate,
    }
}

/// What the decider sees: the balancer's windows and counts, plus the clones on their way.
pub fn observation(signals: &Signals, pending: u32) -> Observation {
    Observation {
        stable: window(&signals.stable),
        panic: window(&signals.panic),
        workers: WorkerCounts {
            ready: u32::try_from(signals.workers.ready).unwrap_or(u32::MAX),
            pending,
            draining: u32::try_from(signals.workers.draining).unwrap_or(u32::MAX),
        },
    }
}

/// Where a clone is in its life, as the scaler sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    /// In the balancer's pool.
    Ready,
    /// Taking no new requests; killed once idle or at the deadline.
    Draining { deadline: Instant },
    /// Being killed.
    Killing,
}

#[derive(Debug)]
struct Worker {
    host: usize,
    /// When it joined the pool: a host's list of clones older than this may not show it.
    joined: Instant,
    /// The id its forkd host gave it; unique on that host only.
    clone_id: String,
    phase: Phase,
}

/// A worker's name in the scaler and the balancer: its clone id qualified by its host, since
/// every forkd numbers its clones from 1.
fn worker_key(host: usize, clone_id: &str) -> String {
    format!("{clone_id}@{host}")
}

/// What a background task reports to the loop.
#[derive(Debug)]
enum Report {
    /// A clone request on `host` for `asked` clones ended.
    Cloned {
        host: usize,
        asked: u32,
        at: Instant,
        result: Result<Vec<CloneInfo>, CloneRefusal>,
    },
    /// A kill ended.
    Killed {
        id: String,
        result: Result<(), String>,
    },
    /// A host check sent at `at` ended: the clones it lists, or why it could not be asked.
    Checked {
        host: usize,
        at: Instant,
        result: Result<Vec<CloneInfo>, String>,
    },
}

/// Why a clone request got no clones, as far as the scaler acts on it. Only a missing
/// template marks a host down at once (its workers leave the pool); for the rest the host
/// rests for a check interval, keeping its workers, and the next host check decides whether
/// it is down.
#[derive(Debug)]
enum CloneRefusal {
    /// forkd says it has no such template (its daemon restarted): the host is down until a
    /// check finds it again and warms the template again.
    NoTemplate(String),
    /// forkd has no room for that many (`no_capacity`, or `invalid_count` for more than its
    /// limit): it is asked for fewer next time.
    Full(String),
    /// forkd could not be reached, or tried and the clones failed (the app did not start).
    Failed(String),
}

impl CloneRefusal {
    fn of(error: &forkd::ClientError) -> Self {
        use forkd::ErrorCode;
        let text = error.to_string();
        match error.code() {
            Some(ErrorCode::NoCapacity | ErrorCode::InvalidCount) => Self::Full(text),
            Some(ErrorCode::TemplateNotFound) => Self::NoTemplate(text),
            _ => Self::Failed(text),
        }
    }
}

#[derive(Debug)]
struct HostState {
    host: Host,
    up: bool,
    /// When it went down, while it is down.
    down_since: Option<Instant>,
    /// Down for longer than `retire_after`: no longer checked or used.
    retired: bool,
    /// Clones asked for and not yet answered.
    pending: u32,
    checking: bool,
    /// It refused clones for want of room, or a clone request failed: not asked again
    /// before this (another host is, if one has room).
    rest_until: Option<Instant>,
    /// After a refusal for want of room: ask for at most this many at once (halved at each
    /// refusal, so a host with some room left gets asked for what fits; lifted when clones
    /// are granted).
    batch_limit: Option<u32>,
}

impl HostState {
    fn new(host: Host) -> Self {
        Self {
            host,
            up: true,
            down_since: None,
            retired: false,
            pending: 0,
            checking: false,
            rest_until: None,
            batch_limit: None,
        }
    }
}

/// What the scaler last decided, for status pages and the demo.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Status {
    /// The last decision, once there is one.
    pub decision: Option<Decision>,
    /// Clones asked for and not yet answered.
    pub pending: u32,
    /// Workers draining.
    pub draining: u32,
}

/// The control loop. Build it with [`Scaler::new`], then [`Scaler::run`] it.
#[derive(Debug)]
pub struct Scaler {
    policy: Arc<ArcSwap<Policy>>,
    balancer: Balancer,
    hosts: Vec<HostState>,
    workers: HashMap<String, Worker>,
    state: State,
    started: Instant,
    last_check: Instant,
    last: Option<Decision>,
    reports: mpsc::UnboundedSender<Report>,
    inbox: mpsc::UnboundedReceiver<Report>,
    /// Hosts found while running (a DNS name that resolves to more daemons, say).
    new_hosts: mpsc::UnboundedSender<Host>,
    /// The names of the hosts in use, for whoever finds new ones.
    host_names: Arc<ArcSwap<Vec<String>>>,
    new_hosts_inbox: mpsc::UnboundedReceiver<Host>,
    status: Arc<ArcSwap<Status>>,
    metrics: Metrics,
    /// The last scale-up found no host to ask (logged once until that changes).
    starved: bool,
}

impl Scaler {
    /// A scaler for `balancer`, cloning `policy.template` on `hosts`. `policy` may be swapped
    /// at any time (a reload); the next tick uses the new one.
    pub fn new(policy: Arc<ArcSwap<Policy>>, balancer: Balancer, hosts: Vec<Host>) -> Self {
        let (reports, inbox) = mpsc::unbounded_channel();
        let (new_hosts, new_hosts_inbox) = mpsc::unbounded_channel();
        let host_names = hosts.iter().map(|h| h.name.clone()).collect();
        let now = Instant::now();
        Self {
            policy,
            balancer,
            hosts: hosts.into_iter().map(HostState::new).collect(),
            workers: HashMap::new(),
            state: State::default(),
            started: now,
            last_check: now,
            last: None,
            reports,
            inbox,
            new_hosts,
            new_hosts_inbox,
            host_names: Arc::new(ArcSwap::from_pointee(host_names)),
            status: Arc::new(ArcSwap::from_pointee(Status::default())),
            metrics: Metrics::new(),
            starved: false,
        }
    }

    /// Where to send hosts found while the scaler runs; each joins at the next event. A host
    /// sent here must already have the template.
    pub fn host_sender(&self) -> mpsc::UnboundedSender<Host> {
        self.new_hosts.clone()
    }

    /// The names of the hosts in use, kept current: a host down for longer than its
    /// `retire_after` leaves it, so the same address can be found and sent again.
    pub fn host_names(&self) -> Arc<ArcSwap<Vec<String>>> {
        Arc::clone(&self.host_names)
    }

    /// The scaler's Prometheus metrics (a handle; it stays live while the scaler runs).
    pub fn metrics(&self) -> Metrics {
        self.metrics.clone()
    }

    /// The scaler's status, updated every tick.
    pub fn status(&self) -> Arc<ArcSwap<Status>> {
        Arc::clone(&self.status)
    }

    fn pending(&self) -> u32 {
        self.hosts.iter().map(|h| h.pending).sum()
    }

    fn ready_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .workers
            .iter()
            .filter(|(_, w)| w.phase == Phase::Ready)
            .map(|(id, _)| id.clone())
            .collect();
        ids.sort();
        ids
    }

    /// Runs until `shutdown` resolves, then drains nothing and kills every clone it made.
    /// Returns the hosts it used, those found while running included.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) -> Vec<Host> {
        let mut tick = tokio::time::interval(self.policy.load().tick.get());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                _ = tick.tick() => {
                    self.tick();
                    let period = self.policy.load().tick.get();
                    if period != tick.period() {
                        tick = tokio::time::interval(period);
                        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    }
                }
                Some(report) = self.inbox.recv() => self.handle(report),
                Some(host) = self.new_hosts_inbox.recv() => self.add_host(host),
            }
        }
        self.stop().await;
        // Hosts sent but not yet read have their template too; hand them back as well.
        while let Ok(host) = self.new_hosts_inbox.try_recv() {
            self.add_host(host);
        }
        self.hosts.into_iter().map(|h| h.host).collect()
    }

    fn add_host(&mut self, host: Host) {
        tracing::info!(host = %host.name, "forkd host joined");
        self.hosts.push(HostState::new(host));
        self.publish_hosts();
    }

    /// Publishes the names of the hosts in use (not retired).
    fn publish_hosts(&self) {
        let names = self
            .hosts
            .iter()
            .filter(|h| !h.retired)
            .map(|h| h.host.name.clone())
            .collect();
        self.host_names.store(Arc::new(names));
    }

    /// One decision and its actions.
    fn tick(&mut self) {
        let now = Instant::now();
        let policy = self.policy.load_full();
        let observation = observation(&self.balancer.signals(), self.pending());
        let (decision, state) = decide(&policy, &observation, &self.state, now - self.started);
        self.state = state;
        let current = observation.workers.ready + observation.workers.pending;
        if self.last.map(|d| (d.desired, d.panic)) != Some((decision.desired, decision.panic)) {
            tracing::info!(
                policy = %policy.name,
                desired = decision.desired,
                ready = observation.workers.ready,
                pending = observation.workers.pending,
                panic = decision.panic,
                "{}",
                decision.reason
            );
        }
        self.last = Some(decision);
        if decision.desired > current {
            self.scale_up(&policy, decision.desired - current, &decision);
        } else if decision.desired < current {
            self.scale_down(&policy, current - decision.desired, &decision);
        }
        self.finish_drains(now);
        let draining = self
            .workers
            .values()
            .filter(|w| matches!(w.phase, Phase::Draining { .. }))
            .count() as u32;
        self.metrics
            .tick(&policy, &observation, &decision, self.pending());
        let up = self.hosts.iter().filter(|h| h.up).count();
        self.metrics.hosts(up, self.hosts.len() - up);
        self.status.store(Arc::new(Status {
            decision: Some(decision),
            pending: self.pending(),
            draining,
        }));
        if now.duration_since(self.last_check) >= HOST_CHECK {
            self.last_check = now;
            self.check_hosts();
        }
    }

    /// Asks the hosts with the most free room for `count` clones, spread across them.
    fn scale_up(&mut self, policy: &Policy, count: u32, decision: &Decision) {
        let mut share = vec![0u32; self.hosts.len()];
        let now = Instant::now();
        for _ in 0..count {
            let live = |i: usize| {
                self.workers.values().filter(|w| w.host == i).count() as u32
                    + self.hosts[i].pending
                    + share[i]
            };
            let best = (0..self.hosts.len())
                .filter(|&i| {
                    self.hosts[i].up
                        && self.hosts[i].rest_until.is_none_or(|until| now >= until)
                        && self.hosts[i]
                            .batch_limit
                            .is_none_or(|limit| share[i] < limit)
                        && live(i) < self.hosts[i].host.capacity as u32
                })
                .max_by_key(|&i| {
                    (
                        self.hosts[i].host.capacity as u32 - live(i),
                        std::cmp::Reverse(i),
                    )
                });
            match best {
                Some(i) => share[i] += 1,
                None => {
                    if !self.starved {
                        self.starved = true;
                        tracing::warn!(
                            "no forkd host can take another clone now (all down, full or resting after a refusal)"
                        );
                    }
                    break;
                }
            }
        }
        if share.iter().sum::<u32>() == count {
            self.starved = false;
        }
        for (i, n) in share.into_iter().enumerate().filter(|(_, n)| *n > 0) {
            let host = &mut self.hosts[i];
            host.pending += n;
            tracing::info!(host = %host.host.name, count = n, "cloning: {}", decision.reason);
            let client = host.host.client.clone();
            let template = policy.template.clone();
            let reports = self.reports.clone();
            tokio::spawn(async move {
                let at = Instant::now();
                let result = client
                    .create_clones(&template, n as usize)
                    .await
                    .map_err(|e| CloneRefusal::of(&e));
                let _ = reports.send(Report::Cloned {
                    host: i,
                    asked: n,
                    at,
                    result,
                });
            });
        }
    }

    /// Drains the `count` ready workers with the fewest requests in flight.
    fn scale_down(&mut self, policy: &Policy, count: u32, decision: &Decision) {
        let pool = self.balancer.pool();
        let mut candidates: Vec<(usize, String)> = self
            .ready_ids()
            .into_iter()
            .map(|id| (pool.in_flight(&WorkerId::from(id.clone())).unwrap_or(0), id))
            .collect();
        candidates.sort();
        let deadline = Instant::now() + policy.scale_down.drain_timeout.get();
        for (_, id) in candidates.into_iter().take(count as usize) {
            if let Err(e) = pool.drain(&WorkerId::from(id.clone())) {
                tracing::warn!(worker = %id, error = %e, "cannot drain");
                continue;
            }
            tracing::info!(worker = %id, "draining: {}", decision.reason);
            if let Some(w) = self.workers.get_mut(&id) {
                w.phase = Phase::Draining { deadline };
            }
        }
    }

    /// Kills draining workers that are idle or out of time.
    fn finish_drains(&mut self, now: Instant) {
        let pool = self.balancer.pool();
        let done: Vec<(String, bool)> = self
            .workers
            .iter()
            .filter_map(|(id, w)| match w.phase {
                Phase::Draining { deadline } => {
                    let idle = pool.in_flight(&WorkerId::from(id.clone())).unwrap_or(0) == 0;
                    (idle || now >= deadline).then(|| (id.clone(), !idle))
                }
                _ => None,
            })
            .collect();
        for (id, timed_out) in done {
            let _ = pool.remove(&WorkerId::from(id.clone()));
            self.metrics.drained(timed_out);
            self.kill(&id);
        }
    }

    fn kill(&mut self, id: &str) {
        let Some(worker) = self.workers.get_mut(id) else {
            return;
        };
        worker.phase = Phase::Killing;
        let client = self.hosts[worker.host].host.client.clone();
        let reports = self.reports.clone();
        let clone_id = worker.clone_id.clone();
        let id = id.to_owned();
        tokio::spawn(async move {
            let result = client.kill(&clone_id).await.map_err(|e| e.to_string());
            let _ = reports.send(Report::Killed { id, result });
        });
    }

    fn check_hosts(&mut self) {
        let now = Instant::now();
        let mut retired = false;
        for host in self.hosts.iter_mut().filter(|h| !h.retired) {
            if let (Some(since), Some(after)) = (host.down_since, host.host.retire_after)
                && now.duration_since(since) >= after
            {
                tracing::warn!(host = %host.host.name, "forkd host down for {after:?}; dropping it");
                host.retired = true;
                retired = true;
            }
        }
        if retired {
            self.publish_hosts();
        }
        for (i, host) in self
            .hosts
            .iter_mut()
            .enumerate()
            .filter(|(_, h)| !h.checking && !h.retired)
        {
            host.checking = true;
            let client = host.host.client.clone();
            // A host that comes back may have restarted and lost the template.
            let template = (!host.up).then(|| host.host.template.clone()).flatten();
            // Creating a template warms it, which can take a while (a microVM boots).
            let limit = if template.is_some() {
                TEMPLATE_CHECK_LIMIT
            } else {
                CHECK_LIMIT
            };
            let reports = self.reports.clone();
            tokio::spawn(async move {
                let check = async {
                    let clones = client.clones().await.map_err(|e| e.to_string())?.clones;
                    if let Some(spec) = template {
                        let templates = client.templates().await.map_err(|e| e.to_string())?;
                        if !templates.iter().any(|t| t.spec.name == spec.name) {
                            tracing::info!(template = %spec.name, "forkd host is back without the template; creating it again");
                            client
                                .create_template(&spec)
                                .await
                                .map_err(|e| format!("creating the template again: {e}"))?;
                        }
                    }
                    Ok(clones)
                };
                let result = tokio::time::timeout(limit, check)
                    .await
                    .map_err(|_| format!("no answer within {limit:?}"))
                    .and_then(|r| r);
                let _ = reports.send(Report::Checked {
                    host: i,
                    at: now,
                    result,
                });
            });
        }
    }

    /// Adds a new clone to the pool; returns whether it joined (if not, it is killed).
    fn join(&mut self, host: usize, clone_id: String, addr: SocketAddr) -> bool {
        let id = worker_key(host, &clone_id);
        match self.balancer.pool().add_worker(id.clone(), addr) {
            Ok(()) => {
                tracing::info!(worker = %id, %addr, host = %self.hosts[host].host.name, "joined the pool");
                self.workers.insert(
                    id,
                    Worker {
                        host,
                        joined: Instant::now(),
                        clone_id,
                        phase: Phase::Ready,
                    },
                );
                true
            }
            Err(e) => {
                tracing::warn!(worker = %id, error = %e, "cannot add to the pool; killing it");
                self.workers.insert(
                    id.clone(),
                    Worker {
                        host,
                        joined: Instant::now(),
                        clone_id,
                        phase: Phase::Ready,
                    },
                );
                self.kill(&id);
                false
            }
        }
    }

    fn handle(&mut self, report: Report) {
        match report {
            Report::Cloned {
                host,
                asked,
                at,
                result,
            } => {
                self.hosts[host].pending = self.hosts[host].pending.saturating_sub(asked);
                match result {
                    Ok(clones) => {
                        self.hosts[host].batch_limit = None;
                        let took = at.elapsed();
                        let answered = clones.len() as u32;
                        for clone in clones {
                            match clone.state {
                                CloneState::Ready | CloneState::Starting => {
                                    if self.join(host, clone.id, clone.addr) {
                                        self.metrics.joined(clone.driver, took);
                                    } else {
                                        self.metrics.failed(1);
                                    }
                                }
                                _ => {
                                    self.metrics.failed(1);
                                    tracing::warn!(
                                        clone = %clone.id,
                                        error = clone.error.as_deref().unwrap_or("?"),
                                        "clone failed"
                                    );
                                }
                            }
                        }
                        self.metrics.failed(asked.saturating_sub(answered));
                    }
                    Err(refusal) => {
                        let name = &self.hosts[host].host.name;
                        match refusal {
                            CloneRefusal::NoTemplate(e) => {
                                self.metrics.failed(asked);
                                tracing::warn!(host = %name, error = %e, "the host lost the template; marking it down until a check warms it again");
                                self.host_down(host);
                            }
                            CloneRefusal::Full(e) => {
                                self.metrics.refused(asked);
                                tracing::info!(host = %name, asked, error = %e, "forkd host has no room for that many; asking for fewer, and the others meanwhile");
                                let state = &mut self.hosts[host];
                                state.batch_limit = Some((asked / 2).max(1));
                                if asked == 1 {
                                    state.rest_until = Some(Instant::now() + HOST_CHECK);
                                }
                            }
                            CloneRefusal::Failed(e) => {
                                // Not every tick: a broken app would be started ten times a
                                // second. A host that is gone fails its next check.
                                self.metrics.failed(asked);
                                tracing::warn!(host = %name, error = %e, "clone request failed; asking the others for a while");
                                self.hosts[host].rest_until = Some(Instant::now() + HOST_CHECK);
                            }
                        }
                    }
                }
            }
            Report::Killed { id, result } => {
                if let Err(e) = result {
                    tracing::warn!(worker = %id, error = %e, "kill failed");
                }
                self.workers.remove(&id);
            }
            Report::Checked { host, at, result } => {
                self.hosts[host].checking = false;
                if self.hosts[host].retired {
                    return;
                }
                match result {
                    Ok(clones) => {
                        if !self.hosts[host].up {
                            tracing::info!(host = %self.hosts[host].host.name, "forkd host is back");
                            self.hosts[host].up = true;
                            self.hosts[host].down_since = None;
                        }
                        // Workers the host no longer lists are gone (its daemon restarted).
                        let listed: std::collections::HashSet<&str> =
                            clones.iter().map(|c| c.id.as_str()).collect();
                        let vanished: Vec<String> = self
                            .workers
                            .iter()
                            .filter(|(_, w)| {
                                w.host == host
                                    && w.joined < at
                                    && w.phase != Phase::Killing
                                    && !listed.contains(w.clone_id.as_str())
                            })
                            .map(|(id, _)| id.clone())
                            .collect();
                        for id in vanished {
                            tracing::warn!(worker = %id, "worker no longer known to its forkd host; it leaves the pool");
                            let _ = self.balancer.pool().remove(&WorkerId::from(id.clone()));
                            self.workers.remove(&id);
                        }
                        // Clones of our template we do not know are orphans: left by an earlier
                        // run, or forgotten while the host was down. With no clone request in
                        // flight to this host, every clone we asked for is known by now.
                        if self.hosts[host].pending == 0 {
                            let template = self.policy.load().template.clone();
                            for clone in clones.iter().filter(|c| {
                                c.template == template
                                    && matches!(c.state, CloneState::Ready | CloneState::Starting)
                                    && !self.workers.contains_key(&worker_key(host, &c.id))
                            }) {
                                tracing::warn!(host = %self.hosts[host].host.name, clone = %clone.id, "killing a clone of ours the scaler does not know (an orphan)");
                                let client = self.hosts[host].host.client.clone();
                                let clone_id = clone.id.clone();
                                tokio::spawn(async move {
                                    if let Err(e) = client.kill(&clone_id).await {
                                        tracing::warn!(clone = %clone_id, error = %e, "killing an orphan failed");
                                    }
                                });
                            }
                        }
                        // Clones that ended on their own leave the pool.
                        for clone in clones.iter().filter(|c| c.state == CloneState::Exited) {
                            let id = worker_key(host, &clone.id);
                            if self
                                .workers
                                .get(&id)
                                .is_some_and(|w| w.phase != Phase::Killing)
                            {
                                tracing::warn!(worker = %id, exit = ?clone.exit, "worker exited on its own");
                                let _ = self.balancer.pool().remove(&WorkerId::from(id.clone()));
                                self.kill(&id);
                            }
                        }
                    }
                    Err(e) => {
                        if self.hosts[host].up {
                            tracing::warn!(host = %self.hosts[host].host.name, error = %e, "forkd host stopped answering; its workers leave the pool");
                        }
                        self.host_down(host);
                    }
                }
            }
        }
    }

    fn host_down(&mut self, host: usize) {
        self.hosts[host].up = false;
        self.hosts[host].down_since.get_or_insert_with(Instant::now);
        let pool = self.balancer.pool();
        let gone: Vec<String> = self
            .workers
            .iter()
            .filter(|(_, w)| w.host == host)
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            let _ = pool.remove(&WorkerId::from(id.clone()));
            self.workers.remove(&id);
        }
    }

    /// Kills every clone this scaler made, waiting for each.
    async fn stop(&mut self) {
        let pool = self.balancer.pool();
        let mut kills = tokio::task::JoinSet::new();
        for (id, w) in self.workers.drain() {
            let _ = pool.remove(&WorkerId::from(id.clone()));
            let client = self.hosts[w.host].host.client.clone();
            kills.spawn(async move { client.kill(&w.clone_id).await });
        }
        while kills.join_next().await.is_some() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(code: forkd::ErrorCode) -> forkd::ClientError {
        forkd::ClientError::Api {
            status: code.status(),
            code,
            message: "m".into(),
        }
    }

    #[test]
    fn only_a_lost_template_marks_a_host_down_at_once() {
        let kind = |e: forkd::ClientError| match CloneRefusal::of(&e) {
            CloneRefusal::NoTemplate(_) => "down",
            CloneRefusal::Full(_) => "full",
            CloneRefusal::Failed(_) => "rest",
        };
        use forkd::ErrorCode;
        assert_eq!(kind(api(ErrorCode::TemplateNotFound)), "down");
        assert_eq!(kind(api(ErrorCode::NoCapacity)), "full");
        assert_eq!(kind(api(ErrorCode::InvalidCount)), "full");
        assert_eq!(kind(api(ErrorCode::ClonesFailed)), "rest");
        assert_eq!(kind(api(ErrorCode::TemplateWarming)), "rest");
        assert_eq!(kind(api(ErrorCode::Internal)), "rest");
        assert_eq!(kind(api(ErrorCode::Unknown)), "rest");
        let undecodable = serde_json_error();
        assert_eq!(kind(forkd::ClientError::Decode(undecodable)), "rest");
    }

    fn serde_json_error() -> serde_json::Error {
        serde_json::from_str::<u8>("not json").unwrap_err()
    }
}
