//! The daemon's state: templates and their clones, and every operation the API offers on
//! them — the maps, validation and bookkeeping. HTTP lives in [`crate::server`]; starting,
//! killing and watching processes in [`crate::driver`].
//!
//! Every clone has one record in one map. Capacity is reserved before any work starts: a
//! clone request takes its slots under the clone map's lock, so that live clones plus
//! reserved slots never exceed `max_clones`, whatever the driver and however many requests
//! run at once. A `spawn` or `fork` slot becomes a `starting` record as soon as the clone's id
//! and socket are known; a `vm` slot when the pool hands out its clone (its id comes from its
//! QEMU). A slot whose clone fails is given back, by being dropped, so a start task that
//! panics gives its slot back too.
//!
//! Nothing here polls. A task per clone waits for its driver to say how it ended; a kill that
//! must wait for a clone to finish starting waits on the record's `started` watch; shutdown
//! waits for warming templates and reserved slots to settle the same way.
//!
//! [`templates`] holds the template operations, [`clones`] the clone operations; here are
//! the daemon itself and its shutdown.

mod clones;
mod revive;
mod templates;
#[cfg(test)]
mod tests;

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::{Notify, watch};

use crate::api::{CloneState, Driver};
use crate::config::Config;
use crate::driver::Ids;
use crate::metrics::Metrics;
use clones::Clones;
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) use templates::validate;
use templates::{TemplateSlot, Templates};

/// The daemon: configuration, templates, clones and metrics.
pub(crate) struct Daemon {
    pub(crate) config: Config,
    pub(crate) metrics: Metrics,
    ids: Ids,
    templates: Mutex<Templates>,
    clones: Mutex<Clones>,
    /// Slots held by clone requests for clones that have no record yet. Raised only under
    /// the clone map's lock, after the capacity check; lowered without it (a lower count
    /// only ever frees room), so a slot can be given back from anywhere, even a `Drop`.
    reserved: AtomicUsize,
    /// Told whenever a slot is given back or filled: shutdown waits for none to be left.
    released: Notify,
    /// forkd's lifeline (read end, write end): `fork` templates inherit the read end, and
    /// their clones die when it closes, that is with this daemon, not with their template.
    /// `None` if the pipe could not be made: clones then die with their template.
    lifeline: Option<(OwnedFd, OwnedFd)>,
    /// Snapshots being sent to peers: each reads and compresses the whole guest RAM, so only
    /// [`crate::driver::seed::MAX_EXPORTS`] at once; a peer asking for more is told to try
    /// another (or later).
    pub(crate) exports: Arc<tokio::sync::Semaphore>,
}

fn live(state: CloneState) -> bool {
    matches!(
        state,
        CloneState::Starting | CloneState::Ready | CloneState::Stopping
    )
}

impl Daemon {
    pub(crate) fn new(config: Config) -> Arc<Daemon> {
        Arc::new(Daemon {
            config,
            metrics: Metrics::new(),
            ids: Ids::default(),
            templates: Mutex::default(),
            clones: Mutex::default(),
            reserved: AtomicUsize::new(0),
            released: Notify::new(),
            exports: Arc::new(tokio::sync::Semaphore::new(
                crate::driver::seed::MAX_EXPORTS,
            )),
            lifeline: kernel::pipe()
                .inspect_err(|error| {
                    tracing::warn!(%error, "no lifeline pipe: clones will die with their template");
                })
                .ok(),
        })
    }

    /// The lifeline's read end, for a template to inherit.
    fn lifeline(&self) -> Option<BorrowedFd<'_>> {
        self.lifeline.as_ref().map(|(read, _)| read.as_fd())
    }

    fn templates(&self) -> MutexGuard<'_, Templates> {
        // As for `clones`: every update is a single insert, remove or flag.
        self.templates
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn clones(&self) -> MutexGuard<'_, Clones> {
        // A panic while holding this lock would be a bug; the map itself stays consistent
        // (every update is a single insert, remove or field write), so keep going.
        self.clones.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Recounts live clones per driver into the gauge. Call with the clone map locked.
    fn update_live_gauge(&self, clones: &Clones) {
        for driver in [Driver::Spawn, Driver::Fork, Driver::Vm] {
            let count = clones
                .records
                .values()
                .filter(|r| r.info.driver == driver && live(r.info.state))
                .count();
            self.metrics
                .live
                .with_label_values(&[driver.as_str()])
                .set(count as i64);
        }
    }

    /// What SIGTERM does to the daemon: nothing new starts; what is starting finishes (a
    /// template warming up stops itself, a reserved `vm` clone gets its record or is
    /// killed); then every clone is killed and every template stopped.
    pub(crate) async fn shut_down(self: &Arc<Self>) {
        let warming: Vec<watch::Receiver<()>> = {
            let mut templates = self.templates();
            templates.closing = true;
            let slots = templates.map.values();
            slots.filter_map(TemplateSlot::warming).cloned().collect()
        };
        self.clones().closing = true;
        for mut done in warming {
            // Nothing is ever sent: the watch closes when the warming request is done.
            let _ = done.changed().await;
        }
        loop {
            // Made before looking, so a slot given back in between still wakes us.
            let released = self.released.notified();
            if self.reserved.load(Ordering::Acquire) == 0 {
                break;
            }
            released.await;
        }
        let ids: Vec<String> = self.clones().records.keys().cloned().collect();
        self.kill_all(ids).await;
        for template in self.ready_templates() {
            let _ = self.delete_template(&template.spec.name).await;
        }
    }
}
