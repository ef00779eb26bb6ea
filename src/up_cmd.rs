//! `squall up`: the balancer, the scaler and an embedded forkd in one process, on loopback,
//! in front of an app the policy's template runs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use balancer::{Balancer, ThreadListeners};
use policies::Policy;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tracing_subscriber::EnvFilter;

use crate::policy_cmd::EXIT_BAD_INPUT;

/// How clones of the app are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum DriverArg {
    /// Fork each worker from a warm zygote (the app links forkd/zygote).
    Fork,
    /// Start each worker from scratch: the cold-start baseline.
    Spawn,
    /// Restore each worker from a warm microVM snapshot (QEMU); the app listens on port 80
    /// in the guest (`PORT`).
    Vm,
}

/// Arguments of `squall up`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct UpArgs {
    /// The scaling policy [default: the embedded default policy].
    #[arg(long)]
    pub(crate) policy: Option<PathBuf>,
    /// How workers are cloned.
    #[arg(long, value_enum, default_value = "fork")]
    pub(crate) driver: DriverArg,
    /// Where clients send traffic.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub(crate) listen: SocketAddr,
    /// Where /metrics and /status are served.
    #[arg(long, default_value = "127.0.0.1:9090")]
    pub(crate) admin: SocketAddr,
    /// The app's health path: a worker is ready when it answers 200.
    #[arg(long, default_value = "/healthz")]
    pub(crate) health_path: String,
    /// Requests one worker serves at once, beyond which the balancer queues
    /// [default: the policy's target concurrency].
    #[arg(long)]
    pub(crate) max_concurrency: Option<usize>,
    /// The app: the command forkd runs for the template.
    #[arg(last = true, required = true)]
    pub(crate) command: Vec<String>,
}

pub(crate) fn run(args: UpArgs) -> ExitCode {
    init_logging();
    let policy = match load_policy(args.policy.as_deref()) {
        Ok(policy) => policy,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_BAD_INPUT);
        }
    };
    let result = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")
        .and_then(|runtime| {
            runtime.block_on(async {
                let (stop, stopped) = watch::channel(false);
                let running = start(&args, policy, stopped).await?;
                println!(
                    "squall up: send traffic to http://{}/   status http://{}/status   metrics http://{}/metrics",
                    running.listen, running.admin, running.admin
                );
                let mut terminate = signal(SignalKind::terminate())?;
                let mut interrupt = signal(SignalKind::interrupt())?;
                tokio::select! {
                    _ = terminate.recv() => tracing::info!("SIGTERM: shutting down"),
                    _ = interrupt.recv() => tracing::info!("SIGINT: shutting down"),
                }
                let _ = stop.send(true);
                running.finished().await
            })
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("squall up: {e:#}");
            ExitCode::FAILURE
        }
    }
}

pub(crate) fn init_logging() {
    init_logging_at("info");
}

/// Logs to stderr at `default` unless `RUST_LOG` says otherwise.
pub(crate) fn init_logging_at(default: &str) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default)),
        )
        .with_writer(std::io::stderr)
        .try_init();
}

fn load_policy(path: Option<&std::path::Path>) -> Result<Policy, policies::LoadError> {
    match path {
        Some(path) => policies::load_file(path),
        None => Ok(policies::default_policy()),
    }
}

