//! `squall up` end to end: the real binary, its embedded forkd forking the demo app (built
//! into squall as `squall warm-app`), real HTTP on loopback.
#![allow(clippy::unwrap_used)] // In tests a panic is a failed test, which is the point.

mod common;

use std::time::{Duration, Instant};

use common::*;

#[test]
fn a_surge_scales_up_and_the_calm_scales_back_to_min_without_failures() {
    let case = Case::new("surge");
    let up = case.up(&quick_policy(1));
    up.wait_for("first worker", Duration::from_secs(20), |n| n >= 1);

    // 16 clients back to back against workers that serve 2 at a time: about 8 are needed.
    let mut load = Load::start(up.listen, 16);
    up.wait_for("scale up", Duration::from_secs(20), |n| n >= 4);
    // The load goes on while the pool grows: 200 more answers through the churn.
    let at_peak = load.ok();
    test_support::wait_until(
        "200 answers after the scale-up",
        Duration::from_secs(30),
        || (load.ok() >= at_peak + 200).then_some(()),
    );
    load.stop();
    // The calm: back to min, and every request through the churn answered 200.
    up.wait_for("scale down to min", Duration::from_secs(30), |n| n == 1);
    assert_eq!(load.failed(), 0, "requests failed ({} ok)", load.ok());
}

#[test]
fn a_policy_reload_takes_effect_and_a_bad_one_is_ignored() {
    let case = Case::new("reload");
    let up = case.up(&quick_policy(1));
    up.wait_for("first worker", Duration::from_secs(20), |n| n == 1);
    let refused = "squall_policy_reloads_total{outcome=\"refused\"}";
    let applied = "squall_policy_reloads_total{outcome=\"applied\"}";
    // A broken policy is refused once the watcher sees it; the old one stays in force.
    rewrite(
        &case.policy,
        "name: quick\ntemplate: app\nworkers: {min: 9, max: 2}\n",
    );
    up.wait_for_metric(refused, Duration::from_secs(10), |n| n == 1.0);
    assert_eq!(up.metric(applied), 0.0);
    assert_eq!(up.status()["policy"]["min"], 1);
    assert_eq!(up.ready_workers(), 1);
    // A good one takes effect without a restart: the scaler's bounds, and the windows the
    // balancer measures over (2 s / 500 ms before).
    let wider = quick_policy(3).replace(
        "window: {stable: 2s, panic: 500ms}",
        "window: {stable: 20s, panic: 5s}",
    );
    assert_ne!(wider, quick_policy(3), "the windows changed");
    rewrite(&case.policy, &wider);
    up.wait_for("min raised to 3", Duration::from_secs(15), |n| n == 3);
    let status = up.status();
    assert_eq!(status["stable"]["window_seconds"], 20.0, "{status}");
    assert_eq!(status["panic"]["window_seconds"], 5.0, "{status}");
}

#[test]
fn sighup_reloads_the_policy_on_its_own() {
    let case = Case::new("sighup");
    let up = case.up(&quick_policy(1));
    up.wait_for("first worker", Duration::from_secs(20), |n| n == 1);
    let policy = &case.policy;
    // New content under the old modification time, put in place at once (written beside
    // it, dated, renamed over it): the file watcher never sees a change...
    let seen = std::fs::metadata(policy).unwrap().modified().unwrap();
    let next = policy.with_extension("next");
    std::fs::write(&next, quick_policy(2)).unwrap();
    let file = std::fs::File::options().write(true).open(&next).unwrap();
    file.set_modified(seen).unwrap();
    std::fs::rename(&next, policy).unwrap();
    assert_eq!(std::fs::metadata(policy).unwrap().modified().unwrap(), seen);
    // ...so only the signal reloads it.
    up.signal("HUP");
    up.wait_for("min raised to 2 by SIGHUP", Duration::from_secs(15), |n| {
        n == 2
    });
    assert_eq!(
        up.metric("squall_policy_reloads_total{outcome=\"applied\"}"),
        1.0
    );
}

