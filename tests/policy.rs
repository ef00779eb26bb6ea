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

#[test]
fn simulate_compare_prints_squall_and_the_models_side_by_side() {
    let scratch = Scratch::new("compare");
    let csv = scratch.join("run.csv").display().to_string();
    let stdout = squall_ok(&[
        "policy",
        "simulate",
        &repo("policies/default.yaml"),
        "--trace",
        &repo("policies/examples/traces/flash-crowd.csv"),
        "--compare",
        "kpa,hpa",
        "--cold-start",
        "2s",
        "--csv",
        &csv,
    ]);
    // A legend that says what each column is, clearly labelled as models.
    for line in [
        "  squall  squall (policy default), clone delay 5ms",
        "  kpa     model of Knative KPA (published algorithm, defaults), cold start 2s",
        "  hpa     model of Kubernetes HPA (published algorithm, defaults), cold start 2s",
    ] {
        assert!(stdout.lines().any(|l| l == line), "{line:?} in:\n{stdout}");
    }
    // A header of the three, and a row per measure with a value for each.
    assert!(
        stdout
            .lines()
            .any(|l| l.split_whitespace().eq(["squall", "kpa", "hpa"])),
        "{stdout}"
    );
    for row in [
        "p95 back under the 150ms SLO after the surge at 40.0s",
        "100ms ticks over the SLO (of 1200)",
        "worker-seconds",
        "peak workers",
        "requests completed",
        "requests failed",
        "latency p95",
        "latency p99",
    ] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(row))
            .unwrap_or_else(|| panic!("no row {row:?} in:\n{stdout}"));
        assert_eq!(line[row.len()..].split_whitespace().count(), 3, "{line:?}");
    }
    assert!(
        stdout.contains("they are not the real controllers"),
        "{stdout}"
    );
    // No line per tick: the runs are in the CSV files, one per autoscaler.
    assert!(stdout.lines().count() < 40, "{stdout}");
    for (name, reason) in [
        ("run.csv", "workers"),
        ("run-kpa.csv", "KPA model: "),
        ("run-hpa.csv", "HPA model: "),
    ] {
        let text = std::fs::read_to_string(scratch.join(name)).unwrap();
        assert_eq!(text.lines().count(), 1201, "{name}");
        assert!(text.contains(reason), "{name}");
    }
}

#[test]
fn simulate_compare_refuses_an_unknown_model_and_lists_the_valid_ones() {
    let stderr = squall_exits(
        2,
        &[
            "policy",
            "simulate",
            &repo("policies/default.yaml"),
            "--trace",
            &repo("policies/examples/traces/flash-crowd.csv"),
            "--compare",
            "kpa,knative",
        ],
    );
    assert!(
        stderr.contains("unknown model `knative`: expected one of kpa, hpa"),
        "{stderr}"
    );
    // A cold start only means something with models to compare.
    let stderr = squall_exits(
        2,
        &[
            "policy",
            "simulate",
            &repo("policies/default.yaml"),
            "--trace",
            &repo("policies/examples/traces/flash-crowd.csv"),
            "--cold-start",
            "2s",
        ],
    );
    assert!(stderr.contains("--compare"), "{stderr}");
}

#[test]
fn simulate_writes_nothing_but_its_report() {
    // Everything goes to standard output; standard error is for errors only.
    let out = squall(&[
        "policy",
        "simulate",
        &repo("policies/default.yaml"),
        "--trace",
        &repo("policies/examples/traces/flash-crowd.csv"),
        "--compare",
        "kpa,hpa",
    ]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");
}
