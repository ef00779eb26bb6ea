//! What the balancer's tests run against: real workers (small hyper servers on port 0 whose
//! behaviour each test picks), a balancer serving on port 0, and an HTTP client. Waits and
//! plain exchanges come from `test-support`; only what is the balancer's own is here.
// Each test binary uses a part of it.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use balancer::{Balancer, Config};
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use lifecycle::Stop;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};

type Body = BoxBody<Bytes, hyper::Error>;

/// How a test worker answers.
#[derive(Debug, Clone, Default)]
pub(crate) struct Behaviour {
    /// Added before answering `/`.
    pub(crate) delay: Duration,
}

/// A worker: an HTTP/1.1 server on a loopback port.
///
/// Routes: `/` answers its name (after `delay`); `/echo` streams the request body back;
/// `/count` reads the whole request body, then answers its length;
/// `/headers` lists the request headers and answers with hop-by-hop headers of its own;
/// `/chunks` answers a chunked body of three parts; `/stall` sends one part and then
/// nothing; `/hold` records its `x-seq` header and
/// waits until the test calls [`TestWorker::release`]; `/sleep` never answers in time; an
/// `Upgrade: echo` request switches protocols and echoes bytes.
pub(crate) struct TestWorker {
    pub(crate) name: String,
    pub(crate) addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    gate: Arc<Semaphore>,
    arrivals: Arc<Mutex<Vec<String>>>,
    /// Connections open now.
    open: Arc<AtomicUsize>,
    server: JoinHandle<()>,
    _placeholder: TcpSocket,
}

fn reuseport_socket(addr: SocketAddr) -> TcpSocket {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_reuseport(true).expect("SO_REUSEPORT");
    socket.bind(addr).expect("bind");
    socket
}

/// An address that refuses connections for as long as the returned socket lives: bound,
/// never listening, so no other test can take the port either.
pub(crate) fn refusing_addr() -> (TcpSocket, SocketAddr) {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.1:0".parse().expect("address"))
        .expect("bind");
    let addr = socket.local_addr().expect("address");
    (socket, addr)
}

impl TestWorker {
    pub(crate) async fn start(name: &str, behaviour: Behaviour) -> Self {
        // The listener shares its port (SO_REUSEPORT) with a socket that never listens, so
        // that after a kill the port refuses connections instead of being handed to another
        // test's listener, and a worker can be started again on it.
        let listener = reuseport_socket("127.0.0.1:0".parse().expect("address"));
        let placeholder = reuseport_socket(listener.local_addr().expect("worker address"));
        Self::serve(name, behaviour, listener, placeholder)
    }

    /// Starts a worker again on the port of one that was killed.
    pub(crate) async fn restart(self, behaviour: Behaviour) -> Self {
        let listener = reuseport_socket(self.addr);
        Self::serve(&self.name, behaviour, listener, self._placeholder)
    }

