//! The listeners: accepting client connections, the admin listener, and the ticker.
//!
//! Two ways to serve: [`Balancer::serve`] on the caller's runtime (what the scaler and the
//! tests use), and [`Balancer::serve_threads`], nginx's model, for the most throughput: one
//! single-threaded runtime per thread, each accepting from its own `SO_REUSEPORT` socket on
//! the same address, so a connection, its requests and the worker connections they use stay
//! on one thread, with no work stealing or cross-thread wake-ups. Those threads can also be
//! given CPUs of their own ([`ThreadListeners::spread_over`]).
//!
//! Both accept with [`lifecycle::HttpServer`], which also gives shutdown its protocol: when
//! the [`Shutdown`] comes the listener is closed, every connection is told to finish (HTTP/1
//! after its current response, HTTP/2 with GOAWAY), and `serve` returns once they have all
//! finished or `shutdown_timeout` has passed, whichever is first. The ticker is a task of
//! its own that stops on the same `Shutdown`.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use lifecycle::{AdminAuth, HttpServer, Limits, Shutdown, Tls};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::time::MissedTickBehavior;

use crate::stall::{StreamExecutor, WriteStall};
use crate::{Balancer, Core, admin, stack, tls, upstream};

/// Serving could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A listening socket could not be created, bound or configured.
    #[error("binding {addr}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// A thread's runtime could not be started.
    #[error("starting the runtime of serving thread {thread}")]
    Runtime {
        /// Which thread.
        thread: usize,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// A serving thread panicked.
    #[error("serving thread {thread} panicked")]
    Panicked {
        /// Which thread.
        thread: usize,
    },
}

/// Listening sockets for [`Balancer::serve_threads`]: one per thread, all bound to one
/// address with `SO_REUSEPORT` so the kernel spreads new connections across them.
#[derive(Debug)]
pub struct ThreadListeners {
    addr: SocketAddr,
    sockets: Vec<std::net::TcpListener>,
    /// The CPUs each thread may run on, when spread; `None`: any the process may.
    cpus: Option<Vec<Vec<usize>>>,
}

impl ThreadListeners {
    /// Binds `threads` sockets (at least one) to `addr`. With port 0 the first socket
    /// picks the port and the others join it.
    pub fn bind(addr: SocketAddr, threads: usize) -> Result<Self, ServeError> {
        let mut bound = addr;
        let mut sockets = Vec::new();
        for _ in 0..threads.max(1) {
            let socket =
                reuseport_listener(bound).map_err(|source| ServeError::Bind { addr, source })?;
            bound = socket
                .local_addr()
                .map_err(|source| ServeError::Bind { addr, source })?;
            sockets.push(socket);
        }
        Ok(Self {
            addr: bound,
            sockets,
            cpus: None,
        })
    }

    /// The address the sockets are bound to (with the port chosen, if 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Gives each serving thread CPUs of its own out of `allowed` (the CPUs the process may
    /// run on): thread `i` of `n` gets every `n`th of them from the `i`th on, so one each
    /// when there are as many threads as CPUs. Returns what each thread gets, or `None`
    /// (and leaves the threads free to run anywhere) when there is one thread, or more
    /// threads than CPUs.
    ///
    /// Why: under full load the kernel sometimes puts two serving threads on one CPU while
    /// the other CPUs run the clients and the workers. Neither thread then ever waits for
    /// work, so they take turns a scheduler tick (4 ms at 250 Hz) at a time, and every
    /// connection of each waits out the other's ticks: measured on 2 CPUs, such spells
    /// lasted up to half a second and doubled the 99th percentile of latency
    /// (`bench/proxy/run`). With disjoint CPUs that cannot happen; the cost is that a
    /// thread cannot move to a CPU outside its share when something else keeps its own busy.
    pub fn spread_over(&mut self, allowed: &[usize]) -> Option<&[Vec<usize>]> {
        self.cpus = spread(allowed, self.sockets.len());
        self.cpus.as_deref()
    }
}

/// Deals `allowed` out to `threads` threads, as [`ThreadListeners::spread_over`] says.
fn spread(allowed: &[usize], threads: usize) -> Option<Vec<Vec<usize>>> {
    if threads < 2 || allowed.len() < threads {
        return None;
    }
    Some(
        (0..threads)
            .map(|thread| {
                allowed
                    .iter()
                    .copied()
                    .skip(thread)
                    .step_by(threads)
                    .collect()
            })
            .collect(),
    )
}

fn reuseport_listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// Pending connections the kernel queues per socket.
const LISTEN_BACKLOG: i32 = 4096;

/// Which serving thread runs the ticker: exactly one per balancer must.
const TICKER_THREAD: usize = 0;

