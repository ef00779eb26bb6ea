//! Workers that speak HTTP/2 with prior knowledge (`WorkerProtocol::H2c`), on real loopback
//! sockets: streams share a few connections up to the worker's stream limit, trailers pass
//! both ways, a worker's `GOAWAY` costs no request, a stream it refuses unprocessed is sent
//! again, a worker that accepts connections but never speaks costs the requests waiting on
//! it one connect (not one each), a worker killed with requests in flight costs none that may
//! be sent twice, and HTTP/1.1 clients reach it too.
//!
//! The workers are the `h2` crate's server, so a test can set the stream limit, refuse a
//! stream or send `GOAWAY` exactly when it wants.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use balancer::{Config, WorkerProtocol};
use bytes::Bytes;
use common::{Running, WAIT};
use http::{HeaderMap, Request, Response, StatusCode};
use test_support::eventually;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore};

/// What an h2c test worker does.
#[derive(Debug, Clone, Copy)]
struct Behaviour {
    /// Its `SETTINGS_MAX_CONCURRENT_STREAMS`.
    max_streams: u32,
    /// How many of the first streams it refuses with `REFUSED_STREAM`.
    refuse_first: usize,
    /// After how many streams on one connection it sends `GOAWAY` (gracefully).
    streams_per_connection: Option<usize>,
}

impl Default for Behaviour {
    fn default() -> Self {
        Self {
            max_streams: 100,
            refuse_first: 0,
            streams_per_connection: None,
        }
    }
}

/// An h2c worker: answers `echo BODY` with the request's trailer `x-sent` echoed as the
/// response trailer `x-echo`, and on `/hold` first waits for a permit.
struct H2Worker {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    /// Streams it has seen (refused ones too).
    streams: Arc<AtomicUsize>,
    gate: Arc<Semaphore>,
    /// Closes every connection at once, without `GOAWAY`, when notified.
    killed: Arc<Notify>,
}

impl H2Worker {
    async fn start(behaviour: Behaviour) -> H2Worker {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let worker = H2Worker {
            addr: listener.local_addr().expect("address"),
            connections: Arc::default(),
            streams: Arc::default(),
            gate: Arc::new(Semaphore::new(0)),
            killed: Arc::default(),
        };
        let (connections, streams, gate, killed) = (
            Arc::clone(&worker.connections),
            Arc::clone(&worker.streams),
            Arc::clone(&worker.gate),
            Arc::clone(&worker.killed),
        );
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                connections.fetch_add(1, Ordering::SeqCst);
                let (streams, gate, killed) =
                    (Arc::clone(&streams), Arc::clone(&gate), Arc::clone(&killed));
                tokio::spawn(async move {
                    tokio::select! {
                        () = serve_connection(stream, behaviour, streams, gate) => {}
                        () = killed.notified() => {}
                    }
                });
            }
        });
        worker
    }

    /// Drops every connection it has open, as a worker that was killed.
    fn kill(&self) {
        self.killed.notify_waiters();
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    fn streams(&self) -> usize {
        self.streams.load(Ordering::SeqCst)
    }
}

async fn serve_connection(
    stream: TcpStream,
    behaviour: Behaviour,
    streams: Arc<AtomicUsize>,
    gate: Arc<Semaphore>,
) {
    let mut builder = h2::server::Builder::new();
    builder.max_concurrent_streams(behaviour.max_streams);
    let Ok(mut connection) = builder.handshake::<_, Bytes>(stream).await else {
        return;
    };
    let mut served = 0;
    while let Some(Ok((request, mut respond))) = connection.accept().await {
        if streams.fetch_add(1, Ordering::SeqCst) < behaviour.refuse_first {
            respond.send_reset(h2::Reason::REFUSED_STREAM);
            continue;
        }
        served += 1;
        if behaviour.streams_per_connection == Some(served) {
            connection.graceful_shutdown();
        }
        tokio::spawn(answer(request, respond, Arc::clone(&gate)));
    }
}

