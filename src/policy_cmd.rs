//! `squall policy check` and `squall policy simulate`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use policies::{Duration, Model, Policy, Run, SimConfig, Trace};

/// Exit code for input that is wrong (a bad policy or trace), as opposed to a failure.
pub(crate) const EXIT_BAD_INPUT: u8 = 2;

/// Work with scaling policies.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum PolicyCommand {
    /// Validate policy files and print each one normalized (every default written out).
    /// Exits 2 if any has a mistake, listing every mistake with its file, line and column.
    Check {
        /// Policy files (YAML).
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Replay a load trace through a policy and a queueing model of the workers.
    Simulate(SimulateArgs),
}

/// Arguments of `squall policy simulate`.
#[derive(Debug, clap::Args)]
pub(crate) struct SimulateArgs {
    /// The policy file (YAML).
    pub(crate) policy: PathBuf,
    /// The load trace: CSV rows `time,rate,service`, such as `10s,2000,50ms`.
    #[arg(long)]
    pub(crate) trace: PathBuf,
    /// Time from a scale-up decision until the new worker serves.
    #[arg(long, default_value = "5ms")]
    pub(crate) clone_delay: Duration,
    /// Requests one worker serves at once [default: the policy's target concurrency].
    #[arg(long)]
    pub(crate) worker_concurrency: Option<u32>,
    /// The p95 SLO to judge the run against [default: the policy's target.latency_p95].
    #[arg(long)]
    pub(crate) slo: Option<Duration>,
    /// Seed of the simulated arrivals.
    #[arg(long, default_value_t = 1)]
    pub(crate) seed: u64,
    /// Write the tick-by-tick record to this CSV file.
    #[arg(long)]
    pub(crate) csv: Option<PathBuf>,
    /// Write a chart of the run to this SVG file.
    #[arg(long)]
    pub(crate) svg: Option<PathBuf>,
    /// Print only the summary, not a line per tick.
    #[arg(long, short)]
    pub(crate) quiet: bool,
    /// Also run models of other autoscalers' published algorithms, with their defaults, on
    /// the same trace, seed and pool, and print them side by side with the policy instead
    /// of the ticks: `kpa` (Knative's KPA), `hpa` (Kubernetes' HPA), comma-separated.
    /// --csv and --svg then also write each model's run, its name before the extension.
    #[arg(long, value_delimiter = ',', value_name = "MODELS")]
    pub(crate) compare: Vec<Model>,
    /// With --compare: time from a model's scale-up decision until the new pod serves (the
    /// policy keeps --clone-delay).
    #[arg(long, default_value = "2s", requires = "compare")]
    pub(crate) cold_start: Duration,
}

pub(crate) fn run(command: PolicyCommand) -> anyhow::Result<ExitCode> {
    match command {
        PolicyCommand::Check { files } => Ok(check(&files)),
        PolicyCommand::Simulate(args) => simulate(&args),
    }
}

fn check(files: &[PathBuf]) -> ExitCode {
    let mut ok = true;
    for file in files {
        match policies::load_file(file) {
            Ok(policy) => match serde_yaml::to_string(&policy.normalized()) {
                Ok(yaml) => print!("# {}: ok\n{yaml}", file.display()),
                Err(e) => {
                    eprintln!("{}: cannot print the policy: {e}", file.display());
                    ok = false;
                }
            },
            Err(e) => {
                eprintln!("{e}");
                ok = false;
            }
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_BAD_INPUT)
    }
}

/// Reads a trace file, bounded in size.
fn read_trace(path: &Path) -> anyhow::Result<Result<Trace, policies::TraceError>> {
    const MAX_TRACE_BYTES: u64 = 16 * 1024 * 1024;
    let size = std::fs::metadata(path)
        .with_context(|| format!("{}: cannot read the trace", path.display()))?
        .len();
    anyhow::ensure!(
        size <= MAX_TRACE_BYTES,
        "{}: the trace is {size} bytes; the limit is {MAX_TRACE_BYTES}",
        path.display()
    );
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read the trace", path.display()))?;
    Ok(Trace::parse_csv(&path.display().to_string(), &text))
}

