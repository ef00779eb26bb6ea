//! Container images the tests run, built from Debian's packages by the scripts under
//! `tests/images/` and kept in a cache the tests own, so that only the first test run on a
//! machine pays for a build (about half a minute for the Flask image).
//!
//! The cache is `$SQUALL_TEST_CACHE` or `~/.cache/squall/test-images`. An image's entry is
//! named by a hash of its script and files, so editing them builds it afresh; a build runs
//! under a lock file (tests in other processes wait for it) into a temporary name that is
//! renamed into place once complete, so a build cut short is never used.

use std::hash::{Hash as _, Hasher as _};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The Flask test app (`tests/images/flask`): an OCI image layout, tag `latest`, whose
/// entrypoint serves `/`, `/healthz`, `/whoami` and `/write` with waitress on port 8000.
pub fn flask() -> PathBuf {
    cached("flask")
}

/// A Debian root filesystem (`tests/images/debian`): the essential set with systemd, as a
/// directory, for installing Squall's own package into. Copy it before changing it.
pub fn debian() -> PathBuf {
    cached("debian")
}

/// The repository's `tests/images` directory.
fn images_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../images")
}

fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SQUALL_TEST_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").expect("HOME is not set: set SQUALL_TEST_CACHE");
    Path::new(&home).join(".cache/squall/test-images")
}

/// A hash of every file in `dir` (names and contents, in name order).
fn content_hash(dir: &Path) -> u64 {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .collect();
    entries.sort();
    // SipHash with fixed keys: the same files give the same name on every run.
    let mut hasher = std::hash::DefaultHasher::new();
    for path in entries {
        path.file_name().hash(&mut hasher);
        std::fs::read(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
            .hash(&mut hasher);
    }
    hasher.finish()
}

/// The image `tests/images/NAME`, built with its `build` script unless cached.
fn cached(name: &str) -> PathBuf {
    let source = images_dir().join(name);
    let cache = cache_dir();
    std::fs::create_dir_all(&cache)
        .unwrap_or_else(|e| panic!("creating the test image cache {}: {e}", cache.display()));
    let image = cache.join(format!("{name}-{:016x}", content_hash(&source)));
    let lock_path = cache.join(format!("{name}.lock"));
    let lock = std::fs::File::create(&lock_path)
        .unwrap_or_else(|e| panic!("creating {}: {e}", lock_path.display()));
    lock.lock()
        .unwrap_or_else(|e| panic!("locking {}: {e}", lock_path.display()));
    if !image.exists() {
        let building = cache.join(format!("{name}.building-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&building);
        let started = std::time::Instant::now();
        let status = Command::new(source.join("build"))
            .arg(&building)
            .status()
            .unwrap_or_else(|e| panic!("running {}/build: {e}", source.display()));
        assert!(
            status.success(),
            "building the test image {name} failed ({status}): it needs root, mmdebstrap and \
             umoci (scripts/install-deps installs them)"
        );
        std::fs::rename(&building, &image)
            .unwrap_or_else(|e| panic!("moving {} into place: {e}", image.display()));
        eprintln!(
            "built the test image {name} in {:.1} s: {}",
            started.elapsed().as_secs_f64(),
            image.display()
        );
    }
    image
}
