//! The models of Knative's KPA and Kubernetes' HPA: each rule table-driven and clock-stepped,
//! their bounds as properties, and the comparison with Squall's decider on the flash crowd.
#![allow(clippy::unwrap_used)] // In tests a panic is a failed test, which is the point.

mod common;

use std::time::Duration;

use common::trace;
use policies::models::{hpa, kpa};
use policies::{
    Autoscaler, Decision, Hpa, HpaReason, Kpa, KpaReason, Model, ModelReason, Now, Observation,
    Policy, Reason, SimConfig, Trace, WindowStats, WorkerCounts, compare, load, simulate,
    simulate_with,
};
use proptest::prelude::*;

fn policy(extra: &str) -> Policy {
    let text = format!("name: t\ntemplate: t\n{extra}");
    load("test.yaml", &text).unwrap_or_else(|e| panic!("{e}"))
}

fn window(demand: f64) -> WindowStats {
    WindowStats {
        mean_in_flight: demand,
        ..WindowStats::default()
    }
}

fn obs(stable: f64, panic: f64, ready: u32, pending: u32) -> Observation {
    Observation {
        stable: window(stable),
        panic: window(panic),
        now: Now::default(),
        workers: WorkerCounts {
            ready,
            pending,
            draining: 0,
        },
    }
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn kpa_reason(d: &Decision) -> KpaReason {
    match d.reason {
        Reason::Model(ModelReason::Kpa(r)) => r,
        other => panic!("not a KPA reason: {other}"),
    }
}

fn hpa_reason(d: &Decision) -> HpaReason {
    match d.reason {
        Reason::Model(ModelReason::Hpa(r)) => r,
        other => panic!("not an HPA reason: {other}"),
    }
}

#[test]
fn the_models_run_at_their_published_periods_and_windows() {
    let p = policy("");
    let k = Kpa::new(&p);
    assert_eq!(k.tick(), secs(2));
    assert_eq!(k.windows().stable.get(), secs(60));
    assert_eq!(k.windows().panic.get(), secs(6));
    assert!((k.per_pod() - 5.6).abs() < 1e-9, "70% of 8");
    let h = Hpa::new(&p);
    assert_eq!(h.tick(), secs(15));
    assert_eq!(h.windows().stable.get(), secs(15));
    assert_eq!(hpa::TOLERANCE, 0.1);
    assert_eq!(hpa::DOWN_STABILIZATION, secs(300));
    assert_eq!(kpa::PANIC_THRESHOLD, 2.0);
}

#[test]
fn kpa_single_decisions() {
    struct Case {
        name: &'static str,
        policy: &'static str,
        obs: Observation,
        desired: u32,
        panic: bool,
        reason: fn(&KpaReason) -> bool,
    }
    let cases = [
        Case {
            name: "stable: mean concurrency over 70% of the target",
            policy: "",
            obs: obs(20.0, 20.0, 4, 0),
            desired: 4,
            panic: false,
            reason: |r| matches!(r, KpaReason::Stable { want: 4, .. }),
        },
        Case {
            name: "stable scale-up below the panic threshold",
            policy: "",
            obs: obs(30.0, 30.0, 4, 0),
            desired: 6,
            panic: false,
            reason: |r| matches!(r, KpaReason::Stable { want: 6, .. }),
        },
        Case {
            name: "panic when the panic want is twice the ready pods",
            policy: "",
            obs: obs(10.0, 45.0, 4, 0),
            desired: 9,
            panic: true,
            reason: |r| {
                matches!(
                    r,
                    KpaReason::Panic {
                        want: 9,
                        ready: 4,
                        ..
                    }
                )
            },
        },
        Case {
            name: "panic at exactly twice",
            policy: "target: {concurrency: 10}\n",
            obs: obs(0.0, 56.0, 4, 0),
            desired: 8,
            panic: true,
            reason: |r| matches!(r, KpaReason::Panic { want: 8, .. }),
        },
        Case {
            name: "no panic just under twice; stable wants fewer, but at most halve",
            policy: "",
            obs: obs(10.0, 39.0, 4, 0),
            desired: 2,
            panic: false,
            reason: |r| matches!(r, KpaReason::Stable { want: 2, .. }),
        },
        Case {
            name: "at most halve per tick",
            policy: "",
            obs: obs(0.0, 0.0, 10, 0),
            desired: 5,
            panic: false,
            reason: |r| matches!(r, KpaReason::Stable { want: 0, .. }),
        },
        Case {
            name: "at most 1000 times the ready pods per tick",
            policy: "workers: {max: 10000}\n",
            obs: obs(20000.0, 20000.0, 1, 0),
            desired: 1000,
            panic: true,
            reason: |r| matches!(r, KpaReason::Panic { want: 3572, .. }),
        },
        Case {
            name: "workers.max stands for max-scale",
            policy: "workers: {max: 6}\n",
            obs: obs(400.0, 400.0, 4, 0),
            desired: 6,
            panic: true,
            reason: |r| matches!(r, KpaReason::Panic { .. }),
        },
        Case {
            name: "workers.min stands for min-scale",
            policy: "workers: {min: 3}\n",
            obs: obs(0.0, 0.0, 3, 0),
            desired: 3,
            panic: false,
            reason: |r| matches!(r, KpaReason::Stable { .. }),
        },
        Case {
            name: "pending pods are not ready: the rates go by the ready ones",
            policy: "",
            obs: obs(50.0, 50.0, 2, 6),
            desired: 9,
            panic: true,
            reason: |r| {
                matches!(
                    r,
                    KpaReason::Panic {
                        want: 9,
                        ready: 2,
                        ..
                    }
                )
            },
        },
    ];
    for case in cases {
        let mut model = Kpa::new(&policy(case.policy));
        let d = model.decide(&case.obs, secs(10));
        assert_eq!(d.desired, case.desired, "{}: {d}", case.name);
        assert_eq!(d.panic, case.panic, "{}: {d}", case.name);
        assert!((case.reason)(&kpa_reason(&d)), "{}: {d}", case.name);
        assert!(d.to_string().contains("KPA model: "), "{d}");
    }
}

#[test]
fn kpa_panic_never_scales_down_and_ends_a_stable_window_after_the_last_trigger() {
    let mut model = Kpa::new(&policy(""));
    let d = model.decide(&obs(10.0, 56.0, 4, 0), secs(0));
    assert_eq!((d.desired, d.panic), (10, true), "{d}");
    // Quiet at once: panic holds the count for a whole stable window after the trigger.
    let quiet = obs(5.6, 5.6, 10, 0);
    for t in (2..=60).step_by(2) {
        let d = model.decide(&quiet, secs(t));
        assert_eq!((d.desired, d.panic), (10, true), "at {t}s: {d}");
    }
    let d = model.decide(&quiet, secs(62));
    assert_eq!(
        (d.desired, d.panic),
        (5, false),
        "halved on leaving panic: {d}"
    );
    assert!(matches!(kpa_reason(&d), KpaReason::Stable { want: 1, .. }));

    // A new trigger extends the panic; a smaller want in panic does not lower the count.
    let mut model = Kpa::new(&policy(""));
    model.decide(&obs(10.0, 56.0, 4, 0), secs(0));
    let d = model.decide(&obs(10.0, 45.0, 4, 0), secs(40));
    assert_eq!((d.desired, d.panic), (10, true), "still over, want 9: {d}");
    let d = model.decide(&quiet, secs(100));
    assert!(
        d.panic,
        "60s after the last trigger is not yet past it: {d}"
    );
    let d = model.decide(&quiet, secs(102));
    assert!(!d.panic, "{d}");
}

#[test]
fn kpa_panic_starts_from_the_pods_there_are() {
    // Twelve pods asked for, four ready: the panic want of nine does not lower it.
    let mut model = Kpa::new(&policy(""));
    let d = model.decide(&obs(10.0, 45.0, 4, 8), secs(0));
    assert_eq!((d.desired, d.panic), (12, true), "{d}");
}

#[test]
fn kpa_scales_to_zero_only_with_min_0_and_after_the_grace_period() {
    let idle = obs(0.0, 0.0, 1, 0);
    let mut model = Kpa::new(&policy("workers: {min: 0}\n"));
    let d = model.decide(&idle, secs(100));
    assert_eq!(d.desired, 1, "{d}");
    assert_eq!(
        kpa_reason(&d),
        KpaReason::ZeroGrace {
            remaining: secs(30)
        }
    );
    assert_eq!(model.decide(&idle, secs(128)).desired, 1);
    let d = model.decide(&idle, secs(130));
    assert_eq!(d.desired, 0, "{d}");
    // Demand in between starts the grace period again.
    let mut model = Kpa::new(&policy("workers: {min: 0}\n"));
    model.decide(&idle, secs(100));
    model.decide(&obs(1.0, 1.0, 1, 0), secs(110));
    assert_eq!(model.decide(&idle, secs(130)).desired, 1);
    assert_eq!(model.decide(&idle, secs(142)).desired, 1);
    assert_eq!(model.decide(&idle, secs(160)).desired, 0);
    // With workers.min 1, never.
    let mut model = Kpa::new(&policy(""));
    for t in (0..200).step_by(2) {
        assert_eq!(model.decide(&idle, secs(t)).desired, 1);
    }
}

#[test]
fn kpa_is_poked_by_requests_at_zero_pods_only() {
    let p = policy("workers: {min: 0}\n");
    let mut model = Kpa::new(&p);
    let at_zero = WorkerCounts::default();
    assert!(model.activates(at_zero));
    assert!(!model.activates(WorkerCounts {
        pending: 1,
        ..at_zero
    }));
    let mut waiting = obs(0.0, 0.0, 0, 0);
    waiting.now.queued = 3;
    let d = model.activate(&waiting, secs(5)).unwrap();
    assert_eq!(d.desired, 1, "{d}");
    assert_eq!(kpa_reason(&d), KpaReason::Poke { queued: 3 });
    let mut busy = waiting;
    busy.workers.pending = 1;
    assert_eq!(model.activate(&busy, secs(6)), None);
    // The HPA is never woken between syncs.
    assert!(!Hpa::new(&p).activates(at_zero));
}

#[test]
fn hpa_single_decisions() {
    struct Case {
        name: &'static str,
        policy: &'static str,
        obs: Observation,
        desired: u32,
        reason: fn(&HpaReason) -> bool,
    }
    // target.concurrency 8: `per(ready, ratio)` is the demand giving that ratio.
    let per = |ready: u32, ratio: f64| f64::from(ready) * 8.0 * ratio;
    let cases = [
        Case {
            name: "within the tolerance above",
            policy: "",
            obs: obs(per(4, 1.09), 0.0, 4, 0),
            desired: 4,
            reason: |r| matches!(r, HpaReason::WithinTolerance { unready: 0, .. }),
        },
        Case {
            name: "within the tolerance below",
            policy: "",
            obs: obs(per(4, 0.91), 0.0, 4, 0),
            desired: 4,
            reason: |r| matches!(r, HpaReason::WithinTolerance { .. }),
        },
        Case {
            name: "just past the tolerance: ceil(current × metric / target)",
            policy: "",
            obs: obs(per(4, 1.15), 0.0, 4, 0),
            desired: 5,
            reason: |r| matches!(r, HpaReason::Ratio { want: 5, .. }),
        },
        Case {
            name: "down at once without history, 100% per period",
            policy: "",
            obs: obs(per(4, 0.25), 0.0, 4, 0),
            desired: 1,
            reason: |r| matches!(r, HpaReason::Ratio { want: 1, .. }),
        },
        Case {
            name: "up at most 100% per period",
            policy: "",
            obs: obs(per(10, 3.0), 0.0, 10, 0),
            desired: 20,
            reason: |r| matches!(r, HpaReason::Ratio { want: 30, .. }),
        },
        Case {
            name: "or 4 pods per period, whichever is more",
            policy: "",
            obs: obs(per(1, 10.0), 0.0, 1, 0),
            desired: 5,
            reason: |r| matches!(r, HpaReason::Ratio { want: 10, .. }),
        },
        Case {
            name: "pods not ready count as 0 on a scale-up: reversed, so hold",
            policy: "",
            obs: obs(per(2, 1.5), 0.0, 2, 2),
            desired: 4,
            reason: |r| matches!(r, HpaReason::WithinTolerance { unready: 2, .. }),
        },
        Case {
            name: "pods not ready count as 0 on a scale-up: still up",
            policy: "",
            obs: obs(per(2, 4.0), 0.0, 2, 2),
            desired: 8,
            reason: |r| matches!(r, HpaReason::Ratio { want: 8, .. }),
        },
        Case {
            name: "pods not ready count at the target on a scale-down",
            policy: "",
            obs: obs(per(4, 0.25), 0.0, 4, 4),
            desired: 5,
            reason: |r| matches!(r, HpaReason::Ratio { want: 5, .. }),
        },
        Case {
            name: "no ready pod, no metric: hold",
            policy: "",
            obs: obs(100.0, 0.0, 0, 2),
            desired: 2,
            reason: |r| matches!(r, HpaReason::NoMetrics),
        },
        Case {
            name: "workers.max stands for maxReplicas",
            policy: "workers: {max: 6}\n",
            obs: obs(per(4, 10.0), 0.0, 4, 0),
            desired: 6,
            reason: |r| matches!(r, HpaReason::Ratio { want: 40, .. }),
        },
        Case {
            name: "below minReplicas: raised to it",
            policy: "workers: {min: 3}\n",
            obs: obs(0.0, 0.0, 1, 0),
            desired: 3,
            reason: |r| matches!(r, HpaReason::BelowMin { min: 3 }),
        },
        Case {
            name: "workers.min 0 is minReplicas 1",
            policy: "workers: {min: 0}\n",
            obs: obs(0.0, 0.0, 1, 0),
            desired: 1,
            reason: |r| matches!(r, HpaReason::Ratio { want: 0, .. }),
        },
        Case {
            name: "and from zero pods, raised to 1",
            policy: "workers: {min: 0}\n",
            obs: obs(10.0, 0.0, 0, 0),
            desired: 1,
            reason: |r| matches!(r, HpaReason::BelowMin { min: 1 }),
        },
    ];
    for case in cases {
        let mut model = Hpa::new(&policy(case.policy));
        let d = model.decide(&case.obs, secs(15));
        assert_eq!(d.desired, case.desired, "{}: {d}", case.name);
        assert!(!d.panic, "{}: the HPA has no panic", case.name);
        assert!((case.reason)(&hpa_reason(&d)), "{}: {d}", case.name);
        assert!(d.to_string().contains("HPA model: "), "{d}");
    }
}

#[test]
fn hpa_scales_down_to_the_highest_recommendation_of_the_last_300s() {
    let mut model = Hpa::new(&policy(""));
    let d = model.decide(&obs(80.0, 0.0, 10, 0), secs(0));
    assert_eq!(d.desired, 10, "ratio 1: {d}");
    for t in (15..300).step_by(15) {
        let d = model.decide(&obs(8.0, 0.0, 10, 0), secs(t));
        assert_eq!(d.desired, 10, "at {t}s: {d}");
        assert_eq!(
            hpa_reason(&d),
            HpaReason::Stabilized {
                want: 1,
                highest: 10
            }
        );
    }
    let d = model.decide(&obs(8.0, 0.0, 10, 0), secs(300));
    assert_eq!(d.desired, 1, "the recommendation of 10 is 300s old: {d}");
    // A scale-up is not stabilized.
    let d = model.decide(&obs(80.0, 0.0, 1, 0), secs(315));
    assert_eq!(d.desired, 5, "{d}");
}

#[test]
fn hpa_says_it_cannot_scale_to_zero() {
    let p = policy("workers: {min: 0}\n");
    let model = Hpa::new(&p);
    assert_eq!(model.min_replicas(), 1);
    assert_eq!(model.initial_workers(), 1);
    assert!(
        model.notes().iter().any(|n| n.contains("HPAScaleToZero")),
        "{:?}",
        model.notes()
    );
    assert!(
        Hpa::new(&policy(""))
            .notes()
            .iter()
            .all(|n| !n.contains("HPAScaleToZero"))
    );
    assert_eq!(Kpa::new(&p).initial_workers(), 0);
}

#[test]
fn model_names_parse_and_an_unknown_one_lists_the_valid_ones() {
    assert_eq!("kpa".parse::<Model>().unwrap(), Model::Kpa);
    assert_eq!("HPA".parse::<Model>().unwrap(), Model::Hpa);
    let err = "knative".parse::<Model>().unwrap_err();
    assert_eq!(
        err.to_string(),
        "unknown model `knative`: expected one of kpa, hpa"
    );
}

#[test]
fn on_the_flash_crowd_squall_recovers_sooner_than_both_models() {
    let p = policies::default_policy();
    let crowd = trace("flash-crowd.csv");
    let config = SimConfig::default();
    assert_eq!(config.clone_delay, Duration::from_millis(5));
    let runs = compare(&p, &crowd, &config, secs(2), &[Model::Kpa, Model::Hpa]).unwrap();
    let names: Vec<&str> = runs.iter().map(|c| c.name).collect();
    assert_eq!(names, ["squall", "kpa", "hpa"]);
    assert_eq!(runs[0].label, "squall (policy default)");
    assert_eq!(
        runs[1].label,
        "model of Knative KPA (published algorithm, defaults)"
    );
    assert_eq!(
        runs[2].label,
        "model of Kubernetes HPA (published algorithm, defaults)"
    );
    assert_eq!(runs[1].startup, secs(2));
    // Squall's run in a comparison is the plain simulation.
    assert_eq!(runs[0].run, simulate(&p, &crowd, &config).unwrap());

    let recovery = |i: usize| runs[i].run.summary.recoveries[0].1.unwrap_or(Duration::MAX);
    let over = |i: usize| runs[i].run.summary.ticks_over_slo;
    let (squall, kpa, hpa) = (recovery(0), recovery(1), recovery(2));
    assert!(squall < kpa, "squall {squall:?}, kpa {kpa:?}");
    assert!(squall < hpa, "squall {squall:?}, hpa {hpa:?}");
    assert!(
        kpa < hpa,
        "the KPA's panic beats a 15s sync: {kpa:?}, {hpa:?}"
    );
    assert!(over(0) < over(1) && over(1) < over(2));
    // The same requests, all served.
    let completed: Vec<u64> = runs.iter().map(|c| c.run.summary.completed).collect();
    assert!(
        completed.iter().all(|&c| c == completed[0]),
        "{completed:?}"
    );
    assert!(runs.iter().all(|c| c.run.summary.failed == 0));
    // The models never go past max, and the HPA never below 1.
    for c in &runs[1..] {
        assert!(c.run.summary.peak_workers <= p.workers.max, "{}", c.name);
    }
    assert!(runs[2].run.ticks.iter().all(|t| t.decision.desired >= 1));
    // The report shows them side by side, labelled.
    let text = policies::comparison_text(&runs);
    assert!(text.contains("model of Knative KPA (published algorithm, defaults), cold start 2s"));
    assert!(text.contains("squall (policy default), clone delay 5ms"));
    assert!(text.contains("p95 back under the 150ms SLO after the surge at 40.0s"));
}

#[test]
fn a_comparison_is_deterministic_for_a_seed() {
    let p = policies::default_policy();
    let ramp = trace("daily-ramp.csv");
    let config = SimConfig {
        seed: 7,
        ..SimConfig::default()
    };
    let a = compare(&p, &ramp, &config, secs(2), &Model::ALL).unwrap();
    let b = compare(&p, &ramp, &config, secs(2), &Model::ALL).unwrap();
    assert_eq!(a, b);
    let other = compare(
        &p,
        &ramp,
        &SimConfig { seed: 8, ..config },
        secs(2),
        &Model::ALL,
    )
    .unwrap();
    assert_ne!(a[1].run, other[1].run, "the seed matters");
    // Asking twice for a model runs it once.
    let once = compare(&p, &ramp, &config, secs(2), &[Model::Hpa, Model::Hpa]).unwrap();
    assert_eq!(once.len(), 2);
}

#[test]
fn kpa_goes_to_zero_when_idle_and_is_poked_back() {
    // 20 requests/s for 10s, nothing for 190s, then 20/s again.
    let p = policy("workers: {min: 0}\ntarget: {concurrency: 8, latency_p95: 150ms}\n");
    let gap = Trace::parse_csv(
        "gap",
        "0s,20,50ms\n10s,20,50ms\n10s,0,50ms\n200s,0,50ms\n200s,20,50ms\n220s,20,50ms\n",
    )
    .unwrap();
    let config = SimConfig {
        clone_delay: secs(2),
        ..SimConfig::default()
    };
    let run = simulate_with(&p, &gap, &config, &mut Kpa::new(&p)).unwrap();
    let at_zero: Vec<Duration> = run
        .ticks
        .iter()
        .filter(|t| t.at > secs(20) && t.workers.ready + t.workers.pending == 0)
        .map(|t| t.at)
        .collect();
    // Idle from 10s: no request over the 60s stable window, then the 30s grace period.
    assert!(
        at_zero
            .first()
            .is_some_and(|&t| t >= secs(100) && t <= secs(104)),
        "first at zero: {:?}",
        at_zero.first()
    );
    assert!(at_zero.iter().all(|&t| t < secs(202)), "back after 200s");
    assert!(
        run.summary.activations >= 2,
        "poked from zero at the start and at 200s"
    );
    assert_eq!(run.summary.failed, 0);
    // The first requests after zero waited for the cold start.
    assert!(run.summary.p99.unwrap() >= Duration::from_millis(1500));
}

fn small_policy() -> impl Strategy<Value = Policy> {
    (0u32..6, 0u32..40, 1.0f64..32.0).prop_map(|(min, extra, concurrency)| {
        let mut p = policy("");
        p.workers = policies::Workers {
            min,
            max: (min + extra).max(1),
        };
        p.target.concurrency = Some(concurrency);
        assert_eq!(p.validate(), vec![]);
        p
    })
}

prop_compose! {
    fn observation()(
        stable in 0.0f64..2000.0,
        panic in 0.0f64..2000.0,
        ready in 0u32..60,
        pending in 0u32..20,
    ) -> Observation {
        obs(stable, panic, ready, pending)
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn models_stay_within_their_bounds(
        p in small_policy(),
        history in prop::collection::vec(observation(), 1..60),
    ) {
        let mut kpa = Kpa::new(&p);
        let mut hpa = Hpa::new(&p);
        for (i, o) in history.iter().enumerate() {
            let t = secs(2 * i as u64);
            let d = kpa.decide(o, t);
            prop_assert!(d.desired >= p.workers.min && d.desired <= p.workers.max, "kpa {d}");
            let ready = f64::from(o.workers.ready.max(1));
            let most = (ready * kpa::MAX_SCALE_UP_RATE).ceil() as u32;
            let least = ((ready / kpa::MAX_SCALE_DOWN_RATE).floor() as u32).min(p.workers.max);
            if !d.panic {
                prop_assert!(d.desired <= most.max(p.workers.min), "kpa up rate: {d}");
            }
            prop_assert!(d.desired >= least, "kpa down rate: {d}");

            let current = o.workers.ready + o.workers.pending;
            let d = hpa.decide(o, secs(15 * i as u64));
            prop_assert!(d.desired >= 1, "hpa below 1: {d}");
            prop_assert!(d.desired >= p.workers.min && d.desired <= p.workers.max, "hpa {d}");
            let up = (2 * current).max(current + hpa::UP_PODS).max(hpa.min_replicas());
            prop_assert!(d.desired <= up, "hpa up rate from {current}: {d}");
        }
    }

    #[test]
    fn kpa_never_scales_down_in_panic(
        p in small_policy(),
        demands in prop::collection::vec((0.0f64..500.0, 0.0f64..500.0), 1..80),
    ) {
        // The pool becomes what was decided, as in the simulator once the cold start passes.
        let mut kpa = Kpa::new(&p);
        let mut previous: Option<Decision> = None;
        let mut ready = p.workers.min;
        for (i, &(stable, panic)) in demands.iter().enumerate() {
            let d = kpa.decide(&obs(stable, panic, ready, 0), secs(2 * i as u64));
            if let Some(before) = previous
                && before.panic
                && d.panic
            {
                prop_assert!(d.desired >= before.desired, "{d} after {before}");
            }
            ready = d.desired;
            previous = Some(d);
        }
    }
}
