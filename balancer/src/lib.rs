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
//! How a request flows, module by module: `server` accepts it with `lifecycle`'s HTTP
//! server ([`Balancer::serve`] on the caller's runtime, or [`Balancer::serve_threads`] with
//! one runtime per thread) and hands it to the request path, a stack of tower layers in
//! `stack` (its module docs give the order and the reasons): telemetry, proxy semantics,
//! retry, the admission queue and timeouts around the balance service, which picks a worker
//! (`pick`, by the `load` estimates, over the `pool` snapshot), reserves its slot and sends
//! the request over one of its connections (`upstream`: keep-alive HTTP/1.1, or multiplexed
//! h2c for workers that speak HTTP/2, such as gRPC servers; [`Config::worker_protocol`]). `body` holds the bodies
//! streamed both ways, `telemetry` the windows the scaler reads, `metrics` the Prometheus
//! metrics, `admin` the `/metrics`, `/status` and `/healthz` pages (behind an optional bearer
//! token, `lifecycle::AdminAuth`). `tls` terminates TLS on the
//! client-facing listener (when [`Config::tls`] is set) and reloads its certificate; `stall`
//! cuts off clients that stop taking what they are sent (a whole HTTP/1 connection, or one
//! HTTP/2 stream).
//!
//! Run one `serve` or one `serve_threads` per balancer: each runs the ticker that rotates
//! the telemetry windows and probes ejected workers. [`Balancer::retune`] changes the windows
//! and the per-worker concurrency limit while it runs.
#![forbid(unsafe_code)]

mod admin;
mod body;
mod config;
mod load;
mod metrics;
mod pick;
mod pool;
mod server;
mod stack;
mod stall;
mod telemetry;
mod tls;
mod upstream;
mod worker;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;

pub use config::{Config, ConfigError};
pub use metrics::MetricsError;
pub use pool::{Pool, PoolError, WorkerState, WorkerStatus};
pub use server::{ServeError, ThreadListeners};
pub use telemetry::{Signals, WindowSignals, WorkerCounts};
pub use tls::{TLS_POLL, TlsError, TlsFiles};
pub use upstream::{UnknownProtocol, WorkerProtocol};
pub use worker::WorkerId;

use load::Nanos;
use metrics::Metrics;
use pool::{PoolWriter, Snapshot};
use stack::admission::Queue;
use stack::budget::RetryBudget;
use telemetry::Windows;
use tls::TlsState;
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
    /// TLS could not be set up with the configured certificate and key.
    #[error("setting up TLS")]
    Tls(#[from] TlsError),
}

/// What a running balancer can be re-tuned with ([`Balancer::retune`]), as a policy reload
/// in `squall up` does: the measurement windows the scaler reads, and how many requests one
/// worker serves at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    /// Length of the stable window; a whole number of ticks.
    pub stable_window: Duration,
    /// Length of the panic window; a whole number of ticks, no longer than the stable one.
    pub panic_window: Duration,
    /// Most requests one worker serves at once.
    pub max_concurrency_per_worker: usize,
}

