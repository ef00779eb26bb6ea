//! Property tests of the decider's invariants and of the parser's robustness.
#![allow(clippy::unwrap_used)] // In tests a panic is a failed test, which is the point.

use std::time::Duration;

use policies::{
    Now, Observation, Policy, ScaleDown, ScaleUp, State, Step, Target, WindowStats, Windows,
    WorkerCounts, activate, decide, load,
};
use proptest::prelude::*;

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (1u32..10).prop_map(Step::Workers),
        (1.0f64..400.0).prop_map(Step::Percent)
    ]
}

fn ms(range: std::ops::Range<u64>) -> impl Strategy<Value = policies::Duration> {
    range.prop_map(policies::Duration::from_millis)
}

prop_compose! {
    fn policy()(
        min in 0u32..6,
        extra in 0u32..40,
        concurrency in 1.0f64..32.0,
        slo in proptest::option::of(ms(20..2000)),
        panic_ms in 200u64..3000,
        stable_extra in 1000u64..60_000,
        threshold in 1.1f64..5.0,
        up in step(),
        down in step(),
        up_cooldown in ms(0..2000),
        down_cooldown in ms(0..2000),
        delay in ms(0..60_000),
    ) -> Policy {
        let down = match down { Step::Percent(p) => Step::Percent(p.min(100.0)), s => s };
        let p = Policy {
            name: "p".into(),
            template: "t".into(),
            workers: policies::Workers { min, max: (min + extra).max(1) },
            target: Target { concurrency: Some(concurrency), latency_p95: slo },
            window: Windows {
                stable: policies::Duration::from_millis(panic_ms + stable_extra),
                panic: policies::Duration::from_millis(panic_ms),
            },
            panic_threshold: threshold,
            scale_up: ScaleUp { max_step: up, cooldown: up_cooldown },
            scale_down: ScaleDown { max_step: down, cooldown: down_cooldown, delay, ..ScaleDown::default() },
            tick: policies::Duration::from_millis(100),
        };
        assert_eq!(p.validate(), vec![], "the strategy builds valid policies");
        p
    }
}

prop_compose! {
    fn window()(
        in_flight in 0.0f64..500.0,
        queue in prop_oneof![Just(0.0), 0.0f64..300.0],
        p95 in proptest::option::of(1u64..5000),
        service in proptest::option::of(1u64..5000),
        service_mean in proptest::option::of(1u64..2000),
        rate in prop_oneof![Just(None), (0.0f64..5000.0).prop_map(Some)],
    ) -> WindowStats {
        WindowStats {
            request_rate: rate.unwrap_or(in_flight * 10.0),
            mean_in_flight: in_flight,
            queue_depth: queue,
            latency_p50: p95.map(|v| Duration::from_millis(v / 2)),
            latency_p95: p95.map(Duration::from_millis),
            latency_p99: p95.map(|v| Duration::from_millis(v * 2)),
            service_p95: service.map(Duration::from_millis),
            service_mean: service_mean.map(Duration::from_millis),
            error_rate: 0.0,
        }
    }
}

prop_compose! {
    fn observation()(
        stable in window(),
        panic in window(),
        ready in 0u32..60,
        pending in 0u32..20,
        draining in 0u32..5,
        in_flight in 0u32..500,
        queued in prop_oneof![Just(0u32), 0u32..300],
        arrived in 0u64..400,
        queued_before in prop_oneof![Just(0u32), 0u32..300],
        span in 0u64..100,
    ) -> Observation {
        let now = Now { in_flight, queued, arrived, queued_before, span: Duration::from_millis(span) };
        Observation { stable, panic, now, workers: WorkerCounts { ready, pending, draining } }
    }
}

/// A policy, a history of observations it has decided on, and the next observation.
fn situation() -> impl Strategy<Value = (Policy, Vec<Observation>, Observation)> {
    (
        policy(),
        prop::collection::vec(observation(), 0..40),
        observation(),
    )
}

/// Checks that `busier`, which has more of what drives scaling than `o`, gets at least as
/// many workers as `o` after the same history `past`.
fn no_fewer_workers_for(
    p: &Policy,
    past: &[Observation],
    o: &Observation,
    busier: &Observation,
) -> Result<(), TestCaseError> {
    let (state, now) = history(p, past);
    let (d, _) = decide(p, o, &state, now);
    let (d_busier, _) = decide(p, busier, &state, now);
    prop_assert!(d_busier.desired >= d.desired, "{d_busier} < {d}");
    Ok(())
}

