//! The from-zero scenario of `squall demo`: the default policy with `workers.min: 0`. A few
//! rounds of: wait until the pool has gone to zero workers, idle a moment, send one request
//! and time it, then time one more sent right after it (a warm request, for comparison).
//! Then, from zero once more, a short crowd, summarised at 100 ms resolution like the flash
//! crowd's surge.
//!
//! The policy's scale-down delay is cut from 30 s to 2 s so that the pool reaches zero
//! within seconds between rounds; the output says so.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use policies::Policy;
use scaler::up::Running;

use super::report::{self, Ms};
use super::{APP_CONCURRENCY, HOLD, PoolUse, SAMPLE, SERVICE_MS};
use crate::loadgen::{self, Record, Stage};

/// How the policy is described in the demo's first line.
pub(super) const DESCRIBED: &str = "the default policy with workers.min 0 and scale_down.delay 2s (30s by default; shortened so the pool is back at zero within seconds between rounds)";
/// The scale-down delay of this scenario's policy.
const SCALE_DOWN_DELAY: Duration = Duration::from_secs(2);
/// How many times the single request from zero is measured.
const ROUNDS: usize = 5;
/// How long the pool stays at zero before the request is sent.
const IDLE: Duration = Duration::from_millis(500);
/// The crowd sent at the pool once it is at zero again after the rounds.
const CROWD_RPS: f64 = 1000.0;
const CROWD: Duration = Duration::from_secs(5);
/// How long one request may take before it counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the pool may take to go to zero (the panic window's calm, the stable window,
/// the scale-down delay and the drain).
const ZERO_WITHIN: Duration = Duration::from_secs(120);

/// The embedded default policy, allowed to scale to zero, with a short scale-down delay.
pub(super) fn policy() -> anyhow::Result<Policy> {
    let mut policy = policies::default_policy();
    policy.workers.min = 0;
    policy.scale_down.delay = policies::Duration::from_millis(SCALE_DOWN_DELAY.as_millis() as u64);
    let violations = policy.validate();
    anyhow::ensure!(
        violations.is_empty(),
        "the from-zero policy is not valid: {}",
        violations
            .iter()
            .map(|v| format!("{}: {}", v.path, v.message))
            .collect::<Vec<_>>()
            .join("; ")
    );
    Ok(policy)
}

/// Waits until the pool has no worker at all: none ready, none being cloned, none draining.
/// Returns how long that took.
async fn at_zero(running: &Running) -> anyhow::Result<Duration> {
    super::wait_for(
        running,
        "the pool going to zero workers",
        ZERO_WITHIN,
        |r| {
            let workers = r.balancer.signals().workers;
            workers.ready == 0 && workers.draining == 0 && r.status.load().pending == 0
        },
    )
    .await
}

/// The median and the largest of `samples`; `None` when there are none.
fn median_and_max(samples: &[Duration]) -> Option<(Duration, Duration)> {
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let max = *sorted.last()?;
    let mid = sorted.len() / 2;
    let median = if sorted.len().is_multiple_of(2) {
        (sorted[mid - 1] + sorted[mid]) / 2
    } else {
        sorted[mid]
    };
    Some((median, max))
}

/// Runs the rounds and the crowd at `running`, printing to `out`.
pub(super) async fn run(
    running: &Running,
    slo: Duration,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let url: hyper::Uri = format!("http://{}/", running.listen).parse()?;
    writeln!(
        out,
        "{ROUNDS} rounds: wait until the pool is at zero workers, idle {} ms, send one request, then one more right after it (balancer on http://{}/, live page http://{}/)",
        IDLE.as_millis(),
        running.listen,
        running.admin
    )?;
    out.flush()?;
    let (mut from_zero, mut warm, mut failed) = (Vec::new(), Vec::new(), 0);
    for round in 1..=ROUNDS {
        let waited = at_zero(running).await?;
        tokio::time::sleep(IDLE).await;
        let first = loadgen::one_request(&url, REQUEST_TIMEOUT).await;
        let second = loadgen::one_request(&url, REQUEST_TIMEOUT).await;
        let mut shown = |outcome: anyhow::Result<Duration>, into: &mut Vec<Duration>| {
            outcome.map_or_else(
                |e| {
                    failed += 1;
                    format!("failed ({e:#})")
                },
                |latency| {
                    into.push(latency);
                    Ms(latency).to_string()
                },
            )
        };
        let first = shown(first, &mut from_zero);
        let second = shown(second, &mut warm);
        writeln!(
            out,
            "round {round}: at zero after {:.1} s; the first request from zero {first}, a warm request right after it {second}",
            waited.as_secs_f64()
        )?;
        out.flush()?;
    }
    let shown = |samples: &[Duration]| {
        median_and_max(samples).map_or_else(
            || ("failed".to_owned(), "failed".to_owned()),
            |(median, max)| (Ms(median).to_string(), Ms(max).to_string()),
        )
    };
    let ((zero_median, zero_max), (warm_median, warm_max)) = (shown(&from_zero), shown(&warm));
    writeln!(
        out,
        "first request from zero: {zero_median} (a warm request: {warm_median})"
    )?;
    writeln!(
        out,
        "  over {ROUNDS} rounds: from zero median {zero_median}, max {zero_max}; warm median {warm_median}, max {warm_max}; {failed} of {} requests failed",
        2 * ROUNDS
    )?;
    out.flush()?;
    crowd(running, url, slo, out).await
}

