//! What the tests of every Squall crate share, so that no crate's tests carry their own copy:
//! a scratch directory removed on drop, waits on a condition with a deadline (never a fixed
//! sleep), one HTTP/1.1 exchange over a fresh connection (blocking or async), process
//! inspection through `/proc`, the container images the tests run (built once, cached), and
//! the Python zygote's virtualenv.
//! Only tests depend on this crate.
//!
//! A failure here is the test's failure, so these helpers panic with a message that says
//! what was being waited for or done.
#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used)] // test support: a panic is a failed test, which is the point

pub mod http;
pub mod images;
pub mod process;
pub mod python;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// A fresh directory under the system temp dir, removed when dropped (even when the test
/// fails). Names are unique per process and per call, so tests running at once never share.
#[derive(Debug)]
pub struct Scratch(PathBuf);

impl Scratch {
    /// Makes `$TMPDIR/squall-test-NAME-PID-N`.
    pub fn new(name: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("squall-test-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        Self(dir)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// A path inside the directory.
    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// How often the waits below look again.
const POLL: Duration = Duration::from_millis(10);

/// Waits until `condition` returns `Some`, looking every few milliseconds on tokio's clock,
/// and returns its value; fails the test after `deadline`, saying `what` it waited for.
pub async fn eventually<T>(
    what: &str,
    deadline: Duration,
    mut condition: impl FnMut() -> Option<T>,
) -> T {
    eventually_async(what, deadline, || std::future::ready(condition())).await
}

/// [`eventually`] for a condition that is itself async (an HTTP request, say).
pub async fn eventually_async<T, F: Future<Output = Option<T>>>(
    what: &str,
    deadline: Duration,
    mut condition: impl FnMut() -> F,
) -> T {
    let start = tokio::time::Instant::now();
    loop {
        if let Some(value) = condition().await {
            return value;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting until {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// [`eventually`] for tests without a runtime: blocks the thread between looks.
pub fn wait_until<T>(
    what: &str,
    deadline: Duration,
    mut condition: impl FnMut() -> Option<T>,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = condition() {
            return value;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting until {what}"
        );
        std::thread::sleep(POLL);
    }
}

/// Runs `check` on every seed of the fuzz target `target` (`fuzz/seeds/TARGET`: the corpus
/// it starts from, and every input it once failed on), naming each on stderr first so that a
/// failure says which; fails if there are none.
pub fn check_fuzz_seeds(target: &str, mut check: impl FnMut(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/seeds")
        .join(target);
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading the seeds in {}: {e}", dir.display()));
    let mut checked = 0;
    for entry in entries {
        let path = entry.expect("a directory entry").path();
        let bytes = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("reading the seed {}: {e}", path.display()));
        eprintln!("checking {}", path.display());
        check(&bytes);
        checked += 1;
    }
    assert!(checked > 0, "no seeds in {}", dir.display());
}

/// Every file under `dir`, recursively (none if it does not exist): what a test checks is
/// left behind.
pub fn files_under(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(files_under(&path));
        } else {
            found.push(path);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scratch_directory_is_unique_and_removed_on_drop() {
        let a = Scratch::new("t");
        let b = Scratch::new("t");
        assert_ne!(a.path(), b.path());
        std::fs::write(a.join("f"), "x").unwrap();
        let kept = a.path().to_owned();
        drop(a);
        assert!(!kept.exists());
    }

    #[test]
    fn wait_until_returns_the_value_and_fails_after_its_deadline() {
        let mut n = 0;
        assert_eq!(
            wait_until("n reaches 3", Duration::from_secs(5), || {
                n += 1;
                (n == 3).then_some(n)
            }),
            3
        );
        let failed = std::panic::catch_unwind(|| {
            wait_until("never", Duration::from_millis(50), || None::<()>)
        });
        assert!(failed.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn eventually_fails_after_its_deadline_on_tokios_clock() {
        let waited = tokio::spawn(eventually("never", Duration::from_secs(30), || None::<()>));
        assert!(waited.await.unwrap_err().is_panic());
    }
}
