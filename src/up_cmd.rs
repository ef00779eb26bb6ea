//! `squall up`: the balancer, the scaler and an embedded forkd in one process, on loopback,
//! in front of an app the policy's template runs.

use std::collections::HashSet;
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

use crate::admin::Admin;
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
    /// Where the live page (/), /metrics, /status and /api/history are served.
    #[arg(long, default_value = "127.0.0.1:9090")]
    pub(crate) admin: SocketAddr,
    /// The app's health path: a worker is ready when it answers 200.
    #[arg(long, default_value = "/healthz")]
    pub(crate) health_path: String,
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
    /// The app: the command forkd runs for the template.
    #[arg(last = true, required = true)]
    pub(crate) command: Vec<String>,
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
                    "squall up: send traffic to http://{}/   status http://{}/status   metrics http://{}/metrics   live page http://{}/",
                    running.listen, running.admin, running.admin, running.admin
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
    let mut tasks = Vec::new();
    // forkd stops after the scaler has killed its clones: its own shutdown kills the template.
    let (forkd_stop, forkd_stopped) = watch::channel(false);
    let external = !args.forkd.is_empty() || args.forkd_dns.is_some();
    anyhow::ensure!(
        !(external && args.no_vm_merge),
        "--no-vm-merge is for the embedded forkd; give it to each `squall forkd` instead"
    );
    anyhow::ensure!(
        !args.no_vm_merge || matches!(args.driver, DriverArg::Vm),
        "--no-vm-merge applies to --driver vm only"
    );
    let (token, urls) = if external {
        let file = args
            .forkd_token_file
            .as_ref()
            .context("--forkd and --forkd-dns need --forkd-token-file")?;
        let token = std::fs::read_to_string(file)
            .with_context(|| format!("reading {}", file.display()))?
            .trim()
            .to_owned();
        (token, args.forkd.clone())
    } else {
        // forkd, embedded, on a loopback port of its own with a fresh token.
        let token = format!("{:032x}", rand::random::<u128>());
        let forkd_listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding forkd")?;
        let forkd_addr = forkd_listener.local_addr()?;
        let mut forkd_config = forkd::Config::new(token.clone());
        forkd_config.vm_merge_memory = !args.no_vm_merge;
        tasks.push(tokio::spawn(async move {
            forkd::serve(forkd_listener, forkd_config, until(forkd_stopped))
                .await
                .context("forkd")
        }));
        (token, vec![format!("http://{forkd_addr}")])
    };
    let driver = match args.driver {
        DriverArg::Fork => forkd::Driver::Fork,
        DriverArg::Spawn => forkd::Driver::Spawn,
        DriverArg::Vm => forkd::Driver::Vm,
    };
    let mut spec = forkd::TemplateSpec::new(policy.template.clone(), driver, args.command.clone());
    spec.health_path = args.health_path.clone();
    let origin = if external {
        Origin::Given
    } else {
        Origin::Embedded
    };
    let hosts = if let Some(name) = &args.forkd_dns {
        // Daemons may still be starting (a DaemonSet rolling out next to us): keep looking.
        let deadline = tokio::time::Instant::now() + DNS_STARTUP_WAIT;
        loop {
            let mut hosts = warm_hosts(&urls, &token, &spec, origin)
                .await
                .unwrap_or_else(|e| {
                    tracing::warn!("{e:#}");
                    Vec::new()
                });
            match resolve(name).await {
                Ok(found) => hosts.extend(
                    warm_hosts(&found, &token, &spec, Origin::Found)
                        .await
                        .unwrap_or_else(|e| {
                            tracing::warn!("{e:#}");
                            Vec::new()
                        }),
                ),
                Err(e) => tracing::warn!("{e:#}"),
            }
            if !hosts.is_empty() || tokio::time::Instant::now() >= deadline {
                break hosts;
            }
            tracing::warn!(name = %name, "no forkd host is ready yet; looking again");
            tokio::time::sleep(DNS_STARTUP_RETRY).await;
        }
    } else {
        anyhow::ensure!(!urls.is_empty(), "no forkd host given");
        warm_hosts(&urls, &token, &spec, origin).await?
    };

    anyhow::ensure!(
        !hosts.is_empty(),
        "no forkd host could create template {}",
        policy.template
    );

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
        let shutdown = lifecycle::Shutdown::on(until(stopped.clone()));
        tasks.push(tokio::spawn(async move {
            tokio::task::spawn_blocking(move || balancer.serve_threads(listeners, shutdown))
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
    let template = policy.load().template.clone();
    let embedded = (!external).then(|| hosts[0].client.clone());
    let scaler = scaler::Scaler::new(Arc::clone(&policy), balancer.clone(), hosts);
    let status = scaler.status();
    let page = Arc::new(Admin::new(
        balancer.clone(),
        &scaler,
        Arc::clone(&policy),
        driver,
        embedded,
    ));
    {
        let (page, stopped) = (Arc::clone(&page), stopped.clone());
        tasks.push(tokio::spawn(async move {
            page.sample(until(stopped)).await;
            Ok(())
        }));
    }
    {
        let stopped = stopped.clone();
        tasks.push(tokio::spawn(async move {
            page.serve(admin_listener, until(stopped)).await;
            Ok(())
        }));
    }
    if let Some(name) = args.forkd_dns.clone() {
        let discovery = Discovery {
            every: DNS_REFRESH,
            token,
            spec,
            in_use: scaler.host_names(),
            hosts: scaler.host_sender(),
        };
        let stopped = stopped.clone();
        tasks.push(tokio::spawn(async move {
            let lookup = move || {
                let name = name.clone();
                async move { resolve(&name).await }
            };
            discovery.run(lookup, stopped).await;
            Ok(())
        }));
    }
    tasks.push(tokio::spawn(async move {
        let hosts = scaler.run(until(stopped)).await;
        if external {
            // Leave the shared daemons as they were found.
            for host in hosts {
                let _ = host.client.delete_template(&template).await;
            }
        }
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

/// How often `--forkd-dns` is resolved again to find daemons on new hosts.
const DNS_REFRESH: Duration = Duration::from_secs(10);
/// How long `squall up --forkd-dns` waits at start for a first daemon.
const DNS_STARTUP_WAIT: Duration = Duration::from_secs(120);
const DNS_STARTUP_RETRY: Duration = Duration::from_secs(2);

/// The forkd URLs a `HOST:PORT` name resolves to, one per address.
async fn resolve(name: &str) -> anyhow::Result<Vec<String>> {
    let addrs = tokio::net::lookup_host(name)
        .await
        .with_context(|| format!("resolving {name}"))?;
    Ok(addrs.map(|addr| format!("http://{addr}")).collect())
}

/// Where a forkd host came from, which decides what the scaler does when it goes down.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Origin {
    /// The daemon inside this process: it cannot restart on its own.
    Embedded,
    /// Given by `--forkd`: checked until it comes back, its template created again if lost.
    Given,
    /// Found by `--forkd-dns`: as given, but dropped after [`RETIRE_AFTER`] down, since
    /// addresses of daemons that went away are not coming back.
    Found,
}

/// How long a host found by DNS may stay down before the scaler drops it.
const RETIRE_AFTER: Duration = Duration::from_secs(60);
/// How long creating (and warming) a template on a newly found host may take.
const WARM_LIMIT: Duration = Duration::from_secs(120);

/// Creates the template on each daemon; returns the hosts that have it. A daemon that
/// refuses is left out (a name may resolve to addresses no daemon listens on, such as ::1 next
/// to 127.0.0.1), unless it is the only one, whose error is returned.
async fn warm_hosts(
    urls: &[String],
    token: &str,
    spec: &forkd::TemplateSpec,
    origin: Origin,
) -> anyhow::Result<Vec<scaler::Host>> {
    let mut hosts = Vec::new();
    for url in urls {
        let client = forkd::Client::new(url, token)?;
        tracing::info!(template = %spec.name, driver = spec.driver.as_str(), forkd = %url, "warming the template");
        match create_or_adopt(&client, spec).await {
            Ok(()) => hosts.push(scaler::Host {
                name: url.clone(),
                client,
                capacity: policies::MAX_WORKERS as usize,
                template: (origin != Origin::Embedded).then(|| spec.clone()),
                retire_after: (origin == Origin::Found).then_some(RETIRE_AFTER),
            }),
            Err(e) if urls.len() > 1 => {
                tracing::warn!(forkd = %url, error = %e, "cannot create the template there; leaving this host out");
            }
            Err(e) => {
                return Err(e.context(format!("creating template {} on {url}", spec.name)));
            }
        }
    }
    Ok(hosts)
}

/// Creates the template, or takes over the same template left by an earlier `squall up`
/// that did not stop cleanly (the scaler kills clones of it that it does not know). A
/// different template of the same name is an error.
async fn create_or_adopt(client: &forkd::Client, spec: &forkd::TemplateSpec) -> anyhow::Result<()> {
    match client.create_template(spec).await {
        Ok(_) => Ok(()),
        Err(forkd::ClientError::Api { status, message })
            if status == hyper::StatusCode::CONFLICT =>
        {
            let existing = client.templates().await?;
            match existing.iter().find(|t| t.spec.name == spec.name) {
                Some(t) if t.spec == *spec && t.alive => {
                    tracing::warn!(template = %spec.name, "the template is already there (left by an earlier run): using it");
                    Ok(())
                }
                Some(t) if t.spec != *spec => anyhow::bail!(
                    "forkd already has a different template named {} (driver {}, command {:?}); delete it or rename the policy's template",
                    spec.name,
                    t.spec.driver.as_str(),
                    t.spec.command
                ),
                _ => anyhow::bail!("forkd answered 409: {message}"),
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// Finds forkd daemons on new hosts while `squall up` runs.
struct Discovery {
    /// How often to look.
    every: Duration,
    token: String,
    spec: forkd::TemplateSpec,
    /// The hosts the scaler uses now (a retired host leaves it and may be found again).
    in_use: Arc<ArcSwap<Vec<String>>>,
    /// Where new hosts go, template warm.
    hosts: tokio::sync::mpsc::UnboundedSender<scaler::Host>,
}

impl Discovery {
    /// Calls `lookup` every `every` and hands daemons not in use to the scaler, once their
    /// template is warm. Daemons that vanish are the scaler's health checks' business.
    async fn run<Lookup: Future<Output = anyhow::Result<Vec<String>>>>(
        &self,
        lookup: impl Fn() -> Lookup,
        stopped: watch::Receiver<bool>,
    ) {
        let stop = until(stopped);
        tokio::pin!(stop);
        // Addresses that did not take the template, warned about once.
        let mut refused: HashSet<String> = HashSet::new();
        loop {
            tokio::select! {
                () = &mut stop => return,
                () = tokio::time::sleep(self.every) => {}
            }
            let urls = tokio::select! {
                () = &mut stop => return,
                urls = lookup() => match urls {
                    Ok(urls) => urls,
                    Err(e) => {
                        tracing::warn!("{e:#}; keeping the hosts found before");
                        continue;
                    }
                },
            };
            let in_use = self.in_use.load_full();
            let fresh: Vec<String> = urls.into_iter().filter(|u| !in_use.contains(u)).collect();
            for url in fresh {
                // Each on its own, so one bad address does not hide the others; shutdown
                // does not wait for a slow one.
                let warm = tokio::time::timeout(
                    WARM_LIMIT,
                    warm_hosts(
                        std::slice::from_ref(&url),
                        &self.token,
                        &self.spec,
                        Origin::Found,
                    ),
                );
                let result = tokio::select! {
                    () = &mut stop => return,
                    result = warm => result.unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within {WARM_LIMIT:?}"))),
                };
                match result {
                    Ok(found) => {
                        refused.remove(&url);
                        for host in found {
                            if let Err(unsent) = self.hosts.send(host) {
                                // The scaler has stopped: leave the daemon as it was.
                                let _ = unsent.0.client.delete_template(&self.spec.name).await;
                                return;
                            }
                        }
                    }
                    Err(e) if refused.insert(url.clone()) => {
                        tracing::warn!(forkd = %url, "forkd host not usable (will keep trying quietly): {e:#}");
                    }
                    Err(e) => tracing::debug!(forkd = %url, "forkd host still not usable: {e:#}"),
                }
            }
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// An in-process forkd on a loopback port; stops when the sender drops.
    async fn forkd_daemon(token: &str) -> (String, watch::Sender<bool>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = watch::channel(false);
        let config = forkd::Config::new(token.to_owned());
        tokio::spawn(async move { forkd::serve(listener, config, until(stopped)).await });
        (url, stop)
    }

    #[tokio::test]
    async fn daemons_that_appear_later_join_with_their_template_warm() {
        let token = "discovery-test-token";
        let (first, _first) = forkd_daemon(token).await;
        let (second, _second) = forkd_daemon(token).await;
        // The name first resolves to one daemon, then to both, plus an address where
        // nothing listens (it must not stop the others from joining).
        let answers = std::sync::Mutex::new(vec![
            vec![first.clone()],
            vec![
                first.clone(),
                "http://127.0.0.1:1".to_owned(),
                second.clone(),
            ],
        ]);
        let lookup = || {
            let mut answers = answers.lock().unwrap();
            let next = if answers.len() > 1 {
                answers.remove(0)
            } else {
                answers[0].clone()
            };
            std::future::ready(Ok(next))
        };
        // Spawn makes no process for a template, so nothing runs here.
        let spec = forkd::TemplateSpec::new(
            "web".to_owned(),
            forkd::Driver::Spawn,
            vec!["true".to_owned()],
        );
        let in_use = Arc::new(ArcSwap::from_pointee(vec![first.clone()]));
        let (hosts, mut joined) = tokio::sync::mpsc::unbounded_channel();
        let (stop, stopped) = watch::channel(false);
        let discovery = Discovery {
            every: Duration::from_millis(20),
            token: token.to_owned(),
            spec: spec.clone(),
            in_use: Arc::clone(&in_use),
            hosts,
        };
        let discovery = discovery.run(lookup, stopped);
        let check = async {
            let host = joined.recv().await.unwrap();
            assert_eq!(host.name, second);
            assert_eq!(host.retire_after, Some(RETIRE_AFTER));
            assert_eq!(host.template.as_ref(), Some(&spec));
            // The scaler now uses it.
            in_use.store(Arc::new(vec![first.clone(), second.clone()]));
            let templates = host.client.templates().await.unwrap();
            assert_eq!(
                templates.len(),
                1,
                "the template is created before the host joins"
            );
            assert_eq!(templates[0].spec.name, "web");
            // Nothing else joins: both are in use, the dead address never answers.
            let more = tokio::time::timeout(Duration::from_millis(200), joined.recv()).await;
            assert!(
                more.is_err(),
                "unexpected host: {:?}",
                more.map(|h| h.map(|h| h.name))
            );
            // Once the scaler drops the second (down too long), it is found again: its daemon
            // still has the same template, which is taken over rather than refused.
            in_use.store(Arc::new(vec![first.clone()]));
            let again = joined.recv().await.unwrap();
            assert_eq!(again.name, second);
            stop.send(true).unwrap();
        };
        let ((), ()) = tokio::join!(discovery, check);
    }
}
