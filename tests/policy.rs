//! `squall policy check` and `squall policy simulate`, run as a user runs them.
#![allow(clippy::unwrap_used)] // In tests a panic is a failed test, which is the point.

mod common;

use std::path::Path;

use common::{Scratch, squall, squall_exits, squall_ok};

fn repo(path: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(path)
        .display()
        .to_string()
}

/// Writes `text` to `name` in `scratch`; returns its path.
fn file(scratch: &Scratch, name: &str, text: &str) -> String {
    let path = scratch.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[test]
fn check_prints_each_example_normalized() {
    let files = [
        repo("policies/examples/latency-slo.yaml"),
        repo("policies/examples/concurrency-api.yaml"),
        repo("policies/examples/cost-saver.yaml"),
    ];
    let args: Vec<&str> = std::iter::once("policy")
        .chain(std::iter::once("check"))
        .chain(files.iter().map(String::as_str))
        .collect();
    let stdout = squall_ok(&args);
    assert_eq!(stdout.matches(": ok\n").count(), 3, "{stdout}");
    // Defaults are written out: the concurrency API's file gives no latency target.
    assert!(stdout.contains("name: orders-api"));
    assert!(stdout.contains("latency_p95: null"));
    assert!(stdout.contains("max_step: 25%"));
}

#[test]
fn check_lists_every_mistake_and_exits_2() {
    let scratch = Scratch::new("check");
    let good = file(&scratch, "good.yaml", "name: a\ntemplate: b\n");
    let bad = file(
        &scratch,
        "bad.yaml",
        "name: a\ntemplate: b\nworkers: {min: 9, max: 3}\nscale_down:\n  dealy: 30s\ntick: 5\n",
    );
    let out = squall(&["policy", "check", &good, &bad]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines,
        [
            format!(
                "{bad}:3:16: workers.min: is 9, more than workers.max (3): expected min <= max"
            ),
            format!(
                "{bad}:5:3: scale_down: unknown key `dealy`: did you mean `delay`? (known keys: delay, max_step, cooldown, drain_timeout)"
            ),
            format!("{bad}:6:7: tick: `5` has no unit: write it as, for example, 5ms or 5s"),
        ]
    );
    // The good file is still checked and printed.
    assert!(
        String::from_utf8(out.stdout)
            .unwrap()
            .contains("good.yaml: ok")
    );
}

#[test]
fn check_reports_a_missing_file_plainly() {
    let stderr = squall_exits(2, &["policy", "check", "/nonexistent/p.yaml"]);
    assert!(
        stderr.starts_with("/nonexistent/p.yaml: cannot read the policy"),
        "{stderr}"
    );
}

#[test]
fn simulate_prints_ticks_and_a_summary_and_writes_csv_and_svg() {
    let scratch = Scratch::new("simulate");
    let csv = scratch.join("run.csv").display().to_string();
    let svg = scratch.join("run.svg").display().to_string();
    let stdout = squall_ok(&[
        "policy",
        "simulate",
        &repo("policies/default.yaml"),
        "--trace",
        &repo("policies/examples/traces/flash-crowd.csv"),
        "--csv",
        &csv,
        "--svg",
        &svg,
    ]);
    // A line per tick (1200 of them over 120 s at 100 ms), then the summary.
    assert!(
        stdout.lines().filter(|l| l.contains("s ")).count() >= 1200,
        "{stdout}"
    );
    assert!(
        stdout.contains("surge at 40.0s: p95 back under the 150ms SLO after"),
        "{stdout}"
    );
    assert!(stdout.contains("worker-seconds:"));
    assert!(stdout.contains("0 failed"));
    let csv = std::fs::read_to_string(csv).unwrap();
    assert!(csv.starts_with(
        "time_s,rate_rps,demand,desired,ready,pending,draining,panic,p95_ms,reason\n"
    ));
    assert_eq!(csv.lines().count(), 1201);
    let svg = std::fs::read_to_string(svg).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("polyline"));
}

#[test]
fn simulate_rejects_a_bad_trace_with_its_line() {
    let scratch = Scratch::new("trace");
    let trace = file(
        &scratch,
        "t.csv",
        "time,rate,service\n0s,10,20ms\n5s,lots,20ms\n",
    );
    let stderr = squall_exits(
        2,
        &[
            "policy",
            "simulate",
            &repo("policies/default.yaml"),
            "--trace",
            &trace,
            "-q",
        ],
    );
    assert_eq!(
        stderr.trim(),
        format!("{trace}:3: rate: `lots` is not a number of requests per second")
    );
}
