//! `squall up` end to end: the real binary, its embedded forkd forking the demo app (built
//! into squall as `squall warm-app`), real HTTP on loopback.
#![allow(clippy::unwrap_used)] // In tests a panic is a failed test, which is the point.

mod common;

use std::io::{BufRead, BufReader};

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;

#[test]
fn a_surge_scales_up_and_the_calm_scales_back_to_min_without_failures() {
    let scratch = Scratch::new("surge");
    let policy = scratch.join("policy.yaml");
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
    let policy = scratch.join("policy.yaml");
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
    let policy = scratch.join("policy.yaml");
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
    let policy = scratch.join("bad.yaml");
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
    let policy = scratch.join("policy.yaml");
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
    // Stopped, the embedded forkd deletes its template: the image it built and its run
    // directory go too.
    let run_dir = std::env::temp_dir().join(format!("squall-forkd-vm-{}", up.child.id()));
    assert!(run_dir.exists(), "{} while running", run_dir.display());
    drop(up);
    assert!(!run_dir.exists(), "{} is left behind", run_dir.display());
}

/// A `squall forkd` daemon of the test's own, killed when dropped.
struct Forkd {
    child: Child,
    url: String,
}

impl Forkd {
    fn start(token_file: &std::path::Path, marker: &str) -> Forkd {
        Self::start_with(token_file, marker, &[])
    }