async fn answer(
    request: Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    gate: Arc<Semaphore>,
) {
    if request.uri().path() == "/hold" {
        gate.acquire().await.expect("open").forget();
    }
    let te = request.headers().get("te").cloned();
    let mut body = request.into_body();
    let mut text = b"echo ".to_vec();
    while let Some(Ok(chunk)) = body.data().await {
        let _ = body.flow_control().release_capacity(chunk.len());
        text.extend_from_slice(&chunk);
    }
    let sent = body.trailers().await.ok().flatten().unwrap_or_default();
    let mut head = Response::builder().status(StatusCode::OK);
    if let Some(te) = te {
        head = head.header("x-te", te);
    }
    let Ok(mut stream) = respond.send_response(head.body(()).expect("valid response"), false)
    else {
        return;
    };
    let _ = stream.send_data(Bytes::from(text), false);
    let mut trailers = HeaderMap::new();
    if let Some(value) = sent.get("x-sent") {
        trailers.insert("x-echo", value.clone());
    }
    trailers.insert("grpc-status", "0".parse().expect("valid value"));
    let _ = stream.send_trailers(trailers);
}

/// A balancer in front of `workers`, all speaking h2c.
async fn balancer_for(workers: &[&H2Worker]) -> Running {
    let running = Running::start(Config::default(), &[]).await;
    for (n, worker) in workers.iter().enumerate() {
        running
            .balancer
            .pool()
            .add_worker_speaking(format!("h2-{n}"), worker.addr, WorkerProtocol::H2c)
            .expect("new worker");
    }
    running
}

use common::{H2Sender as Sender, h2c_connect as connect};

/// What a client got: the status, the body, and the trailers.
struct Exchange {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
    trailers: HeaderMap,
}

/// Sends `request` with `body` (none if empty) and `trailers` (none if empty), and reads
/// the whole answer.
async fn exchange(
    sender: &Sender,
    request: Request<()>,
    body: &'static str,
    trailers: HeaderMap,
) -> Exchange {
    let mut ready = sender.clone().ready().await.expect("ready");
    let bodiless = body.is_empty() && trailers.is_empty();
    let (response, mut stream) = ready.send_request(request, bodiless).expect("sent");
    if !bodiless {
        stream
            .send_data(Bytes::from_static(body.as_bytes()), trailers.is_empty())
            .expect("body sent");
        if !trailers.is_empty() {
            stream.send_trailers(trailers).expect("trailers sent");
        }
    }
    let response = response.await.expect("a response");
    let (parts, mut body) = response.into_parts();
    let mut text = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("body data");
        let _ = body.flow_control().release_capacity(chunk.len());
        text.extend_from_slice(&chunk);
    }
    let trailers = body.trailers().await.expect("trailers").unwrap_or_default();
    Exchange {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&text).into_owned(),
        trailers,
    }
}

fn request(method: &str, path: &str) -> Request<()> {
    Request::builder()
        .method(method)
        .uri(format!("http://app.example{path}"))
        .header("te", "trailers")
        .body(())
        .expect("valid request")
}

#[tokio::test]
async fn streams_share_a_few_connections_up_to_the_workers_stream_limit() {
    for (max_streams, connections) in [(2, 3), (100, 1)] {
        let worker = H2Worker::start(Behaviour {
            max_streams,
            ..Behaviour::default()
        })
        .await;
        let running = balancer_for(&[&worker]).await;
        let client = connect(running.addr).await;
        let held: Vec<_> = (0..6)
            .map(|_| {
                let client = client.clone();
                tokio::spawn(async move {
                    exchange(&client, request("GET", "/hold"), "", HeaderMap::new()).await
                })
            })
            .collect();
        eventually("six streams reach the worker", WAIT, || {
            (worker.streams() == 6).then_some(())
        })
        .await;
        assert_eq!(
            worker.connections(),
            connections,
            "six streams, at most {max_streams} on a connection"
        );
        worker.gate.add_permits(6);
        for answer in held {
            assert_eq!(answer.await.expect("exchange").status, StatusCode::OK);
        }
        running
            .wait_for_in_flight(0, "every stream is finished")
            .await;
        // Finished streams make room: the next requests take no new connection.
        let again = exchange(&client, request("GET", "/"), "", HeaderMap::new()).await;
        assert_eq!(again.status, StatusCode::OK);
        assert_eq!(worker.connections(), connections);
        running.shutdown().await;
    }
}

