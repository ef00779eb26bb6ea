//! End-to-end tests of `squall forkd`: the real binary, a token file, real warm-app templates
//! and clones, and what is left after the daemon is stopped or killed.
// A panic anywhere here is a failed test.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use forkd::{Client, Driver, ErrorCode, TemplateSpec};

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

/// Whether `pid` is a live process (a zombie counts as dead).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit_once(") ")
                .map(|(_, rest)| !rest.starts_with(['Z', 'X']))
        })
        .unwrap_or(false)
}

fn wait_until_dead(pids: &[u32]) {
    let start = Instant::now();
    while let Some(pid) = pids.iter().find(|&&pid| alive(pid)) {
        assert!(start.elapsed() < DEADLINE, "process {pid} outlived forkd");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `squall forkd` on a free loopback port, killed when dropped.
struct Forkd {
    child: Child,
    addr: SocketAddr,
    token_file: PathBuf,
}

impl Forkd {
    fn start(token: &str) -> Forkd {
        let token_file =
            std::env::temp_dir().join(format!("squall-forkd-test-token-{}", std::process::id()));
        std::fs::write(&token_file, format!("{token}\n")).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_squall"))
            .args([
                "forkd",
                "--listen",
                "127.0.0.1:0",
                "--kill-grace",
                "1",
                "--token-file",
            ])
            .arg(&token_file)
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Read the address from the log, then keep draining it so forkd never blocks on a full pipe.
        let stderr = child.stderr.take().unwrap();
        let (found, address) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some((_, addr)) = line.split_once("forkd listening addr=") {
                    let _ = found.send(addr.trim().to_owned());
                }
            }
        });
        let addr = address
            .recv_timeout(DEADLINE)
            .expect("forkd did not log its address")
            .parse()
            .unwrap();
        Forkd {
            child,
            addr,
            token_file,
        }
    }

    fn client(&self, token: &str) -> Client {
        Client::new(&format!("http://{}", self.addr), token).unwrap()
    }
}

impl Drop for Forkd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.token_file);
    }
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
    let fork = client
        .create_template(&spec("warm", Driver::Fork))
        .await
        .unwrap();
    client
        .create_template(&spec("cold", Driver::Spawn))
        .await
        .unwrap();
    let mut pids = vec![fork.pid.unwrap()];
    pids.extend(
        client
            .create_clones("warm", 3)
            .await
            .unwrap()
            .iter()
            .map(|c| c.pid.unwrap()),
    );
    pids.extend(
        client
            .create_clones("cold", 1)
            .await
            .unwrap()
            .iter()
            .map(|c| c.pid.unwrap()),
    );
    assert!(pids.iter().all(|&pid| alive(pid)));
    pids
}

#[tokio::test]
async fn the_binary_requires_the_token_from_its_file() {
    let forkd = Forkd::start("s3cret");
    forkd.client("wrong").health().await.unwrap();
    let error = forkd.client("wrong").clones().await.unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::Unauthorized), "{error}");
    assert!(
        forkd
            .client("s3cret")
            .clones()
            .await
            .unwrap()
            .clones
            .is_empty()
    );
}

#[tokio::test]
async fn sigterm_kills_every_clone_and_template_then_exits() {
    let mut forkd = Forkd::start("s3cret");
    let pids = populate(&forkd.client("s3cret")).await;
    let status = Command::new("kill")
        .args(["-TERM", &forkd.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = forkd.child.wait().unwrap();
    assert!(exit.success(), "forkd exited with {exit}");
    wait_until_dead(&pids);
}

#[tokio::test]
async fn sigkill_of_forkd_leaves_nothing_running() {
    let mut forkd = Forkd::start("s3cret");
    let pids = populate(&forkd.client("s3cret")).await;
    forkd.child.kill().unwrap();
    forkd.child.wait().unwrap();
    wait_until_dead(&pids);
}

#[test]
fn a_missing_token_file_is_a_clear_error() {
    let output = Command::new(env!("CARGO_BIN_EXE_squall"))
        .args([
            "forkd",
            "--listen",
            "127.0.0.1:0",
            "--token-file",
            "/nonexistent/token",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("reading the token file /nonexistent/token"),
        "{stderr}"
    );
}

/// Runs `squall forkd --listen ADDR --token-file F ARGS...` as a client; returns its JSON output.
fn cli(forkd: &Forkd, args: &[&str]) -> serde_json::Value {
    let output = Command::new(env!("CARGO_BIN_EXE_squall"))
        .args(["forkd", "--listen", &forkd.addr.to_string(), "--token-file"])
        .arg(&forkd.token_file)
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

#[test]
fn the_cli_drives_a_running_daemon() {
    use std::io::{Read, Write};
    let forkd = Forkd::start("s3cret");
    let spec_file = std::env::temp_dir().join(format!(
        "squall-forkd-test-spec-{}.json",
        std::process::id()
    ));
    std::fs::write(
        &spec_file,
        serde_json::to_vec(&spec("web", Driver::Fork)).unwrap(),
    )
    .unwrap();
    let template = cli(&forkd, &["create-template", spec_file.to_str().unwrap()]);
    std::fs::remove_file(&spec_file).unwrap();
    assert_eq!(template["spec"]["name"], "web");
    let clones = cli(&forkd, &["clone", "web", "2"]);
    let clones = clones.as_array().unwrap();
    assert_eq!(clones.len(), 2);
    let addr: SocketAddr = clones[0]["addr"].as_str().unwrap().parse().unwrap();
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let id = clones[0]["id"].as_str().unwrap();
    assert_eq!(cli(&forkd, &["kill", id])["killed"], id);
    assert_eq!(cli(&forkd, &["clones"]).as_array().unwrap().len(), 1);
    assert_eq!(cli(&forkd, &["delete-template", "web"])["deleted"], "web");
    assert!(cli(&forkd, &["templates"]).as_array().unwrap().is_empty());
}
