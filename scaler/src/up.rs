//! `squall up`, assembled: forkd (embedded in this process, or daemons on other hosts), the
//! template warm on each, the balancer tuned by the policy, the scaler, the policy watcher
//! and the admin listener, all started from one typed [`UpConfig`] and stopped by one
//! [`Shutdown`]. The `squall` binary only parses its arguments into an `UpConfig`; the demo
//! builds one directly.
//!
//! Shutdown order: the balancer finishes its requests, the scaler kills the clones it made
//! (and, on shared daemons, deletes the template it created), then the embedded forkd stops
//! its template.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use balancer::{Balancer, ThreadListeners, WorkerProtocol};
use forkd::TemplateSpec;
use lifecycle::{AdminAuth, Shutdown, Stop};
use policies::Policy;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::admin::{Admin, Sources};
use crate::discovery::{DNS_REFRESH, Discovery, WarmError, resolve, warm_hosts};
use crate::hosts::{Host, Origin};
use crate::{Scaler, ScalerConfig, Status};

/// How long `squall up` with a DNS name waits at start for a first daemon.
const DNS_STARTUP_WAIT: Duration = Duration::from_secs(120);
/// How often it looks meanwhile.
const DNS_STARTUP_RETRY: Duration = Duration::from_secs(2);
/// How long a shared daemon has, at shutdown, to delete the template `squall up` made.
const LEAVE_LIMIT: Duration = Duration::from_secs(10);

/// Where the forkd daemons are.
#[derive(Debug, Clone)]
pub enum ForkdHosts {
    /// One in this process, on a loopback port of its own with a fresh token.
    Embedded {
        /// Whether its microVM clones may be merged by the host's KSM
        /// (`forkd::Config::vm_merge_memory`).
        vm_merge_memory: bool,
        /// Where its root filesystem disks are kept; `None` for forkd's default
        /// (`forkd::Config::image_cache`).
        image_cache: Option<PathBuf>,
    },
    /// Daemons running elsewhere (`squall forkd`), given by URL and/or found by a DNS name.
    Remote {
        /// Their URLs, such as `http://10.0.0.5:7070`.
        urls: Vec<String>,
        /// A `HOST:PORT` name resolving to one address per daemon, resolved again every
        /// [`DNS_REFRESH`] so daemons on new hosts join.
        dns: Option<String>,
        /// Their bearer token.
        token: String,
    },
}

/// Everything `squall up` needs to run.
#[derive(Debug, Clone)]
pub struct UpConfig {
    /// The scaling policy.
    pub policy: Policy,
    /// The file the policy came from, watched for changes (and SIGHUP); `None` for none.
    pub policy_file: Option<PathBuf>,
    /// How workers are cloned.
    pub driver: forkd::Driver,
    /// The app: the command forkd runs for the template (named by the policy's `template`);
    /// with `image`, the arguments that replace the image's `Cmd`.
    pub command: Vec<String>,
    /// `vm` only: the container image to run, on forkd's host (see [`TemplateSpec::image`]).
    pub image: Option<PathBuf>,
    /// With `image`: the app's port in the guest (see [`TemplateSpec::app_port`]).
    pub app_port: Option<u16>,
    /// The app's health path: a worker is ready when it answers 200.
    pub health_path: String,
    /// How long the template may take to start and answer its health check (forkd's
    /// `start_timeout_ms`).
    pub start_timeout: Duration,
    /// The protocol the app's workers speak: the balancer sends them requests in it, and a
    /// `spawn` worker is ready once it answers the protocol's check (`GET health_path` for
    /// HTTP/1.1, the connection preface for h2c). h2c is not for the `vm` driver.
    pub worker_protocol: WorkerProtocol,
    /// Where clients send traffic.
    pub listen: SocketAddr,
    /// TLS on the client listener (see [`balancer::Config::tls`]); `None` for plaintext.
    pub tls: Option<balancer::TlsFiles>,
    /// Where the live page, `/metrics`, `/status` and `/api/history` are served.
    pub admin: SocketAddr,
    /// What a request to the admin listener must carry: nothing by default, or a bearer
    /// token (see [`crate::admin`]).
    pub admin_auth: AdminAuth,
    /// Requests one worker serves at once; by default the policy's target concurrency.
    pub max_concurrency: Option<usize>,
    /// Where forkd runs.
    pub forkd: ForkdHosts,
}