#[tokio::test]
async fn trailers_pass_both_ways_and_the_worker_hears_te_trailers() {
    let worker = H2Worker::start(Behaviour::default()).await;
    let running = balancer_for(&[&worker]).await;
    let client = connect(running.addr).await;
    let mut trailers = HeaderMap::new();
    trailers.insert("x-sent", "from the client".parse().expect("valid value"));
    let answer = exchange(&client, request("POST", "/echo"), "hello", trailers).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.body, "echo hello");
    assert_eq!(answer.headers["x-te"], "trailers");
    assert_eq!(answer.trailers["x-echo"], "from the client");
    assert_eq!(answer.trailers["grpc-status"], "0");
    running.shutdown().await;
}

#[tokio::test]
async fn a_worker_that_sends_goaway_costs_no_request() {
    let worker = H2Worker::start(Behaviour {
        streams_per_connection: Some(2),
        ..Behaviour::default()
    })
    .await;
    let running = balancer_for(&[&worker]).await;
    let client = connect(running.addr).await;
    for n in 0..8 {
        let answer = exchange(&client, request("GET", "/"), "", HeaderMap::new()).await;
        assert_eq!(
            answer.status,
            StatusCode::OK,
            "request {n}: {}",
            answer.body
        );
    }
    assert!(
        worker.connections() >= 4,
        "two streams a connection, then GOAWAY: {} connections",
        worker.connections()
    );
    running.shutdown().await;
}

#[tokio::test]
async fn a_refused_stream_is_sent_again_and_refused_twice_is_unreachable() {
    let worker = H2Worker::start(Behaviour {
        refuse_first: 1,
        ..Behaviour::default()
    })
    .await;
    let running = balancer_for(&[&worker]).await;
    let client = connect(running.addr).await;
    let answer = exchange(&client, request("GET", "/"), "", HeaderMap::new()).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    assert_eq!(worker.streams(), 2, "refused, then sent again");
    running.shutdown().await;

    // A lone worker that refuses every stream: the request reached no application, and no
    // other worker can take it.
    let refusing = H2Worker::start(Behaviour {
        refuse_first: usize::MAX,
        ..Behaviour::default()
    })
    .await;
    let running = balancer_for(&[&refusing]).await;
    let client = connect(running.addr).await;
    let answer = exchange(&client, request("GET", "/"), "", HeaderMap::new()).await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY, "{}", answer.body);
    assert!(
        answer.body.contains("no worker could be reached"),
        "{}",
        answer.body
    );
    assert_eq!(refusing.streams(), 2, "refused twice");
    // A worker that refuses a stream is up and answering: it stays in rotation, so that
    // refusals under load cannot take the workers out one after another.
    let status = running.balancer.status_json();
    assert_eq!(status["workers"][0]["state"], "ready", "{status}");
    running.shutdown().await;
}

#[tokio::test]
async fn http1_clients_reach_h2c_workers() {
    let worker = H2Worker::start(Behaviour::default()).await;
    let running = balancer_for(&[&worker]).await;
    let client = common::client();
    let request = Request::post(running.url("/echo"))
        .header("te", "trailers")
        .body(http_body_util::Full::new(Bytes::from_static(
            b"over HTTP/1.1",
        )))
        .expect("valid request");
    let answer = common::send(&client, request).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.body, "echo over HTTP/1.1");
    assert_eq!(answer.headers["x-te"], "trailers");
    let again = common::get(&client, &running.url("/")).await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(
        worker.connections(),
        1,
        "both requests on one h2 connection"
    );
    running.shutdown().await;
}

#[tokio::test]
async fn a_refused_request_is_sent_again_with_its_body_and_trailers() {
    let worker = H2Worker::start(Behaviour {
        refuse_first: 1,
        ..Behaviour::default()
    })
    .await;
    let running = balancer_for(&[&worker]).await;
    let client = connect(running.addr).await;
    let mut trailers = HeaderMap::new();
    trailers.insert("x-sent", "twice".parse().expect("valid value"));
    let answer = exchange(&client, request("POST", "/echo"), "a body", trailers).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    assert_eq!(answer.body, "echo a body");
    assert_eq!(answer.trailers["x-echo"], "twice");
    assert_eq!(worker.streams(), 2, "refused, then sent again");
    running.shutdown().await;
}

/// A "worker" that accepts TCP connections and then says nothing: no SETTINGS, no answer.
struct SilentWorker {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
}

