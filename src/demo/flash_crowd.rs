//! The flash-crowd scenario of `squall demo`: 50 requests/s, a surge 40 times that for 20 s,
//! then calm again long enough to scale down. A line per second for people (by completion
//! time), then a summary by send time in 100 ms slots: the worst slot's p95 during the surge,
//! when p95 was back under the SLO for good, failures, and what the pool cost against a
//! static pool sized for the surge.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use scaler::up::Running;

use super::report::{self, Ms};
use super::{APP_CONCURRENCY, HOLD, PoolUse, SAMPLE, SERVICE_MS, slots_in};
use crate::loadgen::{self, Record, Stage};

/// The crowd: calm, a surge 40 times the calm rate, calm again long enough to scale down.
const CALM_RPS: f64 = 50.0;
const SURGE_RPS: f64 = 2000.0;
const CALM_BEFORE: Duration = Duration::from_secs(10);
const SURGE: Duration = Duration::from_secs(20);
const CALM_AFTER: Duration = Duration::from_secs(45);

/// Drives the crowd at `running` once `min` workers are ready, printing a line per second and
/// the summary to `out`.
pub(super) async fn run(
    running: &Running,
    slo: Duration,
    min: u32,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let min = min.max(1) as usize;
    super::wait_for(
        running,
        "the first workers ready",
        Duration::from_secs(30),
        |r| r.balancer.signals().workers.ready >= min,
    )
    .await?;
    writeln!(
        out,
        "traffic: {CALM_RPS} req/s for {}s, then {SURGE_RPS} req/s for {}s, then {CALM_RPS} req/s for {}s (balancer on http://{}/, live page http://{}/)",
        CALM_BEFORE.as_secs(),
        SURGE.as_secs(),
        CALM_AFTER.as_secs(),
        running.listen,
        running.admin
    )?;
    writeln!(
        out,
        "{:>5} {:>8} {:>8} {:>7} {:>9} {:>9} {:>6} {:>8} {:>9} {:>8} {:>6}",
        "time",
        "offered",
        "served",
        "errors",
        "p95",
        "p99",
        "ready",
        "pending",
        "draining",
        "desired",
        "panic"
    )?;
    out.flush()?;

    let schedule = vec![
        Stage {
            rate: CALM_RPS,
            duration: CALM_BEFORE,
        },
        Stage {
            rate: SURGE_RPS,
            duration: SURGE,
        },
        Stage {
            rate: CALM_RPS,
            duration: CALM_AFTER,
        },
    ];
    let total = CALM_BEFORE + SURGE + CALM_AFTER;
    let record = Arc::new(Mutex::new(Record::for_schedule(&schedule)));
    let url: hyper::Uri = format!("http://{}/", running.listen).parse()?;
    let generator = tokio::spawn(loadgen::run(
        url,
        schedule,
        4000,
        Duration::from_secs(10),
        Arc::clone(&record),
    ));

    let start = Instant::now();
    let mut pool = PoolUse::default();
    let samples = total.as_nanos().div_ceil(SAMPLE.as_nanos()) as u32;
    let per_second = (Duration::from_secs(1).as_nanos() / SAMPLE.as_nanos()) as u32;
    for sample in 1..=samples {
        tokio::time::sleep_until((start + SAMPLE * sample).into()).await;
        pool.sample(super::live_workers(running));
        if sample % per_second == 0 {
            print_second(out, running, &record, (sample / per_second) as usize - 1)?;
        }
    }
    generator.await.context("load generator")?;

    let record = loadgen::lock(&record);
    let surge_slots = slots_in(CALM_BEFORE)..slots_in(CALM_BEFORE + SURGE);
    let surge = &record.slots
        [surge_slots.start.min(record.slots.len())..surge_slots.end.min(record.slots.len())];
    let after_surge_began = &record.slots[surge_slots.start.min(record.slots.len())..];
    let mut surge_latencies: Vec<Duration> = surge
        .iter()
        .flat_map(|s| s.latencies.iter().copied())
        .collect();
    let sent: u64 = record.slots.iter().map(|s| s.requests()).sum();
    let failed: u64 = record.slots.iter().map(|s| s.failed).sum();
    let hold = slots_in(HOLD);

    writeln!(out)?;
    writeln!(
        out,
        "worst 100 ms p95 during the surge: {} (the p95 of the requests sent in each 100 ms slot, worst slot; SLO {})",
        report::worst_p95(surge).map_or_else(|| "-".to_owned(), |p| p.to_string()),
        Ms(slo),
    )?;
    match report::back_under_slo(after_surge_began, slo, hold) {
        Some(slots) => writeln!(
            out,
            "p95 back under the {} ms SLO {} ms after the surge began (and stayed under it for at least {} ms)",
            slo.as_millis(),
            report::slots_duration(slots).as_millis(),
            HOLD.as_millis(),
        )?,
        None => writeln!(
            out,
            "p95 never came back under the {} ms SLO for {} ms",
            slo.as_millis(),
            HOLD.as_millis()
        )?,
    }
    let (over, last_over) = report::over_slo(surge, slo);
    writeln!(
        out,
        "100 ms slots of the surge over the SLO: {over} of {}{}",
        surge.len(),
        last_over.map_or_else(String::new, |last| format!(
            " (the last {} ms after the surge began)",
            report::slots_duration(last).as_millis()
        )),
    )?;
    writeln!(
        out,
        "during the surge: p95 {}, p99 {} (answered requests); requests: {sent} sent, {failed} failed",
        ms(loadgen::quantile(&mut surge_latencies, 0.95)),
        ms(loadgen::quantile(&mut surge_latencies, 0.99)),
    )?;
    writeln!(
        out,
        "workers: peak {}, {:.0} worker-seconds",
        pool.peak, pool.worker_seconds
    )?;
    let need = report::right_sized_pool(
        SURGE_RPS,
        Duration::from_millis(SERVICE_MS),
        APP_CONCURRENCY,
    );
    let static_seconds = f64::from(need) * total.as_secs_f64();
    let ratio = |r: Option<f64>| r.map_or_else(|| "-".to_owned(), |r| format!("{r:.2}"));
    writeln!(
        out,
        "right-sized static pool: {need} workers (ceil({SURGE_RPS} req/s x {SERVICE_MS} ms / {APP_CONCURRENCY} per worker)), {static_seconds:.0} worker-seconds over the {} s run; peak/need {}, worker-seconds/static {}",
        total.as_secs(),
        ratio(report::ratio(pool.peak as f64, f64::from(need))),
        ratio(report::ratio(pool.worker_seconds, static_seconds)),
    )?;
    out.flush()?;
    Ok(())
}

