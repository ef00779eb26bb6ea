//! What the end-to-end tests of the `squall` binary share: a test's own scratch directory,
//! files and process marker ([`Case`]), `squall up` and `squall forkd` themselves (killed when
//! dropped), tiny HTTP clients and a closed-loop load.
#![allow(dead_code)] // Each test binary uses its own part of this module.

pub(crate) mod browser;
pub(crate) mod netns;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub(crate) use test_support::Scratch;

/// A policy with short windows so a test sees a whole cycle in seconds.
pub(crate) fn quick_policy(min: u32) -> String {
    format!(
        "name: quick\ntemplate: app\nworkers: {{min: {min}, max: 12}}\ntarget: {{concurrency: 2}}\n\
         window: {{stable: 2s, panic: 500ms}}\nscale_down: {{delay: 2s, max_step: 2, drain_timeout: 5s}}\n"
    )
}

/// The token of the forkd daemons the tests start.
pub(crate) const TOKEN: &str = "test-token";

/// What one test keeps to itself: a scratch directory holding its policy file and a token
/// file, and the marker the processes it starts carry in their environment.
pub(crate) struct Case {
    /// `policy.yaml` in the scratch directory (written by [`Case::write_policy`]).
    pub(crate) policy: PathBuf,
    /// A file holding [`TOKEN`], for forkd daemons and their clients.
    pub(crate) token_file: PathBuf,
    pub(crate) marker: String,
    pub(crate) scratch: Scratch,
}

impl Case {
    /// The scratch directory, token file and marker of the test `name`.
    pub(crate) fn new(name: &str) -> Case {
        let scratch = Scratch::new(name);
        let token_file = scratch.join("token");
        std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
        Case {
            policy: scratch.join("policy.yaml"),
            token_file,
            marker: format!("{name}-{}", std::process::id()),
            scratch,
        }
    }

    pub(crate) fn write_policy(&self, text: &str) {
        std::fs::write(&self.policy, text).unwrap();
    }

    /// `squall up` forking the demo app under the policy `text`.
    pub(crate) fn up(&self, policy: &str) -> Up {
        self.write_policy(policy);
        Up::start_full(&self.policy, &self.marker, "fork", &[], &demo_app())
    }

    /// `squall up` forking the demo app under the policy `text`, its standard error (and its
    /// template's and clones', which inherit it) written to the file `log`.
    pub(crate) fn up_logged(&self, policy: &str, log: &Path) -> Up {
        self.write_policy(policy);
        let log = std::fs::File::create(log).unwrap();
        Up::start_with(
            &self.policy,
            &self.marker,
            "fork",
            &[],
            &demo_app(),
            Stdio::from(log),
        )
    }

    /// `squall up` forking the demo app under the policy `text`, on the forkd daemons `hosts`.
    pub(crate) fn up_on(&self, policy: &str, hosts: &[&Forkd]) -> Up {
        self.write_policy(policy);
        let mut extra = Vec::new();
        for forkd in hosts {
            extra.extend(["--forkd".to_owned(), forkd.url.clone()]);
        }
        extra.extend([
            "--forkd-token-file".to_owned(),
            self.token_file.display().to_string(),
        ]);
        Up::start_full(&self.policy, &self.marker, "fork", &extra, &demo_app())
    }

    /// A `squall forkd` daemon on the case's token file, with `args` for it.
    pub(crate) fn forkd(&self, args: &[&str]) -> Forkd {
        Forkd::start(&self.token_file, &self.marker, args)
    }
}

/// `squall up`, killed (and its children checked) when dropped.
pub(crate) struct Up {
    pub(crate) child: Child,
    pub(crate) listen: SocketAddr,
    pub(crate) admin: SocketAddr,
    pub(crate) marker: String,
    /// The admin token, when started with `--admin-token-file`: the helpers below send it.
    pub(crate) admin_token: Option<String>,
}

/// The demo app's arguments for the tests: quick to warm, 40 ms per request, 2 at once.
pub(crate) const APP_ARGS: [&str; 8] = [
    "--warmup-ms",
    "200",
    "--service-ms",
    "40",
    "--concurrency",
    "2",
    "--cache-mib",
    "1",
];

