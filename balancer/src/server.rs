//! The listeners: accepting client connections, the ticker, and graceful shutdown.
//!
//! Shutdown is a protocol (mini-redis style): when the `shutdown` future completes the
//! listener is closed, every connection is told to finish (HTTP/1 after its current
//! response, HTTP/2 with GOAWAY), and `serve` returns once they have all finished or
//! `shutdown_timeout` has passed, whichever is first.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::MissedTickBehavior;

use crate::{Balancer, Core, admin, proxy};

/// Pause after a failed `accept` (out of file descriptors, typically) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

impl Balancer {
    /// Proxies the connections `listener` accepts until `shutdown` completes, then finishes
    /// the requests in flight (for at most `Config::shutdown_timeout`) and returns.
    ///
    /// It also runs the ticker that rotates the telemetry windows and probes ejected
    /// workers, so [`Balancer::signals`] moves only while a `serve` runs. Clients may speak
    /// HTTP/1.1 or HTTP/2 with prior knowledge (h2c).
    pub async fn serve(&self, listener: TcpListener, shutdown: impl Future<Output = ()>) {
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
                _ = ticker.tick() => core.tick(),
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
