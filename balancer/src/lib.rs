//! The HTTP load balancer: it proxies client requests to the worker pool, picks a worker
//! with power-of-two-choices, and measures every request so the scaler can decide from it.
//!
//! The balancer knows nothing of scaling policy; the scaler adds, drains and removes workers
//! through [`Pool`] and reads [`Signals`].
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use balancer::{Balancer, Config};
//!
//! let balancer = Balancer::new(Config::default())?;
//! balancer.pool().add_worker("clone-1", "127.0.0.1:8081".parse()?)?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! let shutdown = lifecycle::Shutdown::on(async { tokio::signal::ctrl_c().await.ok(); });
//! let serving = balancer.clone();
//! tokio::spawn(async move { serving.serve(listener, shutdown).await });
//! // ... every tick, the scaler reads:
//! let signals = balancer.signals();
//! println!("{:.1} req/s, p95 {:?}", signals.stable.request_rate, signals.stable.latency_p95);
//! # Ok(()) }
//! ```
//!
//! How a request flows, module by module: `server` accepts it ([`Balancer::serve`] on the
//! caller's runtime, or [`Balancer::serve_threads`] with one runtime per thread), `proxy`
//! rewrites it, `admission` reserves a slot on a worker that `pick` chose (or queues it),
//! `upstream` sends it over a pooled connection, `body` streams the bodies, and `telemetry`
//! records it. `pool` holds the workers, `load` their latency estimates, `admin` the
//! `/metrics` and `/status` pages.
//!
//! Run one `serve` or one `serve_threads` per balancer: each runs the ticker that rotates
//! the telemetry windows.
#![forbid(unsafe_code)]

mod admin;
mod body;
mod config;
mod load;
mod pick;
mod pool;
mod server;
mod stack;
mod stall;
mod telemetry;
mod upstream;
mod worker;

use std::sync::Arc;

use arc_swap::ArcSwap;

pub use config::{Config, ConfigError};
pub use pool::{Pool, PoolError, WorkerState, WorkerStatus};
pub use server::{ServeError, ThreadListeners};
pub use telemetry::{MetricsError, Signals, WindowSignals, WorkerCounts};
pub use worker::WorkerId;

use load::Nanos;
use pool::{PoolWriter, Snapshot};
use stack::admission::Queue;
use telemetry::{Metrics, Windows};
use worker::Worker;

