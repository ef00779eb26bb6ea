//! Squall's Debian package (`scripts/build-deb`), checked as a host without Kubernetes uses
//! it: built twice to the same bytes, installed with dpkg into a Debian root filesystem
//! (`test_support::images::debian`, entered with `tests/images/enter`), its systemd units
//! verified there by `systemd-analyze verify` against the real system units and held to a
//! sandbox (`systemd-analyze security`), its token made on install, and all of it gone again
//! on purge.
//!
//! Needs root, dpkg-deb and mmdebstrap (scripts/install-deps).
#![allow(clippy::unwrap_used)] // In tests a panic is a failed test, which is the point.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use test_support::Scratch;

fn repository() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Builds the package into `out`; returns its path.
fn build(out: &Path) -> PathBuf {
    let status = Command::new(repository().join("scripts/build-deb"))
        .arg(out)
        .env("SOURCE_DATE_EPOCH", "1700000000")
        .status()
        .unwrap();
    assert!(status.success(), "scripts/build-deb: {status}");
    out.join(format!("squall_{}_amd64.deb", env!("CARGO_PKG_VERSION")))
}

/// Runs `command` as root inside the Debian root `root`, which must succeed; its output.
fn inside(root: &Path, command: &[&str]) -> Output {
    let output = Command::new(repository().join("tests/images/enter"))
        .arg(root)
        .arg("0:0")
        .args(command)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{command:?}: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

#[test]
fn the_package_installs_its_sandboxed_units_and_purges_clean() {
    let scratch = Scratch::new("debian-package");
    let deb = build(&scratch.join("first"));
    let again = build(&scratch.join("second"));
    assert_eq!(
        std::fs::read(&deb).unwrap(),
        std::fs::read(&again).unwrap(),
        "the same inputs, another package"
    );

    // A copy of the cached Debian root, with the package where the root can read it.
    let root = scratch.join("root");
    let status = Command::new("cp")
        .arg("-a")
        .arg(test_support::images::debian())
        .arg(&root)
        .status()
        .unwrap();
    assert!(status.success(), "copying the Debian root: {status}");
    std::fs::copy(&deb, root.join("var/tmp/squall.deb")).unwrap();
    inside(&root, &["dpkg", "-i", "/var/tmp/squall.deb"]);

    let version = inside(&root, &["squall", "--version"]);
    assert_eq!(
        String::from_utf8(version.stdout).unwrap().trim(),
        format!("squall {}", env!("CARGO_PKG_VERSION"))
    );
    // The token the daemons share: made on install, random, root's alone.
    let token_file = root.join("etc/squall/forkd.token");
    let token = std::fs::read_to_string(&token_file).unwrap();
    assert_eq!(token.trim().len(), 64, "{token:?}");
    assert!(token.trim().chars().all(|c| c.is_ascii_hexdigit()));
    let mode = std::fs::metadata(&token_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    // The policy the services start with is Squall's default, and valid.
    inside(
        &root,
        &["squall", "policy", "check", "/etc/squall/policy.yaml"],
    );

    let units = ["squall-up.service", "squall-forkd.service"];
    let verify = inside(
        &root,
        &[&["systemd-analyze", "verify"], &units[..]].concat(),
    );
    let said = String::from_utf8_lossy(&verify.stderr);
    assert!(said.trim().is_empty(), "systemd-analyze verify: {said}");
    for unit in units {
        let security = inside(
            &root,
            &["systemd-analyze", "security", "--offline=yes", unit],
        );
        let report = String::from_utf8(security.stdout).unwrap();
        let exposure: f64 = report
            .lines()
            .find_map(|line| {
                let rest = line.split("Overall exposure level for ").nth(1)?;
                rest.split(": ").nth(1)?.split(' ').next()?.parse().ok()
            })
            .unwrap_or_else(|| panic!("no overall exposure in {report}"));
        eprintln!("{unit}: systemd-analyze security exposure {exposure}");
        // systemd's scale: up to 4.0 is "OK", above that "MEDIUM" and worse.
        assert!(exposure <= 4.0, "{unit} is exposed {exposure}: {report}");
        for directive in [
            "DynamicUser=yes",
            "ProtectSystem=strict",
            "NoNewPrivileges=yes",
        ] {
            let text = std::fs::read_to_string(root.join("lib/systemd/system").join(unit)).unwrap();
            assert!(text.contains(directive), "{unit} lacks {directive}");
        }
    }

    inside(&root, &["dpkg", "--purge", "squall"]);
    for path in [
        "usr/bin/squall",
        "lib/systemd/system/squall-up.service",
        "etc/default/squall",
        "etc/squall",
    ] {
        assert!(!root.join(path).exists(), "{path} is left after purge");
    }
}