impl SilentWorker {
    async fn start() -> SilentWorker {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let worker = SilentWorker {
            addr: listener.local_addr().expect("address"),
            accepted: Arc::default(),
        };
        let accepted = Arc::clone(&worker.accepted);
        tokio::spawn(async move {
            // Kept open, never read or written.
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                held.push(stream);
            }
        });
        worker
    }

    /// Connections it has accepted.
    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

#[tokio::test]
async fn requests_waiting_on_a_failed_connect_fail_with_it_instead_of_trying_in_turn() {
    const REQUESTS: u32 = 8;
    let connect_timeout = Duration::from_millis(500);
    let silent = SilentWorker::start().await;
    let config = Config {
        connect_timeout,
        // No probe connects to the ejected worker while the test runs.
        ejection: Duration::from_secs(60),
        max_ejection: Duration::from_secs(60),
        ..Config::default()
    };
    let running = Running::start(config, &[]).await;
    running
        .balancer
        .pool()
        .add_worker_speaking("silent", silent.addr, WorkerProtocol::H2c)
        .expect("new worker");
    let client = connect(running.addr).await;
    // At once, so that all but the first wait while the first connects.
    let answers: Vec<_> = (0..REQUESTS)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                exchange(&client, request("GET", "/"), "", HeaderMap::new()).await
            })
        })
        .collect();
    for answer in answers {
        let answer = answer.await.expect("exchange");
        assert_eq!(answer.status, StatusCode::BAD_GATEWAY, "{}", answer.body);
    }
    assert_eq!(
        silent.accepted(),
        1,
        "the requests that waited on the failed connect each connected again"
    );
    running.shutdown().await;
}

/// A GET and a POST held by a worker that `ends` once a live worker has joined: the POST
/// gets `502`, the GET is answered by the live worker. Returns the balancer, whose first
/// worker is `h2-0`.
async fn held_get_and_post_when(end: impl FnOnce(&Running, &H2Worker)) -> Running {
    let held_by = H2Worker::start(Behaviour::default()).await;
    let live = H2Worker::start(Behaviour::default()).await;
    let running = balancer_for(&[&held_by]).await;
    let client = connect(running.addr).await;
    let held = |method: &'static str| {
        let client = client.clone();
        tokio::spawn(async move {
            exchange(&client, request(method, "/hold"), "", HeaderMap::new()).await
        })
    };
    let (get, post) = (held("GET"), held("POST"));
    eventually("both requests held by the first worker", WAIT, || {
        (held_by.streams() == 2).then_some(())
    })
    .await;
    running
        .balancer
        .pool()
        .add_worker_speaking("live", live.addr, WorkerProtocol::H2c)
        .expect("new worker");
    end(&running, &held_by);
    let post = post.await.expect("client task");
    assert_eq!(post.status, StatusCode::BAD_GATEWAY, "{}", post.body);
    eventually("the GET sent again to the live worker", WAIT, || {
        (live.streams() == 1).then_some(())
    })
    .await;
    live.gate.add_permits(1);
    let get = get.await.expect("client task");
    assert_eq!(get.status, StatusCode::OK, "{}", get.body);
    assert_eq!(live.streams(), 1, "the POST was sent to a second worker");
    held_by.gate.add_permits(2);
    running
}

#[tokio::test]
async fn a_worker_killed_with_requests_in_flight_costs_no_get() {
    let running = held_get_and_post_when(|_, doomed| doomed.kill()).await;
    let ejected = running.balancer.signals().workers.ejected;
    assert_eq!(ejected, 1, "the killed worker is left out");
    running.shutdown().await;
}

#[tokio::test]
async fn requests_waiting_on_a_removed_worker_fail_over_at_once() {
    // The worker never answers and never resets, as one behind a network partition: only its
    // removal from the pool ends what waits on it (`response_timeout` is 60 s).
    let running = held_get_and_post_when(|running, _| {
        running
            .balancer
            .pool()
            .remove(&"h2-0".into())
            .expect("known");
    })
    .await;
    // Out of the pool, not ejected: nothing counts it as a failed worker.
    let metrics = running.balancer.metrics_text();
    assert!(
        metrics
            .lines()
            .any(|line| line == "squall_ejections_total 0"),
        "{metrics}"
    );
    running.shutdown().await;
}
