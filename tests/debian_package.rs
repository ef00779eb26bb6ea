//! Squall's Debian package (`scripts/build-deb`), checked as a host without Kubernetes uses
//! it: built twice to the same bytes, installed with dpkg into a Debian root filesystem
//! (`test_support::images::debian`, entered with `tests/images/enter`), its systemd units
//! verified there by `systemd-analyze verify` against the real system units and held to a
//! sandbox (`systemd-analyze security`), their command lines (as systemd expands them from the
//! units and `/etc/default/squall`) run there as an unprivileged user and serving, its token
//! made on install, and all of it gone again on purge.
//!
//! Needs root, dpkg-deb and mmdebstrap (scripts/install-deps).
#![allow(clippy::unwrap_used)] // In tests a panic is a failed test, which is the point.

mod common;

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::{Forkd, Up, get};
use test_support::Scratch;

/// The user the services' command lines run as here (systemd would make a dynamic one).
const USER: &str = "65532:65532";

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

    run_the_units(&root);

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

/// Runs each unit's command line as systemd would build it, with `/etc/default/squall` set as
/// a user sets it (addresses the test picks), inside the root as an unprivileged user: forkd
/// answers `/healthz` with the package's token, `squall up` serves the demo app.
fn run_the_units(root: &Path) {
    std::fs::write(
        root.join("etc/default/squall"),
        "SQUALL_UP_LISTEN=127.0.0.1:0\nSQUALL_UP_ADMIN=127.0.0.1:0\nSQUALL_FORKD_LISTEN=127.0.0.1:0\n",
    )
    .unwrap();
    let marker = format!("debian-units-{}", std::process::id());
    // What systemd makes for the units: the cache directory, the token as a credential.
    let credentials = "/run/credentials/squall-forkd.service";
    let token = root.join(credentials.trim_start_matches('/')).join("token");
    std::fs::create_dir_all(token.parent().unwrap()).unwrap();
    std::fs::copy(root.join("etc/squall/forkd.token"), &token).unwrap();
    for dir in ["var/cache/squall", "var/cache/squall-forkd"] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    let status = Command::new("chown")
        .args(["-R", USER])
        .arg(token.parent().unwrap())
        .arg(root.join("var/cache/squall"))
        .arg(root.join("var/cache/squall-forkd"))
        .status()
        .unwrap();
    assert!(status.success(), "chown: {status}");

    let (forkd, env) = exec_start(root, "squall-forkd.service", credentials);
    let forkd = Forkd::spawn(as_service(root, &forkd, &env), &token, &marker);
    let reply = test_support::http::get_bearer(
        forkd.addr(),
        "/v1/templates",
        Some(std::fs::read_to_string(&token).unwrap().trim()),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    drop(forkd);

    let (up, env) = exec_start(
        root,
        "squall-up.service",
        "/run/credentials/squall-up.service",
    );
    let up = Up::spawn(as_service(root, &up, &env), &marker, None);
    up.wait_for(
        "a worker of the default policy",
        Duration::from_secs(60),
        |n| n >= 1,
    );
    assert_eq!(get(up.listen, "/random").0, 200);
}

/// `command` run inside `root` as [`USER`] with the environment `env`.
fn as_service(root: &Path, command: &[String], env: &HashMap<String, String>) -> Command {
    let mut enter = Command::new(repository().join("tests/images/enter"));
    enter.arg(root).arg(USER).args(command).envs(env);
    enter
}

/// The `ExecStart=` of `unit` in `root`, expanded as systemd expands it: the variables of its
/// `Environment=` lines and `EnvironmentFile=` (later ones win), `${NAME}` as one word,
/// `$NAME` alone as the value's words; `%d` is `credentials`, `%C` `/var/cache`. Returns the
/// command and the environment the unit sets.
fn exec_start(
    root: &Path,
    unit: &str,
    credentials: &str,
) -> (Vec<String>, HashMap<String, String>) {
    let text = std::fs::read_to_string(root.join("lib/systemd/system").join(unit)).unwrap();
    let specifiers = |value: &str| value.replace("%d", credentials).replace("%C", "/var/cache");
    let mut env = HashMap::new();
    let mut exec = None;
    for line in text.lines() {
        if let Some(assignments) = line.strip_prefix("Environment=") {
            for assignment in words(assignments) {
                let (name, value) = assignment.split_once('=').unwrap();
                env.insert(name.to_owned(), specifiers(value));
            }
        } else if let Some(file) = line.strip_prefix("EnvironmentFile=") {
            let file = root.join(file.trim_start_matches('-').trim_start_matches('/'));
            for line in std::fs::read_to_string(file).unwrap().lines() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let (name, value) = line.split_once('=').unwrap();
                env.insert(name.to_owned(), value.trim_matches('"').to_owned());
            }
        } else if let Some(command) = line.strip_prefix("ExecStart=") {
            exec = Some(command.to_owned());
        }
    }
    let exec = exec.unwrap_or_else(|| panic!("{unit} has no ExecStart"));
    let mut command = Vec::new();
    for word in exec.split_whitespace() {
        if let Some(name) = word.strip_prefix('$').filter(|name| !name.starts_with('{')) {
            command.extend(env[name].split_whitespace().map(str::to_owned));
            continue;
        }
        let mut word = specifiers(word);
        for (name, value) in &env {
            word = word.replace(&format!("${{{name}}}"), value);
        }
        assert!(!word.contains('$'), "{unit}: {word} is not set");
        command.push(word);
    }
    (command, env)
}

/// The words of an `Environment=` line: split on spaces, double quotes kept together.
fn words(line: &str) -> Vec<String> {
    let (mut words, mut word, mut quoted) = (Vec::new(), String::new(), false);
    for c in line.chars() {
        match c {
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}
