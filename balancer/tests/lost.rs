//! Workers lost with requests in flight: requests that may be sent twice (idempotent methods,
//! or an `Idempotency-Key`) go to another worker, bodies included when small; others get a
//! `502` and reach no other worker; a reused connection closed under a request is told from
//! a dead worker; the retry budget bounds it all.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use balancer::{Config, WorkerState};
use bytes::Bytes;
use common::{Behaviour, Running, TestWorker, WAIT, client, get, send};
use http_body_util::Full;
use hyper::{Request, StatusCode};
use test_support::eventually;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;

/// One request as a [`RawWorker`] read it.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    method: String,
    path: String,
    body: Vec<u8>,
}

/// What a [`RawWorker`] does with the requests it reads.
#[derive(Debug, Clone, Copy)]
enum Fate {
    /// Each request: read whole, reported, then (once the test allows) the connection is
    /// closed without a byte of answer (`reset`: with a TCP reset instead of a FIN), as
    /// when the worker is killed while it works on the request.
    DieAfterReading { reset: bool },
    /// The first request on a connection is answered (keep-alive); a later one on the same
    /// connection is read and the connection closed: what the balancer sees when a worker
    /// closes an idle connection just as a request goes out on it.
    AnswerFirstOnly,
}

/// An HTTP/1.1 worker written by hand, so that it can lose requests on purpose.
struct RawWorker {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Each request read, as it is read.
    reports: mpsc::UnboundedReceiver<Seen>,
    /// Permits for [`Fate::DieAfterReading`] to close a connection.
    deaths: Arc<Semaphore>,
    connections: Arc<Mutex<usize>>,
    server: JoinHandle<()>,
}

impl RawWorker {
    async fn start(fate: Fate) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let deaths = Arc::new(Semaphore::new(0));
        let connections = Arc::new(Mutex::new(0));
        let (report, reports) = mpsc::unbounded_channel();
        let server = tokio::spawn({
            let (seen, deaths, connections) = (seen.clone(), deaths.clone(), connections.clone());
            async move {
                while let Ok((stream, _)) = listener.accept().await {
                    *connections.lock().expect("count") += 1;
                    let (seen, deaths, report) = (seen.clone(), deaths.clone(), report.clone());
                    tokio::spawn(async move {
                        serve(stream, fate, &seen, &deaths, &report).await;
                    });
                }
            }
        });
        Self {
            addr,
            seen,
            reports,
            deaths,
            connections,
            server,
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen").clone()
    }

    fn connections(&self) -> usize {
        *self.connections.lock().expect("count")
    }

    /// Waits for the next request it reads.
    async fn next_request(&mut self) -> Seen {
        tokio::time::timeout(WAIT, self.reports.recv())
            .await
            .expect("a request in time")
            .expect("worker running")
    }
}

