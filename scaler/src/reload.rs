//! The policy file, watched: a policy that changed on disk (its modification time moved) or
//! was signalled with SIGHUP is loaded again and swapped in whole; the scaler's next tick
//! acts on it (and retunes the balancer if its windows or concurrency changed). A policy
//! that does not load, or that changes the template, is refused with a log line and the old
//! one stays in force.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use lifecycle::Shutdown;
use policies::Policy;
use tokio::signal::unix::{SignalKind, signal};

/// How often the file's modification time is looked at.
const POLL: Duration = Duration::from_millis(500);

/// Why a new policy was not taken.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// It does not load (the message names the file, line and column).
    #[error("{0}")]
    Load(#[from] policies::LoadError),
    /// It names another template, which would need other workers altogether.
    #[error("the template cannot change while running ({old} → {new}); restart to change it")]
    Template {
        /// The template in force.
        old: String,
        /// The one the file names.
        new: String,
    },
    /// Its windows or concurrency do not fit the balancer (a window that is not a whole
    /// number of the balancer's ticks, say).
    #[error("the policy's windows or concurrency do not fit the balancer")]
    Tuning(#[source] balancer::ConfigError),
}

/// What a new policy must also satisfy, besides loading: the balancer's checks of the
/// tuning it would get (`max_concurrency` overriding the policy's concurrency, as in
/// `squall up --max-concurrency`).
pub fn fits_the_balancer(
    policy: &Policy,
    max_concurrency: Option<usize>,
) -> Result<(), ReloadError> {
    let tuning = crate::front::tuning(policy, max_concurrency);
    crate::front::config(&tuning)
        .validate()
        .map_err(ReloadError::Tuning)
}

/// Loads `path` and swaps it into `policy`, unless it cannot be taken: it does not load,
/// changes the template, or fails `check`. Nothing of a refused policy applies.
pub fn reload(
    path: &std::path::Path,
    policy: &ArcSwap<Policy>,
    check: impl Fn(&Policy) -> Result<(), ReloadError>,
) -> Result<(), ReloadError> {
    let new = policies::load_file(path)?;
    let old = policy.load();
    if new.template != old.template {
        return Err(ReloadError::Template {
            old: old.template.clone(),
            new: new.template,
        });
    }
    check(&new)?;
    policy.store(Arc::new(new));
    Ok(())
}

/// Reloads the policy at `path` into `policy` when the file changes or on SIGHUP, until
/// `shutdown`.
/// A policy must also pass `check` (see [`fits_the_balancer`]). Each attempt is counted in
/// `metrics` (`squall_policy_reloads_total{outcome}`).
pub async fn watch(
    path: PathBuf,
    policy: Arc<ArcSwap<Policy>>,
    check: impl Fn(&Policy) -> Result<(), ReloadError>,
    metrics: crate::Metrics,
    shutdown: Shutdown,
) -> std::io::Result<()> {
    let mut hangup = signal(SignalKind::hangup())?;
    let modified = |path: &PathBuf| std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let mut seen: Option<SystemTime> = modified(&path);
    loop {
        let why = tokio::select! {
            () = shutdown.wait() => return Ok(()),
            _ = hangup.recv() => "SIGHUP",
            () = tokio::time::sleep(POLL) => {
                let now = modified(&path);
                if now == seen { continue; }
                seen = now;
                "the file changed"
            }
        };
        match reload(&path, &policy, &check) {
            Ok(()) => {
                metrics.reloaded(true);
                tracing::info!(path = %path.display(), policy = %policy.load().name, "policy reloaded ({why})")
            }
            Err(e) => {
                metrics.reloaded(false);
                tracing::error!(
                    path = %path.display(),
                    "policy reload ({why}) refused; keeping the old policy:\n{}",
                    lifecycle::ErrorChain(&e)
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reload_takes_a_good_policy_and_refuses_the_rest() {
        let dir = test_support::Scratch::new("reload");
        let path = dir.join("p.yaml");
        let write = |text: &str| std::fs::write(&path, text).unwrap();
        write("name: a\ntemplate: t\n");
        let policy = ArcSwap::from_pointee(policies::load_file(&path).unwrap());
        let fits = |p: &Policy| fits_the_balancer(p, None);
        write("name: b\ntemplate: t\nworkers: {min: 3}\n");
        reload(&path, &policy, fits).unwrap();
        assert_eq!(
            (policy.load().name.as_str(), policy.load().workers.min),
            ("b", 3)
        );
        write("name: c\ntemplate: other\n");
        let refused = reload(&path, &policy, fits).unwrap_err();
        assert!(matches!(refused, ReloadError::Template { .. }), "{refused}");
        write("name: d\ntemplate: t\nworkers: {min: 5, max: 2}\n");
        let refused = reload(&path, &policy, fits).unwrap_err().to_string();
        assert!(refused.contains("p.yaml"), "names the file: {refused}");
        // A panic window of 250 ms is no whole number of the balancer's 100 ms ticks: the
        // whole policy is refused, not applied in part.
        write(
            "name: e\ntemplate: t\nworkers: {min: 4}\nwindow: {stable: 10s, panic: 250ms}\ntick: 50ms\n",
        );
        let refused = reload(&path, &policy, fits).unwrap_err();
        assert!(matches!(refused, ReloadError::Tuning(_)), "{refused}");
        assert_eq!(policy.load().name, "b", "the old policy stays");
    }
}
