//! What forkd's integration tests share: an in-process daemon on port 0, the demo app's
//! binary, plain HTTP requests, and process and descriptor inspection through /proc.
// Test support: a panic here is a failed test, so unwrapping is what we want.
#![allow(dead_code, unreachable_pub, missing_docs, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use forkd::{Client, Config, Driver, TemplateSpec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

pub const TOKEN: &str = "test-token";

/// The warm-app binary, built if this test run did not build it already.
pub fn warm_app() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let exe = std::env::current_exe().unwrap();
        // target/debug/deps/<test> -> target/debug/warm-app
        let path = exe.parent().unwrap().parent().unwrap().join("warm-app");
        if !path.exists() {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let status = std::process::Command::new(cargo)
                .args(["build", "-p", "warm-app"])
                .status()
                .unwrap();
            assert!(status.success(), "building warm-app failed");
        }
        path
    })
    .clone()
}

/// A warm-app template: `fork` or `spawn`, a short warm-up and a small cache.
pub fn warm_app_spec(name: &str, driver: Driver) -> TemplateSpec {
    let app = warm_app().display().to_string();
    let mut command = vec![
        app,
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

/// A daemon served in this process on a loopback port.
pub struct Daemon {
    pub addr: SocketAddr,
    pub client: Client,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), forkd::ServeError>>,
}

impl Daemon {
    pub async fn start() -> Daemon {
        Daemon::with_config(Config::new(TOKEN)).await
    }

    pub async fn with_config(config: Config) -> Daemon {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(forkd::serve(listener, config, async move {
            let _ = stopped.await;
        }));
        let client = Client::new(&format!("http://{addr}"), TOKEN).unwrap();
        Daemon {
            addr,
            client,
            stop,
            task,
        }
    }

    /// Shuts the daemon down the way SIGTERM does, and waits until it has.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap().unwrap();
    }
}

/// One HTTP/1.1 request over a fresh connection: the status code and the body.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let response = String::from_utf8_lossy(&response).into_owned();
    let status = response[9..12].parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

pub async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    http(addr, "GET", path, &[], b"").await
}

/// Whether `pid` is a live process (a zombie counts as dead).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the first field after the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(") ")
            .map(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

/// The pids of `pid`'s children.
pub fn children(pid: u32) -> Vec<u32> {
    let mut children = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            if let Ok(list) = std::fs::read_to_string(task.path().join("children")) {
                children.extend(
                    list.split_whitespace()
                        .filter_map(|p| p.parse::<u32>().ok()),
                );
            }
        }
    }
    children
}

/// How many descriptors `pid` has open.
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Waits until `condition` holds, failing the test after `deadline`.
pub async fn eventually(what: &str, deadline: Duration, mut condition: impl FnMut() -> bool) {
    let start = Instant::now();
    while !condition() {
        assert!(start.elapsed() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A fresh directory under the system temp dir, removed when dropped (even if the test fails).
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
