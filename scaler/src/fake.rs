//! Fakes of the balancer and of forkd hosts for the scaler's own tests: in memory, driven by
//! the test, and told what to do when asked (grant, refuse, hang, die). The real parts are
//! exercised by the end-to-end tests; these let a test step tokio's paused clock through
//! one scenario at a time, as Knative's autoscaler tests do.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use balancer::{PoolError, Signals, WindowSignals, WorkerId};
use forkd::{CloneInfo, CloneState, Driver, TemplateInfo, TemplateSpec};

use balancer::{Tuning, TuningError};

use crate::front::{Front, WorkerPool};
use crate::host::{CloneHost, HostError, Listing};

/// A worker in the fake balancer's pool.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct PoolEntry {
    pub(crate) addr: SocketAddr,
    pub(crate) draining: bool,
    pub(crate) in_flight: usize,
}

#[derive(Debug, Default)]
pub(crate) struct FrontState {
    pub(crate) pool: BTreeMap<WorkerId, PoolEntry>,
    /// The demand both windows report: requests in flight plus queued, on average.
    pub(crate) demand: f64,
    /// Every retune asked for.
    pub(crate) retunes: Vec<Tuning>,
    /// Refuse every retune, as a balancer whose tick a policy's windows do not fit would.
    pub(crate) refuse_retunes: bool,
    /// The most ready (not draining) workers the pool ever held at once.
    pub(crate) peak_ready: usize,
    /// Requests in flight and queued now, as the balancer would report them.
    pub(crate) in_flight: usize,
    pub(crate) queued: usize,
    /// What the balancer notifies when a request queues.
    pub(crate) activation: Arc<tokio::sync::Notify>,
}

/// The balancer, faked: a pool and a demand the test sets.
#[derive(Debug, Clone, Default)]
pub(crate) struct FakeFront(Arc<Mutex<FrontState>>);

impl FakeFront {
    pub(crate) fn state(&self) -> MutexGuard<'_, FrontState> {
        self.0.lock().unwrap()
    }

    /// Ready (not draining) workers in the pool.
    pub(crate) fn ready(&self) -> usize {
        self.state().pool.values().filter(|e| !e.draining).count()
    }

    pub(crate) fn set_demand(&self, demand: f64) {
        self.state().demand = demand;
    }
}

impl WorkerPool for FakeFront {
    fn add(&self, id: &WorkerId, addr: SocketAddr) -> Result<(), PoolError> {
        let mut state = self.state();
        if state.pool.contains_key(id) {
            return Err(PoolError::Duplicate(id.clone()));
        }
        state.pool.insert(
            id.clone(),
            PoolEntry {
                addr,
                draining: false,
                in_flight: 0,
            },
        );
        let ready = state.pool.values().filter(|e| !e.draining).count();
        state.peak_ready = state.peak_ready.max(ready);
        Ok(())
    }

    fn drain(&self, id: &WorkerId) -> Result<(), PoolError> {
        let mut state = self.state();
        let entry = state
            .pool
            .get_mut(id)
            .ok_or_else(|| PoolError::Unknown(id.clone()))?;
        entry.draining = true;
        Ok(())
    }

    fn remove(&self, id: &WorkerId) {
        self.state().pool.remove(id);
    }

    fn in_flight(&self, id: &WorkerId) -> Option<usize> {
        self.state().pool.get(id).map(|e| e.in_flight)
    }
}

impl Front for FakeFront {
    fn signals(&self) -> Signals {
        let state = self.state();
        let window = WindowSignals {
            requests: 100,
            request_rate: 100.0,
            mean_in_flight: state.demand,
            ..WindowSignals::default()
        };
        let mut signals = Signals {
            stable: window.clone(),
            panic: window,
            in_flight: state.in_flight,
            queue_depth: state.queued,
            ..Signals::default()
        };
        for entry in state.pool.values() {
            if entry.draining {
                signals.workers.draining += 1;
            } else {
                signals.workers.ready += 1;
            }
        }
        signals
    }

    fn retune(&self, tuning: Tuning) -> Result<(), TuningError> {
        let mut state = self.state();
        if state.refuse_retunes {
            return Err(TuningError::Invalid(balancer::ConfigError::Zero(
                "max_concurrency_per_worker",
            )));
        }
        state.retunes.push(tuning);
        Ok(())
    }

    fn activation(&self) -> Arc<tokio::sync::Notify> {
        Arc::clone(&self.state().activation)
    }
}

/// What a fake host does when asked for clones.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum OnClone {
    /// Makes them, within its clone limit (refusing a batch that does not fit).
    Grant,
    /// Never answers.
    Hang,
    /// Answers that every clone failed.
    Fail,
}

#[derive(Debug)]
pub(crate) struct HostSim {
    pub(crate) on_clone: OnClone,
    /// Answers nothing at all (a dead daemon or a cut network).
    pub(crate) dead: bool,
    pub(crate) max_clones: Option<usize>,
    pub(crate) templates: Vec<TemplateSpec>,
    pub(crate) clones: BTreeMap<u64, CloneInfo>,
    next_id: u64,
    /// Clone ids killed, in order.
    pub(crate) killed: Vec<String>,
    /// Clone requests answered, and how many each asked for.
    pub(crate) asked: Vec<u32>,
    /// Peers whose snapshot this host can get (a template created with another `source`
    /// fails, as with a peer that does not answer).
    pub(crate) seedable_from: Vec<String>,
    /// Every `source` a template was asked to be made from, in order, and whether it was.
    pub(crate) seed_tries: Vec<(String, bool)>,
}