impl UpConfig {
    /// A configuration running `command` with `driver` under `policy`, on loopback ports
    /// chosen by the system and an embedded forkd; change the fields for the rest.
    pub fn new(policy: Policy, driver: forkd::Driver, command: Vec<String>) -> Self {
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        let defaults = TemplateSpec::new("", driver, Vec::new());
        Self {
            policy,
            policy_file: None,
            driver,
            command,
            image: None,
            app_port: None,
            health_path: defaults.health_path,
            start_timeout: Duration::from_millis(defaults.start_timeout_ms),
            worker_protocol: WorkerProtocol::Http1,
            listen: loopback,
            tls: None,
            admin: loopback,
            admin_auth: AdminAuth::open(),
            max_concurrency: None,
            forkd: ForkdHosts::Embedded {
                vm_merge_memory: true,
                image_cache: None,
            },
        }
    }

    /// The template every worker is cloned from: the policy names it.
    fn template(&self) -> TemplateSpec {
        let mut spec = TemplateSpec::new(
            self.policy.template.clone(),
            self.driver,
            self.command.clone(),
        );
        spec.health_path = self.health_path.clone();
        spec.start_timeout_ms = u64::try_from(self.start_timeout.as_millis()).unwrap_or(u64::MAX);
        spec.protocol = match self.worker_protocol {
            WorkerProtocol::Http1 => forkd::Protocol::Http1,
            WorkerProtocol::H2c => forkd::Protocol::H2c,
        };
        spec.image = self.image.clone();
        spec.app_port = self.app_port;
        spec
    }
}

