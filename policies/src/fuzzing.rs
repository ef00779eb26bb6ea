//! What the `policy_load` fuzz target (`fuzz/`) checks on every input, kept here so that the
//! normal test suite checks it too, over the seeds in `fuzz/seeds/policy_load/` (the example
//! policies, and every input a fuzzer once failed on). Not part of the crate's API: built for
//! this crate's tests and with the `fuzzing` feature only.

use std::time::Duration;

use crate::load::MAX_DIAGNOSTICS;
use crate::{
    LoadError, Now, Observation, Policy, State, WindowStats, WorkerCounts, activate, decide, load,
};

/// Loads `bytes` as a policy file (text that is not UTF-8 never reaches the loader) and
/// panics if the loader breaks its contract:
///
/// - it answers the same twice, and fails only with [`LoadError::Invalid`];
/// - a policy it accepts passes [`Policy::validate`], and drives [`decide`] and [`activate`]
///   through a flash crowd and its end with every decision within `workers.min..=max`;
/// - a refusal lists 1 to [`MAX_DIAGNOSTICS`] mistakes in document order, each at a line and
///   column inside the text.
pub fn check_policy(bytes: &[u8]) {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    let loaded = load("fuzz.yaml", text);
    let again = load("fuzz.yaml", text);
    assert_eq!(
        format!("{loaded:?}"),
        format!("{again:?}"),
        "two loads of the same text differ"
    );
    match loaded {
        Ok(policy) => {
            let violations = policy.validate();
            assert!(violations.is_empty(), "accepted, yet {violations:?}");
            drive(&policy);
        }
        Err(LoadError::Invalid { diagnostics, .. }) => {
            assert!(!diagnostics.is_empty(), "refused without a reason");
            assert!(
                diagnostics.len() <= MAX_DIAGNOSTICS,
                "{} mistakes reported, more than {MAX_DIAGNOSTICS}",
                diagnostics.len()
            );
            assert!(
                diagnostics.is_sorted_by_key(|d| d.mark),
                "mistakes out of document order: {diagnostics:?}"
            );
            // yaml-rust2 counts a `\r` as a line break too; one line more for the end.
            let lines = 2 + text.bytes().filter(|b| matches!(b, b'\n' | b'\r')).count();
            let columns = 2 + text.chars().count();
            for d in &diagnostics {
                assert!(
                    (1..=lines).contains(&d.mark.line) && (1..=columns).contains(&d.mark.column),
                    "{d:?} points outside the text"
                );
            }
        }
        Err(other) => panic!("load failed with {other}, not as Invalid"),
    }
}

/// Runs the decider on `policy` through calm, a flash crowd (with a latency SLO missed), and
/// calm again long enough for any scale-down delay, asserting the bounds on every decision.
fn drive(policy: &Policy) {
    let (min, max) = (policy.workers.min, policy.workers.max);
    let tick = policy.tick.get();
    let mut state = State::default();
    let mut now = Duration::ZERO;
    let mut ready = min;
    let calm = observation(0.0, None, ready);
    let phases = [
        (calm, 3),
        (observation(1e6, Some(Duration::from_secs(30)), ready), 3),
        (observation(f64::MAX, Some(Duration::MAX), ready), 2),
        (calm, 3),
    ];
    for (mut seen, ticks) in phases {
        for _ in 0..ticks {
            seen.workers.ready = ready;
            if let Some((decision, _)) = activate(policy, &seen, &state, now) {
                assert!(
                    (min..=max).contains(&decision.desired),
                    "activate wants {} workers, outside {min}..={max}",
                    decision.desired
                );
            }
            let (decision, next) = decide(policy, &seen, &state, now);
            assert!(
                (min..=max).contains(&decision.desired),
                "decide wants {} workers, outside {min}..={max} ({})",
                decision.desired,
                decision.reason
            );
            state = next;
            ready = decision.desired;
            now = now.saturating_add(tick);
        }
        // Then a jump past every delay and cooldown the policy may have.
        now = now.saturating_add(crate::MAX_DURATION);
    }
}

fn observation(in_flight: f64, p95: Option<Duration>, ready: u32) -> Observation {
    let window = WindowStats {
        request_rate: in_flight * 20.0,
        mean_in_flight: in_flight,
        queue_depth: in_flight / 2.0,
        latency_p50: p95,
        latency_p95: p95,
        latency_p99: p95,
        service_p95: p95,
        service_mean: p95,
        error_rate: 0.0,
    };
    Observation {
        stable: window,
        panic: window,
        now: Now {
            in_flight: in_flight.min(f64::from(u32::MAX)) as u32,
            queued: (in_flight / 2.0).min(f64::from(u32::MAX)) as u32,
            arrived: (in_flight * 2.0).min(u64::MAX as f64) as u64,
            queued_before: 0,
            span: crate::RECENT,
        },
        workers: WorkerCounts {
            ready,
            pending: 0,
            draining: 0,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every seed of the fuzz target, and every input it once failed on, passes the checks.
    #[test]
    fn the_fuzz_seeds_pass_the_checks() {
        test_support::check_fuzz_seeds("policy_load", check_policy);
    }
}
