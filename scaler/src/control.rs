//! The control loop: every tick it reads the balancer's measurements, asks the policy for a
//! decision and acts on it through the hosts. It owns all of its state — the [`Fleet`] of
//! workers, the hosts' health and room — and is the only place where measurement, policy and
//! cloning meet (Knative's autoscaler keeps collector, decider and actuator apart the same
//! way).
//!
//! Slow work — asking a host for clones, killing one, checking a host — runs in tasks that
//! report back over a channel, so a tick never waits on the network. Time is tokio's clock,
//! so tests pause and step it.
//!
//! - **Up:** the difference between the decision and ready + pending workers is cloned on
//!   the hosts [`crate::hosts`] places it on; a clone joins the balancer's pool when its host
//!   reports it ready. A request that fails, or gets no answer in time, rests its host and
//!   the next tick asks another.
//! - **Down:** the workers [`Fleet::choose_drains`] picks are drained in the balancer; each
//!   is killed once it has nothing in flight or its drain timeout passes.
//! - **Hosts:** every second each host lists its clones: workers it no longer knows leave
//!   the pool, workers that exited are killed, clones of our template we do not know
//!   (orphans of an earlier run) are killed, and a host that does not answer is down — its
//!   workers leave the pool until it is back (with the template created again if its
//!   daemon lost it).
//! - **Activation:** a request that has to wait in the balancer's queue wakes the loop at
//!   once (the balancer's [`Front::activation`]); it decides on what it sees now through the
//!   same pure decider ([`policies::activate`]) and clones if that grows the pool, at most
//!   once per [`policies::ACTIVATION_INTERVAL`]. So the first request after zero, or the front of a
//!   flash crowd, waits for a clone, not for the next tick.
//! - **Reload:** a new policy in the shared `ArcSwap` takes effect at the next tick; a
//!   change of windows or concurrency is applied to the balancer, or logged as refused.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use forkd::{CloneInfo, CloneState, TemplateSpec};
use lifecycle::Shutdown;
use policies::{Decision, DrainEnd, Fleet, Observation, Plan, Policy, Recent, State, decide};
use tokio::sync::mpsc;
use tokio::time::Instant;

use balancer::WorkerId;

use crate::front::{Front, tuning};
use crate::host::{CloneHost, HostError, Listing, within};
use crate::hosts::{Host, HostState, place};
use crate::{Metrics, Status};

/// How often each host is asked what it runs.
pub(crate) const HOST_CHECK: Duration = Duration::from_secs(1);
/// How soon a host whose template is warming up is asked again.
const WARMING_RETRY: Duration = Duration::from_millis(100);
/// How long a host has, at shutdown, to kill a worker.
const KILL_LIMIT: Duration = Duration::from_secs(10);
/// How long a host has to answer a check.
const CHECK_LIMIT: Duration = Duration::from_secs(2);
/// How long a host that came back has to answer a check and create the template again.
const TEMPLATE_CHECK_LIMIT: Duration = Duration::from_secs(120);
/// How much longer than the template's start timeout a clone request may take before the
/// scaler stops waiting for it (the host rests; clones that come later are orphans).
const CLONE_GRACE: Duration = Duration::from_secs(10);

/// What a background task reports to the loop.
#[derive(Debug)]
enum Report {
    /// A request to host `host` for `asked` clones, sent at `at`, ended.
    Cloned {
        host: usize,
        asked: u32,
        at: Instant,
        result: Result<Vec<CloneInfo>, HostError>,
    },
    /// A kill ended.
    Killed {
        worker: WorkerId,
        result: Result<(), HostError>,
    },
    /// A check of host `host`, sent at `at`, ended.
    Checked {
        host: usize,
        at: Instant,
        result: Result<Listing, HostError>,
    },
}

/// What the scaler is set up with, besides the balancer and the hosts.
#[derive(Debug, Clone)]
pub struct ScalerConfig {
    /// The policy, swapped whole on a reload; the next tick uses the new one.
    pub policy: Arc<ArcSwap<Policy>>,
    /// The template every worker is cloned from (its name is the policy's `template`).
    pub template: Arc<TemplateSpec>,
    /// Overrides the policy's concurrency target as the balancer's per-worker limit.
    pub max_concurrency: Option<usize>,
}

