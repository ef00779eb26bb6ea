//! End-to-end tests of `squall forkd`: the real binary, a token file, real warm-app templates
//! and clones, and what is left after the daemon is stopped or killed.
// A panic anywhere here is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::{Case, TOKEN, squall_exits, terminate};
use forkd::{Client, Driver, ErrorCode, TemplateSpec};
use test_support::process::alive;

const DEADLINE: Duration = Duration::from_secs(20);

/// The warm-app binary, built if this test run did not build it already.
fn warm_app() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_BIN_EXE_squall")).with_file_name("warm-app");
    if !path.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-p", "warm-app"])
            .status()
            .unwrap();
        assert!(status.success(), "building warm-app failed");
    }
    path
}

fn wait_until_dead(pids: &[u32]) {
    test_support::wait_until("every process forkd started to die", DEADLINE, || {
        (!pids.iter().any(|&pid| alive(pid))).then_some(())
    });
}

fn spec(name: &str, driver: Driver) -> TemplateSpec {
    let mut command = vec![
        warm_app().display().to_string(),
        "--warmup-ms".into(),
        "200".into(),
        "--cache-mib".into(),
        "4".into(),
    ];
    if driver == Driver::Spawn {
        command.extend(["--listen".into(), "127.0.0.1:{port}".into()]);
    }
    TemplateSpec::new(name, driver, command)
}

/// Starts a fork template with three clones and a spawn template with one; returns every pid.
async fn populate(client: &Client) -> Vec<u32> {
    let mut pids = Vec::new();
    for (name, driver, clones) in [("warm", Driver::Fork, 3), ("cold", Driver::Spawn, 1)] {
        // A spawn template runs no process of its own.
        pids.extend(
            client
                .create_template(&spec(name, driver))
                .await
                .unwrap()
                .pid,
        );
        let clones = client.create_clones(name, clones).await.unwrap();
        pids.extend(clones.iter().map(|c| c.pid.unwrap()));
    }
    assert_eq!(pids.len(), 5, "the fork template and four clones: {pids:?}");
    assert!(pids.iter().all(|&pid| alive(pid)));
    pids
}

#[tokio::test]
async fn the_binary_requires_the_token_from_its_file() {
    let case = Case::new("forkd-token");
    let forkd = case.forkd(&[]);
    forkd.client("wrong").health().await.unwrap();
    let error = forkd.client("wrong").clones().await.unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::Unauthorized), "{error}");
    assert!(
        forkd
            .client(TOKEN)
            .clones()
            .await
            .unwrap()
            .clones
            .is_empty()
    );
}

#[tokio::test]
async fn sigterm_kills_every_clone_and_template_then_exits() {
    let case = Case::new("forkd-sigterm");
    let mut forkd = case.forkd(&[]);
    let pids = populate(&forkd.client(TOKEN)).await;
    let exit = terminate(&mut forkd.child);
    assert!(exit.success(), "forkd exited with {exit}");
    wait_until_dead(&pids);
}

#[tokio::test]
async fn sigkill_of_forkd_leaves_nothing_running() {
    let case = Case::new("forkd-sigkill");
    let mut forkd = case.forkd(&[]);
    let pids = populate(&forkd.client(TOKEN)).await;
    forkd.child.kill().unwrap();
    forkd.child.wait().unwrap();
    wait_until_dead(&pids);
}

#[test]
fn a_missing_token_file_is_a_clear_error() {
    let stderr = squall_exits(
        1,
        &[
            "forkd",
            "--listen",
            "127.0.0.1:0",
            "--token-file",
            "/nonexistent/token",
        ],
    );
    assert!(
        stderr.contains("reading the token file /nonexistent/token"),
        "{stderr}"
    );
}

#[test]
fn the_cli_drives_a_running_daemon() {
    let case = Case::new("forkd-cli");
    let forkd = case.forkd(&[]);
    let spec_file = case.scratch.join("spec.json");
    std::fs::write(
        &spec_file,
        serde_json::to_vec(&spec("web", Driver::Fork)).unwrap(),
    )
    .unwrap();
    let template = forkd.cli(&["create-template", spec_file.to_str().unwrap()]);
    assert_eq!(template["spec"]["name"], "web");
    let clones = forkd.cli(&["clone", "web", "2"]);
    let clones = clones.as_array().unwrap();
    assert_eq!(clones.len(), 2);
    let addr: SocketAddr = clones[0]["addr"].as_str().unwrap().parse().unwrap();
    let reply = test_support::http::get(addr, "/");
    assert_eq!(reply.status, 200, "{reply:?}");
    let id = clones[0]["id"].as_str().unwrap();
    assert_eq!(forkd.cli(&["kill", id])["killed"], id);
    assert_eq!(forkd.cli(&["clones"]).as_array().unwrap().len(), 1);
    assert_eq!(forkd.cli(&["delete-template", "web"])["deleted"], "web");
    assert!(forkd.cli(&["templates"]).as_array().unwrap().is_empty());
}