/// Why `squall up` could not start, or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum UpError {
    /// A listener could not be bound.
    #[error("binding {what} on {addr}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The template could not be created on a host.
    #[error(transparent)]
    Warm(#[from] WarmError),
    /// No host has the template.
    #[error("no forkd host could create template {0}")]
    NoHost(String),
    /// The shutdown came before `squall up` had started; what had started has stopped.
    #[error("stopped while starting")]
    Stopped,
    /// The policy's windows or concurrency do not fit the balancer.
    #[error("the policy does not fit the balancer")]
    Tuning(#[source] balancer::ConfigError),
    /// The balancer's configuration, from the policy, is invalid.
    #[error("configuring the balancer")]
    Balancer(#[from] balancer::BalancerError),
    /// The balancer's serving threads failed.
    #[error("serving")]
    Serve(#[from] balancer::ServeError),
    /// The embedded forkd failed.
    #[error("the embedded forkd")]
    Forkd(#[from] forkd::ServeError),
    /// The policy file could not be watched.
    #[error("watching the policy file")]
    Watch(#[source] std::io::Error),
    /// A part of `squall up` panicked.
    #[error("a squall up task panicked")]
    Panicked(#[from] tokio::task::JoinError),
}

/// A running `squall up`: where it listens, and its parts.
pub struct Running {
    /// Where clients send traffic.
    pub listen: SocketAddr,
    /// Where the admin listener is.
    pub admin: SocketAddr,
    /// The balancer (its signals, its pool).
    pub balancer: Balancer,
    /// The scaler's last decision.
    pub status: Arc<ArcSwap<Status>>,
    tasks: Vec<JoinHandle<Result<(), UpError>>>,
}

impl Running {
    /// Waits for every part to stop (once the shutdown was given).
    pub async fn finished(self) -> Result<(), UpError> {
        for task in self.tasks {
            task.await??;
        }
        Ok(())
    }
}

/// Starts forkd (embedded) or reaches the daemons, warms the template, and starts the
/// balancer, the scaler and the admin listener; everything stops at `shutdown`. A shutdown
/// that comes while the template warms stops what had started and returns
/// [`UpError::Stopped`].
///
/// Shutdown order: the balancer stops accepting and finishes the requests in flight; only
/// then does the scaler kill the workers (and delete the template it created on shared
/// daemons), and then the embedded forkd stops its template.
pub async fn start(config: UpConfig, shutdown: Shutdown) -> Result<Running, UpError> {
    let tuning = crate::front::tuning(&config.policy, config.max_concurrency);
    let balancer_config = balancer::Config {
        tls: config.tls.clone(),
        worker_protocol: config.worker_protocol,
        ..crate::front::config(&tuning)
    };
    balancer_config.validate().map_err(UpError::Tuning)?;
    let mut tasks: Vec<JoinHandle<Result<(), UpError>>> = Vec::new();
    // forkd stops after the scaler has killed its clones: its own shutdown kills the template.
    let forkd_stop = Stop::new();
    let template = Arc::new(config.template());
    let warming = async {
        match &config.forkd {
            ForkdHosts::Embedded {
                vm_merge_memory,
                image_cache,
            } => {
                let token = format!("{:032x}", rand::random::<u128>());
                let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
                let bind_error = |source| UpError::Bind {
                    what: "forkd",
                    addr: loopback,
                    source,
                };
                let listener = TcpListener::bind(loopback).await.map_err(bind_error)?;
                let url = format!("http://{}", listener.local_addr().map_err(bind_error)?);
                let mut forkd_config = forkd::Config::new(token.clone());
                forkd_config.vm_merge_memory = *vm_merge_memory;
                if let Some(dir) = image_cache {
                    forkd_config.image_cache = dir.clone();
                }
                let stopped = forkd_stop.shutdown();
                tasks.push(tokio::spawn(async move {
                    Ok(forkd::serve(listener, forkd_config, stopped).await?)
                }));
                let hosts = warm_hosts(&[url], &token, &template, Origin::Embedded).await?;
                Ok::<_, UpError>((hosts, token, None))
            }
            ForkdHosts::Remote { urls, dns, token } => {
                let hosts = match dns {
                    Some(name) => first_hosts(urls, name, token, &template).await,
                    None => warm_hosts(urls, token, &template, Origin::Given).await?,
                };
                Ok((hosts, token.clone(), dns.clone()))
            }
        }
    };
    let warmed = tokio::select! {
        warmed = warming => warmed,
        () = shutdown.wait() => Err(UpError::Stopped),
    };
    let warmed = match warmed {
        Ok((hosts, ..)) if hosts.is_empty() => Err(UpError::NoHost(template.name.clone())),
        other => other,
    };
    let (hosts, token, dns) = match warmed {
        Ok(warmed) => warmed,
        Err(error) => {
            // What had started stops before the error is returned: the embedded forkd
            // kills its template.
            forkd_stop.stop();
            for task in tasks {
                let _ = task.await;
            }
            return Err(error);
        }
    };
    let embedded =
        matches!(config.forkd, ForkdHosts::Embedded { .. }).then(|| hosts[0].client.clone());

    let balancer = Balancer::new(balancer_config)?;
    let listeners = ThreadListeners::bind(config.listen, 1)?;
    let listen = listeners.local_addr();
    let admin_listener = TcpListener::bind(config.admin)
        .await
        .map_err(|source| UpError::Bind {
            what: "admin",
            addr: config.admin,
            source,
        })?;
    let admin = admin_listener
        .local_addr()
        .map_err(|source| UpError::Bind {
            what: "admin",
            addr: config.admin,
            source,
        })?;
    // The scaler stops once the balancer has finished the requests in flight.
    let scaler_stop = Stop::new();
    let scaler_stopped = scaler_stop.shutdown();
    {
        let balancer = balancer.clone();
        let stopped = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            let served =
                tokio::task::spawn_blocking(move || balancer.serve_threads(listeners, stopped))
                    .await;
            scaler_stop.stop();
            served??;
            Ok(())
        }));
    }

    let policy = Arc::new(ArcSwap::from_pointee(config.policy));
    let scaler = Scaler::new(
        ScalerConfig {
            policy: Arc::clone(&policy),
            template: Arc::clone(&template),
            max_concurrency: config.max_concurrency,
        },
        balancer.clone(),
        hosts,
    );
    let status = scaler.status();
    if let Some(path) = config.policy_file {
        let (policy, metrics, shutdown) = (Arc::clone(&policy), scaler.metrics(), shutdown.clone());
        let max_concurrency = config.max_concurrency;
        let fits = move |p: &Policy| crate::reload::fits_the_balancer(p, max_concurrency);
        tasks.push(tokio::spawn(async move {
            crate::reload::watch(path, policy, fits, metrics, shutdown)
                .await
                .map_err(UpError::Watch)
        }));
    }
    let page = Arc::new(Admin::new(Sources {
        balancer: balancer.clone(),
        status: scaler.status(),
        metrics: scaler.metrics(),
        policy,
        driver: template.driver,
        forkd: embedded,
    }));
    {
        let (page, shutdown) = (Arc::clone(&page), shutdown.clone());
        tasks.push(tokio::spawn(async move {
            page.sample(shutdown).await;
            Ok(())
        }));
    }
    {
        let (auth, shutdown) = (config.admin_auth, shutdown.clone());
        tasks.push(tokio::spawn(async move {
            page.serve(admin_listener, auth, shutdown).await;
            Ok(())
        }));
    }
    if let Some(name) = dns {
        let discovery = Discovery {
            every: DNS_REFRESH,
            token,
            spec: Arc::clone(&template),
            in_use: scaler.host_names(),
            peers: scaler.up_host_names(),
            hosts: scaler.host_sender(),
        };
        let shutdown = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            let lookup = move || {
                let name = name.clone();
                async move { resolve(&name).await }
            };
            discovery.run(lookup, shutdown).await;
            Ok(())
        }));
    }
    let remote = matches!(config.forkd, ForkdHosts::Remote { .. });
    tasks.push(tokio::spawn(async move {
        let hosts = scaler.run(scaler_stopped).await;
        if remote {
            // Leave the shared daemons as they were found, each within a bound: a host that
            // went away does not hold up the shutdown.
            let mut deletes = tokio::task::JoinSet::new();
            for host in hosts {
                let name = template.name.clone();
                deletes.spawn(async move {
                    let delete = crate::CloneHost::delete_template(&host.client, &name);
                    crate::host::within(LEAVE_LIMIT, delete).await
                });
            }
            while deletes.join_next().await.is_some() {}
        }
        forkd_stop.stop();
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

/// With a DNS name: the given daemons and the ones the name resolves to, looking again for
/// up to [`DNS_STARTUP_WAIT`] while there is none (a DaemonSet may be rolling out next to
/// us).
async fn first_hosts(
    urls: &[String],
    name: &str,
    token: &str,
    spec: &TemplateSpec,
) -> Vec<Host<forkd::Client>> {
    let deadline = tokio::time::Instant::now() + DNS_STARTUP_WAIT;
    loop {
        let mut hosts = warm_hosts(urls, token, spec, Origin::Given)
            .await
            .unwrap_or_else(|e| {
                tracing::warn!("{}", lifecycle::ErrorChain(&e));
                Vec::new()
            });
        match resolve(name).await {
            Ok(found) => hosts.extend(
                warm_hosts(&found, token, spec, Origin::Found)
                    .await
                    .unwrap_or_else(|e| {
                        tracing::warn!("{}", lifecycle::ErrorChain(&e));
                        Vec::new()
                    }),
            ),
            Err(e) => tracing::warn!("{}", lifecycle::ErrorChain(&e)),
        }
        if !hosts.is_empty() || tokio::time::Instant::now() >= deadline {
            return hosts;
        }
        tracing::warn!(name = %name, "no forkd host is ready yet; looking again");
        tokio::time::sleep(DNS_STARTUP_RETRY).await;
    }
}