/// A re-tuning the balancer cannot apply; nothing of it was applied.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TuningError {
    /// The values do not fit together, or not with what cannot change while the balancer
    /// runs (its tick); the source names the field.
    #[error("cannot re-tune the balancer")]
    Invalid(#[from] ConfigError),
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
    /// How many retries the recent requests allow.
    pub(crate) retry_budget: RetryBudget,
    /// Most requests one worker serves at once: `Config::max_concurrency_per_worker` until
    /// re-tuned.
    pub(crate) concurrency_limit: AtomicUsize,
    /// How many shards each worker's connection list has: one per CPU.
    pub(crate) connection_shards: usize,
    /// TLS on the client-facing listener, when configured.
    pub(crate) tls: Option<Arc<TlsState>>,
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
        let tls = config.tls.clone().map(TlsState::new).transpose()?;
        let core = Core {
            clock: Clock {
                epoch: tokio::time::Instant::now(),
            },
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            pool_writer: PoolWriter::default(),
            queue: Queue::default(),
            windows: Windows::new(&config),
            metrics: Metrics::new()?,
            retry_budget: RetryBudget::new(config.retry_budget, config.min_retries_per_second),
            concurrency_limit: AtomicUsize::new(config.max_concurrency_per_worker),
            connection_shards: std::thread::available_parallelism().map_or(1, usize::from),
            tls: tls.map(Arc::new),
            config,
        };
        Ok(Self {
            core: Arc::new(core),
        })
    }

    /// The configuration it was built with; [`Balancer::tuning`] has the fields that a
    /// re-tuning may have changed since.
    pub fn config(&self) -> &Config {
        &self.core.config
    }

    /// The windows and the concurrency limit it runs with now.
    pub fn tuning(&self) -> Tuning {
        let (stable_ticks, panic_ticks) = self.core.windows.ticks();
        let tick = self.core.config.tick;
        Tuning {
            stable_window: tick * stable_ticks as u32,
            panic_window: tick * panic_ticks as u32,
            max_concurrency_per_worker: self.core.concurrency_limit.load(Ordering::Acquire),
        }
    }

    /// Applies new windows and a new per-worker concurrency limit while the balancer runs.
    ///
    /// The windows are resized, not restarted: the history both the old and the new windows
    /// cover is kept, so a shorter window is complete at once and a longer one starts with
    /// the old window's history and fills as it runs. [`Balancer::signals`] and `/status`
    /// report the new lengths at once. A raised limit lets waiting requests in at once; a
    /// lowered one sends no new request to a worker until it is below it (requests in
    /// flight finish).
    ///
    /// Refused, with nothing applied, when a value is zero, the panic window is longer than
    /// the stable one, or a window is not a whole number of ticks (the tick is fixed).
    pub fn retune(&self, tuning: Tuning) -> Result<(), TuningError> {
        let core = &self.core;
        let checked = Config {
            stable_window: tuning.stable_window,
            panic_window: tuning.panic_window,
            max_concurrency_per_worker: tuning.max_concurrency_per_worker,
            ..core.config.clone()
        };
        checked.validate()?;
        core.windows.resize(
            checked.ticks_in(tuning.stable_window),
            checked.ticks_in(tuning.panic_window),
        );
        core.concurrency_limit
            .store(tuning.max_concurrency_per_worker, Ordering::Release);
        // A raised limit is room for whoever waits.
        core.queue.room();
        Ok(())
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
            arrivals: self.core.windows.arrivals(),
        }
    }

    /// Notified whenever a request has to wait in the queue (every worker is at its limit, or
    /// there is none): a scaler waiting on it can add capacity at once instead of at its
    /// next tick. Notifications that come while nobody waits are kept as one, so a crowd
    /// queueing costs the waiter one wake-up, not one per request.
    pub fn activation(&self) -> Arc<tokio::sync::Notify> {
        Arc::clone(&self.core.queue.activation)
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
        let limit = self.concurrency_limit.load(Ordering::Relaxed);
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
            .sample_and_rotate(self.queue.in_flight(), self.queue.depth());
        let now = self.clock.now();
        self.retry_budget.mark(now, self.windows.arrivals());
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

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    const MS: Duration = Duration::from_millis(1);

    fn balancer() -> Balancer {
        Balancer::new(Config {
            tick: 100 * MS,
            stable_window: 1000 * MS,
            panic_window: 200 * MS,
            max_concurrency_per_worker: 1,
            ..Config::default()
        })
        .expect("valid config")
    }

    /// One tick with `requests` answered in it.
    fn tick_with(balancer: &Balancer, requests: usize) {
        for _ in 0..requests {
            balancer.core.windows.record(MS, StatusCode::OK);
        }
        balancer.core.windows.sample_and_rotate(0, 0);
    }

    #[test]
    fn retune_resizes_the_windows_at_once_and_keeps_the_history_they_cover() {
        let balancer = balancer();
        // Ten ticks with 1, 2, ..., 10 requests: the stable window (10 ticks) holds 55.
        for n in 1..=10 {
            tick_with(&balancer, n);
        }
        assert_eq!(balancer.signals().stable.requests, 55);
        let shorter = Tuning {
            stable_window: 500 * MS,
            panic_window: 100 * MS,
            max_concurrency_per_worker: 1,
        };
        balancer.retune(shorter).expect("applicable");
        assert_eq!(balancer.tuning(), shorter);
        // The last five ticks (6 to 10) and the last one, seen at once.
        let signals = balancer.signals();
        assert_eq!(signals.stable.window, 500 * MS);
        assert_eq!(signals.stable.requests, 6 + 7 + 8 + 9 + 10);
        assert_eq!(signals.panic.window, 100 * MS);
        assert_eq!(signals.panic.requests, 10);
        let status = balancer.status_json();
        assert_eq!(status["stable"]["window_seconds"], 0.5);
        assert_eq!(status["panic"]["window_seconds"], 0.1);

        // Longer again: what the shorter window held is kept, and the window fills on.
        let longer = Tuning {
            stable_window: 2000 * MS,
            ..shorter
        };
        balancer.retune(longer).expect("applicable");
        assert_eq!(balancer.signals().stable.window, 2000 * MS);
        assert_eq!(balancer.signals().stable.requests, 40);
        for _ in 0..15 {
            tick_with(&balancer, 1);
        }
        assert_eq!(balancer.signals().stable.requests, 40 + 15);
        for _ in 0..5 {
            tick_with(&balancer, 1);
        }
        // Twenty ticks later only they are left.
        assert_eq!(balancer.signals().stable.requests, 20);
    }

    #[test]
    fn retune_refuses_what_it_cannot_apply_and_applies_nothing_of_it() {
        let balancer = balancer();
        let before = balancer.tuning();
        let refused = [
            (
                Tuning {
                    max_concurrency_per_worker: 0,
                    ..before
                },
                TuningError::Invalid(ConfigError::Zero("max_concurrency_per_worker")),
            ),
            (
                Tuning {
                    panic_window: 2000 * MS,
                    max_concurrency_per_worker: 8,
                    ..before
                },
                TuningError::Invalid(ConfigError::PanicLongerThanStable {
                    panic: 2000 * MS,
                    stable: 1000 * MS,
                }),
            ),
            (
                Tuning {
                    stable_window: 1050 * MS,
                    max_concurrency_per_worker: 8,
                    ..before
                },
                TuningError::Invalid(ConfigError::NotMultipleOfTick {
                    field: "stable_window",
                    window: 1050 * MS,
                    tick: 100 * MS,
                }),
            ),
        ];
        for (tuning, error) in refused {
            let expected = format!("{:?}", error);
            assert_eq!(balancer.retune(tuning), Err(error));
            assert_eq!(balancer.tuning(), before, "{expected}");
        }
        let message = std::error::Error::source(&balancer.retune(refused_tick()).unwrap_err())
            .map(ToString::to_string);
        assert_eq!(
            message.as_deref(),
            Some("stable_window (1.05s) must be a whole multiple of tick (100ms)")
        );
    }

    fn refused_tick() -> Tuning {
        Tuning {
            stable_window: 1050 * MS,
            panic_window: 200 * MS,
            max_concurrency_per_worker: 1,
        }
    }

    #[test]
    fn retune_changes_the_concurrency_limit_of_the_next_pick() {
        let balancer = balancer();
        let addr = "127.0.0.1:9".parse().expect("address");
        balancer.pool().add_worker("w", addr).expect("new id");
        let core = &balancer.core;
        let first = core.pick(None).expect("a free slot");
        assert!(core.pick(None).is_none(), "limit 1 is reached");
        let raised = Tuning {
            max_concurrency_per_worker: 2,
            ..balancer.tuning()
        };
        balancer.retune(raised).expect("applicable");
        let second = core.pick(None).expect("the raised limit has room");
        assert!(Arc::ptr_eq(&first, &second));
        // Lowered below what is in flight: no new request until the worker is below it.
        let lowered = Tuning {
            max_concurrency_per_worker: 1,
            ..raised
        };
        balancer.retune(lowered).expect("applicable");
        assert!(core.pick(None).is_none());
        first.in_flight.fetch_sub(1, Ordering::SeqCst);
        assert!(core.pick(None).is_none(), "still at the lowered limit");
        first.in_flight.fetch_sub(1, Ordering::SeqCst);
        assert!(core.pick(None).is_some());
        assert_eq!(balancer.status_json()["max_concurrency_per_worker"], 1);
    }
}