/// A forkd host, faked.
#[derive(Debug, Clone)]
pub(crate) struct FakeHost(Arc<Mutex<HostSim>>);

impl FakeHost {
    pub(crate) fn new(on_clone: OnClone, max_clones: Option<usize>) -> Self {
        Self(Arc::new(Mutex::new(HostSim {
            on_clone,
            dead: false,
            max_clones,
            templates: Vec::new(),
            clones: BTreeMap::new(),
            next_id: 1,
            killed: Vec::new(),
            asked: Vec::new(),
            seedable_from: Vec::new(),
            seed_tries: Vec::new(),
        })))
    }

    pub(crate) fn sim(&self) -> MutexGuard<'_, HostSim> {
        self.0.lock().unwrap()
    }

    /// Live clones on this host.
    pub(crate) fn live(&self) -> usize {
        self.sim()
            .clones
            .values()
            .filter(|c| c.state == CloneState::Ready)
            .count()
    }

    /// Adds a running clone of `template` that no one asked this scaler for.
    pub(crate) fn plant(&self, template: &str) -> String {
        let mut sim = self.sim();
        let info = sim.new_clone(template);
        info.id
    }
}

impl HostSim {
    fn new_clone(&mut self, template: &str) -> CloneInfo {
        let n = self.next_id;
        self.next_id += 1;
        let info = CloneInfo {
            id: format!("{template}-{n}"),
            template: template.to_owned(),
            driver: Driver::Fork,
            addr: SocketAddr::from(([127, 0, 0, 1], 20_000 + n as u16)),
            pid: None,
            state: CloneState::Ready,
            ready: true,
            exit: None,
            error: None,
        };
        self.clones.insert(n, info.clone());
        info
    }

    fn answer(&self) -> Result<(), HostError> {
        if self.dead {
            Err(HostError::Unreachable("connection refused".into()))
        } else {
            Ok(())
        }
    }
}

impl CloneHost for FakeHost {
    async fn create_template(&self, spec: &TemplateSpec) -> Result<(), HostError> {
        let mut sim = self.sim();
        sim.answer()?;
        if sim.templates.iter().any(|t| t.name == spec.name) {
            return Err(HostError::Exists(spec.name.clone()));
        }
        if let Some(source) = &spec.source {
            let seedable = sim.seedable_from.contains(&source.url);
            sim.seed_tries.push((source.url.clone(), seedable));
            if !seedable {
                return Err(HostError::Failed(format!("{} did not answer", source.url)));
            }
        }
        // Kept without its source, as forkd keeps it.
        sim.templates.push(TemplateSpec {
            source: None,
            ..spec.clone()
        });
        Ok(())
    }

    async fn templates(&self) -> Result<Vec<TemplateInfo>, HostError> {
        let sim = self.sim();
        sim.answer()?;
        Ok(sim
            .templates
            .iter()
            .map(|spec| TemplateInfo {
                spec: spec.clone(),
                pid: None,
                alive: true,
                clones: 0,
                seeded_from: None,
            })
            .collect())
    }

    async fn delete_template(&self, name: &str) -> Result<(), HostError> {
        let mut sim = self.sim();
        sim.answer()?;
        sim.templates.retain(|t| t.name != name);
        Ok(())
    }

    async fn clone_workers(&self, template: &str, count: u32) -> Result<Vec<CloneInfo>, HostError> {
        let on_clone = {
            let mut sim = self.sim();
            sim.answer()?;
            if !sim.templates.iter().any(|t| t.name == template) {
                return Err(HostError::NoTemplate(template.to_owned()));
            }
            sim.asked.push(count);
            sim.on_clone.clone()
        };
        match on_clone {
            OnClone::Hang => std::future::pending().await,
            OnClone::Fail => Err(HostError::Failed("the app exited at once".into())),
            OnClone::Grant => {
                let mut sim = self.sim();
                let live = sim
                    .clones
                    .values()
                    .filter(|c| c.state == CloneState::Ready)
                    .count();
                if sim
                    .max_clones
                    .is_some_and(|max| live + count as usize > max)
                {
                    return Err(HostError::Full(format!("{live} live")));
                }
                Ok((0..count).map(|_| sim.new_clone(template)).collect())
            }
        }
    }

    async fn kill(&self, clone: &str) -> Result<(), HostError> {
        let mut sim = self.sim();
        sim.answer()?;
        sim.clones.retain(|_, c| c.id != clone);
        sim.killed.push(clone.to_owned());
        Ok(())
    }

    async fn list(&self) -> Result<Listing, HostError> {
        let sim = self.sim();
        sim.answer()?;
        Ok(Listing {
            clones: sim.clones.values().cloned().collect(),
            max_clones: sim.max_clones,
        })
    }
}
