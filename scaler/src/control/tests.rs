//! The control loop against a fake balancer and fake forkd hosts, on tokio's paused clock:
//! one table of scenarios — a host refuses, a host dies, a clone never gets ready, a drain
//! times out, … — each a setup, an event once the pool has settled, and what must then
//! hold within a bound of (simulated) time.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use forkd::{Driver, TemplateSpec};
use lifecycle::Stop;
use policies::{ACTIVATION_INTERVAL, Policy};

use super::*;
use crate::fake::{FakeFront, FakeHost, OnClone};
use crate::hosts::Origin;

const TEMPLATE: &str = "app";

/// A policy with short windows and delays, so a scenario takes seconds of simulated time.
fn policy(min: u32, max: u32, extra: &str) -> Policy {
    let yaml = format!(
        "name: test\ntemplate: {TEMPLATE}\nworkers: {{min: {min}, max: {max}}}\ntick: 100ms\n\
         target: {{concurrency: 1}}\nwindow: {{stable: 1s, panic: 200ms}}\n\
         scale_down: {{delay: 1s, max_step: 10, drain_timeout: 5s}}\n{extra}"
    );
    policies::load("test.yaml", &yaml).unwrap()
}

/// The scaler under test, its fakes, and the clock it runs on.
struct Rig {
    front: FakeFront,
    hosts: Vec<FakeHost>,
    policy: Arc<ArcSwap<Policy>>,
    metrics: crate::Metrics,
    /// Where hosts found later go (as discovery sends them).
    joins: mpsc::UnboundedSender<Host<FakeHost>>,
    /// The hosts up, as discovery sees them (the peers a new host is seeded from).
    up_hosts: Arc<ArcSwap<Vec<Arc<str>>>>,
    stop: Stop,
    run: tokio::task::JoinHandle<Vec<Host<FakeHost>>>,
}

impl Rig {
    /// Starts a scaler on `hosts` (each given the template first, as warming does).
    async fn start(policy: Policy, hosts: Vec<FakeHost>) -> Rig {
        let template = Arc::new(TemplateSpec {
            start_timeout_ms: 1000,
            ..TemplateSpec::new(TEMPLATE, Driver::Fork, vec!["app".into()])
        });
        for host in &hosts {
            host.create_template(&template).await.unwrap();
        }
        let front = FakeFront::default();
        let policy = Arc::new(ArcSwap::from_pointee(policy));
        let scaler = Scaler::new(
            ScalerConfig {
                policy: Arc::clone(&policy),
                template,
                max_concurrency: None,
            },
            front.clone(),
            hosts
                .iter()
                .enumerate()
                .map(|(i, client)| Host {
                    name: format!("host-{i}").into(),
                    client: client.clone(),
                    origin: Origin::Given,
                    max_clones: None,
                })
                .collect(),
        );
        let metrics = scaler.metrics();
        let joins = scaler.host_sender();
        let up_hosts = scaler.up_host_names();
        let stop = Stop::new();
        let run = tokio::spawn(scaler.run(stop.shutdown()));
        Rig {
            front,
            hosts,
            policy,
            metrics,
            joins,
            up_hosts,
            stop,
            run,
        }
    }

    /// Steps the paused clock until `holds`; fails after `limit` of simulated time.
    async fn until(&self, what: &str, limit: Duration, holds: impl Fn(&Rig) -> bool) {
        test_support::eventually(what, limit, || holds(self).then_some(())).await;
    }

    /// Stops the scaler and waits until it has killed its clones; returns the fakes.
    async fn stop(self) -> (FakeFront, Vec<FakeHost>) {
        self.stop.stop();
        let stopped = tokio::time::timeout(Duration::from_secs(30), self.run).await;
        stopped.expect("the scaler stopped").unwrap();
        (self.front, self.hosts)
    }

    fn metric(&self, name_and_labels: &str) -> f64 {
        self.metrics
            .render()
            .lines()
            .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok())
            .unwrap_or(0.0)
    }
}

