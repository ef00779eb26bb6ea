//! Clones: reserving capacity, starting clones through their template's driver, recording
//! how each start went and how each clone ends, and killing them.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use tokio::sync::watch;
use tokio::task::JoinSet;

use super::templates::{Template, TemplateSlot};
use super::{Daemon, live};
use crate::api::{CloneInfo, CloneList, CloneState, ExitStatus};
use crate::driver::{CloneHandle, Placement, StartCloneError, Started};
use crate::error::{CloneFailure, CreateClonesError, KillError};

/// Every clone the daemon tracks, by id, behind one lock.
#[derive(Default)]
pub(super) struct Clones {
    pub(super) records: HashMap<String, CloneRecord>,
    /// Set by shutdown: no slot is reserved any more.
    pub(super) closing: bool,
}

pub(super) struct CloneRecord {
    pub(super) info: CloneInfo,
    /// How to kill it and learn of its end, once it started.
    handle: Option<Arc<CloneHandle>>,
    /// While it starts: turns true (or closes) once it has started or failed.
    started: Option<watch::Receiver<bool>>,
}

/// One slot of capacity reserved for a clone that has no record yet; dropping it gives the
/// slot back.
pub(super) struct Slot {
    daemon: Arc<Daemon>,
    held: bool,
}

impl Slot {
    /// Turns the slot into `record`, under the clone map's lock.
    fn fill(mut self, clones: &mut Clones, record: CloneRecord) {
        clones.records.insert(record.info.id.clone(), record);
        self.held = false;
        self.daemon.reserved.fetch_sub(1, Ordering::AcqRel);
        self.daemon.released.notify_waiters();
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.held {
            self.daemon.reserved.fetch_sub(1, Ordering::AcqRel);
            self.daemon.released.notify_waiters();
        }
    }
}

/// How a clone being started is accounted for.
pub(super) enum Claim {
    /// Listed as `starting` under `id`; `started` is told once it has started or failed.
    Listed {
        id: String,
        addr: SocketAddr,
        started: watch::Sender<bool>,
    },
    /// Not listed until it starts (a `vm` clone, whose id comes from its QEMU).
    Reserved(Slot),
}

impl Daemon {
    pub(super) async fn kill_all(self: &Arc<Self>, ids: Vec<String>) {
        let mut kills = JoinSet::new();
        for id in ids {
            let daemon = self.clone();
            kills.spawn(async move { daemon.kill_when_started(&id).await });
        }
        while kills.join_next().await.is_some() {}
    }

    /// Kills a clone, first waiting for it to finish starting if it is.
    pub(super) async fn kill_when_started(&self, id: &str) {
        let started = self
            .clones()
            .records
            .get(id)
            .and_then(|r| r.started.clone());
        if let Some(mut started) = started {
            // An error means the start task is gone, which also means it is over.
            let _ = started.wait_for(|started| *started).await;
        }
        // Not found: it failed to start, or was killed meanwhile. Either way it is gone.
        let _ = self.kill(id).await;
    }

    pub(crate) async fn create_clones(
        self: &Arc<Self>,
        name: &str,
        count: usize,
    ) -> Result<CloneList, CreateClonesError> {
        let requested = Instant::now();
        let max = self.config.max_clones;
        if count == 0 || count > max {
            return Err(CreateClonesError::InvalidCount { count, max });
        }
        let template = match self.templates().map.get(name) {
            Some(TemplateSlot::Ready(template)) => template.clone(),
            Some(TemplateSlot::Warming(_)) => {
                return Err(CreateClonesError::TemplateWarming(name.to_owned()));
            }
            None => return Err(CreateClonesError::TemplateNotFound(name.to_owned())),
        };
        if !template.kind.alive() {
            return Err(CreateClonesError::TemplateDead(name.to_owned()));
        }
        let slots = self.reserve(&template, count)?;
        // Where each clone will serve; if a socket cannot be bound, the slots are given back.
        let placements = (0..count)
            .map(|_| {
                template
                    .kind
                    .place_clone(self.config.clone_ip, || self.ids.clone_id(name))
            })
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(CreateClonesError::Bind)?;
        let claims = self.list_starting(&template, &placements, slots)?;

        let mut starts = JoinSet::new();
        for (index, (placement, claim)) in placements.into_iter().zip(claims).enumerate() {
            let daemon = self.clone();
            let template = template.clone();
            starts.spawn(async move {
                let started = template.kind.start_clone(&template.spec, placement).await;
                let outcome = daemon.settle(&template, claim, started, requested).await;
                (index, outcome)
            });
        }
        let mut outcomes = Vec::with_capacity(count);
        while let Some(joined) = starts.join_next().await {
            // A start task panicking is a bug; its slot was given back as it unwound, or its
            // record stays `starting`, visible.
            if let Ok(outcome) = joined {
                outcomes.push(outcome);
            }
        }
        outcomes.sort_by_key(|(index, _)| *index);
        let mut clones = Vec::with_capacity(count);
        let mut first_failure = None;
        for (_, (info, failure)) in outcomes {
            first_failure = first_failure.or(failure);
            clones.push(info);
        }
        if clones.iter().all(|c| c.state == CloneState::Failed)
            && let Some(first) = first_failure
        {
            return Err(CreateClonesError::AllFailed { count, first });
        }
        Ok(CloneList {
            clones,
            max_clones: max,
        })
    }