/// Runs `squall ARGS...` to its end.
pub(crate) fn squall(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_squall"))
        .args(args)
        .output()
        .expect("squall runs")
}

/// Runs `squall ARGS...`, which must succeed; returns its standard output.
pub(crate) fn squall_ok(args: &[&str]) -> String {
    let out = squall(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "squall {args:?}: {stderr}");
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// Runs `squall ARGS...`, which must exit with `code`; returns its standard error.
pub(crate) fn squall_exits(code: i32, args: &[&str]) -> String {
    let out = squall(args);
    assert_eq!(out.status.code(), Some(code), "squall {args:?}");
    String::from_utf8(out.stderr).expect("UTF-8 errors")
}

/// The command line of the demo app built into squall, with [`APP_ARGS`].
pub(crate) fn demo_app() -> Vec<String> {
    let mut app = vec![
        env!("CARGO_BIN_EXE_squall").to_owned(),
        "warm-app".to_owned(),
    ];
    app.extend(APP_ARGS.map(String::from));
    app
}

impl Up {
    /// `squall up --driver DRIVER` under `policy`, with `extra` options before the app's
    /// command `app`. Its log goes to the test's standard error, which the test runner keeps
    /// and shows when the test fails (why `squall up` ended early, say).
    pub(crate) fn start_full(
        policy: &Path,
        marker: &str,
        driver: &str,
        extra: &[String],
        app: &[String],
    ) -> Up {
        Up::start_with(policy, marker, driver, extra, app, Stdio::inherit())
    }

    /// [`Up::start_full`], with its standard error going to `stderr`.
    pub(crate) fn start_with(
        policy: &Path,
        marker: &str,
        driver: &str,
        extra: &[String],
        app: &[String],
        stderr: Stdio,
    ) -> Up {
        let mut command = Command::new(env!("CARGO_BIN_EXE_squall"));
        command
            .args(["up", "--driver", driver, "--policy"])
            .arg(policy)
            .args([
                "--listen",
                "127.0.0.1:0",
                "--admin",
                "127.0.0.1:0",
                "--max-concurrency",
                "2",
            ])
            .args(extra)
            .arg("--")
            .args(app)
            .stderr(stderr);
        let admin_token = extra
            .iter()
            .position(|arg| arg == "--admin-token-file")
            .map(|at| {
                std::fs::read_to_string(&extra[at + 1])
                    .unwrap()
                    .trim()
                    .to_owned()
            });
        Up::spawn(command, marker, admin_token)
    }

    /// Starts `command`, a `squall up` (directly or through a wrapper that runs it), and
    /// reads the addresses it prints; `admin_token` is what its admin listener wants.
    pub(crate) fn spawn(mut command: Command, marker: &str, admin_token: Option<String>) -> Up {
        let mut child = command
            // A marker in the environment finds this test's processes later.
            .env(test_support::process::MARKER_ENV, marker)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let url = |after: &str| -> SocketAddr {
            let rest = line
                .split(after)
                .nth(1)
                .unwrap_or_else(|| panic!("no {after} in {line:?}"));
            rest.split('/').next().unwrap().parse().unwrap()
        };
        Up {
            listen: url("send traffic to http://"),
            admin: url("status http://"),
            child,
            marker: marker.to_owned(),
            admin_token,
        }
    }

    /// GET `path` on the admin listener, with its token if it has one: (status, body).
    pub(crate) fn admin_get(&self, path: &str) -> (u16, String) {
        let reply = test_support::http::get_bearer(self.admin, path, self.admin_token.as_deref());
        (reply.status, reply.body)
    }

    pub(crate) fn ready_workers(&self) -> u64 {
        let body = self.admin_get("/status").1;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["worker_counts"]["ready"].as_u64().unwrap()
    }

    /// Waits until the ready workers satisfy `check`; returns their number.
    pub(crate) fn wait_for(
        &self,
        what: &str,
        deadline: Duration,
        check: impl Fn(u64) -> bool,
    ) -> u64 {
        test_support::wait_until(what, deadline, || {
            let ready = self.ready_workers();
            check(ready).then_some(ready)
        })
    }

    /// `/status` as JSON.
    pub(crate) fn status(&self) -> serde_json::Value {
        serde_json::from_str(&self.admin_get("/status").1).unwrap()
    }

    /// The value of the sample `series` (name and labels, as `/metrics` prints them).
    pub(crate) fn metric(&self, series: &str) -> f64 {
        let text = self.admin_get("/metrics").1;
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {series} in /metrics"))
    }

    /// Waits until the sample `series` satisfies `check`; returns its value.
    pub(crate) fn wait_for_metric(
        &self,
        series: &str,
        deadline: Duration,
        check: impl Fn(f64) -> bool,
    ) -> f64 {
        test_support::wait_until(&format!("{series} as expected"), deadline, || {
            let value = self.metric(series);
            check(value).then_some(value)
        })
    }

    /// Sends the process a signal by name (`HUP`, `TERM`).
    pub(crate) fn signal(&self, name: &str) {
        signal(&self.child, name);
    }

    /// Processes started for this test (they carry its marker in their environment).
    pub(crate) fn processes(&self) -> usize {
        processes_with(&self.marker)
    }
}

/// Sends `child` a signal by name (`HUP`, `TERM`).
pub(crate) fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{name} failed");
}

