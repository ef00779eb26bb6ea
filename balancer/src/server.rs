//! The listeners: accepting client connections, the ticker, and graceful shutdown.
//!
//! Two ways to serve: [`Balancer::serve`] on the caller's runtime (what the scaler and the
//! tests use), and [`Balancer::serve_threads`], nginx's model, for the most throughput: one
//! single-threaded runtime per thread, each accepting from its own `SO_REUSEPORT` socket on
//! the same address, so a connection, its requests and the worker connections they use stay
//! on one thread, with no work stealing or cross-thread wake-ups.
//!
//! Shutdown is a protocol (mini-redis style): when the `shutdown` future completes the
//! listener is closed, every connection is told to finish (HTTP/1 after its current
//! response, HTTP/2 with GOAWAY), and `serve` returns once they have all finished or
//! `shutdown_timeout` has passed, whichever is first.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::MissedTickBehavior;

use crate::stall::WriteStall;
use crate::{Balancer, Core, admin, proxy, upstream};

/// Pause after a failed `accept` (out of file descriptors, typically) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

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
        })
    }

    /// The address the sockets are bound to (with the port chosen, if 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
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

/// Whether an accept loop also runs the ticker; exactly one loop per balancer must.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Ticker {
    Run,
    Skip,
}

impl Balancer {
    /// Proxies the connections `listener` accepts until `shutdown` completes, then finishes
    /// the requests in flight (for at most `Config::shutdown_timeout`) and returns.
    ///
    /// It also runs the ticker that rotates the telemetry windows and probes ejected
    /// workers, so [`Balancer::signals`] moves only while a `serve` runs. Clients may speak
    /// HTTP/1.1 or HTTP/2 with prior knowledge (h2c).
    pub async fn serve(&self, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        self.accept(listener, shutdown, Ticker::Run).await;
    }

    /// Like [`Balancer::serve`], on one single-threaded runtime per listener socket, each
    /// on a thread of its own; blocks the calling thread until every thread has finished its
    /// shutdown. `shutdown` turning `true` (or its sender going away) stops them.
    pub fn serve_threads(
        &self,
        listeners: ThreadListeners,
        shutdown: watch::Receiver<bool>,
    ) -> Result<(), ServeError> {
        std::thread::scope(|scope| {
            let handles: Vec<_> = listeners
                .sockets
                .into_iter()
                .enumerate()
                .map(|(thread, socket)| {
                    let mut shutdown = shutdown.clone();
                    let serving = std::thread::Builder::new()
                        .name(format!("squall-serve-{thread}"))
                        .spawn_scoped(scope, move || {
                            upstream::set_shard(thread);
                            let runtime = tokio::runtime::Builder::new_current_thread()
                                .enable_all()
                                .build()
                                .map_err(|source| ServeError::Runtime { thread, source })?;
                            runtime.block_on(async move {
                                let listener = TcpListener::from_std(socket)
                                    .map_err(|source| ServeError::Runtime { thread, source })?;
                                let ticker = if thread == 0 {
                                    Ticker::Run
                                } else {
                                    Ticker::Skip
                                };
                                let stopped = async move {
                                    // A dropped sender also means stop.
                                    let _ = shutdown.wait_for(|stop| *stop).await;
                                };
                                self.accept(listener, stopped, ticker).await;
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

    async fn accept(
        &self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
        run_ticker: Ticker,
    ) {
        let core = &self.core;
        let config = &core.config;
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(config.header_read_timeout)
            // hyper's floor for its read buffer; it caps the request head.
            .max_buf_size(config.max_header_bytes.max(8192));
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(config.max_header_bytes).unwrap_or(u32::MAX));
        let graceful = GracefulShutdown::new();
        let mut ticker = tokio::time::interval(config.tick);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, client)) => {
                        let core = Arc::clone(core);
                        serve_connection(&builder, &graceful, stream, client, core);
                    }
                    Err(error) => {
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                },
                _ = ticker.tick(), if run_ticker == Ticker::Run => core.tick(),
                () = &mut shutdown => break,
            }
        }
        drop(listener);
        tracing::info!(
            connections = graceful.count(),
            "shutting down: finishing in-flight requests"
        );
        tokio::select! {
            () = graceful.shutdown() => tracing::info!("all connections finished"),
            () = tokio::time::sleep(config.shutdown_timeout) => {
                tracing::warn!("shutdown timeout passed with requests still in flight");
            }
        }
    }

    /// Serves the admin endpoints (`/metrics`, `/status`) until `shutdown` completes.
    pub async fn serve_admin(&self, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        let builder = auto::Builder::new(TokioExecutor::new());
        let graceful = GracefulShutdown::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let balancer = self.clone();
                        let service = service_fn(move |request| {
                            let response = admin::respond(&balancer, &request);
                            async move { Ok::<_, Infallible>(response) }
                        });
                        let connection = builder
                            .serve_connection(TokioIo::new(stream), service)
                            .into_owned();
                        let connection = graceful.watch(connection);
                        tokio::spawn(connection);
                    }
                    Err(error) => {
                        tracing::warn!(%error, "admin accept failed");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                },
                () = &mut shutdown => break,
            }
        }
        drop(listener);
        let _ = tokio::time::timeout(self.core.config.shutdown_timeout, graceful.shutdown()).await;
    }
}

fn serve_connection(
    builder: &auto::Builder<TokioExecutor>,
    graceful: &GracefulShutdown,
    stream: TcpStream,
    client: SocketAddr,
    core: Arc<Core>,
) {
    if let Err(error) = stream.set_nodelay(true) {
        tracing::debug!(%error, "setting TCP_NODELAY");
    }
    let stream = WriteStall::new(stream, core.config.client_write_timeout);
    let service = service_fn(move |request| {
        let core = Arc::clone(&core);
        async move { Ok::<_, Infallible>(proxy::handle(core, request, client).await) }
    });
    let connection = builder
        .serve_connection_with_upgrades(TokioIo::new(stream), service)
        .into_owned();
    let connection = graceful.watch(connection);
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%client, %error, "client connection ended");
        }
    });
}
