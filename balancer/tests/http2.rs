//! The balancer's HTTP/2 (h2c, prior knowledge) side on real loopback sockets: its limits on
//! headers, bodies and streams, a stream the client cancels, a stream the client stops
//! reading (and one it reads slowly but steadily), and the queue.
//!
//! The client is the `h2` crate itself, so a test can reset a stream and read the settings
//! the balancer announced.

mod common;

use std::time::{Duration, Instant};

use balancer::Config;
use bytes::Bytes;
use common::{Running, WAIT};
use http::{Request, Response, StatusCode};
use test_support::eventually;
use tokio::net::TcpStream;

use common::{H2Sender as Sender, h2c_connect as connect};

fn get(path: &str) -> Request<()> {
    Request::get(format!("http://app.example{path}"))
        .body(())
        .expect("valid request")
}

/// Sends a bodiless request and waits for the response head.
async fn send(
    sender: &Sender,
    request: Request<()>,
) -> Result<Response<h2::RecvStream>, h2::Error> {
    let mut ready = sender.clone().ready().await?;
    let (response, _) = ready.send_request(request, true)?;
    response.await
}

/// Reads a whole body, giving flow-control capacity back as it goes.
async fn body_of(response: Response<h2::RecvStream>) -> String {
    let mut body = response.into_body();
    let mut text = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("body data");
        let _ = body.flow_control().release_capacity(chunk.len());
        text.extend_from_slice(&chunk);
    }
    String::from_utf8_lossy(&text).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_list_over_the_limit_is_refused_before_any_worker_sees_it() {
    let config = Config {
        max_header_bytes: 8 * 1024,
        ..Config::default()
    };
    let (worker, running) = Running::with_one_worker(config).await;
    let sender = connect(running.addr).await;
    let mut big = get("/");
    big.headers_mut().insert(
        "x-big",
        "a".repeat(20 * 1024).parse().expect("header value"),
    );
    // h2 itself answers `431` and resets the stream.
    let refused = send(&sender, big).await.expect("an answer");
    assert_eq!(
        refused.status(),
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
    );
    assert_eq!(worker.hits(), 0, "the worker saw an oversized head");
    // A head within the limit still goes through, on the same connection.
    let response = send(&sender, get("/")).await.expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(body_of(response).await, "w");
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_limit_is_refused_declared_or_streamed() {
    let config = Config {
        max_body_bytes: 1000,
        ..Config::default()
    };
    let (worker, running) = Running::with_one_worker(config).await;
    let sender = connect(running.addr).await;

    // Declared too large: refused before anything is sent on.
    let declared = Request::post("http://app.example/count")
        .header("content-length", "2000")
        .body(())
        .expect("valid request");
    let mut ready = sender.clone().ready().await.expect("ready");
    let (response, mut upload) = ready.send_request(declared, false).expect("sent");
    upload.reserve_capacity(2000);
    let _ = upload.send_data(Bytes::from(vec![b'x'; 2000]), true);
    let response = response.await.expect("response");
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(worker.hits(), 0);

    // No length declared: stopped as it streams past the limit.
    let streamed = Request::post("http://app.example/count")
        .body(())
        .expect("valid request");
    let mut ready = sender.clone().ready().await.expect("ready");
    let (response, mut upload) = ready.send_request(streamed, false).expect("sent");
    for _ in 0..4 {
        upload.reserve_capacity(600);
        upload
            .send_data(Bytes::from(vec![b'y'; 600]), false)
            .expect("data");
    }
    let _ = upload.send_data(Bytes::new(), true);
    let response = response.await.expect("response");
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_the_client_resets_frees_its_worker_slot() {
    let (worker, running) = Running::with_one_worker(Config::default()).await;
    let balancer = running.balancer.clone();
    let sender = connect(running.addr).await;
    let mut ready = sender.clone().ready().await.expect("ready");
    let (response, mut stream) = ready.send_request(get("/hold"), true).expect("sent");
    eventually("the request at the worker", WAIT, || {
        (worker.hits() == 1 && balancer.signals().in_flight == 1).then_some(())
    })
    .await;
    // RST_STREAM(CANCEL): the client gives up on the request.
    stream.send_reset(h2::Reason::CANCEL);
    drop(response);
    running.wait_for_in_flight(0, "the slot to be freed").await;
    assert_eq!(balancer.pool().workers()[0].in_flight, 0);
    // The connection is still good for the next request.
    let response = send(&sender, get("/")).await.expect("response");
    assert_eq!(body_of(response).await, "w");
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_requests_queue_like_http1_ones_when_workers_are_full() {
    let config = Config {
        max_concurrency_per_worker: 1,
        ..Config::default()
    };
    let (worker, running) = Running::with_one_worker(config).await;
    let balancer = running.balancer.clone();
    let sender = connect(running.addr).await;
    let mut answers = Vec::new();
    for seq in 0..3 {
        let mut request = get("/hold");
        request
            .headers_mut()
            .insert("x-seq", seq.to_string().parse().expect("value"));
        let sender = sender.clone();
        answers.push(tokio::spawn(async move {
            let response = send(&sender, request).await.expect("response");
            (response.status(), body_of(response).await)
        }));
        // One at a time, so arrival order is known: the first holds the worker's only
        // slot, the others wait in the balancer's queue.
        eventually("the request at the worker or in the queue", WAIT, || {
            (worker.hits() == 1 && balancer.signals().queue_depth == seq).then_some(())
        })
        .await;
    }
    worker.release(3);
    for (seq, answer) in answers.into_iter().enumerate() {
        assert_eq!(
            answer.await.expect("answer"),
            (StatusCode::OK, seq.to_string())
        );
    }
    assert_eq!(worker.arrivals(), ["0", "1", "2"]);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_may_have_no_more_streams_open_than_the_limit() {
    let config = Config {
        max_concurrent_streams: 2,
        ..Config::default()
    };
    let (worker, running) = Running::with_one_worker(config).await;
    let balancer = running.balancer.clone();
    let sender = connect(running.addr).await;
    // The balancer announces the limit in its SETTINGS, which the first exchange has read.
    let response = send(&sender, get("/")).await.expect("response");
    assert_eq!(body_of(response).await, "w");
    assert_eq!(sender.current_max_send_streams(), 2);
    // Two held streams take the connection's two; a third opens only when one ends.
    let held: Vec<_> = (0..3)
        .map(|_| {
            let sender = sender.clone();
            tokio::spawn(async move { send(&sender, get("/hold")).await.map(|r| r.status()) })
        })
        .collect();
    eventually("two streams at the worker", WAIT, || {
        (worker.hits() == 3 && balancer.signals().in_flight == 2).then_some(())
    })
    .await;
    assert_eq!(balancer.signals().queue_depth, 0, "not held by the queue");
    worker.release(1);
    eventually("the third stream at the worker", WAIT, || {
        (worker.hits() == 4).then_some(())
    })
    .await;
    worker.release(2);
    for answer in held {
        assert_eq!(
            answer.await.expect("task").expect("response"),
            StatusCode::OK
        );
    }
    assert_eq!(worker.hits(), 4);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_client_stops_reading_is_reset_while_the_others_go_on() {
    let config = Config {
        client_write_timeout: Duration::from_millis(500),
        ..Config::default()
    };
    let (worker, running) = Running::with_one_worker(config).await;
    let balancer = running.balancer.clone();
    // Each stream gets h2's default window (64 KiB); the connection's is large, so a stream
    // that takes its window and stops leaves room for the others.
    let stream = TcpStream::connect(running.addr).await.expect("connect");
    let (sender, connection) = h2::client::Builder::new()
        .initial_connection_window_size(64 * 1024 * 1024)
        .handshake::<_, Bytes>(stream)
        .await
        .expect("h2 handshake");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let sender = sender.ready().await.expect("connection ready");

    // Stream one asks for 256 MiB and never gives any window back.
    let mut ready = sender.clone().ready().await.expect("ready");
    let (response, _) = ready.send_request(get("/big"), true).expect("sent");
    let response = response.await.expect("response head");
    assert_eq!(response.status(), StatusCode::OK);
    let mut stalled = response.into_body();
    eventually("the stalled stream to hold the worker", WAIT, || {
        (balancer.signals().in_flight == 1).then_some(())
    })
    .await;

    // Another stream on the same connection is served meanwhile.
    let other = send(&sender, get("/")).await.expect("response");
    assert_eq!(body_of(other).await, "w");
    assert_eq!(worker.open_connections(), 2, "one busy, one idle");

    // Stream one is reset (its data read, never released, then the reset), which frees the
    // worker's slot and closes the worker connection it held half-read.
    let started = Instant::now();
    let ended = tokio::time::timeout(WAIT, async {
        loop {
            match stalled.data().await {
                Some(Ok(_unreleased)) => {}
                Some(Err(error)) => return Some(error),
                None => return None,
            }
        }
    })
    .await
    .expect("the stalled stream was never cut");
    let error = ended.expect("the stalled stream ended with a reset, not an end");
    assert_eq!(error.reason(), Some(h2::Reason::CANCEL), "{error}");
    assert!(started.elapsed() < WAIT);
    running
        .wait_for_in_flight(0, "the stalled stream's slot to be freed")
        .await;
    assert_eq!(balancer.pool().workers()[0].in_flight, 0);
    eventually("the stalled worker connection to close", WAIT, || {
        (worker.open_connections() == 1).then_some(())
    })
    .await;

    // The connection itself is still good.
    let after = send(&sender, get("/")).await.expect("response");
    assert_eq!(body_of(after).await, "w");
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_client_reads_slowly_but_steadily_is_not_reset() {
    let limit = Duration::from_millis(1500);
    let config = Config {
        client_write_timeout: limit,
        ..Config::default()
    };
    let (_worker, running) = Running::with_one_worker(config).await;
    // h2's default stream window, 64 KiB.
    let sender = connect(running.addr).await;
    let response = send(&sender, get("/big")).await.expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    // The window is opened 4 KiB at a time, 32 KiB a second: one of the worker's 64 KiB
    // chunks takes 2 s to go through, more than the limit, while a 16 KiB piece takes 0.5 s,
    // a third of it; the client never stops, and in all reads for over five times the limit.
    const STEP: usize = 4 * 1024;
    let every = Duration::from_millis(125);
    let wanted = 256 * 1024;
    let (mut read, mut unreleased) = (0, 0);
    let mut next = tokio::time::Instant::now();
    while read < wanted {
        next += every;
        while let Ok(chunk) = tokio::time::timeout_at(next, body.data()).await {
            let chunk = chunk
                .expect("the body went on")
                .unwrap_or_else(|error| panic!("reset after {read} bytes: {error}"));
            read += chunk.len();
            unreleased += chunk.len();
        }
        let step = unreleased.min(STEP);
        body.flow_control()
            .release_capacity(step)
            .expect("capacity released");
        unreleased -= step;
    }
    drop(body);
    running.wait_for_in_flight(0, "the stream to end").await;
    running.shutdown().await;
}