/// Sends `child` SIGTERM and waits for it to exit.
pub(crate) fn terminate(child: &mut Child) -> ExitStatus {
    signal(child, "TERM");
    child.wait().unwrap()
}

/// A child process killed (and reaped) when dropped, so a failing test leaves none behind.
pub(crate) struct ChildGuard(pub(crate) Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn processes_with(marker: &str) -> usize {
    test_support::process::with_marker(marker).len()
}

impl Drop for Up {
    /// SIGTERM first, so forkd kills what it started (microVMs remove their files).
    fn drop(&mut self) {
        stop_gently(&mut self.child, Duration::from_secs(20));
    }
}

/// Stops `child` with SIGTERM, then SIGKILL if it has not exited `within`; nothing if it was
/// reaped already (its pid may be another process's by now).
fn stop_gently(child: &mut Child, within: Duration) {
    if !matches!(child.try_wait(), Ok(None)) {
        return;
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Reads `child`'s stderr for the line containing `marker` and returns the address after
/// `key=` on it: the address a program bound when it was given port 0. Its stderr is drained
/// from then on (echoed to the test's output) so the program never blocks on a full pipe.
pub(crate) fn bound_address(
    child: &mut Child,
    marker: &'static str,
    key: &'static str,
) -> SocketAddr {
    let line = log_line(child, marker);
    let needle = format!("{key}=");
    let rest = line
        .split_once(&needle)
        .unwrap_or_else(|| panic!("no {key}= on the {marker:?} line: {line}"))
        .1;
    let token = rest.split_whitespace().next().unwrap_or("");
    let addr = token.trim_matches(|c: char| !(c.is_ascii_digit() || c == '.' || c == ':'));
    addr.parse()
        .unwrap_or_else(|e| panic!("{addr:?} is not an address: {e}"))
}

/// Reads `child`'s stderr until a line containing `marker` and returns that line; the rest
/// of its stderr is drained from then on (echoed to the test's output), so the program never
/// blocks on a full pipe.
pub(crate) fn log_line(child: &mut Child, marker: &'static str) -> String {
    let stderr = child.stderr.take().expect("stderr is piped");
    let (found, line) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains(marker) {
                let _ = found.send(line);
            } else {
                eprintln!("{line}");
            }
        }
    });
    line.recv_timeout(Duration::from_secs(30))
        .unwrap_or_else(|_| panic!("no {marker:?} line in the program's log"))
}

/// A `squall forkd` daemon of the test's own on a port the system chose, killed when
/// dropped.
pub(crate) struct Forkd {
    pub(crate) child: Child,
    pub(crate) url: String,
    /// The file holding the token its clients must send.
    pub(crate) token_file: PathBuf,
}

impl Forkd {
    /// `squall forkd` requiring the token in `token_file`, with `args` for it.
    pub(crate) fn start(token_file: &Path, marker: &str, args: &[&str]) -> Forkd {
        let mut command = Command::new(env!("CARGO_BIN_EXE_squall"));
        command
            .args([
                "forkd",
                "--listen",
                "127.0.0.1:0",
                "--kill-grace",
                "1",
                "--token-file",
            ])
            .arg(token_file)
            .args(args);
        Forkd::spawn(command, token_file, marker)
    }