impl Drop for RawWorker {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn serve(
    mut stream: TcpStream,
    fate: Fate,
    seen: &Mutex<Vec<Seen>>,
    deaths: &Semaphore,
    report: &mpsc::UnboundedSender<Seen>,
) {
    let mut buffer = Vec::new();
    let mut answered = 0;
    while let Some(request) = read_request(&mut stream, &mut buffer).await {
        seen.lock().expect("seen").push(request.clone());
        let _ = report.send(request);
        match fate {
            Fate::DieAfterReading { reset } => {
                deaths.acquire().await.expect("open").forget();
                if reset {
                    stream.set_zero_linger().ok();
                }
                return;
            }
            Fate::AnswerFirstOnly if answered > 0 => return,
            Fate::AnswerFirstOnly => {
                answered += 1;
                let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nraw";
                if stream.write_all(answer).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Reads one request (head and `Content-Length` body) from `stream`; `None` at its end.
async fn read_request(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> Option<Seen> {
    let head_end = loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
    let mut words = head.split_whitespace();
    let (method, path) = (words.next()?.to_owned(), words.next()?.to_owned());
    let length: usize = head
        .lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, value)| value.trim().parse().ok())
        .unwrap_or(0);
    while buffer.len() < head_end + length {
        let mut chunk = [0u8; 65536];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
    let body = buffer[head_end..head_end + length].to_vec();
    buffer.drain(..head_end + length);
    Some(Seen { method, path, body })
}

/// The balancer's value of the counter `name`.
fn counter(running: &Running, name: &str) -> u64 {
    let text = running.balancer.metrics_text();
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

fn state_of(running: &Running, name: &str) -> WorkerState {
    running
        .balancer
        .pool()
        .workers()
        .into_iter()
        .find(|worker| worker.id.to_string() == name)
        .map(|worker| worker.state)
        .unwrap_or_else(|| panic!("no worker {name}"))
}

/// A balancer whose only worker is `dying`; the request `request` makes is sent, and once `dying` has read it,
/// `live` joins the pool and `dying` dies. The answer the client got, and what `dying` read.
async fn lose_one(
    config: Config,
    dying: &mut RawWorker,
    live: &TestWorker,
    request: impl FnOnce(&Running) -> Request<Full<Bytes>>,
) -> (Running, common::Answer, Seen) {
    let running = Running::start(config, &[]).await;
    let request = request(&running);
    let pool = running.balancer.pool();
    pool.add_worker("dying", dying.addr).expect("new");
    let answer = tokio::spawn({
        let client = client();
        async move { send(&client, request).await }
    });
    let read = dying.next_request().await;
    pool.add_worker("live", live.addr).expect("new");
    dying.deaths.add_permits(1);
    let answer = answer.await.expect("client task");
    (running, answer, read)
}

fn request(method: &str, url: &str, body: Vec<u8>) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(url)
        .body(Full::new(Bytes::from(body)))
        .expect("valid request")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gets_in_flight_on_a_killed_worker_are_answered_by_another() {
    let mut doomed = TestWorker::start("doomed", Behaviour::default()).await;
    let live = TestWorker::start("live", Behaviour::default()).await;
    let running = Running::start(Config::default(), &[&doomed]).await;
    let client = client();
    let mut held = Vec::new();
    for _ in 0..3 {
        let (client, url) = (client.clone(), running.url("/hold"));
        held.push(tokio::spawn(async move { get(&client, &url).await }));
    }
    eventually("three requests held by the doomed worker", WAIT, || {
        (doomed.hits() == 3).then_some(())
    })
    .await;
    running
        .balancer
        .pool()
        .add_worker("live", live.addr)
        .expect("new");
    doomed.kill().await;
    eventually(
        "the three requests sent again to the live worker",
        WAIT,
        || (live.hits() == 3).then_some(()),
    )
    .await;
    live.release(3);
    for answer in held {
        let answer = answer.await.expect("client task");
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
        assert_eq!(answer.headers["x-worker"], "live");
    }
    assert_eq!(state_of(&running, "doomed"), WorkerState::Ejected);
    assert_eq!(counter(&running, "squall_retries_total"), 3);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_on_a_new_connection_ejects_the_worker_and_the_get_goes_on() {
    let mut dying = RawWorker::start(Fate::DieAfterReading { reset: true }).await;
    let live = TestWorker::start("live", Behaviour::default()).await;
    let (running, answer, read) = lose_one(Config::default(), &mut dying, &live, |running| {
        request("GET", &running.url("/"), vec![])
    })
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    assert_eq!(answer.body, "live");
    assert_eq!((read.method.as_str(), read.path.as_str()), ("GET", "/"));
    assert_eq!(state_of(&running, "dying"), WorkerState::Ejected);
    assert_eq!(counter(&running, "squall_retries_total"), 1);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_is_not_sent_twice() {
    let mut dying = RawWorker::start(Fate::DieAfterReading { reset: false }).await;
    let live = TestWorker::start("live", Behaviour::default()).await;
    let (running, answer, read) = lose_one(Config::default(), &mut dying, &live, |running| {
        request("POST", &running.url("/count"), b"order=1".to_vec())
    })
    .await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY, "{}", answer.body);
    assert!(
        answer.body.contains("not sent to another worker"),
        "{}",
        answer.body
    );
    assert_eq!(read.body, b"order=1");
    assert_eq!(live.hits(), 0, "the POST reached a second worker");
    // The worker's connection failed: it is left out all the same.
    assert_eq!(state_of(&running, "dying"), WorkerState::Ejected);
    assert_eq!(counter(&running, "squall_retries_total"), 0);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_with_an_idempotency_key_is_sent_again_with_its_body() {
    let mut dying = RawWorker::start(Fate::DieAfterReading { reset: false }).await;
    let live = TestWorker::start("live", Behaviour::default()).await;
    let body: Vec<u8> = (0..40_000).map(|n| (n % 251) as u8).collect();
    let keyed = |running: &Running| {
        let mut keyed = request("POST", &running.url("/count"), body.clone());
        keyed
            .headers_mut()
            .insert("idempotency-key", "8e03978e-40d5".parse().expect("value"));
        keyed
    };
    let (running, answer, read) = lose_one(Config::default(), &mut dying, &live, keyed).await;
    assert_eq!(read.body, body, "the first worker read the whole body");
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    assert_eq!(answer.headers["x-worker"], "live");
    assert_eq!(answer.body, body.len().to_string(), "the body sent again");
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_too_large_to_keep_is_not_sent_again() {
    let mut dying = RawWorker::start(Fate::DieAfterReading { reset: false }).await;
    let live = TestWorker::start("live", Behaviour::default()).await;
    let body = vec![b'x'; 100 * 1024];
    let (running, answer, read) = lose_one(Config::default(), &mut dying, &live, |running| {
        request("PUT", &running.url("/count"), body.clone())
    })
    .await;
    assert_eq!(read.body.len(), body.len());
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY, "{}", answer.body);
    assert_eq!(live.hits(), 0, "a body past the limit was sent again");
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_budget_a_lost_request_gets_502() {
    let mut dying = RawWorker::start(Fate::DieAfterReading { reset: false }).await;
    let live = TestWorker::start("live", Behaviour::default()).await;
    let config = Config {
        retry_budget: 0.0,
        min_retries_per_second: 0,
        ..Config::default()
    };
    let (running, answer, _) = lose_one(config, &mut dying, &live, |running| {
        request("GET", &running.url("/"), vec![])
    })
    .await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY, "{}", answer.body);
    assert!(answer.body.contains("budget"), "{}", answer.body);
    assert_eq!(live.hits(), 0);
    assert_eq!(counter(&running, "squall_retries_total"), 0);
    assert_eq!(counter(&running, "squall_retry_budget_exhausted_total"), 1);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_connection_closed_under_a_get_is_sent_again_to_the_same_live_worker() {
    let racy = RawWorker::start(Fate::AnswerFirstOnly).await;
    let running = Running::start(Config::default(), &[]).await;
    running
        .balancer
        .pool()
        .add_worker("racy", racy.addr)
        .expect("new");
    let client = client();
    let url = running.url("/");
    // A GET that goes out on a connection already used is lost and sent again on a new one
    // (a GET that finds no idle connection, its first one still finishing, opens a new one
    // and is simply answered): every GET is answered, by the one worker.
    let mut gets = 0;
    while racy.seen().len() == racy.connections() {
        gets += 1;
        assert!(gets <= 20, "no GET went out on a used connection");
        let answer = get(&client, &url).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
        assert_eq!(answer.body, "raw");
    }
    assert_eq!(racy.seen().len(), racy.connections() + 1);
    assert_eq!(state_of(&running, "racy"), WorkerState::Ready);
    assert_eq!(counter(&running, "squall_retries_total"), 0);

    // A POST lost the same way cannot be told from a worker that died with it: `502`, and
    // the worker stays in (its next connection may well be answered).
    let mut posts = 0;
    loop {
        posts += 1;
        assert!(posts <= 20, "no POST went out on a used connection");
        let post = request("POST", &running.url("/"), b"x".to_vec());
        let answer = send(&client, post).await;
        if answer.status == StatusCode::BAD_GATEWAY {
            break;
        }
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    }
    assert_eq!(state_of(&running, "racy"), WorkerState::Ready);
    running.shutdown().await;
}

/// A worker cut off by a network partition answers nothing and resets nothing: when the
/// scaler removes it, what waits on it must fail over then, not at `response_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_waiting_on_a_removed_worker_fail_over_at_once() {
    let cut_off = TestWorker::start("cut-off", Behaviour::default()).await;
    let live = TestWorker::start("live", Behaviour::default()).await;
    let config = Config {
        // Far beyond the test's patience: only the removal can end these requests.
        response_timeout: WAIT * 10,
        ..Config::default()
    };
    let running = Running::start(config, &[]).await;
    let pool = running.balancer.pool();
    pool.add_worker("cut-off", cut_off.addr).expect("new");
    let client = client();
    let held = |method: &str| {
        let (client, request) = (
            client.clone(),
            request(method, &running.url("/hold"), vec![]),
        );
        tokio::spawn(async move { send(&client, request).await })
    };
    let gets = [held("GET"), held("GET"), held("HEAD")];
    let post = held("POST");
    eventually("four requests held by the cut-off worker", WAIT, || {
        (cut_off.hits() == 4).then_some(())
    })
    .await;
    pool.add_worker("live", live.addr).expect("new");
    pool.remove(&"cut-off".into()).expect("known");
    let post = post.await.expect("client task");
    assert_eq!(post.status, StatusCode::BAD_GATEWAY, "{}", post.body);
    eventually(
        "the GETs and the HEAD sent to the live worker",
        WAIT,
        || (live.hits() == 3).then_some(()),
    )
    .await;
    live.release(3);
    for answer in gets {
        let answer = answer.await.expect("client task");
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
        assert_eq!(answer.headers["x-worker"], "live");
    }
    assert_eq!(live.hits(), 3, "the POST was sent to a second worker");
    assert_eq!(counter(&running, "squall_retries_total"), 3);
    // Out of the pool, not ejected: nothing counts it as a failed worker.
    assert_eq!(counter(&running, "squall_ejections_total"), 0);
    cut_off.release(4);
    running.shutdown().await;
}
