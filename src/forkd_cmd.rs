//! `squall forkd`: runs the per-host fork daemon until SIGTERM or SIGINT, then kills every
//! clone and template it started. With a subcommand (`squall forkd clone web 3`), it is
//! instead a client of a running daemon, through `forkd::Client`, printing JSON.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use lifecycle::{Stop, Terminate};

use crate::Threads;

/// `--vm-accel`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum VmAccel {
    /// KVM where it runs the guest, TCG otherwise.
    Auto,
    /// KVM only.
    Kvm,
    /// QEMU's TCG only.
    Tcg,
}

/// Arguments of `squall forkd`.
#[derive(Debug, clap::Args)]
pub(crate) struct ForkdArgs {
    /// Address to serve the API on. Loopback by default: expose it only on a trusted network.
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// File holding the bearer token that API clients must send (surrounding whitespace is ignored).
    #[arg(long)]
    token_file: PathBuf,
    /// The address clones listen on (loopback unless balancers on other hosts must reach them).
    #[arg(long, default_value = "127.0.0.1")]
    clone_ip: std::net::IpAddr,
    /// At most this many live clones at once.
    #[arg(long, default_value_t = 256)]
    max_clones: usize,
    /// Seconds a killed clone has between SIGTERM and SIGKILL.
    #[arg(long, default_value_t = 5.0)]
    kill_grace: f64,
    /// Keep `vm` clones out of the host's same-page merging (KSM). By default, where the host
    /// runs KSM, identical pages of all QEMU processes that allow it are merged, which saves
    /// a fifth of a clone's memory under TCG but lets those processes time each other's
    /// memory: use this where templates of tenants who must stay apart share a host.
    #[arg(long)]
    no_vm_merge: bool,
    /// How `vm` guests run: `auto` tries KVM first (for up to 10 s, once per daemon) and
    /// falls back to TCG; `kvm` or `tcg` uses that one only (`tcg` where /dev/kvm is known
    /// not to run guests skips the trial).
    #[arg(long, value_name = "ACCEL", default_value = "auto")]
    vm_accel: VmAccel,
    /// Where root filesystem disks built from container images (`"image"` in a `vm`
    /// template) are kept, named by content digest [default: ~/.cache/squall/images].
    #[arg(long, value_name = "DIR")]
    image_cache: Option<PathBuf>,
    /// Instead of running the daemon, ask the one at `--listen` to do this.
    #[command(subcommand)]
    action: Option<Action>,
}

/// Client actions against a running daemon.
#[derive(Debug, clap::Subcommand)]
enum Action {
    /// Create and warm a template from a JSON spec file (`-` for stdin).
    CreateTemplate {
        /// The spec: `{"name", "driver": "fork"|"spawn", "command": [...], ...}`.
        spec: PathBuf,
    },
    /// List templates.
    Templates,
    /// Delete a template, killing its clones.
    DeleteTemplate {
        /// The template's name.
        name: String,
    },
    /// Clone a template.
    Clone {
        /// The template's name.
        template: String,
        /// How many clones.
        #[arg(default_value_t = 1)]
        count: usize,
    },
    /// List clones.
    Clones,
    /// Kill a clone.
    Kill {
        /// The clone's id.
        id: String,
    },
}

/// Runs the daemon; reports a failure on stderr.
pub(crate) fn run(mut args: ForkdArgs) -> ExitCode {
    lifecycle::init_logging("info");
    let result = match args.action.take() {
        Some(action) => client(&args, action),
        None => daemon(args),
    };
    crate::exit_code("forkd", result)
}

fn read_token(args: &ForkdArgs) -> anyhow::Result<String> {
    let token = std::fs::read_to_string(&args.token_file)
        .with_context(|| format!("reading the token file {}", args.token_file.display()))?
        .trim()
        .to_owned();
    anyhow::ensure!(
        !token.is_empty(),
        "the token file {} is empty",
        args.token_file.display()
    );
    Ok(token)
}

fn client(args: &ForkdArgs, action: Action) -> anyhow::Result<()> {
    let token = read_token(args)?;
    let client = forkd::Client::new(&format!("http://{}", args.listen), &token)?;
    let output = crate::block_on(Threads::One, async {
        anyhow::Ok(match action {
            Action::CreateTemplate { spec } => {
                let text = if spec.as_os_str() == "-" {
                    std::io::read_to_string(std::io::stdin())?
                } else {
                    std::fs::read_to_string(&spec)
                        .with_context(|| format!("reading {}", spec.display()))?
                };
                let spec: forkd::TemplateSpec =
                    serde_json::from_str(&text).context("parsing the template spec")?;
                serde_json::to_value(client.create_template(&spec).await?)?
            }
            Action::Templates => serde_json::to_value(client.templates().await?)?,
            Action::DeleteTemplate { name } => {
                client.delete_template(&name).await?;
                serde_json::json!({"deleted": name})
            }
            Action::Clone { template, count } => {
                serde_json::to_value(client.create_clones(&template, count).await?)?
            }
            Action::Clones => serde_json::to_value(client.clones().await?.clones)?,
            Action::Kill { id } => {
                client.kill(&id).await?;
                serde_json::json!({"killed": id})
            }
        })
    })?;
    println!("{}", serde_json::to_string_pretty(&output)?);
    Ok(())
}

fn daemon(args: ForkdArgs) -> anyhow::Result<()> {
    let token = read_token(&args)?;
    anyhow::ensure!(
        args.kill_grace.is_finite() && args.kill_grace >= 0.0,
        "--kill-grace must be a number of seconds"
    );
    let mut config = forkd::Config::new(token);
    config.max_clones = args.max_clones;
    config.kill_grace = Duration::from_secs_f64(args.kill_grace);
    config.clone_ip = args.clone_ip;
    config.vm_merge_memory = !args.no_vm_merge;
    config.vm_accel = match args.vm_accel {
        VmAccel::Auto => None,
        VmAccel::Kvm => Some(microvm::Accel::Kvm),
        VmAccel::Tcg => Some(microvm::Accel::Tcg),
    };
    if let Some(dir) = &args.image_cache {
        config.image_cache = dir.clone();
    }

    if !args.listen.ip().is_loopback() {
        tracing::warn!(addr = %args.listen, "forkd's API is reachable beyond this host: protect it with a strong token");
    }
    crate::block_on(Threads::PerCpu, async {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        let terminate = Terminate::watch().context("watching SIGTERM and SIGINT")?;
        let stop = Stop::new();
        let shutdown = stop.shutdown();
        tokio::spawn(terminate.stop(stop));
        forkd::serve(listener, config, shutdown).await?;
        Ok(())
    })
}