    /// With more arguments for `squall forkd`.
    fn start_with(token_file: &std::path::Path, marker: &str, args: &[&str]) -> Forkd {
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
            .args(args)
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
    let token_file = scratch.join("token");
    std::fs::write(&token_file, "test-token-for-two-hosts\n").unwrap();
    let marker = format!("hosts-{}", std::process::id());
    let mut a = Forkd::start(&token_file, &marker);
    let b = Forkd::start(&token_file, &marker);
    let policy = scratch.join("policy.yaml");
    std::fs::write(&policy, quick_policy(4)).unwrap();

    let up = up_on(&policy, &marker, &[&a, &b], &token_file);
    up.wait_for("four workers", Duration::from_secs(30), |n| n == 4);
    let clones_on = |forkd: &Forkd| ready_clones_on(forkd, &token_file);
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
    let token_file = scratch.join("token");
    std::fs::write(&token_file, "test-token-for-dns\n").unwrap();
    let marker = format!("dns-{}", std::process::id());
    let forkd = Forkd::start(&token_file, &marker);
    let port = forkd.url.rsplit(':').next().unwrap();
    let policy = scratch.join("policy.yaml");
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

#[test]
fn a_full_forkd_host_keeps_its_workers_and_the_others_get_the_clones() {
    let scratch = Scratch::new("full");
    let token_file = scratch.join("token");
    std::fs::write(&token_file, "test-token-for-a-full-host\n").unwrap();
    let marker = format!("full-{}", std::process::id());
    // A holds at most two clones; B has room.
    let a = Forkd::start_with(&token_file, &marker, &["--max-clones", "2"]);
    let b = Forkd::start(&token_file, &marker);
    let policy = scratch.join("policy.yaml");
    std::fs::write(&policy, quick_policy(2)).unwrap();
    let up = up_on(&policy, &marker, &[&a, &b], &token_file);
    up.wait_for("two workers", Duration::from_secs(30), |n| n == 2);
    let clones_on_a = ready_clone_ids_on(&a, &token_file);
    assert_eq!(clones_on_a.len(), 1, "one on each host: {clones_on_a:?}");

    // Six are needed: the scaler asks both hosts for two more each; A refuses (at its
    // limit, 503). A is full, not down: its worker stays, and B gets the rest.
    reload_policy(&up, &policy, &quick_policy(6));
    up.wait_for("six workers", Duration::from_secs(30), |n| n == 6);
    // Two host checks later (a host marked down is found again by a check, and its clones
    // the scaler forgot are then killed as orphans) A's first worker is still serving.
    std::thread::sleep(Duration::from_millis(2500));
    let now_on_a = ready_clone_ids_on(&a, &token_file);
    assert!(
        clones_on_a.iter().all(|id| now_on_a.contains(id)),
        "A's worker was dropped: {clones_on_a:?} then {now_on_a:?}"
    );
    assert_eq!(up.ready_workers(), 6);
    let (_, metrics) = get(up.admin, "/metrics");
    assert!(
        metrics.contains("squall_forkd_hosts{state=\"down\"} 0"),
        "a full host is not a down host"
    );
    assert_eq!(get(up.listen, "/").0, 200);
}

#[test]
fn a_host_with_some_room_left_is_asked_for_what_fits() {
    let scratch = Scratch::new("room");
    let token_file = scratch.join("token");
    std::fs::write(&token_file, "test-token-for-room-left\n").unwrap();
    let marker = format!("room-{}", std::process::id());
    let forkd = Forkd::start_with(&token_file, &marker, &["--max-clones", "4"]);
    let policy = scratch.join("policy.yaml");
    std::fs::write(&policy, quick_policy(2)).unwrap();
    let up = up_on(&policy, &marker, &[&forkd], &token_file);
    up.wait_for("two workers", Duration::from_secs(30), |n| n == 2);
    // Six wanted, room for two more: the request for four is refused whole, and the scaler
    // asks for fewer until the host is full.
    reload_policy(&up, &policy, &quick_policy(6));
    up.wait_for(
        "the host filled to its limit",
        Duration::from_secs(30),
        |n| n == 4,
    );
    assert_eq!(ready_clones_on(&forkd, &token_file), 4);
    let (_, metrics) = get(up.admin, "/metrics");
    assert!(
        metrics.contains("squall_forkd_hosts{state=\"down\"} 0"),
        "a full host is not a down host"
    );
}

/// `squall up` running the demo app (fork driver) on the forkd daemons `hosts`.
fn up_on(
    policy: &std::path::Path,
    marker: &str,
    hosts: &[&Forkd],
    token_file: &std::path::Path,
) -> Up {
    let squall = env!("CARGO_BIN_EXE_squall");
    let mut app = vec![squall.to_owned(), "warm-app".to_owned()];
    app.extend(APP_ARGS.map(String::from));
    let mut extra = Vec::new();
    for forkd in hosts {
        extra.extend(["--forkd".to_owned(), forkd.url.clone()]);
    }
    extra.extend([
        "--forkd-token-file".to_owned(),
        token_file.display().to_string(),
    ]);
    Up::start_full(policy, marker, "fork", &extra, &app)
}

/// Writes `text` to the policy file and tells `up` to reload it now (SIGHUP).
fn reload_policy(up: &Up, policy: &std::path::Path, text: &str) {
    std::fs::write(policy, text).unwrap();
    let _ = Command::new("kill")
        .args(["-HUP", &up.child.id().to_string()])
        .status();
}

/// Clones `forkd` lists as ready, asked through `squall forkd clones`.
fn ready_clones_on(forkd: &Forkd, token_file: &std::path::Path) -> usize {
    ready_clone_ids_on(forkd, token_file).len()
}

/// The ids of the clones `forkd` lists as ready.
fn ready_clone_ids_on(forkd: &Forkd, token_file: &std::path::Path) -> Vec<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_squall"))
        .args([
            "forkd",
            "--listen",
            forkd.url.trim_start_matches("http://"),
            "--token-file",
        ])
        .arg(token_file)
        .arg("clones")
        .output()
        .unwrap();
    let clones: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    clones
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["state"] == "ready")
        .map(|c| c["id"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn a_squall_up_killed_and_started_again_takes_over_its_template_and_kills_orphans() {
    let scratch = Scratch::new("orphans");
    let token_file = scratch.join("token");
    std::fs::write(&token_file, "test-token-for-orphans\n").unwrap();
    let marker = format!("orphans-{}", std::process::id());
    let forkd = Forkd::start(&token_file, &marker);
    let policy = scratch.join("policy.yaml");
    std::fs::write(&policy, quick_policy(3)).unwrap();
    let mut first = up_on(&policy, &marker, &[&forkd], &token_file);
    first.wait_for("three workers", Duration::from_secs(30), |n| n == 3);
    // Killed outright (an OOM kill, say): its template and clones stay on forkd.
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    assert_eq!(ready_clones_on(&forkd, &token_file), 3);

    // The next one takes the template over instead of failing on "template exists", and
    // kills the three orphans, so forkd ends up with only the new scaler's three.
    let second = up_on(&policy, &marker, &[&forkd], &token_file);
    second.wait_for("three new workers", Duration::from_secs(30), |n| n == 3);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let on_forkd = ready_clones_on(&forkd, &token_file);
        if on_forkd == 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "orphans not killed: forkd has {on_forkd} clones, squall up 3"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(get(second.listen, "/").0, 200);
}
