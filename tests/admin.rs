//! The admin listeners' bearer token, end to end: `squall balance --admin` and `squall up`
//! started with `--admin-token-file` (and `--admin-metrics-open`) and talked to over HTTP on
//! loopback; the token rotated the way a Kubernetes Secret volume rotates it, and on SIGHUP;
//! token files that cannot be used refused at start with a message naming them; and the live
//! page asking for the token in headless Chromium.
#![allow(clippy::unwrap_used)] // In tests a panic is a failed test, which is the point.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::browser::Browser;
use common::*;
use test_support::http::get_bearer;

/// `squall balance` in front of a worker that is never asked (these tests only read the
/// admin listener), without its admin options.
const BALANCE: [&str; 5] = [
    "balance",
    "--listen",
    "127.0.0.1:0",
    "--worker",
    "127.0.0.1:9",
];

/// How long a rotated token may take to be in force (the file is looked at every second).
const ROTATION: Duration = Duration::from_secs(30);

/// [`BALANCE`] with `extra` arguments, its admin listener on a loopback port.
struct Balance {
    child: ChildGuard,
    admin: SocketAddr,
}

fn balance(extra: &[&str]) -> Balance {
    let mut child = Command::new(env!("CARGO_BIN_EXE_squall"))
        .args(BALANCE)
        .args(["--admin", "127.0.0.1:0"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let child = ChildGuard(child);
    let admin = stdout
        .lines()
        .map_while(Result::ok)
        .find_map(|line| line.strip_prefix("admin on ")?.parse().ok())
        .expect("squall balance announces its admin listener");
    Balance { child, admin }
}

/// The status of `GET path`, with `Authorization: Bearer <token>` when given.
fn status(addr: SocketAddr, path: &str, token: Option<&str>) -> u16 {
    get_bearer(addr, path, token).status
}

/// The value of the sample `series` on `/metrics`, read with `token`.
fn metric(addr: SocketAddr, series: &str, token: &str) -> f64 {
    let text = get_bearer(addr, "/metrics", Some(token)).body;
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in /metrics:\n{text}"))
}

/// Writes `token` and a newline to `path`; returns the path as an argument.
fn write_token(path: &Path, token: &str) -> String {
    std::fs::write(path, format!("{token}\n")).unwrap();
    path.display().to_string()
}

#[test]
fn balance_admin_token_refuses_requests_without_the_right_bearer() {
    let scratch = Scratch::new("admin-balance-token");
    let file = write_token(&scratch.join("token"), "balance-s3cret");
    let squall = balance(&["--admin-token-file", &file]);
    for path in ["/status", "/metrics"] {
        let refused = get_bearer(squall.admin, path, None);
        assert_eq!(refused.status, 401, "{path} without a token");
        assert_eq!(
            refused.header("www-authenticate"),
            Some(r#"Bearer realm="squall""#)
        );
        assert!(refused.body.starts_with("unauthorized"), "{}", refused.body);
        assert_eq!(status(squall.admin, path, Some("balance-s3cre")), 401);
        assert_eq!(status(squall.admin, path, Some("balance-s3cret")), 200);
    }
    let document = get_bearer(squall.admin, "/status", Some("balance-s3cret")).body;
    let document: serde_json::Value = serde_json::from_str(&document).unwrap();
    assert_eq!(document["workers"][0]["addr"], "127.0.0.1:9");
    assert_eq!(status(squall.admin, "/healthz", None), 200);
    let refused = metric(
        squall.admin,
        "squall_admin_unauthorized_total",
        "balance-s3cret",
    );
    assert_eq!(refused, 4.0, "two refusals on each of two paths");
}

#[test]
fn balance_admin_metrics_open_leaves_only_metrics_open() {
    let scratch = Scratch::new("admin-balance-metrics-open");
    let file = write_token(&scratch.join("token"), "balance-s3cret");
    let squall = balance(&["--admin-token-file", &file, "--admin-metrics-open"]);
    let metrics = get_bearer(squall.admin, "/metrics", None);
    assert_eq!(metrics.status, 200);
    assert!(
        metrics
            .body
            .contains("# TYPE squall_admin_unauthorized_total counter"),
        "{}",
        metrics.body
    );
    assert_eq!(status(squall.admin, "/status", None), 401);
    assert_eq!(status(squall.admin, "/status", Some("wrong")), 401);
    assert_eq!(status(squall.admin, "/status", Some("balance-s3cret")), 200);
}

#[test]
fn the_admin_token_follows_a_secret_rotation_and_sighup() {
    // As a Secret volume lays it out: token -> ..data/token, ..data -> ..first.
    let scratch = Scratch::new("admin-token-rotation");
    let symlink = |target: &str, link: &str| {
        std::os::unix::fs::symlink(target, scratch.join(link)).unwrap();
    };
    std::fs::create_dir(scratch.join("..first")).unwrap();
    write_token(&scratch.join("..first/token"), "first-token");
    symlink("..first", "..data");
    symlink("..data/token", "token");
    let squall = balance(&["--admin-token-file", &as_arg(&scratch.join("token"))]);
    assert_eq!(status(squall.admin, "/status", Some("first-token")), 200);

    // The kubelet writes the new content in a new directory and swaps `..data` at once.
    std::fs::create_dir(scratch.join("..second")).unwrap();
    write_token(&scratch.join("..second/token"), "second-token");
    symlink("..second", "..data_tmp");
    std::fs::rename(scratch.join("..data_tmp"), scratch.join("..data")).unwrap();
    test_support::wait_until("the rotated token in force", ROTATION, || {
        (status(squall.admin, "/status", Some("second-token")) == 200).then_some(())
    });
    assert_eq!(status(squall.admin, "/status", Some("first-token")), 401);

    // A change the poll cannot see (same inode, size and modification time) is read on SIGHUP.
    let path = scratch.join("..second/token");
    let modified = std::fs::metadata(&path).unwrap().modified().unwrap();
    write_token(&path, "third--token");
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(modified)
        .unwrap();
    signal(&squall.child.0, "HUP");
    test_support::wait_until("the token read again on SIGHUP", ROTATION, || {
        (status(squall.admin, "/status", Some("third--token")) == 200).then_some(())
    });
    assert_eq!(status(squall.admin, "/status", Some("second-token")), 401);
}

/// `path` as an argument.
fn as_arg(path: &Path) -> String {
    path.display().to_string()
}

#[test]
fn bad_admin_token_files_are_refused_at_start_naming_the_file() {
    let scratch = Scratch::new("admin-bad-token");
    let long = "x".repeat(4097);
    for (name, content, says) in [
        ("empty", Some(" \n"), "is empty"),
        ("spaced", Some("two words"), "not visible ASCII"),
        ("accented", Some("café"), "not visible ASCII"),
        ("long", Some(long.as_str()), "longer than 4096 bytes"),
        ("missing", None, "cannot read the token file"),
    ] {
        let path = scratch.join(name);
        if let Some(content) = content {
            std::fs::write(&path, content).unwrap();
        }
        let file = as_arg(&path);
        let token = ["--admin-token-file", file.as_str()];
        let balance = [&BALANCE[..], &["--admin", "127.0.0.1:0"], &token].concat();
        let up = [
            &["up", "--admin", "127.0.0.1:0"][..],
            &token,
            &["--", "true"],
        ]
        .concat();
        for args in [balance, up] {
            let stderr = squall_exits(1, &args);
            assert!(
                stderr.contains(says) && stderr.contains(&file),
                "squall {} with the {name} token file: {stderr}",
                args[0]
            );
            assert!(
                !stderr.contains("two words") && !stderr.contains("café"),
                "{stderr}"
            );
        }
    }
    let stderr = squall_exits(2, &[&BALANCE[..], &["--admin-metrics-open"]].concat());
    assert!(stderr.contains("--admin-token-file"), "{stderr}");
    let file = write_token(&scratch.join("good"), "good-token");
    let stderr = squall_exits(1, &[&BALANCE[..], &["--admin-token-file", &file]].concat());
    assert!(stderr.contains("needs --admin"), "{stderr}");
}

#[test]
fn an_admin_listener_beyond_loopback_without_a_token_is_warned_about() {
    let mut child = ChildGuard(
        Command::new(env!("CARGO_BIN_EXE_squall"))
            .args(BALANCE)
            .args(["--admin", "0.0.0.0:0"])
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let line = log_line(&mut child.0, "reachable beyond this host");
    assert!(
        line.contains("WARN") && line.contains("--admin-token-file"),
        "{line}"
    );
}

/// `squall up` forking the demo app, with `extra` options, in `case`.
fn up(case: &Case, extra: &[String]) -> Up {
    case.write_policy(&quick_policy(1));
    Up::start_full(&case.policy, &case.marker, "fork", extra, &demo_app())
}

#[test]
fn up_admin_token_protects_status_history_and_metrics_but_not_the_page() {
    let case = Case::new("admin-up-token");
    let file = write_token(&case.scratch.join("admin-token"), "up-s3cret");
    let up = up(&case, &["--admin-token-file".to_owned(), file]);
    for path in ["/status", "/api/history", "/metrics"] {
        let refused = get_bearer(up.admin, path, None);
        assert_eq!(refused.status, 401, "{path} without a token");
        assert_eq!(
            refused.header("www-authenticate"),
            Some(r#"Bearer realm="squall""#)
        );
        assert_eq!(status(up.admin, path, Some("up-s3cre")), 401, "{path}");
        assert_eq!(status(up.admin, path, Some("up-s3cret")), 200, "{path}");
    }
    let history = get_bearer(up.admin, "/api/history", Some("up-s3cret")).body;
    let history: serde_json::Value = serde_json::from_str(&history).unwrap();
    assert!(history["samples"].is_array(), "{history}");
    // The page and its code show nothing of the process: open, so that it can ask.
    for path in ["/", "/live.js", "/live.css", "/healthz"] {
        assert_eq!(status(up.admin, path, None), 200, "{path}");
    }
    assert!(
        get_bearer(up.admin, "/", None)
            .body
            .contains(r#"<form id="auth""#)
    );
    assert_eq!(status(up.admin, "/favicon.ico", None), 404);
    // The helpers send the token: the scaler works as ever behind it.
    up.wait_for("the first worker", Duration::from_secs(30), |n| n >= 1);
    assert_eq!(up.metric("squall_admin_unauthorized_total"), 6.0);
}

#[test]
fn up_admin_metrics_open_is_scraped_without_a_token() {
    let case = Case::new("admin-up-metrics-open");
    let file = write_token(&case.scratch.join("admin-token"), "up-s3cret");
    let extra = ["--admin-token-file", &file, "--admin-metrics-open"].map(String::from);
    let up = up(&case, &extra);
    let metrics = get_bearer(up.admin, "/metrics", None);
    assert_eq!(metrics.status, 200);
    assert!(
        metrics.body.contains("# TYPE squall_desired_workers gauge"),
        "{}",
        metrics.body
    );
    assert_eq!(status(up.admin, "/status", None), 401);
    assert_eq!(status(up.admin, "/api/history", None), 401);
    assert_eq!(status(up.admin, "/api/history", Some("up-s3cret")), 200);
}

#[test]
fn the_live_page_asks_for_the_admin_token_and_keeps_it_for_the_tab() {
    let case = Case::new("admin-live-page");
    let file = write_token(&case.scratch.join("admin-token"), "page-s3cret");
    let up = up(&case, &["--admin-token-file".to_owned(), file]);
    let mut page = Browser::open(&format!("http://{}/", up.admin));
    let seen = "JSON.stringify({auth: document.body.dataset.auth, samples: document.body.dataset.samples, \
                note: document.getElementById('auth-note').textContent, \
                error: document.getElementById('error').textContent})";
    let deadline = Duration::from_secs(30);

    // Without a token, /api/history says 401: the page asks, and stops polling.
    page.wait_for("document.body.dataset.auth === 'needed'", deadline, seen);
    assert_eq!(
        page.evaluate("document.getElementById('auth').hidden"),
        false
    );
    assert_eq!(page.evaluate("document.body.dataset.samples"), "0");

    let give = |page: &mut Browser, token: &str| {
        page.evaluate(&format!(
            "document.getElementById('token').value = '{token}'; \
             document.getElementById('auth').requestSubmit(); true"
        ));
    };
    give(&mut page, "not-the-token");
    page.wait_for("document.body.dataset.auth === 'refused'", deadline, seen);
    assert_eq!(
        page.evaluate("document.getElementById('auth-note').textContent"),
        "That token was refused."
    );
    assert_eq!(
        page.evaluate("sessionStorage.getItem('squall-admin-token')"),
        serde_json::Value::Null
    );

    // The right one: the page draws, polling on with the token.
    give(&mut page, "page-s3cret");
    page.wait_for("Number(document.body.dataset.samples) >= 2", deadline, seen);
    assert_eq!(
        page.evaluate("document.getElementById('auth').hidden"),
        true
    );
    assert_eq!(
        page.evaluate("document.getElementById('error').hidden"),
        true
    );
    assert_eq!(
        page.evaluate("sessionStorage.getItem('squall-admin-token')"),
        "page-s3cret"
    );
    assert_eq!(
        page.evaluate("document.querySelector('#workers svg') !== null"),
        true
    );

    // Reloaded, the tab still has it: no question asked.
    page.evaluate(
        "document.body.dataset.old = 'yes'; setTimeout(() => location.reload(), 0); true",
    );
    page.wait_for(
        "document.body.dataset.old === undefined && Number(document.body.dataset.samples) >= 1",
        deadline,
        seen,
    );
    assert_eq!(
        page.evaluate("document.body.dataset.auth === undefined"),
        true
    );

    // Two refusals in all: one without a token, one with the wrong one; the page did not
    // keep asking while it waited.
    assert_eq!(up.metric("squall_admin_unauthorized_total"), 2.0);
}