    fn serve(
        name: &str,
        behaviour: Behaviour,
        listener: TcpSocket,
        placeholder: TcpSocket,
    ) -> Self {
        let addr = listener.local_addr().expect("worker address");
        let listener = listener.listen(1024).expect("listen");
        let hits = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(Semaphore::new(0));
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        let open = Arc::new(AtomicUsize::new(0));
        let state = Arc::new(WorkerState {
            name: name.to_owned(),
            behaviour,
            hits: Arc::clone(&hits),
            gate: Arc::clone(&gate),
            arrivals: Arc::clone(&arrivals),
        });
        let opened = Arc::clone(&open);
        let server = tokio::spawn(async move {
            // Connections live in this set, so aborting the server closes them all.
            let mut connections = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = Arc::clone(&state);
                let open = OpenConnection::count(&opened);
                connections.spawn(async move {
                    let _open = open;
                    let service = service_fn(move |request| {
                        let state = Arc::clone(&state);
                        async move { Ok::<_, Infallible>(state.answer(request).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades()
                        .await;
                });
            }
        });
        Self {
            name: name.to_owned(),
            addr,
            hits,
            gate,
            arrivals,
            open,
            server,
            _placeholder: placeholder,
        }
    }

    /// Connections open to it now.
    pub(crate) fn open_connections(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Requests it has received.
    pub(crate) fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// The `x-seq` headers of the `/hold` requests, in arrival order.
    pub(crate) fn arrivals(&self) -> Vec<String> {
        self.arrivals.lock().expect("arrivals").clone()
    }

    /// Lets `n` held requests answer.
    pub(crate) fn release(&self, n: usize) {
        self.gate.add_permits(n);
    }

    /// Kills the worker: its listener and every connection close at once, and its port
    /// refuses connections from then on.
    pub(crate) async fn kill(&mut self) {
        self.server.abort();
        let _ = (&mut self.server).await;
    }
}

/// One open connection, counted until dropped.
struct OpenConnection(Arc<AtomicUsize>);

impl OpenConnection {
    fn count(open: &Arc<AtomicUsize>) -> Self {
        open.fetch_add(1, Ordering::SeqCst);
        Self(Arc::clone(open))
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

struct WorkerState {
    name: String,
    behaviour: Behaviour,
    hits: Arc<AtomicUsize>,
    gate: Arc<Semaphore>,
    arrivals: Arc<Mutex<Vec<String>>>,
}

fn full(text: impl Into<Bytes>) -> Body {
    Full::new(text.into())
        .map_err(|never| match never {})
        .boxed()
}

impl WorkerState {
    async fn answer(&self, mut request: Request<Incoming>) -> Response<Body> {
        self.hits.fetch_add(1, Ordering::SeqCst);
        if request
            .headers()
            .get("upgrade")
            .is_some_and(|v| v == "echo")
        {
            let upgrade = hyper::upgrade::on(&mut request);
            tokio::spawn(async move {
                let Ok(upgraded) = upgrade.await else { return };
                let mut io = TokioIo::new(upgraded);
                let mut buf = [0u8; 1024];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
            return Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header("connection", "upgrade")
                .header("upgrade", "echo")
                .body(full(""))
                .expect("valid response");
        }
        let response = Response::builder().header("x-worker", self.name.as_str());
        match request.uri().path() {
            "/echo" => response.body(request.into_body().boxed()),
            "/count" => match request.into_body().collect().await {
                Ok(body) => response.body(full(body.to_bytes().len().to_string())),
                Err(_) => response.status(StatusCode::BAD_REQUEST).body(full("")),
            },
            "/headers" => {
                let mut listing = String::new();
                for (name, value) in request.headers() {
                    let value = value.to_str().unwrap_or("?");
                    listing.push_str(&format!("{name}: {value}\n"));
                }
                response
                    .header("connection", "x-resp-secret")
                    .header("x-resp-secret", "1")
                    .header("keep-alive", "timeout=5")
                    .body(full(listing))
            }
            "/chunks" => {
                let (mut sender, body) =
                    http_body_util::channel::Channel::<Bytes, Infallible>::new(1);
                tokio::spawn(async move {
                    for part in ["one,", "two,", "three"] {
                        if sender.send_data(Bytes::from(part)).await.is_err() {
                            break;
                        }
                    }
                });
                response.body(body.map_err(|never| match never {}).boxed())
            }
            "/stall" => {
                let (mut sender, body) =
                    http_body_util::channel::Channel::<Bytes, Infallible>::new(1);
                tokio::spawn(async move {
                    if sender.send_data(Bytes::from("first,")).await.is_ok() {
                        // Keeps the body open, sending nothing more.
                        tokio::time::sleep(Duration::from_secs(30)).await;
                    }
                });
                response.body(body.map_err(|never| match never {}).boxed())
            }
            "/big" => {
                // Up to 256 MiB in 64 KiB chunks, as fast as the balancer takes them.
                let (mut sender, body) =
                    http_body_util::channel::Channel::<Bytes, Infallible>::new(1);
                tokio::spawn(async move {
                    let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
                    for _ in 0..4096 {
                        if sender.send_data(chunk.clone()).await.is_err() {
                            break;
                        }
                    }
                });
                response.body(body.map_err(|never| match never {}).boxed())
            }
            "/hold" => {
                let seq = request
                    .headers()
                    .get("x-seq")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                self.arrivals.lock().expect("arrivals").push(seq.clone());
                self.gate.acquire().await.expect("gate open").forget();
                response.body(full(seq))
            }
            "/sleep" => {
                tokio::time::sleep(Duration::from_secs(30)).await;
                response.body(full("late"))
            }
            _ => {
                if !self.behaviour.delay.is_zero() {
                    tokio::time::sleep(self.behaviour.delay).await;
                }
                response.body(full(self.name.clone()))
            }
        }
        .expect("valid response")
    }
}

/// How long a test waits for a condition before it fails.
pub(crate) const WAIT: Duration = Duration::from_secs(20);

/// A balancer serving on a loopback port.
pub(crate) struct Running {
    pub(crate) balancer: Balancer,
    pub(crate) addr: SocketAddr,
    stop: Stop,
    task: JoinHandle<()>,
}

impl Running {
    pub(crate) async fn start(config: Config, workers: &[&TestWorker]) -> Self {
        let balancer = Balancer::new(config).expect("valid config");
        for worker in workers {
            balancer
                .pool()
                .add_worker(worker.name.as_str(), worker.addr)
                .expect("new worker");
        }
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let stop = Stop::new();
        let shutdown = stop.shutdown();
        let serving = balancer.clone();
        let task = tokio::spawn(async move { serving.serve(listener, shutdown).await });
        Self {
            balancer,
            addr,
            stop,
            task,
        }
    }

    /// A balancer configured by `config` in front of one worker, `w`, of default behaviour.
    pub(crate) async fn with_one_worker(config: Config) -> (TestWorker, Self) {
        let worker = TestWorker::start("w", Behaviour::default()).await;
        let running = Self::start(config, &[&worker]).await;
        (worker, running)
    }

    /// A new connection to the balancer on which `bytes` have been written, as by a client
    /// that writes HTTP by hand.
    pub(crate) async fn send_raw(&self, bytes: &[u8]) -> TcpStream {
        let mut stream = TcpStream::connect(self.addr).await.expect("connect");
        stream.write_all(bytes).await.expect("write");
        stream
    }

    /// Waits until `n` requests hold a worker slot, failing the test after [`WAIT`].
    pub(crate) async fn wait_for_in_flight(&self, n: usize, what: &str) {
        test_support::eventually(what, WAIT, || {
            (self.balancer.signals().in_flight == n).then_some(())
        })
        .await;
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Stops accepting and waits until in-flight requests have finished.
    pub(crate) async fn shutdown(self) {
        self.stop.stop();
        self.task.await.expect("serve task");
    }
}

/// A stream-opening handle on an h2c client connection (the `h2` crate's own, so a test can
/// reset a stream and read the settings it was sent).
pub(crate) type H2Sender = h2::client::SendRequest<Bytes>;

/// An h2c connection to `addr`, ready for a request.
pub(crate) async fn h2c_connect(addr: SocketAddr) -> H2Sender {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (sender, connection) = h2::client::handshake(stream).await.expect("h2 handshake");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    sender.ready().await.expect("connection ready")
}

/// A keep-alive HTTP/1.1 client; its clones share its connections.
pub(crate) type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub(crate) fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A finished exchange: status, headers and the whole body as text.
pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    pub(crate) headers: hyper::HeaderMap,
    pub(crate) body: String,
}

pub(crate) async fn send(client: &HttpClient, request: Request<Full<Bytes>>) -> Answer {
    let response = client.request(request).await.expect("response");
    let (status, headers) = (response.status(), response.headers().clone());
    let body = body_of(response).await;
    Answer {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// The whole body of `response`.
pub(crate) async fn body_of(response: Response<Incoming>) -> Bytes {
    let body = response.into_body();
    body.collect().await.expect("whole body").to_bytes()
}

pub(crate) async fn get(client: &HttpClient, url: &str) -> Answer {
    let request = Request::get(url)
        .body(Full::new(Bytes::new()))
        .expect("valid request");
    send(client, request).await
}

/// `clients` tasks at once, each sending `requests` GETs of `url` one after another over a
/// clone of `client`; every answer, in no particular order.
pub(crate) async fn load(
    client: HttpClient,
    url: String,
    clients: usize,
    requests: usize,
) -> Vec<Answer> {
    let mut tasks = JoinSet::new();
    for _ in 0..clients {
        let (client, url) = (client.clone(), url.clone());
        tasks.spawn(async move {
            let mut answers = Vec::new();
            for _ in 0..requests {
                answers.push(get(&client, &url).await);
            }
            answers
        });
    }
    let mut answers = Vec::new();
    while let Some(task) = tasks.join_next().await {
        answers.extend(task.expect("load task"));
    }
    answers
}

/// Asserts that what took `took` ended once `bound` had passed, and within `margin` after it
/// (a margin for a loaded machine, not a claim about speed).
pub(crate) fn assert_ended_at(what: &str, took: Duration, bound: Duration, margin: Duration) {
    assert!(
        took >= bound && took < bound + margin,
        "{what} after {took:?}, against a bound of {bound:?}"
    );
}
