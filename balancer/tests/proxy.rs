//! The balancer on real loopback sockets: proxy semantics, worker choice, draining,
//! failures, the admission queue, limits and timeouts.

mod common;

use std::time::Duration;

use balancer::{Config, WorkerId, WorkerState};
use bytes::Bytes;
use common::{
    Behaviour, Running, TestWorker, WAIT, assert_ended_at, body_of, client, get, load,
    refusing_addr, send,
};
use http_body_util::{BodyExt, Full};
use hyper::{Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use test_support::{eventually, eventually_async};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_follow_proxy_semantics() {
    let (_worker, running) = Running::with_one_worker(Config::default()).await;
    let request = Request::get(running.url("/headers"))
        .header("host", "app.example")
        .header("connection", "x-secret")
        .header("x-secret", "hop-by-hop")
        .header("keep-alive", "timeout=5")
        .header("proxy-authorization", "Basic Zm9v")
        .header("x-forwarded-for", "198.51.100.1")
        .header("x-app", "end-to-end")
        .body(Full::new(Bytes::new()))
        .expect("valid request");
    let answer = send(&client(), request).await;
    assert_eq!(answer.status, StatusCode::OK);
    let seen = answer.body;
    assert!(seen.contains("host: app.example\n"), "{seen}");
    assert!(
        seen.contains("x-forwarded-for: 198.51.100.1, 127.0.0.1\n"),
        "{seen}"
    );
    assert!(seen.contains("x-forwarded-proto: http\n"), "{seen}");
    assert!(seen.contains("x-app: end-to-end\n"), "{seen}");
    for gone in ["x-secret", "keep-alive", "proxy-authorization"] {
        assert!(
            !seen.contains(&format!("{gone}:")),
            "{gone} reached the worker: {seen}"
        );
    }
    // And on the way back.
    assert_eq!(answer.headers["x-worker"], "w");
    assert!(!answer.headers.contains_key("x-resp-secret"));
    assert!(!answer.headers.contains_key("keep-alive"));
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_clients_reach_http1_workers() {
    let (_worker, running) = Running::with_one_worker(Config::default()).await;
    let stream = TcpStream::connect(running.addr).await.expect("connect");
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    tokio::spawn(connection);
    for _ in 0..3 {
        let request = Request::get(format!(
            "http://app.example:{}/headers",
            running.addr.port()
        ))
        .body(Full::new(Bytes::new()))
        .expect("valid request");
        let response = sender.send_request(request).await.expect("response");
        assert_eq!(response.status(), StatusCode::OK);
        let body = body_of(response).await;
        let seen = String::from_utf8_lossy(&body);
        assert!(
            seen.contains(&format!("host: app.example:{}\n", running.addr.port())),
            "{seen}"
        );
    }
    // A body from an HTTP/2 client reaches the HTTP/1.1 worker whole.
    let upload = Request::post(format!("http://app.example:{}/count", running.addr.port()))
        .body(Full::new(Bytes::from(vec![b'h'; 100_000])))
        .expect("valid request");
    let response = sender.send_request(upload).await.expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(body_of(response).await, Bytes::from("100000"));
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_bodies_stream_both_ways() {
    let (_worker, running) = Running::with_one_worker(Config::default()).await;
    let answer = get(&client(), &running.url("/chunks")).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.body, "one,two,three");

    // A chunked request body, echoed back.
    let (mut sender, body) = http_body_util::channel::Channel::<Bytes>::new(1);
    let request = Request::post(running.url("/echo"))
        .body(body)
        .expect("valid request");
    let pending = tokio::spawn(async move {
        let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http();
        body_of(client.request(request).await.expect("response")).await
    });
    for part in ["alpha-", "beta-", "gamma"] {
        sender.send_data(Bytes::from(part)).await.expect("send");
    }
    drop(sender);
    assert_eq!(
        pending.await.expect("task"),
        Bytes::from("alpha-beta-gamma")
    );
    running.shutdown().await;
}

/// 50 MB in 1 MB steps, each sent only after the previous one came back: a proxy that
/// buffered either body whole would never see the second step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_megabytes_stream_in_lockstep() {
    const STEP: usize = 1024 * 1024;
    const STEPS: usize = 50;
    let (_worker, running) = Running::with_one_worker(Config::default()).await;
    let stream = TcpStream::connect(running.addr).await.expect("connect");
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(connection);
    let (mut upload, body) = http_body_util::channel::Channel::<Bytes>::new(2);
    let request = Request::post("/echo")
        .header("host", "app")
        .body(body)
        .expect("valid request");
    let first = Bytes::from(vec![0u8; STEP]);
    upload.send_data(first).await.expect("first step");
    let response = sender.send_request(request).await.expect("response head");
    assert_eq!(response.status(), StatusCode::OK);
    let mut download = response.into_body();
    let mut received = 0usize;
    let mut checksum = 0u64;
    for step in 1..=STEPS {
        while received < step * STEP {
            let frame = download
                .frame()
                .await
                .expect("body continues")
                .expect("frame");
            if let Ok(data) = frame.into_data() {
                checksum += data.iter().map(|&b| u64::from(b)).sum::<u64>();
                received += data.len();
            }
        }
        if step < STEPS {
            let fill = (step % 251) as u8;
            upload
                .send_data(Bytes::from(vec![fill; STEP]))
                .await
                .expect("next step");
        }
    }
    drop(upload);
    assert!(download.frame().await.is_none(), "nothing after the end");
    assert_eq!(received, STEP * STEPS);
    let expected: u64 = (1..STEPS).map(|s| (s % 251) as u64 * STEP as u64).sum();
    assert_eq!(checksum, expected);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_are_tunnelled() {
    let (_worker, running) = Running::with_one_worker(Config::default()).await;
    let mut stream = running
        .send_raw(
            b"GET /chat HTTP/1.1\r\nHost: app\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
        )
        .await;
    let head = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("upgrade: echo"),
        "{head}"
    );
    for message in ["ping", "a longer message"] {
        stream.write_all(message.as_bytes()).await.expect("write");
        let mut echoed = vec![0u8; message.len()];
        stream.read_exact(&mut echoed).await.expect("echo");
        assert_eq!(echoed, message.as_bytes());
    }
    // The tunnel holds the worker slot until it closes.
    assert_eq!(running.balancer.signals().in_flight, 1);
    drop(stream);
    running
        .wait_for_in_flight(0, "the tunnel to release its slot")
        .await;
    running.shutdown().await;
}

async fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = stream.read(&mut byte).await.expect("read");
        if n == 0 {
            break;
        }
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2c_sends_most_traffic_to_the_faster_worker() {
    let fast = TestWorker::start("fast", Behaviour::default()).await;
    let slow = TestWorker::start(
        "slow",
        Behaviour {
            delay: Duration::from_millis(40),
        },
    )
    .await;
    let running = Running::start(Config::default(), &[&fast, &slow]).await;
    let answers = load(client(), running.url("/"), 4, 100).await;
    assert!(answers.iter().all(|a| a.status == StatusCode::OK));
    assert_eq!(fast.hits() + slow.hits(), 400);
    assert!(
        fast.hits() > 3 * slow.hits(),
        "fast {} vs slow {}",
        fast.hits(),
        slow.hits()
    );
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_under_load_loses_no_request() {
    let a = TestWorker::start("a", Behaviour::default()).await;
    let b = TestWorker::start("b", Behaviour::default()).await;
    let running = Running::start(Config::default(), &[&a, &b]).await;
    let pool = running.balancer.pool();
    let client = client();
    let answers = tokio::spawn(load(client.clone(), running.url("/"), 8, 60));
    eventually("both workers to serve", WAIT, || {
        (a.hits() > 5 && b.hits() > 5).then_some(())
    })
    .await;
    let drained = WorkerId::from("b");
    pool.drain(&drained).expect("known worker");
    let answers = answers.await.expect("load");
    assert_eq!(answers.len(), 8 * 60);
    assert!(answers.iter().all(|a| a.status == StatusCode::OK));
    eventually("b's requests to finish", WAIT, || {
        (pool.in_flight(&drained) == Some(0)).then_some(())
    })
    .await;
    let b_hits = b.hits();
    for _ in 0..20 {
        assert_eq!(get(&client, &running.url("/")).await.body, "a");
    }
    assert_eq!(b.hits(), b_hits, "a draining worker got a new request");
    let b_state = pool.workers().into_iter().find(|w| w.id == drained);
    assert_eq!(b_state.map(|w| w.state), Some(WorkerState::Draining));
    pool.remove(&drained).expect("known worker");
    assert_eq!(running.balancer.signals().workers.ready, 1);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_loses_no_retryable_request() {
    let a = TestWorker::start("a", Behaviour::default()).await;
    let mut b = TestWorker::start("b", Behaviour::default()).await;
    let running = Running::start(Config::default(), &[&a, &b]).await;
    let client = client();
    let warm_up = load(client.clone(), running.url("/"), 8, 10).await;
    assert!(warm_up.iter().all(|a| a.status == StatusCode::OK));
    assert!(
        b.hits() > 0,
        "b must hold pooled connections before it dies"
    );
    // The balancer still lists b and holds idle connections to it when it dies.
    b.kill().await;
    for answer in load(client, running.url("/"), 8, 25).await {
        assert_eq!((answer.status, answer.body.as_str()), (StatusCode::OK, "a"));
    }
    let signals = running.balancer.signals();
    assert_eq!(signals.workers.ejected, 1);
    assert_eq!(signals.workers.ready, 1);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_holds_requests_and_releases_them_in_order() {
    let config = Config {
        max_concurrency_per_worker: 1,
        queue_capacity: 4,
        ..Config::default()
    };
    let (worker, running) = Running::with_one_worker(config).await;
    let client = client();
    let mut answers = JoinSet::new();
    for seq in 0..5 {
        let client = client.clone();
        let request = Request::get(running.url("/hold"))
            .header("x-seq", seq.to_string())
            .body(Full::new(Bytes::new()))
            .expect("valid request");
        answers.spawn(async move { send(&client, request).await.status });
        // One at a time, so arrival order is known: the first reaches the worker, the
        // others wait in the queue.
        if seq == 0 {
            eventually("the first request at the worker", WAIT, || {
                (worker.hits() == 1).then_some(())
            })
            .await;
        } else {
            let balancer = &running.balancer;
            eventually("the request in the queue", WAIT, || {
                (balancer.signals().queue_depth == seq).then_some(())
            })
            .await;
        }
    }
    // The queue is full: a sixth request is refused at once.
    let refused = get(&client, &running.url("/hold")).await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.headers["retry-after"], "1");
    assert_eq!(worker.hits(), 1);

    for released in 1..=5 {
        worker.release(1);
        if released < 5 {
            eventually("the next request at the worker", WAIT, || {
                (worker.hits() == released + 1).then_some(())
            })
            .await;
        }
    }
    while let Some(status) = answers.join_next().await {
        assert_eq!(status.expect("answer"), StatusCode::OK);
    }
    assert_eq!(worker.arrivals(), ["0", "1", "2", "3", "4"]);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_waits_no_longer_than_the_queue_timeout() {
    const QUEUE_TIMEOUT: Duration = Duration::from_millis(500);
    let config = Config {
        max_concurrency_per_worker: 1,
        queue_timeout: QUEUE_TIMEOUT,
        ..Config::default()
    };
    let (worker, running) = Running::with_one_worker(config).await;
    let client = client();
    let held = tokio::spawn({
        let client = client.clone();
        let url = running.url("/hold");
        async move { get(&client, &url).await.status }
    });
    eventually("the first request at the worker", WAIT, || {
        (worker.hits() == 1).then_some(())
    })
    .await;
    let started = Instant::now();
    let waited = get(&client, &running.url("/")).await;
    let took = started.elapsed();
    assert_eq!(waited.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        waited.body.contains("no worker became free"),
        "{}",
        waited.body
    );
    // It waited the whole timeout, and was answered soon after it.
    assert_ended_at("answered", took, QUEUE_TIMEOUT, Duration::from_secs(5));
    assert_eq!(
        worker.hits(),
        1,
        "the waiting request never reached the worker"
    );
    worker.release(1);
    assert_eq!(held.await.expect("held"), StatusCode::OK);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_answer_with_the_right_status() {
    let config = Config {
        max_header_bytes: 8 * 1024,
        max_body_bytes: 1000,
        response_timeout: Duration::from_millis(300),
        ..Config::default()
    };
    let (_worker, running) = Running::with_one_worker(config).await;
    let client = client();

    let huge_header = Request::get(running.url("/"))
        .header("x-big", "a".repeat(20 * 1024))
        .body(Full::new(Bytes::new()))
        .expect("valid request");
    assert_eq!(
        send(&client, huge_header).await.status,
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
    );

    let declared = Request::post(running.url("/echo"))
        .body(Full::new(Bytes::from(vec![b'x'; 2000])))
        .expect("valid request");
    assert_eq!(
        send(&client, declared).await.status,
        StatusCode::PAYLOAD_TOO_LARGE
    );

    // No declared length: the limit stops the body as it streams past 1000 bytes.
    let (mut sender, body) = http_body_util::channel::Channel::<Bytes>::new(4);
    let streamed = Request::post(running.url("/count"))
        .body(body)
        .expect("valid request");
    for _ in 0..4 {
        sender
            .send_data(Bytes::from(vec![b'y'; 600]))
            .await
            .expect("buffered");
    }
    drop(sender);
    let chunked_client =
        hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http();
    let status = chunked_client
        .request(streamed)
        .await
        .expect("an answer")
        .status();
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    let within = Request::post(running.url("/count"))
        .body(Full::new(Bytes::from(vec![b'z'; 1000])))
        .expect("valid request");
    assert_eq!(send(&client, within).await.body, "1000");

    let slow = get(&client, &running.url("/sleep")).await;
    assert_eq!(slow.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(
        slow.body.starts_with("504 Gateway Timeout"),
        "{}",
        slow.body
    );
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_workers_answer_502() {
    let (_hold_1, dead_1) = refusing_addr();
    let (_hold_2, dead_2) = refusing_addr();
    let running = Running::start(Config::default(), &[]).await;
    let pool = running.balancer.pool();
    pool.add_worker("dead-1", dead_1).expect("new");
    pool.add_worker("dead-2", dead_2).expect("new");
    let answer = get(&client(), &running.url("/")).await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    assert!(
        answer.body.starts_with("502 Bad Gateway"),
        "{}",
        answer.body
    );
    assert_eq!(running.balancer.signals().workers.ejected, 2);
    assert!(
        running
            .balancer
            .metrics_text()
            .contains("squall_retries_total 1\n")
    );
    running.shutdown().await;
}

/// Two dead workers and a live one that is busy with a held request, so the picker prefers
/// the idle-looking dead ones: a request meets both dead workers before the live one.
async fn two_dead_and_one_busy(config: Config) -> (TestWorker, Running, common::Answer) {
    let live = TestWorker::start("live", Behaviour::default()).await;
    let running = Running::start(config, &[&live]).await;
    let client = client();
    let held = tokio::spawn({
        let (client, url) = (client.clone(), running.url("/hold"));
        async move { get(&client, &url).await }
    });
    eventually("the held request at the live worker", WAIT, || {
        (live.hits() == 1).then_some(())
    })
    .await;
    let (_hold_1, dead_1) = refusing_addr();
    let (_hold_2, dead_2) = refusing_addr();
    let pool = running.balancer.pool();
    pool.add_worker("dead-1", dead_1).expect("new");
    pool.add_worker("dead-2", dead_2).expect("new");
    let answer = get(&client, &running.url("/")).await;
    live.release(1);
    assert_eq!(held.await.expect("held").status, StatusCode::OK);
    (live, running, answer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_dead_workers_cost_retries_not_errors() {
    // As when a host dies with several of the pool's workers on it.
    let (_live, running, answer) = two_dead_and_one_busy(Config::default()).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    assert_eq!(answer.body, "live");
    assert_eq!(running.balancer.signals().workers.ejected, 2);
    let metrics = running.balancer.metrics_text();
    assert!(metrics.contains("squall_retries_total 2\n"), "{metrics}");
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_are_bounded() {
    let config = Config {
        retries: 1,
        ..Config::default()
    };
    let (_live, running, answer) = two_dead_and_one_busy(config).await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY, "{}", answer.body);
    let metrics = running.balancer.metrics_text();
    assert!(metrics.contains("squall_retries_total 1\n"), "{metrics}");
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_unreachable_worker_answers_502_without_waiting() {
    let (_hold, dead) = refusing_addr();
    let config = Config {
        // Were the retry to wait in the queue, the test would hit nextest's timeout.
        queue_timeout: Duration::from_secs(3600),
        ..Config::default()
    };
    let running = Running::start(config, &[]).await;
    running
        .balancer
        .pool()
        .add_worker("dead", dead)
        .expect("new");
    let answer = get(&client(), &running.url("/")).await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    assert!(
        running
            .balancer
            .metrics_text()
            .contains("squall_retries_total 0\n")
    );
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_is_timed_out() {
    let config = Config {
        header_read_timeout: Duration::from_millis(200),
        body_timeout: Duration::from_millis(200),
        ..Config::default()
    };
    let (worker, running) = Running::with_one_worker(config).await;
    // Half a request head, then silence.
    let mut stream = running.send_raw(b"GET / HTTP/1.1\r\nHost: app\r\n").await;
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the balancer kept a silent client");
    assert_eq!(worker.hits(), 0);

    // A whole head, then half of the body it announced, then silence.
    let mut stream = running
        .send_raw(b"POST /count HTTP/1.1\r\nHost: app\r\nContent-Length: 100\r\n\r\n0123456789")
        .await;
    let head = tokio::time::timeout(Duration::from_secs(20), read_head(&mut stream))
        .await
        .expect("an answer to the stalled upload");
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
    running.shutdown().await;
}

/// Windows a test sees fill within a few requests: 10 ms ticks, a 100 ms stable window and
/// a 20 ms panic window.
fn short_windows() -> Config {
    Config {
        tick: Duration::from_millis(10),
        stable_window: Duration::from_millis(100),
        panic_window: Duration::from_millis(20),
        ..Config::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_and_shutdown_cover_in_flight_requests() {
    let (worker, running) = Running::with_one_worker(short_windows()).await;
    let client = client();
    for _ in 0..5 {
        assert_eq!(get(&client, &running.url("/")).await.status, StatusCode::OK);
    }
    let balancer = running.balancer.clone();
    eventually("the window to count the requests", WAIT, || {
        (balancer.signals().stable.requests == 5).then_some(())
    })
    .await;
    let signals = balancer.signals();
    assert!(signals.stable.latency_p99 > Duration::ZERO);
    assert_eq!(signals.stable.error_rate, 0.0);
    assert_eq!(signals.workers.ready, 1);

    let held = tokio::spawn({
        let client = client.clone();
        let url = running.url("/hold");
        async move { get(&client, &url).await }
    });
    eventually("the request at the worker", WAIT, || {
        (worker.hits() == 6).then_some(())
    })
    .await;
    assert_eq!(balancer.signals().in_flight, 1);
    let shutdown = tokio::spawn(running.shutdown());
    worker.release(1);
    let answer = held.await.expect("held");
    assert_eq!(answer.status, StatusCode::OK);
    shutdown.await.expect("shutdown");
    let metrics = balancer.metrics_text();
    assert!(
        metrics.contains("squall_requests_total{code=\"2xx\"} 6"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ejected_worker_is_probed_back_in() {
    let a = TestWorker::start("a", Behaviour::default()).await;
    let mut b = TestWorker::start("b", Behaviour::default()).await;
    let config = Config {
        ejection: Duration::from_millis(50),
        max_ejection: Duration::from_millis(200),
        ..short_windows()
    };
    let running = Running::start(config, &[&a, &b]).await;
    let client = client();
    b.kill().await;
    let pool = running.balancer.pool();
    let state_of_b = || {
        pool.workers()
            .into_iter()
            .find(|w| w.id.id() == "b")
            .map(|w| w.state)
    };
    // Requests keep succeeding on a; the first one P2C sends to b finds it refusing.
    let mut sent = 0;
    while state_of_b() != Some(WorkerState::Ejected) {
        assert_eq!(get(&client, &running.url("/")).await.body, "a");
        sent += 1;
        assert!(sent < 1000, "b was never tried");
    }
    let b = b.restart(Behaviour::default()).await;
    eventually("a probe to readmit b", WAIT, || {
        (state_of_b() == Some(WorkerState::Ready)).then_some(())
    })
    .await;
    let answers = load(client, running.url("/"), 4, 25).await;
    assert!(answers.iter().all(|a| a.status == StatusCode::OK));
    assert!(b.hits() > 0, "the readmitted worker got no traffic");
    running.shutdown().await;
}

#[test]
fn serve_threads_spreads_one_address_over_threads() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let worker = runtime.block_on(TestWorker::start("w", Behaviour::default()));
    let balancer = balancer::Balancer::new(Config::default()).expect("valid config");
    balancer
        .pool()
        .add_worker("w", worker.addr)
        .expect("new worker");
    let listeners =
        balancer::ThreadListeners::bind("127.0.0.1:0".parse().expect("address"), 2).expect("bind");
    let addr = listeners.local_addr();
    let stop = lifecycle::Stop::new();
    let shutdown = stop.shutdown();
    let serving = balancer.clone();
    let threads = std::thread::spawn(move || serving.serve_threads(listeners, shutdown));
    runtime.block_on(async {
        let mut load = JoinSet::new();
        for _ in 0..8 {
            let url = format!("http://{addr}/");
            load.spawn(async move {
                // A client of its own per task: its own connections, spread by the kernel.
                let client = client();
                for _ in 0..10 {
                    assert_eq!(get(&client, &url).await.body, "w");
                }
            });
        }
        while let Some(done) = load.join_next().await {
            done.expect("load");
        }
    });
    assert_eq!(worker.hits(), 8 * 10);
    stop.stop();
    threads.join().expect("no panic").expect("served");
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "still accepting after shutdown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_response_body_is_cut_off_and_frees_the_slot() {
    let config = Config {
        worker_body_timeout: Duration::from_millis(200),
        ..Config::default()
    };
    let (_worker, running) = Running::with_one_worker(config).await;
    let response = client()
        .request(
            Request::get(running.url("/stall"))
                .body(Full::new(Bytes::new()))
                .expect("valid request"),
        )
        .await
        .expect("response head");
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let first = body.frame().await.expect("a frame").expect("data");
    assert_eq!(first.into_data().ok(), Some(Bytes::from("first,")));
    let cut = tokio::time::timeout(Duration::from_secs(20), body.frame())
        .await
        .expect("the balancer cuts the stalled body off");
    assert!(!matches!(cut, Some(Ok(_))), "no more data may arrive");
    running.wait_for_in_flight(0, "the slot to be freed").await;
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_disconnected_and_frees_the_slot() {
    let config = Config {
        client_write_timeout: Duration::from_millis(300),
        ..Config::default()
    };
    let (_worker, running) = Running::with_one_worker(config).await;
    let mut stream = running
        .send_raw(b"GET /big HTTP/1.1\r\nHost: app\r\n\r\n")
        .await;
    // The client reads nothing: the socket buffers fill, the balancer's writes stall, and
    // after 300 ms of that the connection is closed and the request dropped.
    running.wait_for_in_flight(1, "a request in flight").await;
    running.wait_for_in_flight(0, "the slot to be freed").await;
    // What was sent before the stall can still be read, and then the connection ends.
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut rest))
        .await
        .expect("the balancer closed the connection");
    assert!(
        ended.is_err() || rest.len() < 256 * 1024 * 1024,
        "the whole body arrived: {} bytes",
        rest.len()
    );
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_continue_is_answered_by_the_balancer() {
    let (_worker, running) = Running::with_one_worker(Config::default()).await;
    let mut stream = running
        .send_raw(b"POST /count HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        .await;
    let interim = read_head(&mut stream).await;
    assert!(interim.starts_with("HTTP/1.1 100"), "{interim}");
    stream.write_all(b"hello").await.expect("write body");
    let head = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut body = [0u8; 1];
    stream.read_exact(&mut body).await.expect("body");
    assert_eq!(&body, b"5");
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_gives_up_on_requests_after_its_bound() {
    const BOUND: Duration = Duration::from_secs(1);
    let config = Config {
        shutdown_timeout: BOUND,
        ..Config::default()
    };
    let (worker, running) = Running::with_one_worker(config).await;
    let held = tokio::spawn({
        let url = running.url("/hold");
        async move {
            client()
                .get(url.parse().expect("url"))
                .await
                .map(|r| r.status())
        }
    });
    eventually("the request at the worker", WAIT, || {
        (worker.hits() == 1).then_some(())
    })
    .await;
    // The worker never answers: shutdown waits for it for its bound, then gives up.
    let started = Instant::now();
    tokio::time::timeout(WAIT, running.shutdown())
        .await
        .expect("shutdown ends after its bound");
    assert_ended_at(
        "shutdown returned",
        started.elapsed(),
        BOUND,
        Duration::from_secs(5),
    );
    held.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_while_a_request_is_held_and_returns_once_it_finishes() {
    let (worker, running) = Running::with_one_worker(Config::default()).await;
    let addr = running.addr;
    let held = tokio::spawn({
        let url = running.url("/hold");
        async move { get(&client(), &url).await }
    });
    eventually("the request at the worker", WAIT, || {
        (worker.hits() == 1).then_some(())
    })
    .await;
    let shutdown = tokio::spawn(running.shutdown());
    // Shutdown has begun once the listener refuses new connections...
    eventually_async("the listener to close", WAIT, || async {
        TcpStream::connect(addr).await.is_err().then_some(())
    })
    .await;
    // ...and does not return while a request is held (one that did not wait would return
    // within microseconds of the listener closing).
    let mut shutdown = shutdown;
    let returned = tokio::time::timeout(Duration::from_millis(500), &mut shutdown).await;
    assert!(
        returned.is_err(),
        "shutdown returned with a request in flight"
    );
    assert!(!held.is_finished(), "the held request was answered early");
    worker.release(1);
    let answer = held.await.expect("held");
    assert_eq!((answer.status, answer.body.as_str()), (StatusCode::OK, ""));
    tokio::time::timeout(WAIT, shutdown)
        .await
        .expect("shutdown returns once the request finished")
        .expect("shutdown task");
}