/// The balancer could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BalancerError {
    /// The configuration is invalid.
    #[error("invalid balancer configuration")]
    Config(#[from] ConfigError),
    /// The Prometheus metrics could not be registered.
    #[error("setting up metrics")]
    Metrics(#[from] MetricsError),
}

/// A load balancer: the worker pool, the admission queue and the measurements, shared by
/// the proxy listener, the admin listener and the scaler. Cheap to clone; clones share
/// everything.
#[derive(Clone, Debug)]
pub struct Balancer {
    pub(crate) core: Arc<Core>,
}

/// Everything the balancer's parts share.
#[derive(Debug)]
pub(crate) struct Core {
    pub(crate) config: Config,
    pub(crate) clock: Clock,
    pub(crate) snapshot: ArcSwap<Snapshot>,
    pub(crate) pool_writer: PoolWriter,
    pub(crate) queue: Queue,
    pub(crate) windows: Windows,
    pub(crate) metrics: Metrics,
    /// How many shards each worker's connection list has: one per CPU.
    pub(crate) connection_shards: usize,
}

/// Nanoseconds since the balancer started, from tokio's clock so tests can pause it.
#[derive(Debug)]
pub(crate) struct Clock {
    epoch: tokio::time::Instant,
}

impl Clock {
    pub(crate) fn now(&self) -> Nanos {
        self.epoch.elapsed().as_nanos() as Nanos
    }
}

impl Balancer {
    /// Builds a balancer with an empty pool. Needs no runtime; [`Balancer::serve`] does.
    pub fn new(config: Config) -> Result<Self, BalancerError> {
        config.validate()?;
        let core = Core {
            clock: Clock {
                epoch: tokio::time::Instant::now(),
            },
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            pool_writer: PoolWriter::default(),
            queue: Queue::default(),
            windows: Windows::new(&config),
            metrics: Metrics::new()?,
            connection_shards: std::thread::available_parallelism().map_or(1, usize::from),
            config,
        };
        Ok(Self {
            core: Arc::new(core),
        })
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &Config {
        &self.core.config
    }

    /// A handle on the worker pool, for adding, draining and removing workers.
    pub fn pool(&self) -> Pool {
        Pool {
            core: Arc::clone(&self.core),
        }
    }

    /// The measurements now: both windows (as of the last tick) and the instantaneous
    /// counts. Cheap enough to call every tick; takes no lock.
    pub fn signals(&self) -> Signals {
        let mut workers = WorkerCounts::default();
        for member in &self.core.snapshot.load().members {
            match member.state() {
                WorkerState::Ready => workers.ready += 1,
                WorkerState::Draining => workers.draining += 1,
                WorkerState::Ejected => workers.ejected += 1,
            }
        }
        Signals {
            stable: self.core.windows.stable(),
            panic: self.core.windows.panic(),
            in_flight: self.core.queue.in_flight(),
            queue_depth: self.core.queue.depth(),
            workers,
        }
    }

    /// The Prometheus text exposition of every metric, as `/metrics` serves it.
    pub fn metrics_text(&self) -> String {
        self.core.metrics.render(
            self.core.queue.in_flight(),
            self.core.queue.depth(),
            &self.pool().workers(),
        )
    }

    /// The `/status` document: workers, counts and both windows, as JSON.
    pub fn status_json(&self) -> serde_json::Value {
        admin::status(self)
    }
}

impl Core {
    /// Ejects a worker whose connect failed, and closes its idle connections.
    pub(crate) fn eject(&self, worker: &Worker) {
        let now = self.clock.now();
        if worker
            .health
            .eject(now, self.config.ejection, self.config.max_ejection)
        {
            self.metrics.ejections.inc();
            worker.connections.clear();
        }
    }

    /// Whether a worker other than `worker` is ready (neither draining nor ejected), busy
    /// or not.
    pub(crate) fn has_worker_besides(&self, worker: &Arc<Worker>) -> bool {
        self.snapshot
            .load()
            .members
            .iter()
            .any(|m| !Arc::ptr_eq(&m.worker, worker) && m.state() == WorkerState::Ready)
    }

    /// Picks a worker other than `exclude` and reserves one of its slots; `None` when no
    /// eligible worker has room.
    pub(crate) fn pick(&self, exclude: Option<&Arc<Worker>>) -> Option<Arc<Worker>> {
        let snapshot = self.snapshot.load();
        let limit = self.config.max_concurrency_per_worker;
        pick::pick(
            &snapshot,
            limit,
            exclude,
            self.clock.now(),
            &mut rand::rng(),
        )
    }

    /// One tick of the ticker: sample and rotate the windows, probe ejected workers.
    pub(crate) fn tick(self: &Arc<Self>) {
        self.windows
            .sample(self.queue.in_flight(), self.queue.depth());
        self.windows.rotate();
        let now = self.clock.now();
        for member in &self.snapshot.load().members {
            let worker = &member.worker;
            if worker.health.start_probe(now) {
                let core = Arc::clone(self);
                let worker = Arc::clone(worker);
                tokio::spawn(async move { core.probe(&worker).await });
            }
        }
    }

    /// Tries a TCP connect to an ejected worker: readmits it or ejects it again, longer.
    async fn probe(self: &Arc<Self>, worker: &Worker) {
        let connect = tokio::net::TcpStream::connect(worker.addr);
        match tokio::time::timeout(self.config.connect_timeout, connect).await {
            Ok(Ok(_stream)) => {
                tracing::info!(worker = %worker.id, "probe connected; worker readmitted");
                worker.health.recover();
                self.queue.room();
            }
            _ => {
                let now = self.clock.now();
                worker
                    .health
                    .eject_again(now, self.config.ejection, self.config.max_ejection);
            }
        }
    }
}
