//! `squall`: the command-line entry point. It only parses arguments and wires the crates
//! together; every mechanism lives in a crate of its own.
#![forbid(unsafe_code)]

mod admin_args;
mod balance_cmd;
mod demo;
mod forkd_cmd;
mod image_cmd;
mod loadgen;
mod policy_cmd;
mod tls_args;
mod up_cmd;

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;

/// Squall: an HTTP load balancer and autoscaler that forks warm workers for flash crowds.
#[derive(Debug, Parser)]
#[command(name = "squall", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Run the load balancer in front of a fixed set of workers.
    Balance(balance_cmd::BalanceArgs),
    /// Run the per-host fork daemon: templates, clones, and the HTTP API to manage them.
    Forkd(forkd_cmd::ForkdArgs),
    /// The flash-crowd demo on the embedded default policy: the demo app behind squall up,
    /// a built-in flash crowd, a line per second and a summary at 100 ms resolution (or
    /// `--scenario from-zero`: the first request after the pool went to zero workers).
    Demo(demo::DemoArgs),
    /// Replay the built-in flash crowd through the default policy in the simulator.
    SimulateDemo,
    /// Build microVM images.
    #[command(subcommand)]
    Image(image_cmd::ImageCommand),
    /// Run an app behind the balancer and the scaler, with an embedded forkd.
    Up(up_cmd::UpArgs),
    /// The demo app (examples/warm-app), built into squall so the demo needs nothing else.
    #[command(hide = true, disable_help_flag = true)]
    WarmApp {
        /// The demo app's own arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Check and simulate scaling policies.
    #[command(subcommand)]
    Policy(policy_cmd::PolicyCommand),
}

/// glibc's `malloc`, with the cache-line-aligned blocks tokio takes for every connection
/// served from it too rather than from `posix_memalign` (see [`kernel::Malloc`]).
#[global_allocator]
static ALLOCATOR: kernel::Malloc = kernel::Malloc;

/// How often a long-running command looks whether to give freed heap memory back to the
/// kernel.
const RELEASE_FREE_MEMORY_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// The share of one CPU under which the process counts as quiet over a period.
const QUIET_CPU_SHARE: f64 = 0.1;

/// Gives freed heap memory back to the kernel after each period of
/// [`RELEASE_FREE_MEMORY_EVERY`] in which the process was quiet (used less than
/// [`QUIET_CPU_SHARE`] of a CPU), on a thread of its own, for as long as the process runs.
/// After a surge, the buffers of the connections and workers that came and went are free,
/// and the resident size falls back instead of staying at the surge's peak (what a
/// container's memory limit sees). Under load it does nothing: the memory freed would be
/// taken again at once, and giving it back costs every request that then faults it in.
///
/// The allocator is glibc's on purpose. mimalloc cut the balancer's instructions per
/// request (`bench/proxy/instructions`: −1.5 % keep-alive, −9 % with a new connection per
/// request), but in `bench/soak/run` (240 s, at a6745fb) it held 2.4 times the resident
/// size (27.3 against 11.9 MB) and grew 5.6 % where glibc's stayed flat.
fn release_free_memory_when_quiet() {
    let started = std::thread::Builder::new()
        .name("squall-memory".into())
        .spawn(|| {
            let quiet = RELEASE_FREE_MEMORY_EVERY.mul_f64(QUIET_CPU_SHARE);
            let mut before = kernel::process_cpu_time().unwrap_or_default();
            loop {
                std::thread::sleep(RELEASE_FREE_MEMORY_EVERY);
                let Ok(now) = kernel::process_cpu_time() else {
                    return;
                };
                if now.saturating_sub(before) < quiet {
                    kernel::release_free_memory();
                }
                before = now;
            }
        });
    if let Err(e) = started {
        tracing::warn!(error = %e, "cannot start the thread that gives freed memory back");
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(
        cli.command,
        Command::Balance(_) | Command::Forkd(_) | Command::Up(_)
    ) {
        release_free_memory_when_quiet();
    }
    let result = match cli.command {
        Command::Balance(args) => Ok(balance_cmd::run(args)),
        Command::Forkd(args) => Ok(forkd_cmd::run(args)),
        Command::Demo(args) => demo::run(args),
        Command::SimulateDemo => policy_cmd::simulated_demo(),
        Command::Image(command) => image_cmd::run(command),
        Command::Policy(command) => policy_cmd::run(command),
        Command::Up(args) => Ok(up_cmd::run(args)),
        Command::WarmApp { args } => {
            warm_app::run_from(std::iter::once("warm-app".to_owned()).chain(args))
                .map(|()| ExitCode::SUCCESS)
        }
    };
    result.unwrap_or_else(|e| {
        // A closed pipe (`squall ... | head`) is the reader's choice, not a failure.
        let broken_pipe = e
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe);
        if broken_pipe {
            return ExitCode::SUCCESS;
        }
        eprintln!("squall: {e:#}");
        ExitCode::FAILURE
    })
}

/// The threads of the tokio runtime a command runs on.
#[derive(Debug, Clone, Copy)]
enum Threads {
    /// The calling thread only.
    One,
    /// This many worker threads.
    Workers(usize),
    /// One worker thread per CPU (tokio's default).
    PerCpu,
}

/// Runs `future` to completion on a tokio runtime of its own, with `threads`.
fn block_on<T>(
    threads: Threads,
    future: impl Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    use tokio::runtime::Builder;
    let mut builder = match threads {
        Threads::One => Builder::new_current_thread(),
        Threads::PerCpu => Builder::new_multi_thread(),
        Threads::Workers(n) => {
            let mut builder = Builder::new_multi_thread();
            builder.worker_threads(n);
            builder
        }
    };
    builder
        .enable_all()
        .build()
        .context("starting the tokio runtime")?
        .block_on(future)
}

/// The exit code of `squall COMMAND`, which reports its own failure on stderr, prefixed
/// with its name.
fn exit_code(command: &str, result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("squall {command}: {error:#}");
            ExitCode::FAILURE
        }
    }
}
