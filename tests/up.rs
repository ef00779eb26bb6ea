//! `squall up` end to end: the real binary, its embedded forkd forking the demo app (built
//! into squall as `squall warm-app`), real HTTP on loopback.
#![allow(clippy::unwrap_used)] // In tests a panic is a failed test, which is the point.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A scratch directory removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("squall-up-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A policy with short windows so a test sees a whole cycle in seconds.
fn quick_policy(min: u32) -> String {
    format!(
        "name: quick\ntemplate: app\nworkers: {{min: {min}, max: 12}}\ntarget: {{concurrency: 2}}\n\
         window: {{stable: 2s, panic: 500ms}}\nscale_down: {{delay: 2s, max_step: 2, drain_timeout: 5s}}\n"
    )
}

/// `squall up`, killed (and its children checked) when dropped.
struct Up {
    child: Child,
    listen: SocketAddr,
    admin: SocketAddr,
    marker: String,
}

/// The demo app's arguments for the tests: quick to warm, 40 ms per request, 2 at once.
const APP_ARGS: [&str; 8] = [
    "--warmup-ms",
    "200",
    "--service-ms",
    "40",
    "--concurrency",
    "2",
    "--cache-mib",
    "1",
];

impl Up {
    /// `squall up` forking the demo app built into squall.
    fn start(policy: &std::path::Path, marker: &str) -> Up {
        let squall = env!("CARGO_BIN_EXE_squall");
        let mut app = vec![squall.to_owned(), "warm-app".to_owned()];
        app.extend(APP_ARGS.map(String::from));
        Up::start_with(policy, marker, "fork", &app)
    }

    fn start_with(policy: &std::path::Path, marker: &str, driver: &str, app: &[String]) -> Up {
        Up::start_full(policy, marker, driver, &[], app)
    }