fn ms(d: Option<Duration>) -> String {
    d.map_or_else(
        || "-".into(),
        |d| format!("{:.0} ms", d.as_secs_f64() * 1e3),
    )
}

/// Prints the line of second `second` (counted from 0): what completed in it, and the pool
/// as it is now.
fn print_second(
    out: &mut impl Write,
    running: &Running,
    record: &Mutex<Record>,
    second: usize,
) -> anyhow::Result<()> {
    let signals = running.balancer.signals();
    let status = **running.status.load();
    let mut row = loadgen::lock(record)
        .seconds
        .get(second)
        .cloned()
        .unwrap_or_default();
    let p95 = loadgen::quantile(&mut row.latencies, 0.95);
    let p99 = loadgen::quantile(&mut row.latencies, 0.99);
    writeln!(
        out,
        "{:>4}s {:>8} {:>8} {:>7} {:>9} {:>9} {:>6} {:>8} {:>9} {:>8} {:>6}",
        second + 1,
        row.sent + row.skipped,
        row.ok,
        row.errors + row.skipped,
        ms(p95),
        ms(p99),
        signals.workers.ready,
        status.pending,
        signals.workers.draining,
        status.decision.map_or(0, |d| d.desired),
        if status.decision.is_some_and(|d| d.panic) {
            "yes"
        } else {
            ""
        }
    )?;
    out.flush()?;
    Ok(())
}
