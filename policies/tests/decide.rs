//! The decider, table-driven and in clock-stepped scenarios.
#![allow(clippy::unwrap_used)] // In tests a panic is a failed test, which is the point.

use std::time::Duration;

use policies::{
    Cause, Decision, Now, Observation, Policy, Reason, State, WindowStats, WorkerCounts, activate,
    decide, load,
};

fn policy(extra: &str) -> Policy {
    let text = format!("name: t\ntemplate: t\n{extra}");
    load("test.yaml", &text).unwrap_or_else(|e| panic!("{e}"))
}

fn window(in_flight: f64, queue: f64) -> WindowStats {
    WindowStats {
        request_rate: in_flight * 20.0,
        mean_in_flight: in_flight,
        queue_depth: queue,
        ..WindowStats::default()
    }
}

fn obs(stable: f64, panic: f64, ready: u32, pending: u32) -> Observation {
    Observation {
        now: policies::Now::default(),
        stable: window(stable, 0.0),
        panic: window(panic, 0.0),
        workers: WorkerCounts {
            ready,
            pending,
            draining: 0,
        },
    }
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

/// A state that has watched `o` for `seconds` at 100ms ticks.
fn watched(p: &Policy, o: &Observation, seconds: u32) -> (State, Duration) {
    let mut state = State::default();
    let mut now = Duration::ZERO;
    for _ in 0..seconds * 10 {
        state = decide(p, o, &state, now).1;
        now += Duration::from_millis(100);
    }
    (state, now)
}

#[test]
fn single_decisions() {
    struct Case {
        name: &'static str,
        policy: &'static str,
        obs: Observation,
        desired: u32,
        panic: bool,
        reason: fn(&Reason) -> bool,
    }
    // Two cases end with demand alone asking for five workers.
    let five_for_demand: fn(&Reason) -> bool = |r| {
        matches!(
            r,
            Reason::ScaleUp {
                need: 5,
                cause: Cause::Demand { .. }
            }
        )
    };
    let cases = [
        Case {
            name: "demand matches the workers",
            policy: "",
            obs: obs(16.0, 16.0, 2, 0),
            desired: 2,
            panic: false,
            reason: |r| matches!(r, Reason::Steady { need: 2 }),
        },
        Case {
            name: "stable demand over capacity scales up",
            policy: "",
            obs: obs(40.0, 40.0, 4, 0),
            desired: 5,
            panic: false,
            reason: five_for_demand,
        },
        Case {
            name: "a scale-up is limited by max_step",
            policy: "scale_up: {max_step: 3}\n",
            obs: obs(160.0, 20.0, 2, 0),
            desired: 5,
            panic: false,
            reason: |r| matches!(r, Reason::ScaleUp { need: 20, .. }),
        },
        Case {
            name: "panic at twice the ready capacity goes to the panic need",
            policy: "scale_up: {max_step: 1000%}\n",
            obs: obs(10.0, 100.0, 4, 0),
            desired: 13,
            panic: true,
            reason: |r| {
                matches!(
                    r,
                    Reason::ScaleUp {
                        need: 13,
                        cause: Cause::Panic { .. }
                    }
                )
            },
        },
        Case {
            name: "panic from zero workers starts one, then doubles",
            policy: "workers: {min: 0}\n",
            obs: obs(0.0, 3.0, 0, 0),
            desired: 1,
            panic: true,
            reason: |r| matches!(r, Reason::ScaleUp { .. }),
        },
        Case {
            name: "cloning workers count as capacity",
            policy: "",
            obs: obs(40.0, 30.0, 2, 3),
            desired: 5,
            panic: false,
            reason: |r| matches!(r, Reason::Steady { need: 5 }),
        },
        Case {
            name: "never above max",
            policy: "workers: {max: 6}\nscale_up: {max_step: 1000%}\n",
            obs: obs(400.0, 400.0, 4, 0),
            desired: 6,
            panic: true,
            reason: |r| matches!(r, Reason::ScaleUp { need: 6, .. }),
        },
        Case {
            name: "a lowered max takes effect at once, even in panic",
            policy: "workers: {max: 3}\n",
            obs: obs(400.0, 400.0, 8, 0),
            desired: 3,
            panic: true,
            reason: |r| matches!(r, Reason::AboveMax { max: 3 }),
        },
        Case {
            name: "below min is raised at once, past the step limit",
            policy: "workers: {min: 5}\nscale_up: {max_step: 1}\n",
            obs: obs(0.0, 0.0, 1, 0),
            desired: 5,
            panic: false,
            reason: |r| matches!(r, Reason::BelowMin { min: 5 }),
        },
        Case {
            name: "no scale-down before the decider has watched for the delay",
            policy: "",
            obs: obs(8.0, 8.0, 10, 0),
            desired: 10,
            panic: false,
            reason: |r| matches!(r, Reason::DownWaiting { need: 1, .. }),
        },
        Case {
            name: "latency over the SLO without queueing scales in proportion",
            policy: "target: {latency_p95: 100ms, concurrency: 8}\n",
            obs: Observation {
                now: policies::Now::default(),
                panic: WindowStats {
                    latency_p95: Some(Duration::from_millis(250)),
                    ..window(8.0, 0.0)
                },
                ..obs(8.0, 8.0, 4, 0)
            },
            desired: 8,
            panic: false,
            reason: |r| {
                matches!(
                    r,
                    Reason::ScaleUp {
                        need: 10,
                        cause: Cause::Latency { .. }
                    }
                )
            },
        },
        Case {
            name: "latency caused by queueing is left to the demand rule",
            policy: "target: {latency_p95: 100ms, concurrency: 8}\n",
            obs: Observation {
                now: policies::Now::default(),
                panic: WindowStats {
                    latency_p95: Some(Duration::from_millis(250)),
                    service_p95: Some(Duration::from_millis(60)),
                    ..window(32.0, 6.0)
                },
                stable: window(32.0, 6.0),
                ..obs(0.0, 0.0, 4, 0)
            },
            desired: 5,
            panic: false,
            reason: five_for_demand,
        },
    ];
    for case in cases {
        let p = policy(case.policy);
        let (d, _) = decide(&p, &case.obs, &State::default(), Duration::ZERO);
        assert_eq!(d.desired, case.desired, "{}: {d}", case.name);
        assert_eq!(d.panic, case.panic, "{}: {d}", case.name);
        assert!(
            (case.reason)(&d.reason),
            "{}: unexpected reason {:?}",
            case.name,
            d.reason
        );
        assert!(!d.reason.to_string().is_empty());
    }
}

#[test]
fn scale_down_waits_for_the_delay_then_steps() {
    let p = policy("scale_down: {delay: 30s, max_step: 2}\n");
    let low = obs(8.0, 8.0, 10, 0);
    let (state, now) = watched(&p, &low, 29);
    let (d, _) = decide(&p, &low, &state, now);
    assert!(matches!(d.reason, Reason::DownWaiting { .. }), "{d}");
    let (state, now) = watched(&p, &low, 31);
    let (d, _) = decide(&p, &low, &state, now);
    assert_eq!(d.desired, 8, "{d}");
    assert!(matches!(d.reason, Reason::ScaleDown { need: 1 }), "{d}");
}

#[test]
fn scale_down_never_goes_below_the_peak_of_the_delay() {
    let p = policy("scale_down: {delay: 30s, max_step: 100%}\n");
    let busy = obs(80.0, 80.0, 10, 0);
    let (mut state, mut now) = watched(&p, &busy, 40);
    let quiet = obs(8.0, 8.0, 10, 0);
    // 20 s after the demand fell, the busy period is still within the delay.
    for _ in 0..200 {
        let (d, next) = decide(&p, &quiet, &state, now);
        assert_eq!(d.desired, 10, "{d}");
        state = next;
        now += Duration::from_millis(100);
    }
    let (d, _) = decide(&p, &quiet, &state, now);
    assert!(matches!(d.reason, Reason::DownHeld { peak: 10 }), "{d}");
    // Once the busy period has left the delay window, the pool may shrink.
    for _ in 0..101 {
        state = decide(&p, &quiet, &state, now).1;
        now += Duration::from_millis(100);
    }
    let (d, _) = decide(&p, &quiet, &state, now);
    assert_eq!(d.desired, 1, "{d}");
}

#[test]
fn cooldowns_are_honoured() {
    let p = policy("scale_up: {max_step: 1, cooldown: 1s}\n");
    let o = obs(80.0, 20.0, 2, 0);
    let (d1, s) = decide(&p, &o, &State::default(), secs(10.0));
    assert_eq!(d1.desired, 3);
    let o = obs(80.0, 20.0, 2, 1);
    let (d2, s) = decide(&p, &o, &s, secs(10.5));
    assert_eq!(d2.desired, 3, "{d2}");
    assert!(matches!(d2.reason, Reason::UpCooldown { .. }), "{d2}");
    let (d3, _) = decide(&p, &o, &s, secs(11.0));
    assert_eq!(d3.desired, 4, "{d3}");
}

#[test]
fn panic_holds_until_a_stable_window_is_calm() {
    let p = policy("window: {stable: 10s, panic: 1s}\nscale_up: {max_step: 1000%}\n");
    let (mut state, mut now) = watched(&p, &obs(8.0, 8.0, 1, 0), 40);
    let (d, next) = decide(&p, &obs(8.0, 80.0, 1, 0), &state, now);
    assert!(d.panic);
    assert_eq!(d.desired, 10);
    state = next;
    // The crowd leaves at once; the count holds while the stable window is not yet calm.
    let calm = obs(8.0, 8.0, 10, 0);
    let mut panic_ended = None;
    for i in 1..=200 {
        now += Duration::from_millis(100);
        let (d, next) = decide(&p, &calm, &state, now);
        state = next;
        if d.panic {
            assert!(matches!(d.reason, Reason::PanicHold { .. }), "{d}");
            assert_eq!(d.desired, 10);
        } else if panic_ended.is_none() {
            panic_ended = Some(i);
        }
    }
    assert_eq!(
        panic_ended,
        Some(100),
        "panic ends exactly one stable window after the last trigger"
    );
}

/// A closed loop for scenarios: `offered` is the concurrency the clients would keep if every
/// request were served at once; capacity beyond `ready × per_worker` waits in the queue.
/// New workers become ready one tick after they are asked for.
struct Loop {
    policy: Policy,
    state: State,
    now: Duration,
    ready: u32,
    pending: u32,
    history: Vec<(f64, f64)>,
    decisions: Vec<Decision>,
}

impl Loop {
    fn new(policy: Policy) -> Self {
        Self {
            ready: policy.workers.min,
            policy,
            state: State::default(),
            now: Duration::ZERO,
            pending: 0,
            history: Vec::new(),
            decisions: Vec::new(),
        }
    }

    fn mean(&self, window: Duration) -> WindowStats {
        let n = (window.as_millis() / self.policy.tick.get().as_millis()) as usize;
        let recent = &self.history[self.history.len().saturating_sub(n)..];
        let k = recent.len().max(1) as f64;
        window_of(
            recent.iter().map(|h| h.0).sum::<f64>() / k,
            recent.iter().map(|h| h.1).sum::<f64>() / k,
        )
    }

    fn tick(&mut self, offered: f64) -> Decision {
        let capacity = f64::from(self.ready) * self.policy.target.concurrency();
        self.history
            .push((offered.min(capacity), (offered - capacity).max(0.0)));
        let o = Observation {
            now: policies::Now::default(),
            stable: self.mean(self.policy.window.stable.get()),
            panic: self.mean(self.policy.window.panic.get()),
            workers: WorkerCounts {
                ready: self.ready,
                pending: self.pending,
                draining: 0,
            },
        };
        let (d, next) = decide(&self.policy, &o, &self.state, self.now);
        self.state = next;
        self.ready += self.pending;
        self.pending = 0;
        let current = self.ready;
        if d.desired > current {
            self.pending = d.desired - current;
        } else {
            self.ready = d.desired;
        }
        self.now += self.policy.tick.get();
        self.decisions.push(d);
        d
    }

    fn run(&mut self, seconds: f64, offered: impl Fn(f64) -> f64) -> Vec<Decision> {
        let start = self.decisions.len();
        let ticks = (seconds * 1000.0 / self.policy.tick.get().as_millis() as f64) as usize;
        for _ in 0..ticks {
            let t = self.now.as_secs_f64();
            self.tick(offered(t));
        }
        self.decisions[start..].to_vec()
    }
}

fn window_of(in_flight: f64, queue: f64) -> WindowStats {
    window(in_flight, queue)
}

/// How often the desired count changes direction (up then down, or down then up).
fn reversals(decisions: &[Decision]) -> usize {
    let mut last_direction = 0i64;
    let mut count = 0;
    for pair in decisions.windows(2) {
        let direction = (i64::from(pair[1].desired) - i64::from(pair[0].desired)).signum();
        if direction != 0 {
            if last_direction != 0 && direction != last_direction {
                count += 1;
            }
            last_direction = direction;
        }
    }
    count
}

#[test]
fn scenario_ten_fold_step() {
    let mut l = Loop::new(policy("workers: {min: 2, max: 40}\n"));
    l.run(40.0, |_| 16.0);
    assert_eq!(l.ready, 2);
    let surge = l.run(30.0, |_| 160.0);
    let first_at_need = surge
        .iter()
        .position(|d| d.desired >= 20)
        .expect("reaches the need");
    assert!(
        first_at_need <= 10,
        "took {first_at_need} ticks to reach 20 workers"
    );
    assert!(
        surge[..12].iter().any(|d| d.panic),
        "a 10x step is a flash crowd"
    );
    assert_eq!(reversals(&surge), 0, "no flapping during the surge");
    assert!(surge.iter().all(|d| d.desired <= 40));
}

#[test]
fn scenario_slow_ramp() {
    let mut l = Loop::new(policy("workers: {min: 1, max: 40}\n"));
    l.run(40.0, |_| 8.0);
    let ramp = l.run(60.0, |t| 8.0 + (t - 40.0) * 2.5);
    assert!(ramp.iter().all(|d| !d.panic), "a slow ramp is not a panic");
    assert_eq!(reversals(&ramp), 0, "the count only grows on a ramp");
    let last = ramp.last().unwrap();
    assert!((19..=21).contains(&last.desired), "tracks the ramp: {last}");
}

#[test]
fn scenario_spike_that_ends() {
    let mut l = Loop::new(policy(
        "workers: {min: 2, max: 40}\nscale_down: {delay: 30s}\n",
    ));
    l.run(40.0, |_| 16.0);
    let spike = l.run(3.0, |_| 160.0);
    let peak = spike.iter().map(|d| d.desired).max().unwrap();
    assert!(peak >= 20, "peak {peak}");
    let after = l.run(120.0, |_| 16.0);
    let first_down = after
        .iter()
        .position(|d| d.desired < peak)
        .expect("scales down in the end");
    // What the workers served during the spike holds the count for scale_down.delay (30s).
    assert!(
        first_down >= 290,
        "scaled down {first_down} ticks after the spike"
    );
    assert_eq!(after.last().unwrap().desired, 2, "back to min");
    assert!(!after.last().unwrap().panic);
    assert_eq!(reversals(&after), 0, "only down after the spike");
}

#[test]
fn scenario_oscillating_load_does_not_flap() {
    let mut l = Loop::new(policy("workers: {min: 1, max: 40}\n"));
    l.run(40.0, |_| 40.0);
    let wave = l.run(120.0, |t| {
        if (t as u64 / 2).is_multiple_of(2) {
            40.0
        } else {
            80.0
        }
    });
    assert!(reversals(&wave) <= 1, "flapped {} times", reversals(&wave));
    let settled: Vec<u32> = wave[300..].iter().map(|d| d.desired).collect();
    assert!(
        settled.windows(2).all(|w| w[0] == w[1]),
        "settles: {settled:?}"
    );
    assert!(
        settled[0] >= 8,
        "sized for the mean demand at least: {}",
        settled[0]
    );
}

#[test]
fn an_app_slow_at_any_load_does_not_drive_the_pool_to_max() {
    // Every request takes 300ms however many workers there are, against a 150ms SLO:
    // the latency rule tries once, sees no improvement, and holds.
    let p = policy("workers: {min: 1, max: 32}\ntarget: {latency_p95: 150ms, concurrency: 8}\n");
    let slow = WindowStats {
        latency_p95: Some(Duration::from_millis(300)),
        service_p95: Some(Duration::from_millis(300)),
        ..window(6.0, 0.0)
    };
    let ready = with_instant_workers(&p, 1, 600, |_| slow);
    assert_eq!(ready, 2, "one proportional step, then hold");
}

#[test]
fn latency_that_falls_as_workers_are_added_keeps_scaling() {
    // p95 = 75ms per in-flight request per worker: 24 in flight need 6 workers for 300ms.
    let p = policy("workers: {min: 1, max: 32}\ntarget: {latency_p95: 300ms, concurrency: 100}\n");
    let ready = with_instant_workers(&p, 2, 100, |ready| {
        let p95 = Duration::from_secs_f64(0.075 * 24.0 / f64::from(ready));
        WindowStats {
            latency_p95: Some(p95),
            service_p95: Some(p95),
            ..window(24.0, 0.0)
        }
    });
    assert_eq!(ready, 6, "scaled until p95 met the SLO");
}

/// Decides `ticks` times at 100ms ticks, starting from `ready` workers, where every worker the
/// decider wants is ready by the next tick and both windows read `measured(ready)`; returns
/// the workers wanted last.
fn with_instant_workers(
    p: &Policy,
    mut ready: u32,
    ticks: u64,
    measured: impl Fn(u32) -> WindowStats,
) -> u32 {
    let mut state = State::default();
    for i in 0..ticks {
        let o = Observation {
            now: policies::Now::default(),
            stable: measured(ready),
            panic: measured(ready),
            workers: WorkerCounts {
                ready,
                pending: 0,
                draining: 0,
            },
        };
        let (d, next) = decide(p, &o, &state, Duration::from_millis(100 * i));
        state = next;
        ready = d.desired;
    }
    ready
}

/// A busy observation: both windows at `rate` requests/s with a mean service time of
/// `service_ms`, `in_flight` of them at workers and `queue` waiting on average.
fn served(rate: f64, service_ms: u64, in_flight: f64, queue: f64) -> WindowStats {
    WindowStats {
        request_rate: rate,
        mean_in_flight: in_flight,
        queue_depth: queue,
        service_mean: Some(Duration::from_millis(service_ms)),
        ..WindowStats::default()
    }
}

#[test]
fn the_first_request_after_zero_asks_for_a_worker_at_once() {
    let p = policy("workers: {min: 0, max: 10}\n");
    let (state, now) = watched(&p, &obs(0.0, 0.0, 0, 0), 60);
    let mut o = obs(0.0, 0.0, 0, 0);
    // Nothing queued: nothing to do between ticks.
    assert_eq!(activate(&p, &o, &state, now), None);
    o.now = Now {
        in_flight: 0,
        queued: 1,
        arrived: 1,
        queued_before: 0,
        span: Duration::from_millis(40),
    };
    let (d, _) = activate(&p, &o, &state, now).expect("a queued request grows the pool");
    assert_eq!(d.desired, 1, "{d}");
    assert!(
        matches!(
            d.reason,
            Reason::ScaleUp {
                need: 1,
                cause: Cause::Queued { service: None, .. }
            }
        ),
        "{d}"
    );
    // A clone already on its way is capacity: the next queued request asks for nothing more.
    o.workers.pending = 1;
    assert_eq!(activate(&p, &o, &state, now), None);
}

#[test]
fn requests_queued_in_a_busy_pool_are_sized_by_littles_law() {
    // 13 workers of 8 slots serving 2000 req/s at 50 ms: 100 in flight, 13 needed.
    let p = policy(
        "workers: {min: 1, max: 64}\ntarget: {concurrency: 8, latency_p95: 150ms}\nscale_up: {max_step: 1000%}\n",
    );
    let busy = served(2000.0, 50, 100.0, 0.0);
    let mut o = Observation {
        stable: busy,
        panic: busy,
        now: Now {
            in_flight: 100,
            queued: 3,
            arrived: 80,
            queued_before: 3,
            span: Duration::from_millis(40),
        },
        workers: WorkerCounts {
            ready: 13,
            pending: 0,
            draining: 0,
        },
    };
    let (state, now) = watched(&p, &o, 60);
    // A few queued now clear within the SLO's budget: no more workers.
    let (d, _) = decide(&p, &o, &state, now);
    assert_eq!(d.desired, 13, "{d}");
    assert_eq!(activate(&p, &o, &state, now), None);
    // The crowd doubles: 180 requests over the last 40 ms, read two standard deviations low,
    // (180 - 2 × √180) / 40 ms = 3829 req/s; 40 waiting, of which the 10 already there then
    // are the backlog (the rest are in the rate): (3829 + 10 / 100 ms) × 50 ms / 8 = 24.6 -> 25.
    o.now.arrived = 180;
    o.now.queued_before = 10;
    o.now.queued = 40;
    let (d, _) = activate(&p, &o, &state, now).expect("a growing queue grows the pool");
    assert_eq!(d.desired, 25, "{d}");
    assert!(
        matches!(
            d.reason,
            Reason::ScaleUp {
                need: 25,
                cause: Cause::Queued { .. }
            }
        ),
        "{d}"
    );
}

#[test]
fn the_panic_need_is_the_arrival_rate_times_the_service_time_not_the_queue() {
    let p = policy(
        "workers: {min: 1, max: 32}\ntarget: {concurrency: 8, latency_p95: 150ms}\nscale_up: {max_step: 1000%}\n",
    );
    // Two workers swamped: 16 in flight and 400 waiting on average over the panic window.
    // Counting the queue as demand would ask for (16 + 400) / 8 = 52 -> max (32); the
    // arrivals need 2000 × 50 ms / 8 = 12.5 -> 13.
    let panic = served(2000.0, 50, 16.0, 400.0);
    let o = Observation {
        stable: served(300.0, 50, 16.0, 40.0),
        panic,
        now: Now {
            in_flight: 16,
            queued: 0,
            arrived: 80,
            queued_before: 3,
            span: Duration::from_millis(40),
        },
        workers: WorkerCounts {
            ready: 2,
            pending: 0,
            draining: 0,
        },
    };
    let (d, _) = decide(&p, &o, &State::default(), Duration::ZERO);
    assert!(d.panic, "{d}");
    assert_eq!(d.desired, 13, "{d}");
    // The backlog is cleared within the SLO less the service time (100 ms):
    // (2000 + 100 / 0.1) × 0.05 / 8 = 18.75 -> 19.
    let backlog = Observation {
        now: Now {
            queued: 100,
            queued_before: 100,
            ..o.now
        },
        ..o
    };
    let (d, _) = decide(&p, &backlog, &State::default(), Duration::ZERO);
    assert_eq!(d.desired, 19, "{d}");
    // Before any worker has answered there is no service time to size by: the panic
    // window's demand counts, as without the rule.
    let unknown = Observation {
        stable: WindowStats {
            service_mean: None,
            ..o.stable
        },
        panic: WindowStats {
            service_mean: None,
            ..o.panic
        },
        ..o
    };
    let (d, _) = decide(&p, &unknown, &State::default(), Duration::ZERO);
    assert!(matches!(d.reason, Reason::ScaleUp { need: 32, .. }), "{d}");
}

#[test]
fn the_first_request_after_zero_asks_for_a_worker_even_when_the_rate_says_none() {
    // The pool served before (the service time is known) and went to zero; one request now
    // waits. Little's law over one request in 40 ms asks for nothing, yet with no worker there
    // or coming the request gets one.
    let p = policy("workers: {min: 0, max: 10}\n");
    let calm = served(0.5, 50, 0.0, 0.0);
    let o = Observation {
        stable: calm,
        panic: calm,
        now: Now {
            in_flight: 0,
            queued: 1,
            arrived: 1,
            queued_before: 0,
            span: Duration::from_millis(40),
        },
        workers: WorkerCounts::default(),
    };
    let (state, now) = watched(&p, &obs(0.0, 0.0, 0, 0), 60);
    let (d, _) = activate(&p, &o, &state, now).expect("a worker for the waiting request");
    assert_eq!(d.desired, 1, "{d}");
}