    /// `squall up` with `extra` options before the app's command.
    fn start_full(
        policy: &std::path::Path,
        marker: &str,
        driver: &str,
        extra: &[String],
        app: &[String],
    ) -> Up {
        let squall = env!("CARGO_BIN_EXE_squall");
        let mut child = Command::new(squall)
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
            // A marker in the environment finds this test's processes later.
            .env("SQUALL_TEST_MARKER", marker)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
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
        }
    }

    fn ready_workers(&self) -> u64 {
        let body = get(self.admin, "/status").1;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["worker_counts"]["ready"].as_u64().unwrap()
    }

    fn wait_for(&self, what: &str, deadline: Duration, check: impl Fn(u64) -> bool) -> u64 {
        let start = Instant::now();
        loop {
            let ready = self.ready_workers();
            if check(ready) {
                return ready;
            }
            assert!(
                start.elapsed() < deadline,
                "{what}: still {ready} ready workers after {deadline:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Processes started for this test (they carry its marker in their environment).
    fn processes(&self) -> usize {
        processes_with(&self.marker)
    }
}

fn processes_with(marker: &str) -> usize {
    let needle = format!("SQUALL_TEST_MARKER={marker}");
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| {
            let env = std::fs::read(e.path().join("environ")).unwrap_or_default();
            let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            let zombie = stat
                .rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z'));
            !zombie && env.split(|b| *b == 0).any(|kv| kv == needle.as_bytes())
        })
        .count()
}

impl Drop for Up {
    fn drop(&mut self) {
        // Already reaped: its pid may belong to someone else now.
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        // SIGTERM first, so forkd kills what it started (microVMs remove their files).
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GET `path` over a fresh connection: (status, body).
fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    let status = reply
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = reply
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    (status, body)
}

/// `clients` threads sending requests back to back until `stop`; counts answers by status.
fn load(
    addr: SocketAddr,
    clients: usize,
    stop: Arc<AtomicBool>,
) -> (
    Vec<std::thread::JoinHandle<()>>,
    Arc<AtomicU64>,
    Arc<AtomicU64>,
) {
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
    (threads, ok, failed)
}

#[test]
fn a_surge_scales_up_and_the_calm_scales_back_to_min_without_failures() {
    let scratch = Scratch::new("surge");
    let policy = scratch.0.join("policy.yaml");
    std::fs::write(&policy, quick_policy(1)).unwrap();
    let marker = format!("surge-{}", std::process::id());
    let up = Up::start(&policy, &marker);
    up.wait_for("first worker", Duration::from_secs(20), |n| n >= 1);

    // 16 clients back to back against workers that serve 2 at a time: about 8 are needed.
    let stop = Arc::new(AtomicBool::new(false));
    let (threads, ok, failed) = load(up.listen, 16, Arc::clone(&stop));
    let peak = up.wait_for("scale up", Duration::from_secs(20), |n| n >= 4);
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    assert!(peak >= 4, "scaled up to {peak}");
    // The calm: back to min, and every request through the churn answered 200.
    up.wait_for("scale down to min", Duration::from_secs(30), |n| n == 1);
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "requests failed ({} ok)",
        ok.load(Ordering::Relaxed)
    );
    assert!(ok.load(Ordering::Relaxed) > 100);
}

#[test]
fn a_policy_reload_takes_effect_and_a_bad_one_is_ignored() {
    let scratch = Scratch::new("reload");
    let policy = scratch.0.join("policy.yaml");
    std::fs::write(&policy, quick_policy(1)).unwrap();
    let marker = format!("reload-{}", std::process::id());
    let up = Up::start(&policy, &marker);
    up.wait_for("first worker", Duration::from_secs(20), |n| n == 1);
    // A broken policy is refused; the old one stays in force.
    std::thread::sleep(Duration::from_millis(1100)); // a new modification time
    std::fs::write(
        &policy,
        "name: quick\ntemplate: app\nworkers: {min: 9, max: 2}\n",
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(up.ready_workers(), 1);
    // A good one takes effect without a restart.
    std::fs::write(&policy, quick_policy(3)).unwrap();
    up.wait_for("min raised to 3", Duration::from_secs(15), |n| n == 3);
}

#[test]
fn sigterm_stops_everything_and_leaves_nothing_running() {
    let scratch = Scratch::new("sigterm");
    let policy = scratch.0.join("policy.yaml");
    std::fs::write(&policy, quick_policy(2)).unwrap();
    let marker = format!("sigterm-{}", std::process::id());
    let mut up = Up::start(&policy, &marker);
    up.wait_for("two workers", Duration::from_secs(20), |n| n == 2);
    // squall up, the zygote and two clones.
    assert!(up.processes() >= 4, "{} processes", up.processes());
    let status = Command::new("kill")
        .args(["-TERM", &up.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = up.child.wait().unwrap();
    assert!(exit.success(), "{exit:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while up.processes() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(up.processes(), 0, "everything squall up started is gone");
}

#[test]
fn a_bad_policy_at_start_is_a_clear_error_and_exit_2() {
    let scratch = Scratch::new("bad");
    let policy = scratch.0.join("bad.yaml");
    std::fs::write(
        &policy,
        "name: x\ntemplate: app\nworkers: {min: 5, max: 2}\ntick: 100\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_squall"))
        .args(["up", "--policy"])
        .arg(&policy)
        .args(["--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    let p = policy.display();
    assert!(
        stderr.contains(&format!(
            "{p}:3:16: workers.min: is 5, more than workers.max (2)"
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("{p}:4:7: tick: `100` has no unit")),
        "{stderr}"
    );
}

#[test]
fn vm_driver_absorbs_a_small_surge() {
    // The demo app as its own binary (smaller than squall): it goes into the guest's
    // initramfs and listens on port 80 there.
    let squall = std::path::Path::new(env!("CARGO_BIN_EXE_squall"));
    let warm_app = squall.with_file_name("warm-app");
    assert!(
        warm_app.exists(),
        "build the demo app first: cargo build -p warm-app ({})",
        warm_app.display()
    );
    let scratch = Scratch::new("vm");
    let policy = scratch.0.join("policy.yaml");
    std::fs::write(
        &policy,
        "name: vm\ntemplate: app\nworkers: {min: 1, max: 4}\ntarget: {concurrency: 2}\n\
         window: {stable: 2s, panic: 500ms}\nscale_down: {delay: 2s, drain_timeout: 5s}\n",
    )
    .unwrap();
    let mut app = vec![
        warm_app.display().to_string(),
        "--listen".into(),
        "0.0.0.0:80".into(),
    ];
    app.extend(APP_ARGS.map(String::from));
    let marker = format!("vm-{}", std::process::id());
    let up = Up::start_with(&policy, &marker, "vm", &app);
    up.wait_for("first microVM worker", Duration::from_secs(120), |n| n >= 1);
    assert_eq!(get(up.listen, "/random").0, 200);

    let stop = Arc::new(AtomicBool::new(false));
    let (threads, ok, failed) = load(up.listen, 6, Arc::clone(&stop));
    let peak = up.wait_for("scale up", Duration::from_secs(60), |n| n >= 2);
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    assert!(peak >= 2);
    up.wait_for("back to min", Duration::from_secs(60), |n| n == 1);
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "{} answered",
        ok.load(Ordering::Relaxed)
    );
}

/// A `squall forkd` daemon of the test's own, killed when dropped.
struct Forkd {
    child: Child,
    url: String,
}

impl Forkd {
    fn start(token_file: &std::path::Path, marker: &str) -> Forkd {
        let mut child = Command::new(env!("CARGO_BIN_EXE_squall"))
            .args([
                "forkd",
                "--listen",
                "127.0.0.1:0",
                "--kill-grace",
                "1",
                "--token-file",
            ])
            .arg(token_file)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .env("SQUALL_TEST_MARKER", marker)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The address is in the log; keep draining it so forkd never blocks on a full pipe.
        let stderr = child.stderr.take().unwrap();
        let (found, address) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some((_, rest)) = line.split_once("addr=") {
                    let addr: String = rest.chars().take_while(|c| !c.is_whitespace()).collect();
                    let addr =
                        addr.trim_matches(|c: char| !(c.is_ascii_digit() || c == '.' || c == ':'));
                    let _ = found.send(addr.to_owned());
                }
            }
        });
        let addr = address
            .recv_timeout(Duration::from_secs(20))
            .expect("forkd logs its address");
        Forkd {
            child,
            url: format!("http://{addr}"),
        }
    }
}

impl Drop for Forkd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn clones_spread_over_forkd_hosts_and_a_killed_host_is_survived() {
    let scratch = Scratch::new("hosts");
    let token_file = scratch.0.join("token");
    std::fs::write(&token_file, "test-token-for-two-hosts\n").unwrap();
    let marker = format!("hosts-{}", std::process::id());
    let mut a = Forkd::start(&token_file, &marker);
    let b = Forkd::start(&token_file, &marker);
    let policy = scratch.0.join("policy.yaml");
    std::fs::write(&policy, quick_policy(4)).unwrap();

    let squall = env!("CARGO_BIN_EXE_squall");
    let mut app = vec![squall.to_owned(), "warm-app".to_owned()];
    app.extend(APP_ARGS.map(String::from));
    let extra = [
        "--forkd".to_owned(),
        a.url.clone(),
        "--forkd".to_owned(),
        b.url.clone(),
        "--forkd-token-file".to_owned(),
        token_file.display().to_string(),
    ];
    let up = Up::start_full(&policy, &marker, "fork", &extra, &app);
    up.wait_for("four workers", Duration::from_secs(30), |n| n == 4);
    let clones_on = |forkd: &Forkd| {
        let out = Command::new(squall)
            .args([
                "forkd",
                "--listen",
                forkd.url.trim_start_matches("http://"),
                "--token-file",
            ])
            .arg(&token_file)
            .arg("clones")
            .output()
            .unwrap();
        let clones: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        clones
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["state"] == "ready")
            .count()
    };
    let (count_a, count_b) = (clones_on(&a), clones_on(&b));
    assert!(
        count_a >= 1 && count_b >= 1,
        "spread over both hosts: {count_a} + {count_b}"
    );

    // Host A dies with its clones; the pool is rebuilt on B and the app keeps answering.
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    // Within a health check (1 s) A's workers leave the pool and B makes up the count.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(clones_on(&b) >= 4 && up.ready_workers() == 4) {
        assert!(Instant::now() < deadline, "the pool was not rebuilt on B");
        std::thread::sleep(Duration::from_millis(100));
    }
    for _ in 0..20 {
        assert_eq!(get(up.listen, "/").0, 200);
    }
    drop(up);
    drop(b);
}

#[test]
fn forkd_hosts_can_be_found_by_dns_name() {
    let scratch = Scratch::new("dns");
    let token_file = scratch.0.join("token");
    std::fs::write(&token_file, "test-token-for-dns\n").unwrap();
    let marker = format!("dns-{}", std::process::id());
    let forkd = Forkd::start(&token_file, &marker);
    let port = forkd.url.rsplit(':').next().unwrap();
    let policy = scratch.0.join("policy.yaml");
    std::fs::write(&policy, quick_policy(2)).unwrap();
    let squall = env!("CARGO_BIN_EXE_squall");
    let mut app = vec![squall.to_owned(), "warm-app".to_owned()];
    app.extend(APP_ARGS.map(String::from));
    let extra = [
        "--forkd-dns".to_owned(),
        format!("localhost:{port}"),
        "--forkd-token-file".to_owned(),
        token_file.display().to_string(),
    ];
    let up = Up::start_full(&policy, &marker, "fork", &extra, &app);
    up.wait_for(
        "two workers from the host found by name",
        Duration::from_secs(30),
        |n| n == 2,
    );
    assert_eq!(get(up.listen, "/").0, 200);
}
