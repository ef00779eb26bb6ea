//! `squall demo`: the flash-crowd demo. It runs the demo app under `squall up` with the
//! embedded default policy, drives a built-in flash crowd at it with an open-loop load
//! generator, prints a line per second and a summary.

use std::io::Write as _;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use lifecycle::Stop;
use scaler::UpConfig;

use crate::Threads;
use crate::loadgen::{self, Record, Stage};
use crate::up_cmd::DriverArg;

/// The crowd: calm, a surge 40 times the calm rate, calm again long enough to scale down.
const CALM_RPS: f64 = 50.0;
const SURGE_RPS: f64 = 2000.0;
const CALM_BEFORE: Duration = Duration::from_secs(10);
const SURGE: Duration = Duration::from_secs(20);
const CALM_AFTER: Duration = Duration::from_secs(45);
/// The demo app's service time and per-worker concurrency.
const SERVICE_MS: u64 = 50;
const APP_CONCURRENCY: usize = 8;

/// Arguments of `squall demo`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct DemoArgs {
    /// How workers are cloned: `fork` (warm, the point of Squall) or `spawn` (cold starts).
    #[arg(long, value_enum, default_value = "fork")]
    driver: DriverArg,
    /// Instead of autoscaling, keep exactly this many workers (the static-pool baseline of
    /// bench/flash-crowd).
    #[arg(long, value_name = "N")]
    static_workers: Option<u32>,
    /// Where the live page, /metrics and /status are served (open the page during the demo).
    #[arg(long, default_value = "127.0.0.1:0")]
    admin: std::net::SocketAddr,
}

/// The demo app's command: this very binary, which carries the demo app (`squall warm-app`).
fn app_command() -> anyhow::Result<Vec<String>> {
    let exe = std::env::current_exe().context("finding the squall binary")?;
    Ok(vec![
        exe.display().to_string(),
        "warm-app".into(),
        "--warmup-ms".into(),
        "2000".into(),
        "--service-ms".into(),
        SERVICE_MS.to_string(),
        "--concurrency".into(),
        APP_CONCURRENCY.to_string(),
    ])
}

pub(crate) fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    lifecycle::init_logging("warn");
    crate::block_on(Threads::Workers(2), demo(args))?;
    Ok(ExitCode::SUCCESS)
}

async fn demo(args: DemoArgs) -> anyhow::Result<()> {
    let mut policy = policies::default_policy();
    if let Some(n) = args.static_workers {
        anyhow::ensure!(
            (1..=policies::MAX_WORKERS).contains(&n),
            "--static-workers must be 1 to {}",
            policies::MAX_WORKERS
        );
        policy.workers = policies::Workers { min: n, max: n };
    }
    let slo = policy
        .target
        .latency_p95
        .map_or(Duration::from_millis(150), |d| d.get());
    let mut up = UpConfig::new(policy.clone(), args.driver.into(), app_command()?);
    up.admin = args.admin;
    up.max_concurrency = Some(APP_CONCURRENCY);
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "squall demo: warm-app ({SERVICE_MS} ms per request, {APP_CONCURRENCY} at once per worker) behind squall up, driver {:?}, {} (p95 SLO {} ms)",
        args.driver,
        args.static_workers.map_or_else(
            || "default policy".to_owned(),
            |n| format!("a static pool of {n}")
        ),
        slo.as_millis()
    )?;
    writeln!(out, "warming the template...")?;
    out.flush()?;
    let stop = Stop::new();
    let running = scaler::up::start(up, stop.shutdown()).await?;
    // Wait for the first worker.
    let deadline = Instant::now() + Duration::from_secs(30);
    while running.balancer.signals().workers.ready < policy.workers.min.max(1) as usize {
        anyhow::ensure!(
            Instant::now() < deadline,
            "no worker became ready within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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
    let record = Arc::new(Mutex::new(Record::default()));
    let url: hyper::Uri = format!("http://{}/", running.listen).parse()?;
    let generator = tokio::spawn(loadgen::run(
        url,
        schedule,
        4000,
        Duration::from_secs(10),
        Arc::clone(&record),
    ));

    let start = Instant::now();
    let mut rows = Vec::new();
    let mut worker_seconds = 0.0;
    let mut peak_workers = 0;
    for second in 0..total.as_secs() as usize {
        tokio::time::sleep_until((start + Duration::from_secs(second as u64 + 1)).into()).await;
        let signals = running.balancer.signals();
        let status = **running.status.load();
        let ready = signals.workers.ready;
        let live = ready + status.pending as usize + signals.workers.draining;
        worker_seconds += live as f64;
        peak_workers = peak_workers.max(live);
        let mut row = record
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .seconds
            .get(second)
            .cloned()
            .unwrap_or_default();
        let p95 = loadgen::quantile(&mut row.latencies, 0.95);
        let p99 = loadgen::quantile(&mut row.latencies, 0.99);
        let ms = |d: Option<Duration>| {
            d.map_or_else(
                || "-".into(),
                |d| format!("{:.0} ms", d.as_secs_f64() * 1e3),
            )
        };
        writeln!(
            out,
            "{:>4}s {:>8} {:>8} {:>7} {:>9} {:>9} {:>6} {:>8} {:>9} {:>8} {:>6}",
            second + 1,
            row.sent + row.skipped,
            row.ok,
            row.errors + row.skipped,
            ms(p95),
            ms(p99),
            ready,
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
        rows.push((row, p95));
    }
    generator.await.context("load generator")?;
    stop.stop();
    running.finished().await?;

    // Summary.
    let surge_start = CALM_BEFORE.as_secs() as usize;
    let surge_end = surge_start + SURGE.as_secs() as usize;
    let recovered = (surge_start..rows.len()).find(|&s| {
        rows[s..(s + 3).min(rows.len())]
            .iter()
            .all(|(_, p95)| p95.is_none_or(|p| p <= slo))
    });
    let all = record
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut surge_latencies: Vec<Duration> = all.seconds
        [surge_start..surge_end.min(all.seconds.len())]
        .iter()
        .flat_map(|s| s.latencies.iter().copied())
        .collect();
    let sent: u64 = all.seconds.iter().map(|s| s.sent + s.skipped).sum();
    let errors: u64 = all.seconds.iter().map(|s| s.errors + s.skipped).sum();
    let ms = |d: Option<Duration>| {
        d.map_or_else(
            || "-".into(),
            |d| format!("{:.0} ms", d.as_secs_f64() * 1e3),
        )
    };
    writeln!(out)?;
    match recovered {
        Some(s) => writeln!(
            out,
            "p95 back under the {} ms SLO {} s after the surge began",
            slo.as_millis(),
            s - surge_start
        )?,
        None => writeln!(
            out,
            "p95 never came back under the {} ms SLO",
            slo.as_millis()
        )?,
    }
    writeln!(
        out,
        "during the surge: p95 {}, p99 {}; requests: {sent} sent, {errors} failed",
        ms(loadgen::quantile(&mut surge_latencies, 0.95)),
        ms(loadgen::quantile(&mut surge_latencies, 0.99)),
    )?;
    writeln!(
        out,
        "workers: peak {peak_workers}, {worker_seconds:.0} worker-seconds (a static pool sized for the peak would use {:.0})",
        peak_workers as f64 * rows.len() as f64
    )?;
    Ok(())
}