#[test]
fn a_reload_that_changes_the_template_is_refused() {
    let case = Case::new("retemplate");
    let up = case.up(&quick_policy(1));
    up.wait_for("first worker", Duration::from_secs(20), |n| n == 1);
    rewrite(
        &case.policy,
        &quick_policy(2).replace("template: app", "template: other"),
    );
    up.wait_for_metric(
        "squall_policy_reloads_total{outcome=\"refused\"}",
        Duration::from_secs(10),
        |n| n == 1.0,
    );
    let status = up.status();
    assert_eq!(status["policy"]["template"], "app", "{status}");
    assert_eq!(
        status["policy"]["min"], 1,
        "the whole new policy was refused"
    );
    assert_eq!(get(up.listen, "/").0, 200);
}

#[test]
fn a_drain_that_times_out_kills_the_worker_and_its_get_goes_on_elsewhere() {
    let case = Case::new("drain-timeout");
    let with_min = |min: u32| {
        quick_policy(min).replace(
            "scale_down: {delay: 2s, max_step: 2, drain_timeout: 5s}",
            "scale_down: {delay: 1s, max_step: 2, drain_timeout: 1s}",
        )
    };
    assert_ne!(with_min(2), quick_policy(2));
    let up = case.up(&with_min(2));
    up.wait_for("two workers", Duration::from_secs(20), |n| n == 2);
    // One slow request on each worker (the balancer sends the second to the idle one).
    let slow: Vec<_> = (0..2)
        .map(|_| {
            let addr = up.listen;
            std::thread::spawn(move || {
                let reply = test_support::http::try_get(addr, "/slow?ms=8000");
                reply.map(|r| r.status).unwrap_or(0)
            })
        })
        .collect();
    test_support::wait_until("both workers busy", Duration::from_secs(10), || {
        let status = up.status();
        let workers = status["workers"].as_array().unwrap().clone();
        (workers.len() == 2 && workers.iter().all(|w| w["in_flight"] == 1)).then_some(())
    });
    // One worker too many: it is drained, holds its request past the 1 s drain timeout,
    // and is killed with it.
    rewrite(&case.policy, &with_min(1));
    up.wait_for_metric(
        "squall_scaler_drains_total{end=\"timeout\"}",
        Duration::from_secs(20),
        |n| n == 1.0,
    );
    up.wait_for("back to one worker", Duration::from_secs(10), |n| n == 1);
    assert_eq!(up.metric("squall_scaler_drains_total{end=\"idle\"}"), 0.0);
    // The killed worker's GET was sent again to the other one (once that one had room):
    // both are answered.
    let statuses: Vec<u16> = slow.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(statuses, [200, 200]);
    assert_eq!(up.metric("squall_retries_total"), 1.0);
}

#[test]
fn sigterm_stops_everything_and_leaves_nothing_running() {
    let case = Case::new("sigterm");
    let mut up = case.up(&quick_policy(2));
    up.wait_for("two workers", Duration::from_secs(20), |n| n == 2);
    // squall up, the zygote and two clones.
    assert!(up.processes() >= 4, "{} processes", up.processes());
    let exit = terminate(&mut up.child);
    assert!(exit.success(), "{exit:?}");
    test_support::wait_until(
        "everything squall up started is gone",
        Duration::from_secs(10),
        || (up.processes() == 0).then_some(()),
    );
}

#[test]
fn an_orderly_shutdown_with_the_fork_driver_logs_no_zygote_socket_error() {
    let case = Case::new("quiet-stop");
    // Each round's clones are killed at shutdown while the template reports their exits, the
    // moment an ending connection used to reset the template's socket (about one round in
    // ten did; `forkd::driver::fork`'s unit test pins the cause down).
    for round in 0..5 {
        let log = case.scratch.join(format!("stderr-{round}.log"));
        let mut up = case.up_logged(&quick_policy(6), &log);
        up.wait_for("six workers", Duration::from_secs(20), |n| n == 6);
        let exit = terminate(&mut up.child);
        assert!(exit.success(), "{exit:?}");
        test_support::wait_until(
            "everything squall up started is gone",
            Duration::from_secs(10),
            || (up.processes() == 0).then_some(()),
        );
        let stderr = std::fs::read_to_string(&log).unwrap();
        assert!(
            stderr.contains("SIGTERM: shutting down"),
            "round {round}: the log was not captured:\n{stderr}"
        );
        // An error of squall's (an ERROR line), or a complaint about the zygote socket from
        // anyone: a WARN or ERROR line, or the template's own message on its way out.
        let complaints: Vec<&str> = stderr
            .lines()
            .filter(|line| {
                let quiet = [" INFO ", " DEBUG ", " TRACE "]
                    .iter()
                    .any(|level| line.contains(level));
                line.contains(" ERROR ") || (line.contains("zygote") && !quiet)
            })
            .collect();
        assert!(
            complaints.is_empty(),
            "round {round}: an orderly shutdown logged {complaints:#?}\nstderr:\n{stderr}"
        );
    }
}

