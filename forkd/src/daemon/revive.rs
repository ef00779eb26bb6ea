//! Templates that die on their own are started again.
//!
//! A `fork` template is a process, and a process can crash or be killed. Its clones die with
//! it (their parent-death signal), and without it the host makes no more clones. So forkd
//! watches each `fork` template and, when it ends without being asked to, starts it again
//! from the same spec under the same name: at once the first time, and if a restarted one
//! dies again within [`STEADY`], after a wait that doubles from 1 s up to [`MAX_BACKOFF`]
//! (as after each failed start). While it warms up again its name stays taken and
//! clone requests are answered `template_warming`; the scaler asks again shortly.
//! `squall_template_restarts_total` counts the restarts.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::Daemon;
use super::templates::{Template, TemplateSlot};
use crate::driver::TemplateKind;

/// The longest wait before starting again a template that keeps dying.
pub(crate) const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// The first wait before starting again a template that died soon after it started.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// How long a template must have lived for its death to be met with a restart at once.
pub(crate) const STEADY: Duration = Duration::from_secs(60);
/// How often a wait looks whether the daemon is shutting down.
const SHUTDOWN_POLL: Duration = Duration::from_millis(100);

/// The wait before starting again a template that lived `lived`, after the wait `last`
/// before its own start (`None`: it is the first, not a restart).
fn next_wait(last: Option<Duration>, lived: Duration) -> Duration {
    match last {
        Some(last) if lived < STEADY => doubled(last),
        _ => Duration::ZERO,
    }
}

/// Twice `wait`, at least [`FIRST_BACKOFF`] and at most [`MAX_BACKOFF`].
fn doubled(wait: Duration) -> Duration {
    (wait * 2).clamp(FIRST_BACKOFF, MAX_BACKOFF)
}

impl Daemon {
    /// Watches `template` (a warm one, just put in the map) and starts it again whenever it
    /// dies on its own; see the module docs. Nothing for drivers without a template process.
    pub(super) fn supervise(self: &Arc<Self>, template: Arc<Template>) {
        if !matches!(template.kind, TemplateKind::Fork(_)) {
            return;
        }
        let daemon = Arc::clone(self);
        tokio::spawn(async move { daemon.revive_when_dead(template).await });
    }

    async fn revive_when_dead(self: Arc<Self>, mut template: Arc<Template>) {
        // `None` until the first restart: a template that dies for the first time, or after
        // living `STEADY`, is started again at once.
        let mut backoff: Option<Duration> = None;
        loop {
            let started = Instant::now();
            if !template.kind.died().await {
                return; // stopped on purpose
            }
            let mut wait = next_wait(backoff, started.elapsed());
            let name = template.spec.name.clone();
            // Held until the template is warm again (or given up): shutdown waits for it.
            let (_warming, done) = watch::channel(());
            {
                let mut templates = self.templates();
                let current = templates.map.get(&name).and_then(TemplateSlot::ready);
                if templates.closing || !current.is_some_and(|t| Arc::ptr_eq(t, &template)) {
                    return; // shutting down, or deleted meanwhile
                }
                templates
                    .map
                    .insert(name.clone(), TemplateSlot::Warming(done));
            }
            {
                // As for a deleted template: a clone request that found it before may not
                // list clones of it now.
                let _clones = self.clones();
                template.retired.store(true, Ordering::Release);
            }
            template.kind.stop().await;
            let driver = template.spec.driver.as_str();
            self.metrics
                .template_restarts
                .with_label_values(&[driver])
                .inc();
            tracing::warn!(template = %name, ?wait, "the template died on its own; starting it again");
            let Some(kind) = self.start_again(&template, &mut wait).await else {
                self.templates().map.remove(&name);
                return;
            };
            let revived = Arc::new(Template::new(template.spec.clone(), kind));
            let closing = {
                let mut templates = self.templates();
                if !templates.closing {
                    templates
                        .map
                        .insert(name.clone(), TemplateSlot::Ready(Arc::clone(&revived)));
                }
                templates.closing
            };
            if closing {
                self.templates().map.remove(&name);
                revived.kind.stop().await;
                return;
            }
            tracing::info!(template = %name, "the template is warm again");
            backoff = Some(wait);
            template = revived;
        }
    }

    /// Starts `template`'s spec again after `backoff`, and again after each failure with the
    /// wait doubled; `None` once the daemon shuts down.
    async fn start_again(
        &self,
        template: &Template,
        backoff: &mut Duration,
    ) -> Option<TemplateKind> {
        loop {
            if !self.wait_unless_closing(*backoff).await {
                return None;
            }
            match TemplateKind::start(&template.spec, &self.config, &self.ids, self.lifeline())
                .await
            {
                Ok(kind) => return Some(kind),
                Err(error) => {
                    *backoff = doubled(*backoff);
                    tracing::warn!(template = %template.spec.name, error = %crate::error::message(&error), wait = ?backoff, "the template did not start again; trying later");
                }
            }
        }
    }

    /// Waits `wait`, or less if the daemon starts shutting down; whether it is still running.
    async fn wait_unless_closing(&self, wait: Duration) -> bool {
        let until = Instant::now() + wait;
        loop {
            if self.templates().closing {
                return false;
            }
            let now = Instant::now();
            if now >= until {
                return true;
            }
            tokio::time::sleep((until - now).min(SHUTDOWN_POLL)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_template_that_keeps_dying_waits_longer_each_time() {
        let soon = Duration::from_secs(5);
        // The first death, or one after a steady life: at once.
        assert_eq!(next_wait(None, soon), Duration::ZERO);
        assert_eq!(
            next_wait(Some(Duration::from_secs(8)), STEADY),
            Duration::ZERO
        );
        // A restarted template that died soon: 1 s, then doubling, up to the most.
        let mut wait = next_wait(Some(Duration::ZERO), soon);
        assert_eq!(wait, FIRST_BACKOFF);
        let mut waits = vec![wait];
        for _ in 0..6 {
            wait = next_wait(Some(wait), soon);
            waits.push(wait);
        }
        let seconds: Vec<u64> = waits.iter().map(Duration::as_secs).collect();
        assert_eq!(seconds, [1, 2, 4, 8, 16, 30, 30]);
    }
}
