//! The shipped policies and traces: each loads, round-trips, and behaves on the flash crowd.
#![allow(clippy::unwrap_used)] // In tests a panic is a failed test, which is the point.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::trace;
use policies::{SimConfig, Trace, load, load_file, simulate};

fn examples() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("default.yaml"));
    files
}

#[test]
fn every_example_policy_is_valid_and_round_trips() {
    let files = examples();
    assert_eq!(files.len(), 4, "three examples and the default: {files:?}");
    for file in files {
        let policy = load_file(&file).unwrap_or_else(|e| panic!("{e}"));
        // The normalized form `squall policy check` prints loads back to the same policy,
        // through this crate's loader and through plain serde_yaml alike.
        let printed = serde_yaml::to_string(&policy.normalized()).unwrap();
        assert_eq!(
            load("printed", &printed).unwrap(),
            policy.normalized(),
            "{}",
            file.display()
        );
        let via_serde: policies::Policy = serde_yaml::from_str(&printed).unwrap();
        assert_eq!(via_serde, policy.normalized());
    }
}

#[test]
fn the_embedded_default_is_the_file() {
    let from_file = load_file(&Path::new(env!("CARGO_MANIFEST_DIR")).join("default.yaml")).unwrap();
    assert_eq!(policies::default_policy(), from_file);
    let embedded = Trace::parse_csv("embedded", policies::FLASH_CROWD_TRACE_CSV).unwrap();
    assert_eq!(embedded, trace("flash-crowd.csv"));
}

#[test]
fn traces_parse_and_have_their_surges() {
    let flash = trace("flash-crowd.csv");
    assert_eq!(flash.surges(), vec![Duration::from_secs(40)]);
    assert_eq!(flash.at(Duration::from_secs(50)).0, 2000.0);
    let ramp = trace("daily-ramp.csv");
    assert!(ramp.surges().is_empty(), "a ramp has no surge");
    assert_eq!(ramp.end(), Duration::from_secs(600));
}

#[test]
fn default_policy_absorbs_the_flash_crowd() {
    // Several seeds: each run's arrivals and service times differ. The crowd needs 2000 req/s
    // × 50 ms / 8 per worker = 13 workers: every run peaks within 17 (1.3 times that, rounded
    // up), and the typical one within 16.
    let mut peaks: Vec<u32> = (1..=8)
        .map(default_policy_absorbs_the_flash_crowd_with)
        .collect();
    peaks.sort_unstable();
    assert!(peaks[3] <= 16, "peaks {peaks:?}");
}

/// Checks one run; returns its peak.
fn default_policy_absorbs_the_flash_crowd_with(seed: u64) -> u32 {
    let policy = policies::default_policy();
    let config = SimConfig {
        seed,
        ..SimConfig::default()
    };
    let run = simulate(&policy, &trace("flash-crowd.csv"), &config).unwrap();
    let s = &run.summary;
    let (surge, recovered) = s.recoveries[0];
    assert_eq!(surge, Duration::from_secs(40));
    let recovered = recovered.expect("p95 comes back under the SLO");
    assert!(
        recovered <= Duration::from_secs(2),
        "seed {seed}: recovered after {recovered:?} of simulated time"
    );
    assert_eq!(s.failed, 0);
    // Met between ticks, as requests queued, and right-sized.
    assert!(s.activations > 0, "seed {seed}: no scale-up between ticks");
    assert!(
        s.peak_workers <= 17,
        "seed {seed}: peak {} workers",
        s.peak_workers
    );
    // Back to min once the crowd has gone, and fewer worker-seconds than a static pool
    // sized for the crowd over the trace.
    assert_eq!(
        run.ticks.last().unwrap().decision.desired,
        policy.workers.min
    );
    let static_peak = 13.0 * 120.0;
    assert!(
        s.worker_seconds < static_peak,
        "{} worker-seconds",
        s.worker_seconds
    );
    s.peak_workers
}

#[test]
fn a_slower_clone_recovers_later() {
    let policy = policies::default_policy();
    let crowd = trace("flash-crowd.csv");
    let fast = simulate(&policy, &crowd, &SimConfig::default()).unwrap();
    let slow = simulate(
        &policy,
        &crowd,
        &SimConfig {
            clone_delay: Duration::from_secs(5),
            ..SimConfig::default()
        },
    )
    .unwrap();
    let recovery = |r: &policies::Run| r.summary.recoveries[0].1.unwrap_or(Duration::MAX);
    assert!(recovery(&slow) > recovery(&fast) + Duration::from_secs(3));
    assert!(slow.summary.ticks_over_slo > fast.summary.ticks_over_slo);
}

#[test]
fn simulation_is_deterministic_for_a_seed() {
    let policy = policies::default_policy();
    let ramp = trace("daily-ramp.csv");
    let a = simulate(&policy, &ramp, &SimConfig::default()).unwrap();
    let b = simulate(&policy, &ramp, &SimConfig::default()).unwrap();
    assert_eq!(a, b);
    assert_eq!(a.to_csv().lines().count(), a.ticks.len() + 1);
    let svg = a.to_svg("ramp");
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert!(svg.contains("<polyline"));
}

#[test]
fn every_example_absorbs_the_flash_crowd() {
    let crowd = trace("flash-crowd.csv");
    for file in examples() {
        let policy = load_file(&file).unwrap();
        // The concurrency-only API has no SLO of its own; judge it on 150ms like the others.
        let config = SimConfig {
            slo: Some(
                policy
                    .target
                    .latency_p95
                    .map_or(Duration::from_millis(150), |d| d.get()),
            ),
            ..SimConfig::default()
        };
        let run = simulate(&policy, &crowd, &config).unwrap();
        let s = &run.summary;
        let recovered = s.recoveries[0]
            .1
            .unwrap_or_else(|| panic!("{}: never recovered", policy.name));
        assert!(
            recovered <= Duration::from_secs(3),
            "{}: recovered after {recovered:?}",
            policy.name
        );
        assert_eq!(s.failed, 0, "{}", policy.name);
        assert!(s.peak_workers <= policy.workers.max, "{}", policy.name);
        assert!(
            s.activations > 0 || run.ticks.iter().any(|t| t.decision.panic),
            "{}: a 40x surge is met between ticks or by a panic",
            policy.name
        );
    }
}

#[test]
fn the_trace_ends_where_it_says() {
    // Four fixed workers, each request 2 s, 100 requests/s for 10 s: far more than they can
    // serve. Worker-time stops at the end of the trace; what arrived is served and judged.
    let policy = load("p", "name: p\ntemplate: t\nworkers: {min: 4, max: 4}\n").unwrap();
    let overload = Trace::parse_csv("overload", "0s,100,2s\n10s,100,2s\n").unwrap();
    let run = simulate(&policy, &overload, &SimConfig::default()).unwrap();
    let s = &run.summary;
    assert!(
        (s.worker_seconds - 40.0).abs() < 0.01,
        "{}",
        s.worker_seconds
    );
    assert!(
        s.completed > 900,
        "every arrival is served: {}",
        s.completed
    );
    assert_eq!(s.failed, 0);
    assert!(
        s.p99.unwrap() > Duration::from_secs(30),
        "the backlog shows in latency: {:?}",
        s.p99
    );
}

#[test]
fn a_trace_too_large_to_simulate_is_refused() {
    let policy = policies::default_policy();
    let huge = Trace::parse_csv("huge", "0s,100000,1ms\n2h,100000,1ms\n").unwrap();
    let err = simulate(&policy, &huge, &SimConfig::default()).unwrap_err();
    assert!(
        err.to_string().contains("about 720000000 requests"),
        "{err}"
    );
}
