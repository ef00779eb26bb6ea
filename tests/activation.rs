//! Activation on the request path, through real `squall up` processes forking the demo app:
//! a request that has to wait for a worker makes the scaler decide at once, not at its next
//! tick. The policies here tick every 10 s, so a worker that appears for a waiting request
//! was cloned by an activation (`squall_activations_total` counts them); nothing here
//! measures time.
#![allow(clippy::unwrap_used)] // In tests a panic is a failed test, which is the point.

mod common;

use std::time::Duration;

use common::{Case, Up, get};

const ACTIVATIONS: &str = "squall_activations_total";

/// A policy that ticks every 10 s, with `min` workers and room for 6.
fn slow_tick_policy(min: u32) -> String {
    format!(
        "name: slow-tick\ntemplate: app\nworkers: {{min: {min}, max: 6}}\n\
         target: {{concurrency: 2}}\ntick: 10s\nwindow: {{stable: 20s, panic: 10s}}\n\
         scale_down: {{delay: 60s, max_step: 1, drain_timeout: 5s}}\n"
    )
}

/// `squall up` with the demo app taking `service_ms` per request, two at a time per worker.
/// Returns once the scaler has made its first decision (the template is warm): requests
/// sent earlier would wait for that first tick, not for an activation.
fn up(case: &Case, min: u32, service_ms: u32) -> Up {
    case.write_policy(&slow_tick_policy(min));
    let mut app = common::demo_app();
    let at = app.iter().position(|a| a == "--service-ms").unwrap();
    app[at + 1] = service_ms.to_string();
    let up = Up::start_full(&case.policy, &case.marker, "fork", &[], &app);
    test_support::wait_until(
        "the scaler's first decision",
        Duration::from_secs(60),
        || (!up.status()["scaler"]["desired"].is_null()).then_some(()),
    );
    up
}

#[test]
fn the_first_request_with_no_worker_is_served_by_a_clone_made_for_it() {
    let case = Case::new("activation-zero");
    let up = up(&case, 0, 10);
    assert_eq!(up.ready_workers(), 0, "min 0: no worker before a request");
    assert_eq!(up.metric(ACTIVATIONS), 0.0);
    let (status, body) = get(up.listen, "/");
    assert_eq!(status, 200, "{body}");
    assert_eq!(up.metric(ACTIVATIONS), 1.0);
    assert_eq!(up.ready_workers(), 1);
    // The worker is there now: the next request needs no activation.
    assert_eq!(get(up.listen, "/").0, 200);
    assert_eq!(up.metric(ACTIVATIONS), 1.0);
}

#[test]
fn requests_waiting_in_a_busy_pool_get_workers_made_for_them() {
    let case = Case::new("activation-busy");
    let up = up(&case, 1, 400);
    up.wait_for("the first worker", Duration::from_secs(60), |n| n == 1);
    // Six requests at once against one worker taking two at a time: four wait, and the
    // scaler clones workers for them.
    let listen = up.listen;
    let requests: Vec<_> = (0..6)
        .map(|_| std::thread::spawn(move || get(listen, "/").0))
        .collect();
    for request in requests {
        assert_eq!(request.join().unwrap(), 200);
    }
    assert!(up.metric(ACTIVATIONS) >= 1.0);
    up.wait_for("the workers made for them", Duration::from_secs(30), |n| {
        n >= 2
    });
}