#[test]
fn sigterm_lets_requests_in_flight_finish_before_the_workers_are_killed() {
    let case = Case::new("sigterm-drain");
    let mut up = case.up(&quick_policy(1));
    up.wait_for("one worker", Duration::from_secs(20), |n| n == 1);
    let addr = up.listen;
    let slow = std::thread::spawn(move || test_support::http::get(addr, "/slow?ms=3000"));
    test_support::wait_until(
        "the slow request at its worker",
        Duration::from_secs(10),
        || {
            let status = up.status();
            (status["in_flight"] == 1).then_some(())
        },
    );
    let exit = terminate(&mut up.child);
    assert!(exit.success(), "{exit:?}");
    // The balancer finished it before the scaler killed its worker.
    let reply = slow.join().unwrap();
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (200, "slept 3000 ms\n")
    );
}

#[test]
fn sigint_stops_a_squall_up_that_is_still_looking_for_forkd_hosts() {
    let case = Case::new("sigint-start");
    case.write_policy(&quick_policy(1));
    // No daemon will ever answer this name: squall up keeps looking (for up to two minutes).
    let mut child = ChildGuard(
        std::process::Command::new(env!("CARGO_BIN_EXE_squall"))
            .args(["up", "--policy"])
            .arg(&case.policy)
            .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .args([
                "--forkd-dns",
                "nonexistent.invalid:7070",
                "--forkd-token-file",
            ])
            .arg(&case.token_file)
            .args(["--", "true"])
            .env("RUST_LOG", "info")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    log_line(&mut child.0, "no forkd host is ready yet");
    signal(&child.0, "INT");
    let exited = test_support::wait_until("squall up exits", Duration::from_secs(10), || {
        child.0.try_wait().unwrap()
    });
    assert!(exited.success(), "{exited:?}");
}

#[test]
fn a_bad_policy_at_start_is_a_clear_error_and_exit_2() {
    let case = Case::new("bad");
    case.write_policy("name: x\ntemplate: app\nworkers: {min: 5, max: 2}\ntick: 100\n");
    let p = case.policy.display().to_string();
    let stderr = squall_exits(2, &["up", "--policy", &p, "--", "true"]);
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
    let case = Case::new("vm");
    case.write_policy(
        "name: vm\ntemplate: app\nworkers: {min: 1, max: 4}\ntarget: {concurrency: 2}\n\
         window: {stable: 2s, panic: 500ms}\nscale_down: {delay: 2s, drain_timeout: 5s}\n",
    );
    let mut app = vec![
        warm_app.display().to_string(),
        "--listen".into(),
        "0.0.0.0:80".into(),
    ];
    app.extend(APP_ARGS.map(String::from));
    let up = Up::start_full(&case.policy, &case.marker, "vm", &[], &app);
    up.wait_for("first microVM worker", Duration::from_secs(120), |n| n >= 1);
    assert_eq!(get(up.listen, "/random").0, 200);
    // The worker's QEMU runs under the accelerator this host allows (TCG where KVM cannot
    // boot a Linux guest).
    common::assert_expected_accelerator(&case.marker);

    let mut load = Load::start(up.listen, 6);
    up.wait_for("scale up", Duration::from_secs(60), |n| n >= 2);
    load.stop();
    up.wait_for("back to min", Duration::from_secs(60), |n| n == 1);
    assert_eq!(load.failed(), 0, "{} answered", load.ok());
    // Stopped, the embedded forkd deletes its template: the image it built and its run
    // directory go too.
    let run_dir = std::env::temp_dir().join(format!("squall-forkd-vm-{}", up.child.id()));
    assert!(run_dir.exists(), "{} while running", run_dir.display());
    drop(up);
    assert!(!run_dir.exists(), "{} is left behind", run_dir.display());
}

#[test]
fn clones_spread_over_forkd_hosts_and_a_killed_host_is_survived() {
    let case = Case::new("hosts");
    let mut a = case.forkd(&[]);
    let b = case.forkd(&[]);

    let up = case.up_on(&quick_policy(4), &[&a, &b]);
    up.wait_for("four workers", Duration::from_secs(30), |n| n == 4);
    let clones_on = |forkd: &Forkd| ready_clone_ids(forkd).len();
    let (count_a, count_b) = (clones_on(&a), clones_on(&b));
    assert!(
        count_a >= 1 && count_b >= 1,
        "spread over both hosts: {count_a} + {count_b}"
    );

    // Host A dies with its clones; the pool is rebuilt on B and the app keeps answering.
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    // Within a health check (1 s) A's workers leave the pool and B makes up the count.
    test_support::wait_until("the pool rebuilt on B", Duration::from_secs(30), || {
        (clones_on(&b) >= 4 && up.ready_workers() == 4).then_some(())
    });
    for _ in 0..20 {
        assert_eq!(get(up.listen, "/").0, 200);
    }
    drop(up);
    drop(b);
}

#[test]
fn forkd_hosts_can_be_found_by_dns_name() {
    let case = Case::new("dns");
    let forkd = case.forkd(&[]);
    let port = forkd.addr().port();
    case.write_policy(&quick_policy(2));
    let extra = [
        "--forkd-dns".to_owned(),
        format!("localhost:{port}"),
        "--forkd-token-file".to_owned(),
        case.token_file.display().to_string(),
    ];
    let up = Up::start_full(&case.policy, &case.marker, "fork", &extra, &demo_app());
    up.wait_for(
        "two workers from the host found by name",
        Duration::from_secs(30),
        |n| n == 2,
    );
    assert_eq!(get(up.listen, "/").0, 200);
}

#[test]
fn full_forkd_hosts_keep_their_workers_and_are_not_down() {
    let case = Case::new("full");
    // A holds at most two clones, B three: five in all.
    let a = case.forkd(&["--max-clones", "2"]);
    let b = case.forkd(&["--max-clones", "3"]);
    let up = case.up_on(&quick_policy(2), &[&a, &b]);
    up.wait_for("two workers", Duration::from_secs(30), |n| n == 2);

    // Eight are wanted; the hosts have room for five. The scaler fills each to its limit
    // (forkd reports it) and no further.
    reload_policy(&up, &case, &quick_policy(8));
    up.wait_for("both hosts full", Duration::from_secs(30), |n| n == 5);
    let (on_a, on_b) = (ready_clone_ids(&a), ready_clone_ids(&b));
    assert_eq!((on_a.len(), on_b.len()), (2, 3), "{on_a:?} {on_b:?}");
    // Full is not down: two more checks of each host later, every worker still serves (a
    // host marked down loses its workers, and its clones are then killed as orphans).
    let checks = "squall_forkd_host_checks_total{outcome=\"ok\"}";
    let before = up.metric(checks);
    up.wait_for_metric(checks, Duration::from_secs(10), |n| n >= before + 4.0);
    assert_eq!(ready_clone_ids(&a), on_a);
    assert_eq!(ready_clone_ids(&b), on_b);
    assert_eq!(up.ready_workers(), 5);
    assert_eq!(up.metric("squall_forkd_hosts{state=\"down\"}"), 0.0);
    assert_eq!(up.metric("squall_desired_workers"), 8.0);
    assert_eq!(get(up.listen, "/").0, 200);
}

#[test]
fn a_host_with_some_room_left_is_asked_for_what_fits() {
    let case = Case::new("room");
    let forkd = case.forkd(&["--max-clones", "4"]);
    let up = case.up_on(&quick_policy(2), &[&forkd]);
    up.wait_for("two workers", Duration::from_secs(30), |n| n == 2);
    // Six wanted, room for two more: forkd reports its limit, so the scaler asks for the two
    // that fit (a host that refuses a batch is asked for half as many; see the scaler's own
    // scenario tests), and the host ends full, not down.
    reload_policy(&up, &case, &quick_policy(6));
    up.wait_for(
        "the host filled to its limit",
        Duration::from_secs(30),
        |n| n == 4,
    );
    assert_eq!(ready_clone_ids(&forkd).len(), 4);
    let (_, metrics) = get(up.admin, "/metrics");
    assert!(
        metrics.contains("squall_forkd_hosts{state=\"down\"} 0"),
        "a full host is not a down host"
    );
}

/// Writes `text` to the case's policy file and tells `up` to reload it now (SIGHUP).
fn reload_policy(up: &Up, case: &Case, text: &str) {
    case.write_policy(text);
    up.signal("HUP");
}

/// The ids of the clones `forkd` lists as ready, asked through `squall forkd clones`.
fn ready_clone_ids(forkd: &Forkd) -> Vec<String> {
    forkd
        .cli(&["clones"])
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["state"] == "ready")
        .map(|c| c["id"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn a_squall_up_killed_and_started_again_takes_over_its_template_and_kills_orphans() {
    let case = Case::new("orphans");
    let forkd = case.forkd(&[]);
    let mut first = case.up_on(&quick_policy(3), &[&forkd]);
    first.wait_for("three workers", Duration::from_secs(30), |n| n == 3);
    // Killed outright (an OOM kill, say): its template and clones stay on forkd.
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    let orphans = ready_clone_ids(&forkd);
    assert_eq!(orphans.len(), 3, "{orphans:?}");

    // The next one takes the template over instead of failing on "template exists", and
    // kills the three orphans rather than adopting them: forkd ends up with the new
    // scaler's three clones, none of the old ones.
    let second = case.up_on(&quick_policy(3), &[&forkd]);
    second.wait_for("three new workers", Duration::from_secs(30), |n| n == 3);
    let now = test_support::wait_until("the orphans killed", Duration::from_secs(30), || {
        let ids = ready_clone_ids(&forkd);
        (ids.len() == 3 && !ids.iter().any(|id| orphans.contains(id))).then_some(ids)
    });
    let in_pool: Vec<String> = second.status()["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["id"].as_str().unwrap().to_owned())
        .collect();
    for id in &now {
        assert!(
            in_pool.iter().any(|w| w.starts_with(&format!("{id}@"))),
            "forkd's clone {id} is not a worker of the new scaler: {in_pool:?}"
        );
    }
    assert_eq!(get(second.listen, "/").0, 200);
}

#[test]
fn the_admin_listener_holds_at_most_64_connections_and_drops_idle_ones() {
    use std::io::{Read, Write};
    let case = Case::new("admin-limits");
    let up = case.up(&quick_policy(1));
    up.wait_for("first worker", Duration::from_secs(20), |n| n == 1);
    let ask = |stream: &mut std::net::TcpStream| -> std::io::Result<String> {
        stream.write_all(b"GET /status HTTP/1.1\r\nHost: t\r\n\r\n")?;
        let mut buf = [0u8; 512];
        let n = stream.read(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    };
    // 64 keep-alive connections, each served once and left open.
    let mut held: Vec<std::net::TcpStream> = (0..64)
        .map(|_| {
            let mut stream = std::net::TcpStream::connect(up.admin).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            assert!(ask(&mut stream).unwrap().starts_with("HTTP/1.1 200"));
            stream
        })
        .collect();
    // The 65th waits in the kernel's queue: its request gets no answer...
    let mut waiting = std::net::TcpStream::connect(up.admin).unwrap();
    waiting
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    assert!(ask(&mut waiting).is_err(), "a 65th connection was served");
    // ...until one of the 64 closes.
    drop(held.pop());
    waiting
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 512];
    let n = waiting.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    drop(held);
    // A client that sends no request head is closed after the 10 s header timeout.
    let mut idle = std::net::TcpStream::connect(up.admin).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let started = Instant::now();
    let closed = idle.read(&mut buf);
    let took = started.elapsed();
    assert!(matches!(closed, Ok(0)), "{closed:?}");
    assert!(
        took >= Duration::from_secs(9) && took < Duration::from_secs(25),
        "closed after {took:?}, against a 10 s header timeout"
    );
}

#[test]
fn a_start_timeout_outside_one_to_600_seconds_is_refused() {
    for given in ["0", "601", "soon"] {
        let stderr = squall_exits(2, &["up", "--start-timeout", given, "--", "true"]);
        assert!(
            stderr.contains("--start-timeout <SECONDS>"),
            "--start-timeout {given}: {stderr}"
        );
    }
}