/// The control loop. Build it with [`Scaler::new`], then [`Scaler::run`] it.
#[derive(Debug)]
pub struct Scaler<F, H> {
    config: ScalerConfig,
    /// The policy the last tick acted on, to notice a reload.
    applied: Arc<Policy>,
    front: F,
    hosts: Vec<HostState<H>>,
    fleet: Fleet<WorkerId>,
    state: State,
    started: Instant,
    last_check: Instant,
    last: Option<Decision>,
    reports: mpsc::UnboundedSender<Report>,
    inbox: mpsc::UnboundedReceiver<Report>,
    /// Hosts found while running (a DNS name that resolves to more daemons, say).
    new_hosts: mpsc::UnboundedSender<Host<H>>,
    new_hosts_inbox: mpsc::UnboundedReceiver<Host<H>>,
    /// The names of the hosts in use, for whoever finds new ones.
    host_names: Arc<ArcSwap<Vec<Arc<str>>>>,
    /// The names of the hosts in use that are up: the peers a new host gets a `vm`
    /// template's snapshot from.
    up_host_names: Arc<ArcSwap<Vec<Arc<str>>>>,
    status: Arc<ArcSwap<Status>>,
    metrics: Metrics,
    /// The last scale-up found no host to ask (logged once until that changes).
    starved: bool,
    /// The balancer's arrival count and queue depth at recent decisions.
    recent: Recent,
    /// When the last decision was made, tick or activation.
    last_decision: Option<Instant>,
    /// When a deferred activation is due (requests queued sooner than
    /// `ACTIVATION_INTERVAL` after the last decision).
    activate_at: Option<Instant>,
}

impl<F: Front, H: CloneHost> Scaler<F, H> {
    /// A scaler for the balancer `front`, cloning on `hosts` (each already has the template).
    pub fn new(config: ScalerConfig, front: F, hosts: Vec<Host<H>>) -> Self {
        let (reports, inbox) = mpsc::unbounded_channel();
        let (new_hosts, new_hosts_inbox) = mpsc::unbounded_channel();
        let host_names: Vec<Arc<str>> = hosts.iter().map(|h| Arc::clone(&h.name)).collect();
        let now = Instant::now();
        Self {
            applied: config.policy.load_full(),
            config,
            front,
            hosts: hosts.into_iter().map(HostState::new).collect(),
            fleet: Fleet::new(),
            state: State::default(),
            started: now,
            last_check: now,
            last: None,
            reports,
            inbox,
            new_hosts,
            new_hosts_inbox,
            up_host_names: Arc::new(ArcSwap::from_pointee(host_names.clone())),
            host_names: Arc::new(ArcSwap::from_pointee(host_names)),
            status: Arc::new(ArcSwap::from_pointee(Status::default())),
            metrics: Metrics::new(),
            starved: false,
            recent: Recent::new(),
            last_decision: None,
            activate_at: None,
        }
    }

    /// Where to send hosts found while the scaler runs; each joins at the next event. A host
    /// sent here must already have the template.
    pub fn host_sender(&self) -> mpsc::UnboundedSender<Host<H>> {
        self.new_hosts.clone()
    }

    /// The names of the hosts in use, kept current: a retired host leaves it, so the same
    /// address can be found and sent again.
    pub fn host_names(&self) -> Arc<ArcSwap<Vec<Arc<str>>>> {
        Arc::clone(&self.host_names)
    }

    /// The names of the hosts in use that are up, kept current: where a new host can get the
    /// template from.
    pub fn up_host_names(&self) -> Arc<ArcSwap<Vec<Arc<str>>>> {
        Arc::clone(&self.up_host_names)
    }

    /// The scaler's Prometheus metrics (a handle; it stays live while the scaler runs).
    pub fn metrics(&self) -> Metrics {
        self.metrics.clone()
    }

    /// The scaler's status, updated every tick.
    pub fn status(&self) -> Arc<ArcSwap<Status>> {
        Arc::clone(&self.status)
    }