impl Balancer {
    /// Proxies the connections `listener` accepts until `shutdown`, then finishes the
    /// requests in flight (for at most `Config::shutdown_timeout`) and returns.
    ///
    /// It also runs the ticker that rotates the telemetry windows and probes ejected
    /// workers, as a task of its own stopped by the same `shutdown`, so
    /// [`Balancer::signals`] moves only while a `serve` runs. Clients may speak HTTP/1.1 or
    /// HTTP/2 with prior knowledge (h2c); with [`Config::tls`](crate::Config::tls), TLS with
    /// ALPN (`h2` or `http/1.1`), and then the certificate is reloaded, in another task
    /// stopped by the same `shutdown`, on SIGHUP and when its files change.
    pub async fn serve(&self, listener: TcpListener, shutdown: Shutdown) {
        let ticker = tokio::spawn(ticker(Arc::clone(&self.core), shutdown.clone()));
        let reloader = self.core.tls.as_ref().map(|_| {
            // Watched before the first connection is accepted, so a SIGHUP sent once the
            // listener answers is never lost (nor taken by the default action: exit).
            let hangup = match signal(SignalKind::hangup()) {
                Ok(hangup) => Some(hangup),
                Err(error) => {
                    tracing::warn!(%error, "cannot watch SIGHUP; the TLS files are still polled");
                    None
                }
            };
            let core = Arc::clone(&self.core);
            tokio::spawn(tls::reload::watch(core, hangup, shutdown.clone()))
        });
        self.accept(listener, &shutdown).await;
        // The ticker and the reloader have heard the same shutdown; they end at their next
        // select.
        if let Err(error) = ticker.await {
            tracing::error!(%error, "the telemetry ticker failed");
        }
        if let Some(reloader) = reloader
            && let Err(error) = reloader.await
        {
            tracing::error!(%error, "the TLS certificate reloader failed");
        }
    }

    /// Like [`Balancer::serve`], on one single-threaded runtime per listener socket, each
    /// on a thread of its own; blocks the calling thread until every thread has finished its
    /// shutdown. The first thread also runs the ticker.
    pub fn serve_threads(
        &self,
        listeners: ThreadListeners,
        shutdown: Shutdown,
    ) -> Result<(), ServeError> {
        let ThreadListeners { sockets, cpus, .. } = listeners;
        let mut cpus = cpus.map(Vec::into_iter);
        std::thread::scope(|scope| {
            let handles: Vec<_> = sockets
                .into_iter()
                .enumerate()
                .map(|(thread, socket)| {
                    let shutdown = shutdown.clone();
                    let cpus = cpus.as_mut().and_then(Iterator::next);
                    let serving = std::thread::Builder::new()
                        .name(format!("squall-serve-{thread}"))
                        .spawn_scoped(scope, move || {
                            if let Some(cpus) = cpus
                                && let Err(error) = kernel::run_only_on(&cpus)
                            {
                                tracing::warn!(
                                    thread, ?cpus, %error,
                                    "cannot keep the serving thread to its CPUs; it runs on any"
                                );
                            }
                            upstream::set_shard(thread);
                            let runtime = tokio::runtime::Builder::new_current_thread()
                                .enable_all()
                                .build()
                                .map_err(|source| ServeError::Runtime { thread, source })?;
                            runtime.block_on(async move {
                                let listener = TcpListener::from_std(socket)
                                    .map_err(|source| ServeError::Runtime { thread, source })?;
                                if thread == TICKER_THREAD {
                                    self.serve(listener, shutdown).await;
                                } else {
                                    self.accept(listener, &shutdown).await;
                                }
                                Ok(())
                            })
                        });
                    (thread, serving)
                })
                .collect();
            let mut result = Ok(());
            for (thread, handle) in handles {
                let outcome = match handle {
                    Ok(handle) => handle
                        .join()
                        .unwrap_or(Err(ServeError::Panicked { thread })),
                    Err(source) => Err(ServeError::Runtime { thread, source }),
                };
                if result.is_ok() {
                    result = outcome;
                }
            }
            result
        })
    }

    /// The proxy listener's limits: the client-facing ones from the configuration, and no
    /// cap on connections or their life (a load balancer's clients keep connections open).
    fn proxy_limits(&self) -> Limits {
        let config = &self.core.config;
        Limits {
            header_read_timeout: config.header_read_timeout,
            max_header_bytes: config.max_header_bytes,
            max_concurrent_streams: config.max_concurrent_streams,
            max_connections: None,
            connection_lifetime: None,
            drain_timeout: config.shutdown_timeout,
        }
    }