    /// Reserves `count` slots for clones of `template`, or says why not.
    pub(super) fn reserve(
        self: &Arc<Self>,
        template: &Template,
        count: usize,
    ) -> Result<Vec<Slot>, CreateClonesError> {
        let clones = self.clones();
        if clones.closing {
            return Err(CreateClonesError::ShuttingDown);
        }
        if template.retired.load(Ordering::Acquire) {
            return Err(CreateClonesError::TemplateNotFound(
                template.spec.name.clone(),
            ));
        }
        let max = self.config.max_clones;
        let live_records = clones
            .records
            .values()
            .filter(|r| live(r.info.state))
            .count();
        let used = live_records + self.reserved.load(Ordering::Acquire);
        if used + count > max {
            return Err(CreateClonesError::NoCapacity { count, used, max });
        }
        self.reserved.fetch_add(count, Ordering::AcqRel);
        drop(clones);
        Ok((0..count)
            .map(|_| Slot {
                daemon: self.clone(),
                held: true,
            })
            .collect())
    }

    /// Lists each clone whose id and address are known already as `starting`, filling its
    /// slot; the others keep their slots until they start. Refused (and every slot given
    /// back) if the template was deleted or shutdown began since the slots were reserved.
    pub(super) fn list_starting(
        &self,
        template: &Template,
        placements: &[Placement],
        slots: Vec<Slot>,
    ) -> Result<Vec<Claim>, CreateClonesError> {
        let mut clones = self.clones();
        if clones.closing {
            return Err(CreateClonesError::ShuttingDown);
        }
        if template.retired.load(Ordering::Acquire) {
            return Err(CreateClonesError::TemplateNotFound(
                template.spec.name.clone(),
            ));
        }
        let mut claims = Vec::with_capacity(slots.len());
        for (placement, slot) in placements.iter().zip(slots) {
            let Some((id, addr)) = placement.known() else {
                claims.push(Claim::Reserved(slot));
                continue;
            };
            let (started, waiting) = watch::channel(false);
            let record = CloneRecord {
                info: clone_info(template, id, addr, CloneState::Starting),
                handle: None,
                started: Some(waiting),
            };
            slot.fill(&mut clones, record);
            claims.push(Claim::Listed {
                id: id.to_owned(),
                addr,
                started,
            });
        }
        self.update_live_gauge(&clones);
        Ok(claims)
    }

    /// Records how one clone's start went, and starts watching it if it started.
    pub(super) async fn settle(
        self: &Arc<Self>,
        template: &Template,
        claim: Claim,
        started: Result<Started, StartCloneError>,
        requested: Instant,
    ) -> (CloneInfo, Option<CloneFailure>) {
        let driver = template.spec.driver;
        let Started { id, addr, handle } = match started {
            Ok(started) => started,
            Err(error) => {
                let (id, addr) = match &claim {
                    Claim::Listed { id, addr, .. } => {
                        let mut clones = self.clones();
                        clones.records.remove(id);
                        self.update_live_gauge(&clones);
                        (id.clone(), *addr)
                    }
                    // It never had an id or an address of its own.
                    Claim::Reserved(_) => (
                        template.spec.name.clone(),
                        SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
                    ),
                };
                // A reserved slot is given back here, outside the lock.
                drop(claim);
                return self.failed(template, &id, addr, CloneFailure::Start(error));
            }
        };
        let handle = Arc::new(handle);
        let info = CloneInfo {
            pid: handle.pid(),
            ..clone_info(template, &id, addr, CloneState::Ready)
        };
        let refused = {
            let mut clones = self.clones();
            let refused = match claim {
                Claim::Listed { started, .. } => {
                    // Only this task removes a `starting` record, so it is there.
                    if let Some(record) = clones.records.get_mut(&id) {
                        record.info = info.clone();
                        record.handle = Some(handle.clone());
                        record.started = None;
                    }
                    started.send_replace(true);
                    None
                }
                Claim::Reserved(slot) if clones.closing => Some((slot, CloneFailure::ShuttingDown)),
                Claim::Reserved(slot) if template.retired.load(Ordering::Acquire) => {
                    Some((slot, CloneFailure::TemplateDeleted))
                }
                Claim::Reserved(slot) => {
                    let record = CloneRecord {
                        info: info.clone(),
                        handle: Some(handle.clone()),
                        started: None,
                    };
                    slot.fill(&mut clones, record);
                    None
                }
            };
            self.update_live_gauge(&clones);
            refused
        };
        if let Some((slot, failure)) = refused {
            // Nobody would kill it later: it goes now, then its slot.
            handle.kill(self.config.kill_grace).await;
            drop(slot);
            return self.failed(template, &id, addr, failure);
        }
        self.watch_exit(id, handle);
        self.metrics
            .clone_duration
            .with_label_values(&[driver.as_str()])
            .observe(requested.elapsed().as_secs_f64());
        self.metrics
            .clones
            .with_label_values(&[driver.as_str(), "ready"])
            .inc();
        (info, None)
    }

