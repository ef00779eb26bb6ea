//! `warm-app`, Squall's demo web app. It pays a slow warm-up (building a cache it then serves
//! from), takes a configurable service time per request, and serves at most `--concurrency`
//! requests at once per process, like a synchronous worker pool: more workers add capacity
//! even on a machine with few cores. Run by forkd's `fork` driver it is a zygote (warm once,
//! fork per clone); run any other way it is a plain server.
//!
//! Routes: `GET /` (a cached value, after the service time), `GET /healthz`, `GET /random`
//! (a random number: clones must not share one), `GET /stats` (requests served, busy now,
//! most busy at once), `POST /crash` (aborts the process).
#![forbid(unsafe_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use clap::Parser;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::sync::Semaphore;

/// Squall's demo web app: slow warm-up, configurable service time, per-worker concurrency limit.
#[derive(Debug, Parser)]
#[command(name = "warm-app", version)]
struct Args {
    /// Address to listen on in plain mode. `{port}` or the PORT environment variable set the port.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    /// How long the warm-up takes, in milliseconds (the cache is built first, then we wait out the rest).
    #[arg(long, default_value_t = 2000)]
    warmup_ms: u64,
    /// Size of the cache built during warm-up, in MiB.
    #[arg(long, default_value_t = 16)]
    cache_mib: usize,
    /// Time to serve one request to `/`, in milliseconds.
    #[arg(long, default_value_t = 0)]
    service_ms: u64,
    /// Requests to `/` served at once by one worker; the rest wait their turn.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
}

/// The warm state: what the slow start-up built.
struct Cache {
    values: Vec<u64>,
}

impl Cache {
    /// Fills the cache, then waits until `warmup` has passed in total.
    fn build(mib: usize, warmup: Duration) -> Cache {
        let started = Instant::now();
        let values = (0..mib * 1024 * 1024 / 8)
            .map(|i| splitmix64(i as u64))
            .collect();
        std::thread::sleep(warmup.saturating_sub(started.elapsed()));
        Cache { values }
    }

    fn get(&self, key: u64) -> u64 {
        if self.values.is_empty() {
            return splitmix64(key);
        }
        self.values[(key % self.values.len() as u64) as usize]
    }
}

/// A fast, well-mixed hash of one integer (Steele, Lea and Flood's SplitMix64 finaliser).
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

struct App {
    cache: Cache,
    name: String,
    service: Duration,
    slots: Semaphore,
    served: AtomicU64,
    /// Requests to `/` being served now, and the most there ever were at once.
    busy: AtomicU64,
    peak_busy: AtomicU64,
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}

/// The `ms=N` of `/slow?ms=N`, if N is 0 to 60 000.
fn slow_duration(query: Option<&str>) -> Option<Duration> {
    let ms: u64 = query?.strip_prefix("ms=")?.parse().ok()?;
    (ms <= 60_000).then(|| Duration::from_millis(ms))
}

async fn handle(
    app: Arc<App>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(match (request.method(), request.uri().path()) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n".into()),
        (&Method::GET, "/random") => text(StatusCode::OK, format!("{}\n", rand::random::<u64>())),
        (&Method::POST, "/crash") => std::process::abort(),
        // A request that takes as long as asked (at most a minute): what a slow report or an
        // upload looks like to the balancer, for tests of draining and timeouts.
        (&Method::GET, "/slow") => match slow_duration(request.uri().query()) {
            Some(wait) => {
                tokio::time::sleep(wait).await;
                text(StatusCode::OK, format!("slept {} ms\n", wait.as_millis()))
            }
            None => text(
                StatusCode::BAD_REQUEST,
                "expected /slow?ms=N with N from 0 to 60000\n".into(),
            ),
        },
        (&Method::GET, "/stats") => text(
            StatusCode::OK,
            format!(
                "served {}\nbusy {}\npeak_busy {}\n",
                app.served.load(Ordering::Relaxed),
                app.busy.load(Ordering::Relaxed),
                app.peak_busy.load(Ordering::Relaxed)
            ),
        ),
        (&Method::GET, "/") => {
            // The semaphore is never closed, so acquire cannot fail.
            let _slot = app.slots.acquire().await;
            let busy = app.busy.fetch_add(1, Ordering::Relaxed) + 1;
            app.peak_busy.fetch_max(busy, Ordering::Relaxed);
            if !app.service.is_zero() {
                tokio::time::sleep(app.service).await;
            }
            app.busy.fetch_sub(1, Ordering::Relaxed);
            let n = app.served.fetch_add(1, Ordering::Relaxed);
            text(
                StatusCode::OK,
                format!(
                    "{} {}: {}\n",
                    app.name,
                    std::process::id(),
                    app.cache.get(n)
                ),
            )
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    })
}

async fn serve(
    app: Arc<App>,
    listener: std::net::TcpListener,
    announce: bool,
) -> anyhow::Result<()> {
    if announce {
        eprintln!("warm-app listening on {}", listener.local_addr()?);
    }
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                eprintln!("warm-app: accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| handle(app.clone(), request));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn plain_addr(listen: &str) -> anyhow::Result<SocketAddr> {
    let listen = match std::env::var("PORT") {
        Ok(port) if listen.contains("{port}") => listen.replace("{port}", &port),
        Ok(port) => {
            let addr: SocketAddr = listen
                .parse()
                .with_context(|| format!("bad --listen {listen}"))?;
            format!("{}:{port}", addr.ip())
        }
        Err(_) => listen.to_owned(),
    };
    listen
        .parse()
        .with_context(|| format!("bad listen address {listen}"))
}

/// Runs the app with command-line `args` (the first is the program name). It must be called
/// while the process is still single-threaded: under forkd's `fork` driver the process is a
/// zygote and forks each clone.
pub fn run_from<I, T>(args: I) -> anyhow::Result<()>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let args = match Args::try_parse_from(args) {
        Ok(args) => args,
        // --help and --version are answers, not failures.
        Err(e) if !e.use_stderr() => {
            e.print()?;
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    let addr = plain_addr(&args.listen)?;
    let warmup = Duration::from_millis(args.warmup_ms);
    let warm = zygote::warm_up(|| Cache::build(args.cache_mib, warmup))?;
    warm.serve(addr, |worker| {
        // Threads may start only now, in the clone (or the plain server).
        let plain = worker.clone_id.is_none();
        let app = Arc::new(App {
            cache: worker.state,
            name: worker
                .clone_id
                .or_else(|| std::env::var("SQUALL_CLONE_ID").ok())
                .unwrap_or_else(|| "plain".to_owned()),
            service: Duration::from_millis(args.service_ms),
            slots: Semaphore::new(args.concurrency.max(1)),
            served: AtomicU64::new(0),
            busy: AtomicU64::new(0),
            peak_busy: AtomicU64::new(0),
        });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(serve(app, worker.listener, plain))
    })?
}