/// A state reached by deciding on a random history, and the time after it.
fn history(p: &Policy, observations: &[Observation]) -> (State, Duration) {
    let mut state = State::default();
    let mut now = Duration::from_secs(1000);
    for o in observations {
        state = decide(p, o, &state, now).1;
        now += p.tick.get();
    }
    (state, now)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn result_is_within_bounds((p, past, o) in situation()) {
        let (state, now) = history(&p, &past);
        let (d, _) = decide(&p, &o, &state, now);
        prop_assert!(d.desired >= p.workers.min && d.desired <= p.workers.max, "{d} outside [{}, {}]", p.workers.min, p.workers.max);
    }

    #[test]
    fn panic_never_scales_down((p, past, o) in situation()) {
        let (state, now) = history(&p, &past);
        let (d, _) = decide(&p, &o, &state, now);
        let current = o.workers.ready + o.workers.pending;
        if d.panic {
            prop_assert!(d.desired >= current.min(p.workers.max), "{d} with {current} workers");
        }
    }

    #[test]
    fn more_demand_never_means_fewer_workers((p, past, o) in situation(), more_stable in 0.0f64..300.0, more_panic in 0.0f64..300.0) {
        let mut busier = o;
        busier.stable.mean_in_flight += more_stable;
        busier.panic.mean_in_flight += more_panic;
        no_fewer_workers_for(&p, &past, &o, &busier)?;
    }

    #[test]
    fn more_queue_never_means_fewer_workers((p, past, o) in situation(), more in 0.0f64..300.0) {
        let mut busier = o;
        busier.stable.queue_depth += more;
        busier.panic.queue_depth += more;
        no_fewer_workers_for(&p, &past, &o, &busier)?;
    }

    #[test]
    fn more_queued_or_faster_arrivals_never_mean_fewer_workers(
        (p, past, o) in situation(),
        more_queued in 0u32..300,
        more_in_flight in 0u32..300,
        more_arrived in 0u64..100,
        more_queued_before in 0u32..100,
        faster in 0.0f64..3000.0,
    ) {
        let mut busier = o;
        busier.now.queued += more_queued;
        busier.now.in_flight += more_in_flight;
        busier.now.arrived += more_arrived;
        busier.now.queued_before += more_queued_before;
        busier.panic.request_rate += faster;
        no_fewer_workers_for(&p, &past, &o, &busier)?;
    }

    #[test]
    fn more_queued_alone_never_means_fewer_workers((p, past, o) in situation(), more in 0u32..300) {
        let mut busier = o;
        busier.now.queued += more;
        no_fewer_workers_for(&p, &past, &o, &busier)?;
    }

    #[test]
    fn growth_is_bounded_by_max_and_max_step((p, past, o) in situation()) {
        let (state, now) = history(&p, &past);
        let (d, _) = decide(&p, &o, &state, now);
        let current = o.workers.ready + o.workers.pending;
        if d.desired > current && d.desired > p.workers.min {
            let allowed = current.saturating_add(p.scale_up.max_step.allowance(current));
            prop_assert!(d.desired <= allowed, "{d}: from {current}, at most {allowed}");
        }
        prop_assert!(d.desired <= p.workers.max);
    }

    #[test]
    fn an_activation_only_ever_grows_and_keeps_the_state_otherwise((p, past, o) in situation()) {
        let (state, now) = history(&p, &past);
        let current = o.workers.ready + o.workers.pending;
        let (decided, next) = decide(&p, &o, &state, now);
        match activate(&p, &o, &state, now) {
            Some((d, s)) => {
                prop_assert!(d.desired > current, "{d} from {current}");
                prop_assert_eq!((d, s), (decided, next));
            }
            None => prop_assert!(decided.desired <= current, "{decided} from {current}"),
        }
    }

    #[test]
    fn same_input_same_output((p, past, o) in situation()) {
        let (state, now) = history(&p, &past);
        let first = decide(&p, &o, &state, now);
        let second = decide(&p, &o, &state.clone(), now);
        prop_assert_eq!(first, second);
    }

    #[test]
    fn steady_input_gives_steady_output(p in policy(), last_worker_load in 0.05f64..0.95, workers in 1u32..30) {
        // Load that needs exactly the workers there are, within the bounds: nothing moves.
        let workers = workers.clamp(p.workers.min.max(1), p.workers.max);
        let c = p.target.concurrency();
        let in_flight = (f64::from(workers - 1) + last_worker_load) * c;
        let w = WindowStats { mean_in_flight: in_flight, ..WindowStats::default() };
        let o = Observation { stable: w, panic: w, now: policies::Now::default(), workers: WorkerCounts { ready: workers, pending: 0, draining: 0 } };
        let mut state = State::default();
        for i in 0..600u64 {
            let (d, next) = decide(&p, &o, &state, Duration::from_millis(100 * i));
            prop_assert_eq!(d.desired, workers, "tick {}: {}", i, d);
            prop_assert!(!d.panic);
            state = next;
        }
    }

    #[test]
    fn any_bytes_give_a_policy_or_an_error(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        let text = String::from_utf8_lossy(&bytes);
        let _ = load("fuzz.yaml", &text);
    }

    #[test]
    fn policy_shaped_text_gives_a_policy_or_an_error(
        lines in prop::collection::vec(
            (
                prop::sample::select(vec!["name", "template", "workers", "min", "max", "target", "concurrency",
                    "latency_p95", "window", "stable", "panic", "panic_threshold", "scale_up", "scale_down",
                    "max_step", "cooldown", "delay", "drain_timeout", "tick", "bogus"]),
                prop::sample::select(vec!["", "1", "-1", "0", "2.5", "100%", "150ms", "10s", "x", "{}", "[]",
                    "{min: 3, max: 1}", "null", "~", "\"q\"", "&a 1", "*a", "!t 1", "[[[[", "1e400", "99999999999"]),
                0usize..3,
            ),
            0..20,
        )
    ) {
        let text: String = lines
            .iter()
            .map(|(k, v, indent)| format!("{}{k}: {v}\n", "  ".repeat(*indent)))
            .collect();
        let _ = load("fuzz.yaml", &text);
    }
}

#[test]
fn deep_nesting_is_refused_not_overflowed() {
    let text = format!("name: {}1{}\n", "[".repeat(100_000), "]".repeat(100_000));
    let err = load("deep.yaml", &text).unwrap_err().to_string();
    assert!(
        err.contains("nesting is too deep") || err.contains("recursion limit"),
        "{err}"
    );
    let text = format!("name: {}1{}\n", "[".repeat(40), "]".repeat(40));
    let err = load("deep.yaml", &text).unwrap_err().to_string();
    assert!(err.contains("nesting is too deep"), "{err}");
}
