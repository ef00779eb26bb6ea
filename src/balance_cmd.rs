//! `squall balance`: runs the load balancer alone, in front of a fixed set of workers.
//!
//! It prints one line per listener, `listening on ADDR` and `admin on ADDR`, to stdout once
//! the sockets are bound (so a caller that asked for port 0 learns the port), logs to
//! stderr, and on SIGTERM or SIGINT stops accepting, finishes the requests in flight and
//! exits 0.

use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use balancer::{Balancer, Config, ThreadListeners, WorkerProtocol};
use lifecycle::{Stop, Terminate};
use tokio::net::TcpListener;

use crate::Threads;
use crate::admin_args::AdminAuthArgs;
use crate::tls_args::TlsArgs;

/// Arguments of `squall balance`.
#[derive(Debug, clap::Args)]
pub(crate) struct BalanceArgs {
    /// Address to accept client connections on (HTTP/1.1 and h2c, or TLS with --tls-cert).
    #[arg(long, value_name = "ADDR")]
    listen: SocketAddr,
    #[command(flatten)]
    tls: TlsArgs,
    /// A worker to send requests to; repeat for more. Its id is its address.
    #[arg(long = "worker", value_name = "ADDR", required = true)]
    workers: Vec<SocketAddr>,
    /// The protocol the workers speak: http1, or h2c (HTTP/2 with prior knowledge, as gRPC
    /// servers speak it).
    #[arg(long, value_name = "PROTOCOL", default_value = "http1")]
    worker_protocol: WorkerProtocol,
    /// Address for the admin endpoints, /metrics, /status and /healthz (loopback unless
    /// others must reach it: see --admin-token-file).
    #[arg(long, value_name = "ADDR")]
    admin: Option<SocketAddr>,
    #[command(flatten)]
    admin_auth: AdminAuthArgs,
    /// Most requests one worker serves at once.
    #[arg(long, default_value_t = Config::default().max_concurrency_per_worker)]
    max_concurrency: usize,
    /// Most requests waiting when every worker is full.
    #[arg(long, default_value_t = Config::default().queue_capacity)]
    queue_capacity: usize,
    /// Longest wait in the queue, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = millis(Config::default().queue_timeout))]
    queue_timeout_ms: u64,
    /// Longest wait for a worker's response head, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = millis(Config::default().response_timeout))]
    response_timeout_ms: u64,
    /// Most other workers a request is tried on when its worker could not be reached, or
    /// (idempotent methods and requests with an Idempotency-Key) was lost before it answered.
    #[arg(long, value_name = "N", default_value_t = Config::default().retries)]
    retries: u32,
    /// Most retries, as a share of the requests of the last 10 s (plus 10 a second).
    #[arg(long, value_name = "RATIO", default_value_t = Config::default().retry_budget)]
    retry_budget: f64,
    /// Threads serving clients, each with a runtime and a listening socket of its own
    /// (default: one per CPU).
    #[arg(long)]
    threads: Option<usize>,
    /// Where the serving threads run: `spread` gives each CPUs of its own, out of those the
    /// process may use (one each with as many threads as CPUs; nothing is pinned with more
    /// threads than CPUs), so two never share a CPU while another is free; `any` leaves
    /// placement to the kernel (for a host where other busy programs share the CPUs).
    #[arg(long, value_enum, value_name = "PLACEMENT", default_value_t = CpuPlacement::Spread)]
    cpus: CpuPlacement,
    /// Longest a shutdown waits for in-flight requests, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = millis(Config::default().shutdown_timeout))]
    shutdown_timeout_ms: u64,
}

/// Where `squall balance` runs its serving threads (`--cpus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum CpuPlacement {
    /// CPUs of their own for each ([`ThreadListeners::spread_over`]).
    Spread,
    /// Wherever the kernel puts them.
    Any,
}

fn millis(duration: Duration) -> u64 {
    duration.as_millis() as u64
}

impl BalanceArgs {
    fn config(&self) -> anyhow::Result<Config> {
        Ok(Config {
            max_concurrency_per_worker: self.max_concurrency,
            queue_capacity: self.queue_capacity,
            queue_timeout: Duration::from_millis(self.queue_timeout_ms),
            response_timeout: Duration::from_millis(self.response_timeout_ms),
            retries: self.retries,
            retry_budget: self.retry_budget,
            shutdown_timeout: Duration::from_millis(self.shutdown_timeout_ms),
            tls: self.tls.files()?,
            worker_protocol: self.worker_protocol,
            ..Config::default()
        })
    }
}

/// Runs `squall balance` to completion: logs to stderr (`RUST_LOG`, default `info`) and
/// returns success after a clean shutdown.
pub(crate) fn run(args: BalanceArgs) -> ExitCode {
    lifecycle::init_logging("info");
    // This runtime only watches signals and serves the admin listener; clients are served
    // by `Balancer::serve_threads`, one runtime per thread.
    crate::exit_code("balance", crate::block_on(Threads::One, balance(args)))
}

async fn balance(args: BalanceArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.admin.is_some() || args.admin_auth.admin_token_file.is_none(),
        "--admin-token-file protects the admin listener: it needs --admin"
    );
    let admin_auth = args.admin_auth.auth()?;
    let balancer = Balancer::new(args.config()?).context("configuring the balancer")?;
    let pool = balancer.pool();
    for addr in &args.workers {
        pool.add_worker(addr.to_string(), *addr)
            .with_context(|| format!("adding worker {addr}"))?;
    }
    // Watched before anything is announced, so a signal sent right after is not lost.
    let terminate = Terminate::watch().context("watching SIGTERM and SIGINT")?;
    let _hangup = crate::tls_args::catch_hangup(
        balancer.config().tls.is_some() || admin_auth.token_file().is_some(),
    )?;
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from));
    let mut listeners = ThreadListeners::bind(args.listen, threads)?;
    if args.cpus == CpuPlacement::Spread {
        spread(&mut listeners, threads);
    }
    announce("listening on", listeners.local_addr())?;

    let stop = Stop::new();
    let shutdown = stop.shutdown();
    let admin = match args.admin {
        Some(addr) => {
            args.admin_auth.warn_if_exposed(addr);
            let admin = TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding admin {addr}"))?;
            announce("admin on", admin.local_addr()?)?;
            let balancer = balancer.clone();
            let shutdown = shutdown.clone();
            Some(tokio::spawn(async move {
                balancer.serve_admin(admin, admin_auth, shutdown).await;
            }))
        }
        None => None,
    };

    tokio::spawn(terminate.stop(stop));

    let serving = balancer.clone();
    tokio::task::spawn_blocking(move || serving.serve_threads(listeners, shutdown))
        .await
        .context("serving threads")??;
    if let Some(admin) = admin {
        admin.await.context("admin listener task")?;
    }
    Ok(())
}

fn announce(what: &str, addr: SocketAddr) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{what} {addr}")?;
    stdout.flush()?;
    Ok(())
}

/// Gives each serving thread CPUs of its own, and says so in the log; says why not when it
/// cannot.
fn spread(listeners: &mut ThreadListeners, threads: usize) {
    let allowed = match kernel::allowed_cpus() {
        Ok(allowed) => allowed,
        Err(error) => {
            tracing::warn!(%error, "cannot read which CPUs this process may use; threads run on any");
            return;
        }
    };
    match listeners.spread_over(&allowed) {
        Some(shares) => tracing::info!(?shares, "each serving thread runs on CPUs of its own"),
        None if threads > 1 => tracing::info!(
            threads,
            cpus = allowed.len(),
            "more serving threads than CPUs: they run on any"
        ),
        None => {}
    }
}