    /// Runs until `shutdown`, then kills every clone it made (draining nothing: give the
    /// shutdown once the balancer has finished its requests). Returns the hosts it used that
    /// are up, those found while running included.
    pub async fn run(mut self, shutdown: Shutdown) -> Vec<Host<H>> {
        let mut period = self.applied.tick.get();
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let activation = self.front.activation();
        loop {
            let deferred = self.activate_at;
            tokio::select! {
                () = shutdown.wait() => break,
                () = activation.notified(), if deferred.is_none() => self.queued(Instant::now()),
                () = activation::until(deferred) => {
                    self.activate_at = None;
                    self.activate(Instant::now());
                }
                _ = tick.tick() => {
                    // The tick sees the queue too: a deferred activation would only repeat it.
                    self.activate_at = None;
                    self.tick(Instant::now());
                    if self.applied.tick.get() != period {
                        period = self.applied.tick.get();
                        tick = tokio::time::interval(period);
                        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    }
                }
                Some(report) = self.inbox.recv() => self.handle(report, Instant::now()),
                Some(host) = self.new_hosts_inbox.recv() => self.add_host(host),
            }
        }
        self.stop().await;
        // Hosts sent but not yet read have the template too; hand them back as well.
        while let Ok(host) = self.new_hosts_inbox.try_recv() {
            self.add_host(host);
        }
        self.hosts
            .into_iter()
            .filter(|h| h.up && !h.retired)
            .map(|h| h.host)
            .collect()
    }

    fn add_host(&mut self, host: Host<H>) {
        tracing::info!(host = %host.name, "forkd host joined");
        // A host retired earlier and found again takes its old place, so a name stays one
        // host (workers are known by their host's name).
        match self
            .hosts
            .iter_mut()
            .find(|h| h.retired && h.host.name == host.name)
        {
            Some(retired) => *retired = HostState::new(host),
            None => self.hosts.push(HostState::new(host)),
        }
        self.publish_hosts();
    }

    /// Publishes the names of the hosts in use (not retired), and of those of them that are
    /// up.
    fn publish_hosts(&self) {
        let in_use = self.hosts.iter().filter(|h| !h.retired);
        let names = in_use.clone().map(|h| Arc::clone(&h.host.name)).collect();
        self.host_names.store(Arc::new(names));
        let up = in_use.filter(|h| h.up).map(|h| Arc::clone(&h.host.name));
        self.up_host_names.store(Arc::new(up.collect()));
    }

    fn index_of(&self, host: &str) -> Option<usize> {
        self.hosts.iter().position(|h| &*h.host.name == host)
    }

    /// Time as the fleet and the decider count it: since the scaler was built.
    fn since_start(&self, now: Instant) -> Duration {
        now.duration_since(self.started)
    }

    fn in_flight(&self, worker: &WorkerId) -> usize {
        self.front.in_flight(worker).unwrap_or(0)
    }

    /// One decision and its actions.
    fn tick(&mut self, now: Instant) {
        self.apply_reload();
        let policy = Arc::clone(&self.applied);
        let observation = self.observe(now);
        let (decision, state) = decide(&policy, &observation, &self.state, self.since_start(now));
        self.state = state;
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
        match Plan::of(&decision, observation.workers) {
            Plan::Grow(count) => self.scale_up(count, &decision, now),
            Plan::Shrink(count) => self.scale_down(&policy, count, &decision, now),
            Plan::Hold => {}
        }
        self.finish_drains(now);
        self.publish(&policy, &observation, &decision);
        if now.duration_since(self.last_check) >= HOST_CHECK {
            self.last_check = now;
            self.check_hosts(now);
        }
    }

    /// Takes a reloaded policy in: the balancer is retuned if its windows or concurrency
    /// changed. A policy the balancer refuses (the reload checks for that first, so only a
    /// policy stored some other way gets here) is put back to the one in force: nothing of
    /// it applies.
    fn apply_reload(&mut self) {
        let policy = self.config.policy.load_full();
        if Arc::ptr_eq(&policy, &self.applied) {
            return;
        }
        let before = tuning(&self.applied, self.config.max_concurrency);
        let after = tuning(&policy, self.config.max_concurrency);
        if before != after {
            if let Err(e) = self.front.retune(after) {
                tracing::error!(
                    "policy {} refused: the balancer cannot take its windows or concurrency ({}); keeping policy {}",
                    policy.name,
                    lifecycle::ErrorChain(&e),
                    self.applied.name
                );
                self.config.policy.store(Arc::clone(&self.applied));
                return;
            }
            tracing::info!(
                stable = ?after.stable_window,
                panic = ?after.panic_window,
                concurrency = after.max_concurrency_per_worker,
                "policy reload: the balancer measures and admits by the new policy"
            );
        }
        self.applied = policy;
    }