/// What happens once the pool has reached `min`.
#[derive(Debug, Clone, Copy)]
enum Event {
    /// Nothing.
    Nothing,
    /// Host `i` stops answering.
    HostDies(usize),
    /// Host `i` dies, then comes back (its daemon restarted without its template or clones).
    HostRestarts(usize),
    /// Demand rises to this many requests at once.
    Demand(f64),
    /// Demand falls to nothing, but every worker holds one request that never ends.
    DemandEndsWithStuckRequests,
    /// A worker exits on its own (its host lists it exited).
    WorkerExits,
    /// A clone of our template appears that this scaler never asked for.
    OrphanAppears,
}

struct Case {
    name: &'static str,
    /// Each host: what it does when asked for clones, and its clone limit.
    hosts: &'static [(OnClone, Option<usize>)],
    min: u32,
    max: u32,
    /// Happens once `min` workers are in the pool (or at once, if that cannot be).
    event: Event,
    /// What must hold, within `within` of simulated time after the event.
    expect: &'static str,
    holds: fn(&Rig) -> bool,
    within: Duration,
}

const SECOND: Duration = Duration::from_secs(1);

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "the pool is raised to min at start",
            hosts: &[(OnClone::Grant, None)],
            min: 3,
            max: 10,
            event: Event::Nothing,
            expect: "three ready workers on the host",
            holds: |rig| rig.front.ready() == 3 && rig.hosts[0].live() == 3,
            within: SECOND,
        },
        Case {
            name: "a full host keeps its workers and the others get the rest",
            hosts: &[(OnClone::Grant, Some(1)), (OnClone::Grant, None)],
            min: 4,
            max: 10,
            event: Event::Nothing,
            expect: "one worker on the full host, three on the other",
            holds: |rig| {
                rig.front.ready() == 4 && rig.hosts[0].live() == 1 && rig.hosts[1].live() == 3
            },
            within: 5 * SECOND,
        },
        Case {
            name: "a host that dies loses its workers, and another host replaces them",
            hosts: &[(OnClone::Grant, None), (OnClone::Grant, None)],
            min: 4,
            max: 10,
            event: Event::HostDies(0),
            expect: "four ready workers, all on the living host, the only one up",
            holds: |rig| {
                rig.up_hosts.load().iter().map(|h| &**h).eq(["host-1"])
                    && rig.front.ready() == 4
                    && rig.hosts[1].live() == 4
                    && rig
                        .front
                        .state()
                        .pool
                        .keys()
                        .all(|id| id.host() == "host-1")
            },
            within: 5 * SECOND,
        },
        Case {
            name: "a host that restarts gets the template again and takes clones again",
            hosts: &[(OnClone::Grant, None)],
            min: 2,
            max: 10,
            event: Event::HostRestarts(0),
            expect: "the template recreated and two new workers on it",
            holds: |rig| {
                rig.hosts[0].sim().templates.len() == 1
                    && rig.hosts[0].live() == 2
                    && rig.front.ready() == 2
            },
            within: 5 * SECOND,
        },
        Case {
            name: "a clone that never gets ready is given up and another host fills the pool",
            hosts: &[(OnClone::Hang, None), (OnClone::Grant, None)],
            min: 2,
            max: 10,
            event: Event::Nothing,
            expect: "two ready workers on the answering host",
            holds: |rig| rig.front.ready() == 2 && rig.hosts[1].live() == 2,
            // The hung request is given up after the template's start timeout (1 s) plus
            // the grace (10 s).
            within: 15 * SECOND,
        },
        Case {
            name: "a host whose clones fail rests, and the pool fills elsewhere",
            hosts: &[(OnClone::Fail, None), (OnClone::Grant, None)],
            min: 3,
            max: 10,
            event: Event::Nothing,
            expect: "three ready workers on the working host",
            holds: |rig| rig.front.ready() == 3 && rig.hosts[1].live() == 3,
            within: 3 * SECOND,
        },
        Case {
            name: "demand raises the pool, within max",
            hosts: &[(OnClone::Grant, None)],
            min: 1,
            max: 6,
            event: Event::Demand(20.0),
            expect: "six ready workers (max)",
            holds: |rig| rig.front.ready() == 6,
            within: 3 * SECOND,
        },
        Case {
            name: "a drain that times out kills the worker with its requests",
            hosts: &[(OnClone::Grant, None)],
            min: 1,
            max: 4,
            event: Event::DemandEndsWithStuckRequests,
            expect: "back to one worker, the drained ones killed at their drain timeout",
            holds: |rig| {
                rig.front.ready() == 1
                    && rig.hosts[0].live() == 1
                    && rig.metric("squall_scaler_drains_total{end=\"timeout\"}") == 3.0
            },
            // Demand 4 → 4 workers; demand gone: 1 s of scale-down delay, then the 5 s
            // drain timeout.
            within: 10 * SECOND,
        },
        Case {
            name: "a worker that exits on its own is replaced",
            hosts: &[(OnClone::Grant, None)],
            min: 2,
            max: 4,
            event: Event::WorkerExits,
            expect: "two ready workers, the exited one forgotten by its host",
            holds: |rig| {
                rig.front.ready() == 2
                    && rig.hosts[0].live() == 2
                    && rig.hosts[0].sim().killed.len() == 1
            },
            within: 3 * SECOND,
        },
        Case {
            name: "an orphan of our template is killed, not adopted",
            hosts: &[(OnClone::Grant, None)],
            min: 1,
            max: 4,
            event: Event::OrphanAppears,
            expect: "the orphan killed, one worker in the pool",
            holds: |rig| {
                rig.hosts[0].sim().killed == ["app-2"]
                    && rig.front.ready() == 1
                    && rig.hosts[0].live() == 1
            },
            within: 3 * SECOND,
        },
    ]
}

