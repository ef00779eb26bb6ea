//! `squall up`: its arguments, parsed into a [`scaler::UpConfig`]; the scaler crate runs it
//! (the balancer, the scaler and forkd, embedded or remote, in front of the app).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use balancer::WorkerProtocol;
use lifecycle::{Stop, Terminate};
use policies::Policy;
use scaler::{ForkdHosts, UpConfig};

use crate::Threads;
use crate::admin_args::AdminAuthArgs;
use crate::policy_cmd::EXIT_BAD_INPUT;
use crate::tls_args::TlsArgs;

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
    /// Where clients send traffic (HTTP/1.1 and h2c, or TLS with --tls-cert).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub(crate) listen: SocketAddr,
    #[command(flatten)]
    pub(crate) tls: TlsArgs,
    /// Where the live page (/), /metrics, /status, /api/history and /healthz are served
    /// (loopback unless others must reach it: see --admin-token-file).
    #[arg(long, default_value = "127.0.0.1:9090")]
    pub(crate) admin: SocketAddr,
    #[command(flatten)]
    pub(crate) admin_auth: AdminAuthArgs,
    /// The app's health path: a worker is ready when it answers 200.
    #[arg(long, default_value = "/healthz")]
    pub(crate) health_path: String,
    /// How long the template may take to start and answer its health check, in seconds
    /// (1 to 600): an app that warms up slowly, or a microVM under QEMU's TCG, may need
    /// more [default: forkd's, 30].
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..=600))]
    pub(crate) start_timeout: Option<u64>,
    /// The protocol the app's workers speak: http1, or h2c (HTTP/2 with prior knowledge, as
    /// gRPC servers speak it; a `spawn` worker is then ready once it answers the HTTP/2
    /// preface, and --health-path is not used). Not for --driver vm.
    #[arg(long, value_name = "PROTOCOL", default_value = "http1")]
    pub(crate) worker_protocol: WorkerProtocol,
    /// Requests one worker serves at once, beyond which the balancer queues
    /// [default: the policy's target concurrency].
    #[arg(long)]
    pub(crate) max_concurrency: Option<usize>,
    /// Clone on these forkd daemons instead of an embedded one (repeatable), such as
    /// http://10.0.0.5:7070.
    #[arg(long = "forkd", value_name = "URL")]
    pub(crate) forkd: Vec<String>,
    /// Also find forkd daemons by resolving HOST:PORT (a headless Service): one per address,
    /// resolved again every 10 s so daemons on new hosts join; at start, waits up to 2 min for
    /// a first one.
    #[arg(long, value_name = "HOST:PORT")]
    pub(crate) forkd_dns: Option<String>,
    /// The bearer token of the forkd daemons given by --forkd or --forkd-dns.
    #[arg(long, value_name = "FILE")]
    pub(crate) forkd_token_file: Option<PathBuf>,
    /// With `--driver vm` and the embedded forkd: keep the clones out of the host's KSM
    /// (see `squall forkd --no-vm-merge`).
    #[arg(long)]
    pub(crate) no_vm_merge: bool,
    /// With `--driver vm`: run this container image (an OCI image layout directory, or a
    /// `docker save` / OCI archive) on forkd's host; the command, if given, replaces the
    /// image's `Cmd`.
    #[arg(long, value_name = "PATH")]
    pub(crate) image: Option<PathBuf>,
    /// With `--image`: the port the app listens on in the guest [default: the first port the
    /// image exposes, else 80].
    #[arg(long, value_name = "PORT", requires = "image")]
    pub(crate) app_port: Option<u16>,
    /// With `--image` and the embedded forkd: where root filesystem disks are kept (see
    /// `squall forkd --image-cache`) [default: ~/.cache/squall/images].
    #[arg(long, value_name = "DIR", requires = "image")]
    pub(crate) image_cache: Option<PathBuf>,
    /// The app: the command forkd runs for the template (with `--image`: the arguments that
    /// replace the image's `Cmd`).
    #[arg(last = true, required_unless_present = "image")]
    pub(crate) command: Vec<String>,
}