    /// Counts and logs a clone that failed, and describes it.
    fn failed(
        &self,
        template: &Template,
        id: &str,
        addr: SocketAddr,
        failure: CloneFailure,
    ) -> (CloneInfo, Option<CloneFailure>) {
        let reason = crate::error::message(&failure);
        tracing::warn!(clone = %id, %reason, "clone failed");
        self.metrics
            .clones
            .with_label_values(&[template.spec.driver.as_str(), "failed"])
            .inc();
        let info = CloneInfo {
            error: Some(reason),
            ..clone_info(template, id, addr, CloneState::Failed)
        };
        (info, Some(failure))
    }

    /// Waits in a task of its own for the clone to end, and records it when it does.
    fn watch_exit(self: &Arc<Self>, id: String, handle: Arc<CloneHandle>) {
        let daemon = Arc::downgrade(self);
        tokio::spawn(async move {
            let status = handle.ended().await;
            if let Some(daemon) = daemon.upgrade() {
                daemon.clone_gone(&id, status);
            }
        });
    }

    /// Records that a clone ended on its own (one being killed is forgotten by the kill).
    fn clone_gone(&self, id: &str, status: ExitStatus) {
        let mut clones = self.clones();
        let Some(record) = clones.records.get_mut(id) else {
            return;
        };
        if !matches!(record.info.state, CloneState::Starting | CloneState::Ready) {
            return;
        }
        record.info.state = CloneState::Exited;
        record.info.ready = false;
        record.info.exit = Some(status);
        let cause = match status {
            ExitStatus::Code(0) => "exited",
            _ => "crashed",
        };
        tracing::warn!(clone = %id, exit = ?status, "clone exited on its own");
        self.metrics
            .exits
            .with_label_values(&[record.info.driver.as_str(), cause])
            .inc();
        self.update_live_gauge(&clones);
    }

    pub(crate) fn clone_list(&self) -> CloneList {
        let mut clones: Vec<CloneInfo> = self
            .clones()
            .records
            .values()
            .map(|r| r.info.clone())
            .collect();
        clones.sort_by(|a, b| {
            a.template
                .cmp(&b.template)
                .then(id_number(&a.id).cmp(&id_number(&b.id)))
        });
        CloneList {
            clones,
            max_clones: self.config.max_clones,
        }
    }

    /// Kills a clone (see [`CloneHandle::kill`]) and forgets it. A clone that already
    /// exited is just forgotten.
    pub(crate) async fn kill(&self, id: &str) -> Result<(), KillError> {
        let (handle, driver) = {
            let mut clones = self.clones();
            let record = clones
                .records
                .get_mut(id)
                .ok_or_else(|| KillError::NotFound(id.to_owned()))?;
            match record.info.state {
                CloneState::Starting => return Err(KillError::Starting(id.to_owned())),
                CloneState::Exited | CloneState::Failed => {
                    clones.records.remove(id);
                    return Ok(());
                }
                CloneState::Ready | CloneState::Stopping => {}
            }
            record.info.state = CloneState::Stopping;
            record.info.ready = false;
            (record.handle.clone(), record.info.driver)
        };
        if let Some(handle) = handle {
            handle.kill(self.config.kill_grace).await;
        }
        let mut clones = self.clones();
        if clones.records.remove(id).is_some() {
            self.metrics
                .exits
                .with_label_values(&[driver.as_str(), "killed"])
                .inc();
        }
        self.update_live_gauge(&clones);
        Ok(())
    }
}

/// A clone of `template` as the API reports it, in `state`, before anything else is known.
fn clone_info(template: &Template, id: &str, addr: SocketAddr, state: CloneState) -> CloneInfo {
    CloneInfo {
        id: id.to_owned(),
        template: template.spec.name.clone(),
        driver: template.spec.driver,
        addr,
        pid: None,
        state,
        ready: state == CloneState::Ready,
        exit: None,
        error: None,
    }
}

fn id_number(id: &str) -> u64 {
    id.rsplit('-')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}