    fn publish(&self, policy: &Policy, observation: &Observation, decision: &Decision) {
        let counts = self.fleet.counts();
        self.metrics
            .tick(policy, observation, decision, counts.pending);
        let up = self.hosts.iter().filter(|h| h.up && !h.retired).count();
        let down = self.hosts.iter().filter(|h| !h.up && !h.retired).count();
        self.metrics.hosts(up, down);
        self.status.store(Arc::new(Status {
            decision: Some(*decision),
            pending: counts.pending,
            draining: counts.draining,
        }));
    }

    /// Asks the hosts for `count` clones, as placement spreads them.
    fn scale_up(&mut self, count: u32, decision: &Decision, now: Instant) {
        let views: Vec<_> = self
            .hosts
            .iter()
            .map(|h| {
                let ours = self
                    .fleet
                    .iter()
                    .filter(|(w, _)| w.host() == &*h.host.name)
                    .count() as u32;
                h.view(now, ours)
            })
            .collect();
        let share = place(count, &views);
        if share.iter().sum::<u32>() < count {
            if !self.starved {
                self.starved = true;
                tracing::warn!(
                    "no forkd host can take another clone now (all down, full or resting after a refusal)"
                );
            }
        } else {
            self.starved = false;
        }
        let limit = Duration::from_millis(self.config.template.start_timeout_ms) + CLONE_GRACE;
        for (i, n) in share.into_iter().enumerate().filter(|(_, n)| *n > 0) {
            let host = &mut self.hosts[i];
            host.pending += n;
            self.fleet.asked(n);
            tracing::info!(host = %host.host.name, count = n, "cloning: {}", decision.reason);
            let client = host.host.client.clone();
            let template = self.config.template.name.clone();
            let reports = self.reports.clone();
            tokio::spawn(async move {
                let result = within(limit, client.clone_workers(&template, n)).await;
                let _ = reports.send(Report::Cloned {
                    host: i,
                    asked: n,
                    at: now,
                    result,
                });
            });
        }
    }

    /// Drains the `count` workers the fleet picks.
    fn scale_down(&mut self, policy: &Policy, count: u32, decision: &Decision, now: Instant) {
        let deadline = self.since_start(now) + policy.scale_down.drain_timeout.get();
        for worker in self.fleet.choose_drains(count, |w| self.in_flight(w)) {
            if let Err(e) = self.front.drain(&worker) {
                tracing::warn!(%worker, error = %e, "cannot drain");
                continue;
            }
            tracing::info!(%worker, "draining: {}", decision.reason);
            // Chosen among the ready ones just now: it can be drained.
            let _ = self.fleet.drain(&worker, deadline);
        }
    }

    /// Kills draining workers that are idle or out of time.
    fn finish_drains(&mut self, now: Instant) {
        let finished = self
            .fleet
            .finished_drains(self.since_start(now), |w| self.in_flight(w));
        for (worker, end) in finished {
            self.front.remove(&worker);
            let timed_out = end == DrainEnd::TimedOut;
            if timed_out {
                tracing::warn!(%worker, "drain timed out; killing the worker with requests in flight");
            }
            self.metrics.drained(timed_out);
            self.kill(&worker);
        }
    }

    /// Asks the worker's host to kill it; it leaves the fleet when that is done.
    fn kill(&mut self, worker: &WorkerId) {
        if !self.fleet.killing(worker) {
            return;
        }
        let Some(host) = self.index_of(worker.host()) else {
            self.fleet.gone(worker);
            return;
        };
        let client = self.hosts[host].host.client.clone();
        let reports = self.reports.clone();
        let worker = worker.clone();
        tokio::spawn(async move {
            let result = client.kill(worker.id()).await;
            let _ = reports.send(Report::Killed { worker, result });
        });
    }

    fn handle(&mut self, report: Report, now: Instant) {
        match report {
            Report::Cloned {
                host,
                asked,
                at,
                result,
            } => self.cloned(host, asked, at, result, now),
            Report::Killed { worker, result } => {
                if let Err(e) = result {
                    tracing::warn!(%worker, error = %e, "kill failed");
                }
                self.fleet.gone(&worker);
            }
            Report::Checked { host, at, result } => {
                self.hosts[host].checking = false;
                if self.hosts[host].retired {
                    return;
                }
                self.metrics.checked(result.is_ok());
                match result {
                    Ok(listing) => self.checked(host, at, &listing),
                    Err(e) => {
                        if self.hosts[host].up {
                            tracing::warn!(host = %self.hosts[host].host.name, error = %e, "forkd host stopped answering; its workers leave the pool");
                        }
                        self.host_down(host, now);
                    }
                }
            }
        }
    }