impl UpArgs {
    /// The typed configuration these arguments describe, `policy` loaded already.
    fn config(&self, policy: Policy) -> anyhow::Result<UpConfig> {
        let external = !self.forkd.is_empty() || self.forkd_dns.is_some();
        anyhow::ensure!(
            !(external && self.image_cache.is_some()),
            "--image-cache is for the embedded forkd; give it to each `squall forkd` instead"
        );
        anyhow::ensure!(
            !(external && self.no_vm_merge),
            "--no-vm-merge is for the embedded forkd; give it to each `squall forkd` instead"
        );
        anyhow::ensure!(
            !self.no_vm_merge || matches!(self.driver, DriverArg::Vm),
            "--no-vm-merge applies to --driver vm only"
        );
        anyhow::ensure!(
            self.image.is_none() || matches!(self.driver, DriverArg::Vm),
            "--image runs a container image in microVMs: it needs --driver vm"
        );
        anyhow::ensure!(
            self.worker_protocol == WorkerProtocol::Http1 || !matches!(self.driver, DriverArg::Vm),
            "--worker-protocol h2c is for --driver spawn or fork: vm checks a worker's health over HTTP/1.1"
        );
        let forkd = if external {
            let file = self
                .forkd_token_file
                .as_ref()
                .context("--forkd and --forkd-dns need --forkd-token-file")?;
            let token = std::fs::read_to_string(file)
                .with_context(|| format!("reading {}", file.display()))?
                .trim()
                .to_owned();
            ForkdHosts::Remote {
                urls: self.forkd.clone(),
                dns: self.forkd_dns.clone(),
                token,
            }
        } else {
            ForkdHosts::Embedded {
                vm_merge_memory: !self.no_vm_merge,
                image_cache: self.image_cache.clone(),
            }
        };
        let mut config = UpConfig::new(policy, self.driver.into(), self.command.clone());
        config.health_path = self.health_path.clone();
        if let Some(seconds) = self.start_timeout {
            config.start_timeout = std::time::Duration::from_secs(seconds);
        }
        config.worker_protocol = self.worker_protocol;
        config.policy_file = self.policy.clone();
        config.listen = self.listen;
        config.tls = self.tls.files()?;
        config.admin = self.admin;
        config.admin_auth = self.admin_auth.auth()?;
        self.admin_auth.warn_if_exposed(self.admin);
        config.max_concurrency = self.max_concurrency;
        config.image = match (&self.image, &forkd) {
            // The embedded forkd may run in another directory; a remote one reads the path
            // on its own host, as given.
            (Some(image), ForkdHosts::Embedded { .. }) => Some(
                std::path::absolute(image)
                    .with_context(|| format!("resolving {}", image.display()))?,
            ),
            (image, _) => image.clone(),
        };
        config.app_port = self.app_port;
        config.forkd = forkd;
        Ok(config)
    }
}

impl From<DriverArg> for forkd::Driver {
    fn from(driver: DriverArg) -> Self {
        match driver {
            DriverArg::Fork => forkd::Driver::Fork,
            DriverArg::Spawn => forkd::Driver::Spawn,
            DriverArg::Vm => forkd::Driver::Vm,
        }
    }
}

pub(crate) fn run(args: UpArgs) -> ExitCode {
    lifecycle::init_logging("info");
    let policy = match load_policy(args.policy.as_deref()) {
        Ok(policy) => policy,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_BAD_INPUT);
        }
    };
    let result = args
        .config(policy)
        .and_then(|config| crate::block_on(Threads::Workers(2), up(config)));
    crate::exit_code("up", result)
}

/// Runs `squall up` until SIGTERM or SIGINT (which also stop a start that is still warming
/// the template).
async fn up(config: UpConfig) -> anyhow::Result<()> {
    // Watched before anything is announced, so a signal sent right after is not lost.
    let terminate = Terminate::watch().context("watching SIGTERM and SIGINT")?;
    let _hangup = crate::tls_args::catch_hangup(
        config.tls.is_some() || config.admin_auth.token_file().is_some(),
    )?;
    let stop = Stop::new();
    let shutdown = stop.shutdown();
    tokio::spawn(terminate.stop(stop));
    let running = match scaler::up::start(config, shutdown.clone()).await {
        Err(scaler::UpError::Stopped) => return Ok(()),
        started => started?,
    };
    let scheme = if running.balancer.config().tls.is_some() {
        "https"
    } else {
        "http"
    };
    println!(
        "squall up: send traffic to {scheme}://{}/   status http://{}/status   metrics http://{}/metrics   live page http://{}/",
        running.listen, running.admin, running.admin, running.admin
    );
    shutdown.wait().await;
    Ok(running.finished().await?)
}

fn load_policy(path: Option<&std::path::Path>) -> Result<Policy, policies::LoadError> {
    match path {
        Some(path) => policies::load_file(path),
        None => Ok(policies::default_policy()),
    }
}