#[tokio::test(start_paused = true)]
async fn scenarios() {
    for case in cases() {
        let hosts = case
            .hosts
            .iter()
            .map(|(on_clone, max)| FakeHost::new(on_clone.clone(), *max))
            .collect();
        let rig = Rig::start(policy(case.min, case.max, ""), hosts).await;
        let settled = |rig: &Rig| rig.front.ready() >= case.min as usize;
        if !matches!(case.hosts[0].0, OnClone::Grant) {
            // The pool cannot fill before the event; nothing to wait for.
        } else {
            rig.until(&format!("{}: min workers", case.name), 5 * SECOND, settled)
                .await;
        }
        match case.event {
            Event::Nothing => {}
            Event::HostDies(i) => rig.hosts[i].sim().dead = true,
            Event::HostRestarts(i) => {
                rig.hosts[i].sim().dead = true;
                rig.until(&format!("{}: host down", case.name), 5 * SECOND, |rig| {
                    rig.front.ready() == 0
                })
                .await;
                let mut sim = rig.hosts[i].sim();
                sim.templates.clear();
                sim.clones.clear();
                sim.dead = false;
            }
            Event::Demand(demand) => rig.front.set_demand(demand),
            Event::DemandEndsWithStuckRequests => {
                rig.front.set_demand(4.0);
                rig.until(&format!("{}: four workers", case.name), 5 * SECOND, |rig| {
                    rig.front.ready() == 4
                })
                .await;
                for entry in rig.front.state().pool.values_mut() {
                    entry.in_flight = 1;
                }
                rig.front.set_demand(0.0);
            }
            Event::WorkerExits => {
                let mut sim = rig.hosts[0].sim();
                let first = sim.clones.values_mut().next().unwrap();
                first.state = forkd::CloneState::Exited;
            }
            Event::OrphanAppears => {
                rig.hosts[0].plant(TEMPLATE);
            }
        }
        rig.until(
            &format!("{}: {}", case.name, case.expect),
            case.within,
            case.holds,
        )
        .await;
        // Whatever happened, the pool never held more than max ready workers at once.
        let peak = rig.front.state().peak_ready;
        assert!(
            peak <= case.max as usize,
            "{}: {peak} ready at once, max {}",
            case.name,
            case.max
        );
        // Shutdown kills every clone the scaler made.
        let (front, hosts) = rig.stop().await;
        for (i, host) in hosts.iter().enumerate() {
            if !host.sim().dead {
                assert_eq!(host.live(), 0, "{}: host {i} has clones left", case.name);
            }
        }
        assert!(
            front.state().pool.is_empty(),
            "{}: pool not emptied",
            case.name
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_reload_retunes_the_balancer_only_when_windows_or_concurrency_change() {
    let rig = Rig::start(policy(1, 4, ""), vec![FakeHost::new(OnClone::Grant, None)]).await;
    rig.until("one worker", 5 * SECOND, |rig| rig.front.ready() == 1)
        .await;
    // Same windows and concurrency, another min: nothing to retune.
    rig.policy.store(Arc::new(policy(2, 4, "")));
    rig.until("two workers", 5 * SECOND, |rig| rig.front.ready() == 2)
        .await;
    assert!(rig.front.state().retunes.is_empty());
    // New windows: the balancer is retuned at the next tick.
    let mut wider = policy(2, 4, "");
    wider.window.stable = "5s".parse().unwrap();
    wider.window.panic = "1s".parse().unwrap();
    rig.policy.store(Arc::new(wider));
    rig.until("a retune", SECOND, |rig| {
        !rig.front.state().retunes.is_empty()
    })
    .await;
    let retunes = rig.front.state().retunes.clone();
    assert_eq!(
        retunes,
        vec![balancer::Tuning {
            stable_window: Duration::from_secs(5),
            panic_window: Duration::from_secs(1),
            max_concurrency_per_worker: 1,
        }]
    );
    let _ = rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_worker_holding_a_request_is_killed_at_its_drain_deadline_not_before() {
    let rig = Rig::start(policy(1, 2, ""), vec![FakeHost::new(OnClone::Grant, None)]).await;
    rig.front.set_demand(2.0);
    rig.until("two workers", 5 * SECOND, |rig| rig.front.ready() == 2)
        .await;
    for entry in rig.front.state().pool.values_mut() {
        entry.in_flight = 1;
    }
    rig.front.set_demand(0.0);
    // The scale-down delay (1 s) passes, then one worker is drained...
    rig.until("one worker draining", 5 * SECOND, |rig| {
        rig.front.state().pool.values().any(|e| e.draining)
    })
    .await;
    let drained_at = tokio::time::Instant::now();
    // ...and killed with its request at the drain timeout (5 s), not a tick sooner.
    rig.until("the drained worker killed", 10 * SECOND, |rig| {
        !rig.hosts[0].sim().killed.is_empty()
    })
    .await;
    let held = drained_at.elapsed();
    assert!(
        held >= Duration::from_secs(5)
            && held < Duration::from_secs(5) + 2 * policy(1, 2, "").tick.get(),
        "killed {held:?} after the drain began, against a 5 s drain timeout"
    );
    assert_eq!(
        rig.metric("squall_scaler_drains_total{end=\"timeout\"}"),
        1.0
    );
    let _ = rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_policy_the_balancer_refuses_applies_in_nothing() {
    let rig = Rig::start(policy(1, 4, ""), vec![FakeHost::new(OnClone::Grant, None)]).await;
    rig.until("one worker", 5 * SECOND, |rig| rig.front.ready() == 1)
        .await;
    rig.front.state().refuse_retunes = true;
    // New windows the balancer refuses, and a new min: neither applies.
    let mut refused = policy(3, 4, "");
    refused.name = "refused".into();
    refused.window.stable = "5s".parse().unwrap();
    rig.policy.store(Arc::new(refused));
    rig.until("the old policy back in force", SECOND, |rig| {
        rig.policy.load().name == "test"
    })
    .await;
    // Several ticks later, still one worker: the refused min of 3 never applied.
    tokio::time::sleep(SECOND).await;
    assert_eq!(rig.front.ready(), 1);
    assert!(rig.front.state().retunes.is_empty());
    let _ = rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_host_found_later_takes_the_clones_the_others_have_no_room_for() {
    let rig = Rig::start(
        policy(3, 4, ""),
        vec![FakeHost::new(OnClone::Grant, Some(1))],
    )
    .await;
    rig.until("the only host is full", 5 * SECOND, |rig| {
        rig.hosts[0].live() == 1
    })
    .await;
    // A second host joins, template warm, as discovery sends it.
    let late = FakeHost::new(OnClone::Grant, None);
    let template = TemplateSpec::new(TEMPLATE, Driver::Fork, vec!["app".into()]);
    late.create_template(&template).await.unwrap();
    rig.joins
        .send(Host {
            name: "late".into(),
            client: late.clone(),
            origin: Origin::Found,
            max_clones: None,
        })
        .unwrap();
    rig.until("three workers, two on the new host", 5 * SECOND, |rig| {
        rig.front.ready() == 3 && late.live() == 2
    })
    .await;
    let (_, hosts) = rig.stop().await;
    assert_eq!(hosts[0].live() + late.live(), 0);
}

/// A policy with a 5 s tick: within a second, only an activation can clone.
fn slow_tick_policy(min: u32, max: u32) -> Policy {
    let yaml = format!(
        "name: test\ntemplate: {TEMPLATE}\nworkers: {{min: {min}, max: {max}}}\ntick: 5s\n\
         target: {{concurrency: 1}}\nwindow: {{stable: 10s, panic: 5s}}\n\
         scale_up: {{max_step: 1000%}}\n\
         scale_down: {{delay: 30s, max_step: 10, drain_timeout: 5s}}\n"
    );
    policies::load("test.yaml", &yaml).unwrap()
}

/// Lets every task run that can, without moving the paused clock.
async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

/// Sets what the fake balancer holds now, and says a request queued.
fn queue(rig: &Rig, in_flight: usize, queued: usize) {
    let activation = {
        let mut state = rig.front.state();
        state.in_flight = in_flight;
        state.queued = queued;
        Arc::clone(&state.activation)
    };
    activation.notify_one();
}

#[tokio::test(start_paused = true)]
async fn a_request_queued_at_zero_workers_gets_a_worker_before_the_next_tick() {
    let rig = Rig::start(
        slow_tick_policy(0, 4),
        vec![FakeHost::new(OnClone::Grant, None)],
    )
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(rig.front.ready(), 0, "min 0: nothing before a request");
    queue(&rig, 0, 1);
    rig.until("a worker for the queued request", SECOND, |rig| {
        rig.front.ready() == 1
    })
    .await;
    assert_eq!(rig.metric("squall_activations_total"), 1.0);
    let _ = rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn requests_queued_in_a_busy_pool_grow_it_at_most_once_per_activation_interval() {
    let rig = Rig::start(
        slow_tick_policy(2, 20),
        vec![FakeHost::new(OnClone::Grant, None)],
    )
    .await;
    rig.until("min workers", SECOND, |rig| rig.front.ready() == 2)
        .await;
    // Well past the last decision, so the first request to queue is decided on at once.
    tokio::time::advance(ACTIVATION_INTERVAL).await;
    // Both workers busy (one request each at concurrency 1) and three waiting: a slot for
    // each request there is, five workers.
    queue(&rig, 2, 3);
    let first = Instant::now();
    settle().await;
    assert_eq!(
        rig.metric("squall_activations_total"),
        1.0,
        "decided at once"
    );
    // More queue at once: the next decision waits out the interval since the last one.
    queue(&rig, 5, 5);
    settle().await;
    assert_eq!(Instant::now(), first, "the clock has not moved");
    assert_eq!(rig.metric("squall_activations_total"), 1.0, "not yet");
    rig.until("a second activation", SECOND, |rig| {
        rig.metric("squall_activations_total") == 2.0
    })
    .await;
    assert!(Instant::now() >= first + ACTIVATION_INTERVAL);
    rig.until("ten workers", SECOND, |rig| rig.front.ready() == 10)
        .await;
    let _ = rig.stop().await;
}