    /// Starts `command`, a `squall forkd` listening on `127.0.0.1:0` (directly or through a
    /// wrapper that runs it) whose token is in `token_file`, and reads the address it bound.
    pub(crate) fn spawn(mut command: Command, token_file: &Path, marker: &str) -> Forkd {
        let mut child = command
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .env(test_support::process::MARKER_ENV, marker)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let addr = bound_address(&mut child, "forkd listening", "addr");
        Forkd {
            child,
            url: format!("http://{addr}"),
            token_file: token_file.to_owned(),
        }
    }

    /// Its address.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.url.trim_start_matches("http://").parse().unwrap()
    }

    /// An API client sending `token`.
    pub(crate) fn client(&self, token: &str) -> forkd::Client {
        forkd::Client::new(&self.url, token).unwrap()
    }

    /// Runs `squall forkd ARGS...` as a client of this daemon; returns its JSON output.
    pub(crate) fn cli(&self, args: &[&str]) -> serde_json::Value {
        let addr = self.addr().to_string();
        let token_file = self.token_file.to_str().unwrap();
        let client = ["forkd", "--listen", &addr, "--token-file", token_file];
        serde_json::from_str(&squall_ok(&[&client, args].concat())).unwrap()
    }
}

impl Drop for Forkd {
    /// SIGTERM, so that it removes what it made (a vm template's RAM file).
    fn drop(&mut self) {
        stop_gently(&mut self.child, Duration::from_secs(10));
    }
}

/// Writes `text` to the policy file and gives it a modification time of its own, so the
/// file watcher sees a change however coarse the file system's clock is.
pub(crate) fn rewrite(policy: &Path, text: &str) {
    let before = std::fs::metadata(policy).and_then(|m| m.modified()).ok();
    std::fs::write(policy, text).unwrap();
    if let Some(before) = before {
        let file = std::fs::File::options().write(true).open(policy).unwrap();
        file.set_modified(before + Duration::from_secs(10)).unwrap();
    }
}

/// GET `path` over a fresh connection: (status, body).
pub(crate) fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let reply = test_support::http::get(addr, path);
    (reply.status, reply.body)
}

/// `clients` threads sending requests back to back, counting the answers by status, until
/// stopped or dropped.
pub(crate) struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
}

impl Load {
    pub(crate) fn start(addr: SocketAddr, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let threads = (0..clients)
            .map(|_| {
                let (stop, ok, failed) = (Arc::clone(&stop), Arc::clone(&ok), Arc::clone(&failed));
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        match get(addr, "/").0 {
                            200 => ok.fetch_add(1, Ordering::Relaxed),
                            _ => failed.fetch_add(1, Ordering::Relaxed),
                        };
                    }
                })
            })
            .collect();
        Load {
            stop,
            threads,
            ok,
            failed,
        }
    }

    /// Requests answered `200` so far.
    pub(crate) fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Requests answered otherwise, or not at all, so far.
    pub(crate) fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// Stops the clients and waits for their last requests; a client that panicked fails
    /// the test.
    pub(crate) fn stop(&mut self) {
        for client in self.halt() {
            client.unwrap();
        }
    }

    fn halt(&mut self) -> Vec<std::thread::Result<()>> {
        self.stop.store(true, Ordering::Relaxed);
        self.threads.drain(..).map(|t| t.join()).collect()
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        // The test has ended, or is failing already.
        let _ = self.halt();
    }
}

/// Asserts that the QEMUs carrying `marker` (a test's vm workers) run under the accelerator
/// this host allows (TCG where KVM cannot boot a Linux guest), and prints it.
pub(crate) fn assert_expected_accelerator(marker: &str) {
    let accels: Vec<String> = test_support::process::with_marker(marker)
        .into_iter()
        .filter_map(test_support::process::qemu_accelerator)
        .collect();
    let expected = microvm::KvmSupport::probe().expected_accel().to_string();
    eprintln!("vm workers ran under {accels:?} (expected {expected})");
    assert!(
        !accels.is_empty() && accels.iter().all(|a| *a == expected),
        "{accels:?}"
    );
}