    /// A clone request ended: the clones that came join the pool.
    fn cloned(
        &mut self,
        host: usize,
        asked: u32,
        at: Instant,
        result: Result<Vec<CloneInfo>, HostError>,
        now: Instant,
    ) {
        let state = &mut self.hosts[host];
        state.pending = state.pending.saturating_sub(asked);
        self.fleet.answered(asked);
        let name = Arc::clone(&state.host.name);
        match result {
            Ok(clones) => {
                self.hosts[host].batch_limit = None;
                let took = now.duration_since(at);
                let answered = clones.len() as u32;
                for clone in clones {
                    let worker = WorkerId::new(Arc::clone(&name), clone.id.as_str());
                    match clone.state {
                        CloneState::Ready | CloneState::Starting => {
                            if self.join(worker, &clone, now) {
                                self.metrics.joined(clone.driver, took);
                            } else {
                                self.metrics.failed(1);
                            }
                        }
                        _ => {
                            self.metrics.failed(1);
                            tracing::warn!(%worker, error = clone.error.as_deref().unwrap_or("?"), "clone failed");
                        }
                    }
                }
                self.metrics.failed(asked.saturating_sub(answered));
            }
            Err(HostError::NoTemplate(e)) => {
                self.metrics.failed(asked);
                tracing::warn!(host = %name, error = %e, "the host lost the template; marking it down until a check creates it again");
                self.host_down(host, now);
            }
            Err(HostError::Full(e)) => {
                self.metrics.refused(asked);
                tracing::info!(host = %name, asked, error = %e, "forkd host has no room for that many; asking for fewer, and the others meanwhile");
                let state = &mut self.hosts[host];
                state.batch_limit = Some((asked / 2).max(1));
                if asked == 1 {
                    state.rest_until = Some(now + HOST_CHECK);
                }
            }
            Err(HostError::Warming(e)) => {
                // Its template is coming back (forkd starts a dead one again): ask again
                // soon, since its clones are likely what the pool lost.
                self.metrics.refused(asked);
                tracing::debug!(host = %name, error = %e, "the host's template is warming up; asking again shortly");
                self.hosts[host].rest_until = Some(now + WARMING_RETRY);
            }
            Err(e) => {
                // Not every tick: a broken app would be started ten times a second. A host
                // that is gone fails its next check.
                self.metrics.failed(asked);
                tracing::warn!(host = %name, error = %e, "clone request failed; asking the others for a while");
                self.hosts[host].rest_until = Some(now + HOST_CHECK);
            }
        }
    }

    /// Adds a new clone to the pool; returns whether it joined (if not, it is killed).
    fn join(&mut self, worker: WorkerId, clone: &CloneInfo, now: Instant) -> bool {
        if self
            .fleet
            .joined(worker.clone(), self.since_start(now))
            .is_err()
        {
            tracing::error!(%worker, "a host reported a clone id twice; ignoring the second");
            return false;
        }
        match self.front.add(&worker, clone.addr) {
            Ok(()) => {
                tracing::info!(%worker, addr = %clone.addr, "joined the pool");
                true
            }
            Err(e) => {
                tracing::warn!(%worker, error = %e, "cannot add to the pool; killing it");
                self.kill(&worker);
                false
            }
        }
    }

    /// Kills every clone this scaler made, waiting for each.
    async fn stop(&mut self) {
        let mut kills = tokio::task::JoinSet::new();
        for worker in self.fleet.clear() {
            self.front.remove(&worker);
            if let Some(host) = self.index_of(worker.host()) {
                let client = self.hosts[host].host.client.clone();
                // A host that went away does not hold up the shutdown.
                kills.spawn(async move { within(KILL_LIMIT, client.kill(worker.id())).await });
            }
        }
        while kills.join_next().await.is_some() {}
    }
}

mod activation;
mod checks;
#[cfg(test)]
mod tests;