/// From zero once more: [`CROWD_RPS`] for [`CROWD`], summarised by send time in 100 ms slots.
async fn crowd(
    running: &Running,
    url: hyper::Uri,
    slo: Duration,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let waited = at_zero(running).await?;
    tokio::time::sleep(IDLE).await;
    writeln!(
        out,
        "a crowd from zero (at zero after {:.1} s, idle {} ms): {CROWD_RPS} req/s for {} s",
        waited.as_secs_f64(),
        IDLE.as_millis(),
        CROWD.as_secs()
    )?;
    out.flush()?;
    let schedule = vec![Stage {
        rate: CROWD_RPS,
        duration: CROWD,
    }];
    let record = Arc::new(Mutex::new(Record::for_schedule(&schedule)));
    let mut generator = tokio::spawn(loadgen::run(
        url,
        schedule,
        4000,
        REQUEST_TIMEOUT,
        Arc::clone(&record),
    ));
    let mut pool = PoolUse::default();
    let mut sampling = tokio::time::interval(SAMPLE);
    loop {
        tokio::select! {
            ended = &mut generator => {
                ended.context("load generator")?;
                break;
            }
            _ = sampling.tick() => pool.sample(super::live_workers(running)),
        }
    }
    let record = loadgen::lock(&record);
    let sent: u64 = record.slots.iter().map(|s| s.requests()).sum();
    let failed: u64 = record.slots.iter().map(|s| s.failed).sum();
    let recovered = report::back_under_slo(&record.slots, slo, super::slots_in(HOLD));
    let (over, _) = report::over_slo(&record.slots, slo);
    let need = report::right_sized_pool(
        CROWD_RPS,
        Duration::from_millis(SERVICE_MS),
        APP_CONCURRENCY,
    );
    writeln!(
        out,
        "crowd from zero: worst 100 ms p95 {} (SLO {}); {}; 100 ms slots over the SLO: {over} of {}; requests: {sent} sent, {failed} failed; workers: peak {} (need {need}, peak/need {})",
        report::worst_p95(&record.slots).map_or_else(|| "-".to_owned(), |p| p.to_string()),
        Ms(slo),
        recovered.map_or_else(
            || format!("p95 never back under the SLO for {} ms", HOLD.as_millis()),
            |slots| format!(
                "p95 back under the SLO {} ms after the crowd began",
                report::slots_duration(slots).as_millis()
            )
        ),
        record.slots.len(),
        pool.peak,
        report::ratio(pool.peak as f64, f64::from(need))
            .map_or_else(|| "-".to_owned(), |r| format!("{r:.2}")),
    )?;
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // In tests a panic is a failed test.

    use super::*;

    #[test]
    fn the_policy_scales_to_zero_with_a_short_delay_and_is_valid() {
        let policy = policy().unwrap();
        assert_eq!(policy.workers.min, 0);
        assert_eq!(policy.scale_down.delay.get(), SCALE_DOWN_DELAY);
        assert_eq!(policy.workers.max, policies::default_policy().workers.max);
    }

    #[test]
    fn median_and_max_of_the_rounds() {
        let ms = Duration::from_millis;
        type Case = (&'static [u64], Option<(u64, u64)>);
        let cases: &[Case] = &[
            (&[], None),
            (&[170], Some((170, 170))),
            (&[178, 171, 172, 175, 171], Some((172, 178))),
            (&[4, 2, 8, 6], Some((5, 8))),
        ];
        for (samples, expected) in cases {
            let samples: Vec<Duration> = samples.iter().map(|&s| ms(s)).collect();
            assert_eq!(
                median_and_max(&samples),
                expected.map(|(median, max)| (ms(median), ms(max))),
                "{samples:?}"
            );
        }
    }
}
