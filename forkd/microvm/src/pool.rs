//! A pool of QEMU processes started ahead of time, so that launching QEMU and opening its
//! monitor happen in the background and a clone's critical path is only restore and resume
//! ([`PoolMode::Waiting`]), or only resume ([`PoolMode::Restored`]: the state is loaded and
//! the guest has answered once, then paused). The pool is refilled as clones are taken.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::sync::{Mutex, Notify};

use crate::clone::{CloneError, Standby, VmClone};
use crate::template::Template;

/// How far a standby QEMU is taken before a clone asks for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolMode {
    /// Started and waiting for the template's state.
    Waiting,
    /// The state loaded, the guest run until it answered once, then paused.
    Restored,
}

/// Standby QEMUs for one template.
#[derive(Debug)]
pub struct Pool {
    template: Arc<Template>,
    size: usize,
    mode: PoolMode,
    standby: Mutex<VecDeque<Standby>>,
    wake: Notify,
    stopping: AtomicBool,
    ids: IdSource,
    /// The refill task, until [`Pool::shutdown`] waits for it.
    refill: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// Where clone ids come from.
struct IdSource(Box<dyn Fn() -> String + Send + Sync>);

impl std::fmt::Debug for IdSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IdSource")
    }
}

/// Clone ids `prefix1`, `prefix2`, …: an id source for [`Pool::start`] where nothing else
/// names the clones (a benchmark, a test).
pub fn numbered_ids(prefix: &'static str) -> impl Fn() -> String + Send + Sync + 'static {
    let next = AtomicU64::new(1);
    move || format!("{prefix}{}", next.fetch_add(1, Ordering::Relaxed))
}

impl Pool {
    /// Starts a pool keeping `size` standby QEMUs for `template`; each is launched for the
    /// clone id `ids` returns (the guest learns it then). The refill task runs until
    /// [`Pool::shutdown`].
    pub fn start(
        template: Arc<Template>,
        size: usize,
        mode: PoolMode,
        ids: impl Fn() -> String + Send + Sync + 'static,
    ) -> Arc<Self> {
        Self::start_with(template, size, mode, ids, Vec::new())
    }

    /// [`Pool::start`], with standby QEMUs of `template` made already (such as one restored
    /// to show that a template works) as the first ones handed out.
    pub fn start_with(
        template: Arc<Template>,
        size: usize,
        mode: PoolMode,
        ids: impl Fn() -> String + Send + Sync + 'static,
        ready: Vec<Standby>,
    ) -> Arc<Self> {
        let pool = Arc::new(Self {
            template,
            size,
            mode,
            standby: Mutex::new(ready.into()),
            wake: Notify::new(),
            stopping: AtomicBool::new(false),
            ids: IdSource(Box::new(ids)),
            refill: Mutex::new(None),
        });
        let refill = Arc::clone(&pool);
        let task = tokio::spawn(async move { refill.refill().await });
        if let Ok(mut slot) = pool.refill.try_lock() {
            *slot = Some(task);
        }
        pool
    }

    fn next_id(&self) -> String {
        (self.ids.0)()
    }

    async fn refill(&self) {
        while !self.stopping.load(Ordering::Acquire) {
            let short = self.size.saturating_sub(self.standby.lock().await.len());
            if short == 0 {
                self.wake.notified().await;
                continue;
            }
            let standby = async {
                let mut standby = self.template.launch(&self.next_id()).await?;
                if self.mode == PoolMode::Restored {
                    standby.restore_paused(&self.template).await?;
                }
                Ok::<_, CloneError>(standby)
            };
            match standby.await {
                Ok(standby) => {
                    if self.stopping.load(Ordering::Acquire) {
                        standby.kill().await;
                        break;
                    }
                    self.standby.lock().await.push_back(standby);
                }
                Err(e) => {
                    tracing::warn!(template = self.template.name(), error = %e, "vm pool: cannot start a standby QEMU");
                    // Do not spin on a persistent failure; a clone request wakes us early.
                    tokio::select! {
                        () = self.wake.notified() => {}
                        () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                    }
                }
            }
        }
    }

    /// Standby QEMUs ready right now.
    pub async fn ready(&self) -> usize {
        self.standby.lock().await.len()
    }

    /// Clones the template, from a standby QEMU when one is ready (otherwise launching one on
    /// the spot), and wakes the refill task.
    pub async fn clone_vm(&self) -> Result<VmClone, CloneError> {
        let standby = self.standby.lock().await.pop_front();
        self.wake.notify_one();
        let standby = match standby {
            Some(standby) => standby,
            None => self.template.launch(&self.next_id()).await?,
        };
        standby.start(&self.template).await
    }

    /// Stops refilling and kills every standby QEMU, returning once they are gone (a QEMU
    /// being launched is let finish, then killed).
    pub async fn shutdown(&self) {
        self.stopping.store(true, Ordering::Release);
        self.wake.notify_one();
        let refill = self.refill.lock().await.take();
        if let Some(refill) = refill {
            let _ = refill.await;
        }
        let standby: Vec<Standby> = self.standby.lock().await.drain(..).collect();
        for standby in standby {
            standby.kill().await;
        }
    }

    /// The template this pool clones.
    pub fn template(&self) -> &Arc<Template> {
        &self.template
    }
}