/// A running `squall up`: where it listens, and its tasks.
pub(crate) struct Running {
    pub(crate) listen: SocketAddr,
    pub(crate) admin: SocketAddr,
    pub(crate) balancer: Balancer,
    pub(crate) status: Arc<ArcSwap<scaler::Status>>,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Running {
    /// Waits for every part to stop (after the stop signal was sent).
    pub(crate) async fn finished(self) -> anyhow::Result<()> {
        for task in self.tasks {
            task.await.context("a squall up task panicked")??;
        }
        Ok(())
    }
}

async fn until(mut stopped: watch::Receiver<bool>) {
    let _ = stopped.wait_for(|stop| *stop).await;
}

/// Starts forkd, warms the template, starts the balancer and the scaler; everything stops
/// when `stopped` turns true (the scaler kills its clones, forkd its template).
pub(crate) async fn start(
    args: &UpArgs,
    policy: Policy,
    stopped: watch::Receiver<bool>,
) -> anyhow::Result<Running> {
    // forkd, embedded, on a loopback port of its own with a fresh token.
    let token = format!("{:032x}", rand::random::<u128>());
    let forkd_listener = TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding forkd")?;
    let forkd_addr = forkd_listener.local_addr()?;
    let mut tasks = Vec::new();
    let forkd_config = forkd::Config::new(token.clone());
    // forkd stops after the scaler has killed its clones: its own shutdown kills the template.
    let (forkd_stop, forkd_stopped) = watch::channel(false);
    tasks.push(tokio::spawn(async move {
        forkd::serve(forkd_listener, forkd_config, until(forkd_stopped))
            .await
            .context("forkd")
    }));
    let client = forkd::Client::new(&format!("http://{forkd_addr}"), &token)?;
    let driver = match args.driver {
        DriverArg::Fork => forkd::Driver::Fork,
        DriverArg::Spawn => forkd::Driver::Spawn,
        DriverArg::Vm => forkd::Driver::Vm,
    };
    let mut spec = forkd::TemplateSpec::new(policy.template.clone(), driver, args.command.clone());
    spec.health_path = args.health_path.clone();
    tracing::info!(template = %policy.template, driver = driver.as_str(), "warming the template");
    client
        .create_template(&spec)
        .await
        .with_context(|| format!("creating template {}", policy.template))?;

    let config = balancer::Config {
        max_concurrency_per_worker: args
            .max_concurrency
            .unwrap_or(policy.target.concurrency().ceil() as usize),
        stable_window: policy.window.stable.get(),
        panic_window: policy.window.panic.get(),
        ..balancer::Config::default()
    };
    let balancer = Balancer::new(config).context("configuring the balancer")?;
    let listeners = ThreadListeners::bind(args.listen, 1)
        .with_context(|| format!("binding {}", args.listen))?;
    let listen = listeners.local_addr();
    let admin_listener = TcpListener::bind(args.admin)
        .await
        .with_context(|| format!("binding admin {}", args.admin))?;
    let admin = admin_listener.local_addr()?;
    {
        let balancer = balancer.clone();
        let stopped = stopped.clone();
        tasks.push(tokio::spawn(async move {
            balancer.serve_admin(admin_listener, until(stopped)).await;
            Ok(())
        }));
    }
    {
        let balancer = balancer.clone();
        let stopped = stopped.clone();
        tasks.push(tokio::spawn(async move {
            tokio::task::spawn_blocking(move || balancer.serve_threads(listeners, stopped))
                .await
                .context("serving thread")?
                .context("serving")
        }));
    }

    let policy = Arc::new(ArcSwap::from_pointee(policy));
    if let Some(path) = args.policy.clone() {
        tasks.push(tokio::spawn(reload_policy(
            path,
            Arc::clone(&policy),
            stopped.clone(),
        )));
    }
    let hosts = vec![scaler::Host {
        name: format!("local forkd {forkd_addr}"),
        client,
        capacity: policies::MAX_WORKERS as usize,
    }];
    let scaler = scaler::Scaler::new(Arc::clone(&policy), balancer.clone(), hosts);
    let status = scaler.status();
    tasks.push(tokio::spawn(async move {
        scaler.run(until(stopped)).await;
        let _ = forkd_stop.send(true);
        Ok(())
    }));
    Ok(Running {
        listen,
        admin,
        balancer,
        status,
        tasks,
    })
}

/// Reloads the policy when its file changes or on SIGHUP. A policy that does not load keeps
/// the old one in force, and the error is logged.
async fn reload_policy(
    path: PathBuf,
    policy: Arc<ArcSwap<Policy>>,
    stopped: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut hangup = signal(SignalKind::hangup()).context("watching SIGHUP")?;
    let modified = |path: &PathBuf| std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let mut seen: Option<SystemTime> = modified(&path);
    let stop = until(stopped);
    tokio::pin!(stop);
    loop {
        let why = tokio::select! {
            () = &mut stop => return Ok(()),
            _ = hangup.recv() => "SIGHUP",
            () = tokio::time::sleep(Duration::from_millis(500)) => {
                let now = modified(&path);
                if now == seen { continue; }
                seen = now;
                "the file changed"
            }
        };
        match policies::load_file(&path) {
            Ok(new) => {
                let old = policy.load();
                if new.template != old.template {
                    tracing::error!(path = %path.display(), "policy reload ({why}) refused: the template cannot change while running; keeping the old policy");
                    continue;
                }
                tracing::info!(path = %path.display(), policy = %new.name, "policy reloaded ({why})");
                policy.store(Arc::new(new));
            }
            Err(e) => tracing::error!("policy reload ({why}) failed; keeping the old policy:\n{e}"),
        }
    }
}