    async fn accept(&self, listener: TcpListener, shutdown: &Shutdown) {
        let heartbeat = tokio::spawn(heartbeat(shutdown.clone()));
        let core = &self.core;
        // HTTP/2 streams run under the per-stream stall watch (`stall`'s module docs).
        let streams = StreamExecutor::new(core.config.client_write_timeout);
        let mut server = HttpServer::with_executor("balancer", self.proxy_limits(), streams);
        if let Some(tls) = &core.tls {
            let failures = core.metrics.tls_handshake_failures.clone();
            server = server.tls(Tls::new(Arc::clone(&tls.server)).count_failures(failures));
        }
        let finished = server
            .serve_bodiless(listener, shutdown, |stream, client| {
                let stream = WriteStall::new(stream, core.config.client_write_timeout);
                (stream, stack::Serve::new(core, client))
            })
            .await;
        if finished {
            tracing::info!("all connections finished");
        }
        // It heard the same shutdown.
        if let Err(error) = heartbeat.await {
            tracing::error!(%error, "the timer heartbeat failed");
        }
    }

    /// Serves the admin endpoints (`/metrics`, `/status`, `/healthz`) until `shutdown`, with
    /// the limits of a control listener ([`Limits::control`]: a few connections, each
    /// short-lived), so that idle or abusive clients cannot exhaust it. `auth` says what a
    /// request must carry (see the `admin` module); its refusals are counted in
    /// `squall_admin_unauthorized_total`, and its token file is read again when it changes
    /// and on SIGHUP while this runs.
    pub async fn serve_admin(&self, listener: TcpListener, auth: AdminAuth, shutdown: Shutdown) {
        let auth = auth.count_refusals(self.admin_refusals());
        let server = HttpServer::new("balancer-admin", Limits::control());
        let serving = server.serve(listener, &shutdown, |stream, _| {
            let (balancer, auth) = (self.clone(), auth.clone());
            let service = service_fn(move |request| {
                let response = admin::respond(&balancer, &auth, &request);
                async move { Ok::<_, Infallible>(response) }
            });
            (stream, service)
        });
        tokio::join!(serving, auth.watch(&shutdown));
    }

    /// The counter of admin requests refused for a missing or wrong bearer token
    /// (`squall_admin_unauthorized_total`, in [`Balancer::metrics_text`]), for an admin
    /// listener other than [`Balancer::serve_admin`] (`squall up`'s) to count in.
    pub fn admin_refusals(&self) -> prometheus::IntCounter {
        self.core.metrics.admin_refusals.clone()
    }
}

/// How far ahead a serving runtime always has a timer due; see [`heartbeat`].
const HEARTBEAT: Duration = Duration::from_secs(1);

/// Keeps a timer due within [`HEARTBEAT`] on the calling runtime until `shutdown`.
///
/// When a timer is armed with a deadline before the wake tokio's timer driver has planned,
/// the driver wakes itself through its eventfd (a system call, and one more turn of the
/// event loop), even when the thread arming it is its own. Every connection arms a header
/// timeout (10 s by default) and every request a response timeout (60 s): on a serving thread
/// with nothing due sooner, most new connections paid that wake-up (measured: 0.45 eventfd
/// writes per request with a new connection per request, on the threads without the
/// ticker). With a timer always due within a second, the planned wake stays near and those
/// later deadlines are only filed. The cost is one wake-up per second per thread.
async fn heartbeat(shutdown: Shutdown) {
    let mut beats = tokio::time::interval(HEARTBEAT);
    beats.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let stop = shutdown.wait();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = beats.tick() => {}
            () = &mut stop => break,
        }
    }
}

/// Every tick: samples and rotates the telemetry windows and probes ejected workers, until
/// `shutdown`.
async fn ticker(core: Arc<Core>, shutdown: Shutdown) {
    let mut ticks = tokio::time::interval(core.config.tick);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let stop = shutdown.wait();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = ticks.tick() => core.tick(),
            () = &mut stop => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::spread;

    #[test]
    fn serving_threads_get_disjoint_shares_of_the_cpus_or_none() {
        assert_eq!(spread(&[0, 1], 2), Some(vec![vec![0], vec![1]]));
        // Every CPU is dealt out, each to one thread, in turn.
        assert_eq!(
            spread(&[0, 2, 3, 5, 7], 2),
            Some(vec![vec![0, 3, 7], vec![2, 5]])
        );
        assert_eq!(
            spread(&[4, 5, 6, 7], 3),
            Some(vec![vec![4, 7], vec![5], vec![6]])
        );
        // Fewer CPUs than threads: some would share, so none is pinned.
        assert_eq!(spread(&[0, 1], 3), None);
        // One thread has all the process's CPUs already.
        assert_eq!(spread(&[0, 1, 2], 1), None);
        assert_eq!(spread(&[], 0), None);
    }
}
