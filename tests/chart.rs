//! The Helm chart, rendered and checked as a user would install it: `charts/squall/tests/check.py`
//! (with `rendered.py`, rendering and look-ups, and `invariants.py`, what holds for any values)
//! renders it with Helm's engine for several sets of values, lints it, validates every object
//! against the Kubernetes schemas and asserts what a user would look for, with this build's
//! `squall policy check` judging the policy it ships.
//!
//! The check runs in the virtualenv `scripts/install-deps` makes: `$SQUALL_VENV`, by default
//! `~/.cache/squall/venv` (the same convention in both places).
#![allow(clippy::unwrap_used)] // In tests a panic is a failed test, which is the point.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Where scripts/install-deps puts the chart check's virtualenv.
fn venv() -> PathBuf {
    match std::env::var_os("SQUALL_VENV") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => {
            let home = std::env::var_os("HOME").expect("HOME is set, or SQUALL_VENV");
            Path::new(&home).join(".cache/squall/venv")
        }
    }
}

#[test]
fn the_chart_renders_validates_and_holds_what_a_user_checks() {
    let python = venv().join("bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/install-deps, which makes the chart check's virtualenv",
        python.display()
    );
    let check = Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/squall/tests/check.py");
    let out = Command::new(&python)
        // No __pycache__ beside the check's modules in the source tree.
        .arg("-B")
        .arg(&check)
        .args(["--squall", env!("CARGO_BIN_EXE_squall")])
        .args(["--kube-version", "1.30"])
        .output()
        .expect("the chart check runs");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "the chart check failed:\n{report}");
    assert!(report.contains("chart check: all"), "{report}");
    assert!(!report.contains("FAIL"), "{report}");
}