fn simulate(args: &SimulateArgs) -> anyhow::Result<ExitCode> {
    let policy = match policies::load_file(&args.policy) {
        Ok(policy) => policy,
        Err(e) => {
            eprintln!("{e}");
            return Ok(ExitCode::from(EXIT_BAD_INPUT));
        }
    };
    let trace = match read_trace(&args.trace)? {
        Ok(trace) => trace,
        Err(e) => {
            eprintln!("{e}");
            return Ok(ExitCode::from(EXIT_BAD_INPUT));
        }
    };
    let config = SimConfig {
        clone_delay: args.clone_delay.get(),
        worker_concurrency: args.worker_concurrency,
        slo: args.slo.map(Duration::get),
        seed: args.seed,
    };
    if !args.compare.is_empty() {
        return compare(args, &policy, &trace, &config);
    }
    let run = match policies::simulate(&policy, &trace, &config) {
        Ok(run) => run,
        Err(e) => {
            eprintln!("{}: {e}", args.trace.display());
            return Ok(ExitCode::from(EXIT_BAD_INPUT));
        }
    };
    let mut out = std::io::stdout().lock();
    if !args.quiet {
        print_ticks(&mut out, &run, 1)?;
    }
    writeln!(
        out,
        "policy {} on {} ({:.0}s, clone delay {}):",
        policy.name,
        args.trace.display(),
        trace.end().as_secs_f64(),
        args.clone_delay
    )?;
    write!(out, "{}", run.summary_text())?;
    out.flush()?;
    if let Some(path) = &args.csv {
        std::fs::write(path, run.to_csv())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.svg {
        let title = format!("{} on {}", policy.name, args.trace.display());
        std::fs::write(path, run.to_svg(&title))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `simulate --compare`: the policy and each model on the same trace, side by side.
fn compare(
    args: &SimulateArgs,
    policy: &Policy,
    trace: &Trace,
    config: &SimConfig,
) -> anyhow::Result<ExitCode> {
    let compared =
        match policies::compare(policy, trace, config, args.cold_start.get(), &args.compare) {
            Ok(compared) => compared,
            Err(e) => {
                eprintln!("{}: {e}", args.trace.display());
                return Ok(ExitCode::from(EXIT_BAD_INPUT));
            }
        };
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "policy {} on {} ({:.0}s, seed {}), side by side with models of other autoscalers:",
        policy.name,
        args.trace.display(),
        trace.end().as_secs_f64(),
        args.seed
    )?;
    write!(out, "{}", policies::comparison_text(&compared))?;
    writeln!(
        out,
        "The models follow each project's published algorithm with its defaults on this simulator's pool; they are not the real controllers (policies/src/simulate/models/)."
    )?;
    out.flush()?;
    for c in &compared {
        let suffix = (c.name != "squall").then_some(c.name);
        if let Some(path) = &args.csv {
            let path = beside(path, suffix);
            std::fs::write(&path, c.run.to_csv())
                .with_context(|| format!("writing {}", path.display()))?;
        }
        if let Some(path) = &args.svg {
            let path = beside(path, suffix);
            let title = format!("{} on {}", c.label, args.trace.display());
            std::fs::write(&path, c.run.to_svg(&title))
                .with_context(|| format!("writing {}", path.display()))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `run.csv` itself, or `run-kpa.csv` beside it for a model's run.
fn beside(path: &Path, suffix: Option<&str>) -> PathBuf {
    let Some(suffix) = suffix else {
        return path.to_owned();
    };
    let stem = path
        .file_stem()
        .map_or_else(|| "run".to_owned(), |s| s.to_string_lossy().into_owned());
    let name = match path.extension() {
        Some(ext) => format!("{stem}-{suffix}.{}", ext.to_string_lossy()),
        None => format!("{stem}-{suffix}"),
    };
    path.with_file_name(name)
}

/// Prints every `every`-th tick of a run, and every tick whose decision changed the count.
pub(crate) fn print_ticks(out: &mut impl Write, run: &Run, every: usize) -> std::io::Result<()> {
    writeln!(
        out,
        "{:>7} {:>7} {:>6} {:>7} {:>5} {:>7} {:>8} {:>5} {:>7}  reason",
        "time", "rate/s", "demand", "desired", "ready", "pending", "draining", "panic", "p95"
    )?;
    let mut previous = None;
    for (i, r) in run.ticks.iter().enumerate() {
        let changed = previous != Some(r.decision.desired);
        previous = Some(r.decision.desired);
        if i % every.max(1) != 0 && !changed {
            continue;
        }
        writeln!(
            out,
            "{:>6.1}s {:>7.0} {:>6} {:>7} {:>5} {:>7} {:>8} {:>5} {:>7}  {}",
            r.at.as_secs_f64(),
            r.rate,
            r.demand,
            r.decision.desired,
            r.workers.ready,
            r.workers.pending,
            r.workers.draining,
            if r.decision.panic { "yes" } else { "" },
            r.p95.map_or_else(
                || "-".to_owned(),
                |d| format!("{:.0}ms", d.as_secs_f64() * 1e3)
            ),
            r.decision.reason
        )?;
    }
    Ok(())
}

/// The default policy on the built-in flash crowd, simulated: what `squall demo` shows
/// until the live demo can run.
pub(crate) fn simulated_demo() -> anyhow::Result<ExitCode> {
    let policy: Policy = policies::default_policy();
    let trace = Trace::parse_csv("flash-crowd.csv", policies::FLASH_CROWD_TRACE_CSV)?;
    let run = policies::simulate(&policy, &trace, &SimConfig::default())?;
    let per_second = (1000 / policy.tick.get().as_millis().max(1)) as usize;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "Simulated flash crowd: the default policy on 50 -> 2000 -> 50 requests/s (policies/examples/traces/flash-crowd.csv)."
    )?;
    print_ticks(&mut out, &run, per_second)?;
    write!(out, "{}", run.summary_text())?;
    writeln!(
        out,
        "Side by side with models of Knative's KPA and Kubernetes' HPA: squall policy simulate policies/default.yaml --trace policies/examples/traces/flash-crowd.csv --compare kpa,hpa"
    )?;
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}
