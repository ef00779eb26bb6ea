//! `squall demo`: the demo app under `squall up`, driven by a built-in open-loop load
//! generator, in one of two scenarios: the flash crowd on the embedded default policy
//! (`flash_crowd`, a line per second and a summary at 100 ms resolution), or the first
//! request after the pool has gone to zero workers (`from_zero`). The summary numbers are
//! pure functions of what the generator booked (`report`).

mod flash_crowd;
mod from_zero;
mod report;

use std::io::Write as _;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use lifecycle::Stop;
use scaler::UpConfig;
use scaler::up::Running;

use crate::Threads;
use crate::up_cmd::DriverArg;

/// The demo app's service time and per-worker concurrency.
const SERVICE_MS: u64 = 50;
const APP_CONCURRENCY: usize = 8;
/// How often the pool is sampled for its peak and its worker-seconds.
const SAMPLE: Duration = crate::loadgen::SLOT;
/// How long p95 must stay under the SLO to count as back under it.
const HOLD: Duration = Duration::from_secs(1);

/// What the demo shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Scenario {
    /// 50 requests/s, then 2000 for 20 s, then 50 again: a line per second and a summary.
    FlashCrowd,
    /// The pool at zero workers (`workers.min: 0`), then one request, a few rounds, then a
    /// short crowd.
    FromZero,
}

/// Arguments of `squall demo`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct DemoArgs {
    /// What to show.
    #[arg(long, value_enum, default_value = "flash-crowd")]
    scenario: Scenario,
    /// How workers are cloned: `fork` (warm, the point of Squall) or `spawn` (cold starts).
    #[arg(long, value_enum, default_value = "fork")]
    driver: DriverArg,
    /// Instead of autoscaling, keep exactly this many workers (the static-pool baseline of
    /// bench/flash-crowd; flash crowd only).
    #[arg(long, value_name = "N")]
    static_workers: Option<u32>,
    /// Where the live page, /metrics and /status are served (open the page during the demo).
    #[arg(long, default_value = "127.0.0.1:0")]
    admin: std::net::SocketAddr,
}

/// The demo app's command: this very binary, which carries the demo app (`squall warm-app`).
/// In a microVM the app listens on the guest's own interface (its `PORT`, 80), which only
/// the host reaches; on the host it keeps to loopback.
fn app_command(driver: DriverArg) -> anyhow::Result<Vec<String>> {
    let exe = std::env::current_exe().context("finding the squall binary")?;
    let mut command = vec![
        exe.display().to_string(),
        "warm-app".into(),
        "--warmup-ms".into(),
        "2000".into(),
        "--service-ms".into(),
        SERVICE_MS.to_string(),
        "--concurrency".into(),
        APP_CONCURRENCY.to_string(),
    ];
    if matches!(driver, DriverArg::Vm) {
        command.extend(["--listen".into(), "0.0.0.0:{port}".into()]);
    }
    Ok(command)
}

pub(crate) fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    lifecycle::init_logging("warn");
    crate::block_on(Threads::Workers(2), demo(args))?;
    Ok(ExitCode::SUCCESS)
}

async fn demo(args: DemoArgs) -> anyhow::Result<()> {
    let (policy, described) = match (args.scenario, args.static_workers) {
        (Scenario::FlashCrowd, None) => (policies::default_policy(), "default policy".to_owned()),
        (Scenario::FlashCrowd, Some(n)) => {
            anyhow::ensure!(
                (1..=policies::MAX_WORKERS).contains(&n),
                "--static-workers must be 1 to {}",
                policies::MAX_WORKERS
            );
            let mut policy = policies::default_policy();
            policy.workers = policies::Workers { min: n, max: n };
            (policy, format!("a static pool of {n}"))
        }
        (Scenario::FromZero, None) => (from_zero::policy()?, from_zero::DESCRIBED.to_owned()),
        (Scenario::FromZero, Some(_)) => {
            anyhow::bail!(
                "--static-workers is for the flash crowd; --scenario from-zero scales from zero"
            )
        }
    };
    let min = policy.workers.min;
    let slo = policy
        .target
        .latency_p95
        .map_or(Duration::from_millis(150), |d| d.get());
    let mut up = UpConfig::new(policy, args.driver.into(), app_command(args.driver)?);
    up.admin = args.admin;
    up.max_concurrency = Some(APP_CONCURRENCY);
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "squall demo: warm-app ({SERVICE_MS} ms per request, {APP_CONCURRENCY} at once per worker) behind squall up, driver {:?}, {described} (p95 SLO {} ms)",
        args.driver,
        slo.as_millis()
    )?;
    writeln!(out, "warming the template...")?;
    out.flush()?;
    let stop = Stop::new();
    let running = scaler::up::start(up, stop.shutdown()).await?;
    let shown = match args.scenario {
        Scenario::FlashCrowd => flash_crowd::run(&running, slo, min, &mut out).await,
        Scenario::FromZero => from_zero::run(&running, slo, &mut out).await,
    };
    stop.stop();
    running.finished().await?;
    shown
}

/// How many 100 ms slots of the load generator's record `duration` spans (rounded down).
fn slots_in(duration: Duration) -> usize {
    (duration.as_nanos() / crate::loadgen::SLOT.as_nanos()) as usize
}

/// Workers alive now: ready, being cloned, or draining (all of them cost a process); see
/// [`report::live_workers`] for how the balancer's and the scaler's counts are joined.
fn live_workers(running: &Running) -> usize {
    let workers = running.balancer.signals().workers;
    let status = running.status.load();
    report::live_workers(
        workers.ready,
        workers.draining,
        status.pending as usize,
        status.decision.map_or(0, |d| d.desired as usize),
    )
}

/// What the pool cost over a run, sampled every [`SAMPLE`].
#[derive(Debug, Default, Clone, Copy)]
struct PoolUse {
    /// The most workers alive at one sample.
    peak: usize,
    /// Workers alive, summed over the samples, times the sample's length.
    worker_seconds: f64,
}

impl PoolUse {
    fn sample(&mut self, live: usize) {
        self.peak = self.peak.max(live);
        self.worker_seconds += live as f64 * SAMPLE.as_secs_f64();
    }
}

/// Waits until `done` is true of `running`, checking every 20 ms, for at most `limit`;
/// `what` names the condition in the error.
async fn wait_for(
    running: &Running,
    what: &str,
    limit: Duration,
    done: impl Fn(&Running) -> bool,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    while !done(running) {
        anyhow::ensure!(
            start.elapsed() < limit,
            "{what}: not within {} s",
            limit.as_secs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(start.elapsed())
}
