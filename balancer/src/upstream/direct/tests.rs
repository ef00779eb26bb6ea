//! The balancer's own client against a scripted worker on a real socket.

use std::sync::atomic::{AtomicUsize, Ordering};

use http::StatusCode;
use http_body::Body as _;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use super::*;
use crate::upstream::acking::tests::{acks_at_once, delay_acks, poll_once};

/// What the scripted worker does after reading a request head.
enum Step {
    /// Writes these bytes.
    Answer(&'static [u8]),
    /// Writes these bytes and closes the connection.
    AnswerAndClose(&'static [u8]),
    /// Writes a 200 with a body of this many bytes, in one write.
    Long(usize),
}

/// A worker that answers the request heads it reads with `steps`, one step per request in
/// order, whatever the connection; it sends each head it read on `heads` and counts the
/// connections it accepted.
struct Worker {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    heads: mpsc::UnboundedReceiver<String>,
}

async fn worker(steps: Vec<Step>) -> Worker {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let (sender, heads) = mpsc::unbounded_channel();
    let counter = Arc::clone(&accepted);
    tokio::spawn(async move {
        let mut steps = steps.into_iter();
        'connections: while let Ok((mut stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            let mut read = Vec::new();
            loop {
                let mut byte = [0u8; 1];
                match stream.read(&mut byte).await {
                    Ok(1) => read.push(byte[0]),
                    _ => continue 'connections,
                }
                if !read.ends_with(b"\r\n\r\n") {
                    continue;
                }
                let _ = sender.send(String::from_utf8_lossy(&read).into_owned());
                read.clear();
                match steps.next() {
                    Some(Step::Answer(bytes)) => stream.write_all(bytes).await.expect("write"),
                    Some(Step::AnswerAndClose(bytes)) => {
                        stream.write_all(bytes).await.expect("write");
                        continue 'connections;
                    }
                    Some(Step::Long(len)) => {
                        let mut answer =
                            format!("HTTP/1.1 200 OK\r\ncontent-length: {len}\r\n\r\n")
                                .into_bytes();
                        answer.extend((0..len).map(|n| (n % 251) as u8));
                        stream.write_all(&answer).await.expect("write");
                    }
                    None => continue 'connections,
                }
            }
        }
    });
    Worker {
        addr,
        accepted,
        heads,
    }
}

fn pool() -> Arc<Pool> {
    Arc::new(Pool::new(4, 1))
}

/// Sends `request` on a pooled connection to `addr`, or a new one.
async fn send<B>(
    pool: &Arc<Pool>,
    addr: SocketAddr,
    request: &Request<B>,
) -> Result<Response<Body>, Failure> {
    let conn = match pool.take() {
        Some(conn) => conn,
        // A worker that never leaves the pool: its connections end only when dropped.
        None => Conn::connect(addr, Duration::from_secs(5), Box::leak(Box::default()))
            .await
            .expect("connect"),
    };
    Exchange::new(conn, request, pool).await
}

fn get(path: &str) -> Request<()> {
    Request::get(path)
        .header("host", "worker")
        .body(())
        .expect("request")
}

/// The body whole, and its trailers.
async fn read_all(body: Body) -> (Vec<u8>, Option<http::HeaderMap>) {
    let collected = body.collect().await.expect("a whole body");
    let trailers = collected.trailers().cloned();
    (collected.to_bytes().to_vec(), trailers)
}

#[tokio::test]
async fn small_answers_come_back_on_one_kept_connection() {
    let mut worker = worker(vec![
        Step::Answer(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"),
        Step::Answer(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Made\r\nx-a: 1\r\ncontent-length: 2\r\n\r\nok"),
    ])
    .await;
    let pool = pool();
    let response = send(&pool, worker.addr, &get("/one?x=1"))
        .await
        .expect("answer");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.body().size_hint().exact(), Some(5));
    assert_eq!(read_all(response.into_body()).await.0, b"hello");
    let head = worker.heads.recv().await.expect("a head");
    assert_eq!(head, "GET /one?x=1 HTTP/1.1\r\nhost: worker\r\n\r\n");

    let response = send(&pool, worker.addr, &get("/two"))
        .await
        .expect("answer");
    assert_eq!(response.status().as_u16(), 201);
    assert_eq!(
        response.headers().get("x-a").map(|v| v.as_bytes()),
        Some(&b"1"[..])
    );
    assert_eq!(read_all(response.into_body()).await.0, b"ok");
    assert_eq!(
        worker.accepted.load(Ordering::SeqCst),
        1,
        "one connection for both"
    );
    assert!(pool.take().is_some(), "the connection is idle in the pool");
}

#[tokio::test]
async fn chunked_close_delimited_and_long_bodies_are_read_whole() {
    let worker = worker(vec![
        Step::Answer(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n7;x=y\r\n, world\r\n0\r\ngrpc-status: 0\r\n\r\n",
        ),
        Step::Long(200 * 1024),
        Step::AnswerAndClose(b"HTTP/1.1 200 OK\r\n\r\nuntil the end"),
    ])
    .await;
    let pool = pool();
    let response = send(&pool, worker.addr, &get("/")).await.expect("answer");
    let (data, trailers) = read_all(response.into_body()).await;
    assert_eq!(data, b"hello, world");
    let trailers = trailers.expect("trailers");
    assert_eq!(
        trailers.get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"0"[..])
    );

    let response = send(&pool, worker.addr, &get("/")).await.expect("answer");
    let (data, _) = read_all(response.into_body()).await;
    assert_eq!(data.len(), 200 * 1024);
    assert!(data.iter().enumerate().all(|(n, &b)| b == (n % 251) as u8));

    let response = send(&pool, worker.addr, &get("/")).await.expect("answer");
    assert_eq!(read_all(response.into_body()).await.0, b"until the end");
    assert_eq!(worker.accepted.load(Ordering::SeqCst), 1);
    assert!(
        pool.take().is_none(),
        "a body read to the close leaves no connection"
    );
}

#[tokio::test]
async fn bodiless_answers_and_connection_close() {
    let worker = worker(vec![
        Step::Answer(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"),
        Step::Answer(b"HTTP/1.1 204 No Content\r\n\r\n"),
        Step::Answer(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok"),
    ])
    .await;
    let pool = pool();
    let head = Request::head("/").body(()).expect("request");
    let response = send(&pool, worker.addr, &head).await.expect("answer");
    assert!(
        response.body().is_end_stream(),
        "an answer to HEAD has no body"
    );
    assert_eq!(
        response
            .headers()
            .get("content-length")
            .map(|v| v.as_bytes()),
        Some(&b"5"[..])
    );
    drop(response);
    let response = send(&pool, worker.addr, &get("/")).await.expect("answer");
    assert!(response.body().is_end_stream());
    drop(response);
    let response = send(&pool, worker.addr, &get("/")).await.expect("answer");
    assert_eq!(read_all(response.into_body()).await.0, b"ok");
    assert_eq!(worker.accepted.load(Ordering::SeqCst), 1);
    assert!(pool.take().is_none(), "connection: close is honoured");
}

#[tokio::test]
async fn a_connection_the_worker_closed_while_idle_is_not_taken() {
    let worker = worker(vec![Step::AnswerAndClose(
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
    )])
    .await;
    let pool = pool();
    let response = send(&pool, worker.addr, &get("/")).await.expect("answer");
    assert_eq!(read_all(response.into_body()).await.0, b"ok");
    // The worker's close reaches the socket in its own time: bounded, not timed.
    for _ in 0..500 {
        match pool.take() {
            None => return,
            Some(conn) => {
                pool.put(conn);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    panic!("a connection the worker closed is still taken after 5 s");
}

#[tokio::test]
async fn a_head_cut_short_is_lost_like_no_answer_and_a_body_cut_short_fails() {
    let worker = worker(vec![
        Step::AnswerAndClose(b""),
        Step::AnswerAndClose(b"HTTP/1.1 200 OK\r\ncontent-le"),
        Step::AnswerAndClose(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc"),
        Step::AnswerAndClose(b"HTTP/1.1 101 Switching Protocols\r\n\r\n"),
    ])
    .await;
    let pool = pool();
    let failure = send(&pool, worker.addr, &get("/"))
        .await
        .expect_err("no answer");
    assert!(!failure.unsent && failure.before_answer, "{failure:?}");
    assert!(matches!(failure.error, WireError::Closed));

    let failure = send(&pool, worker.addr, &get("/"))
        .await
        .expect_err("half a head");
    assert!(!failure.unsent && failure.before_answer, "{failure:?}");
    assert!(matches!(failure.error, WireError::ClosedInHead));

    let response = send(&pool, worker.addr, &get("/")).await.expect("a head");
    let error = response.into_body().collect().await.expect_err("cut short");
    assert!(matches!(error, WireError::ClosedInBody), "{error}");

    let failure = send(&pool, worker.addr, &get("/"))
        .await
        .expect_err("unasked upgrade");
    assert!(matches!(failure.error, WireError::UnaskedUpgrade));
    assert!(pool.take().is_none());
}

#[tokio::test]
async fn a_read_that_waits_for_the_rest_of_an_answer_acknowledges_what_came() {
    const REST: usize = 20_000;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    // The worker writes each piece of its answers when told to.
    let (go, mut told) = mpsc::unbounded_channel::<Vec<u8>>();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.expect("accept");
        while let Some(piece) = told.recv().await {
            if piece.is_empty() {
                // Read a request head.
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") {
                    head.push(stream.read_u8().await.expect("a request"));
                }
            } else {
                stream.write_all(&piece).await.expect("write");
            }
        }
    });
    let pool = pool();
    let conn = Conn::connect(addr, Duration::from_secs(5), Box::leak(Box::default()))
        .await
        .expect("connect");
    delay_acks(&conn.stream);
    let request = get("/");
    let mut exchange = Exchange::new(conn, &request, &pool);
    go.send(Vec::new()).expect("worker");
    // Waiting for an answer nothing of which has come holds no acknowledgement back.
    assert!(poll_once(&mut exchange).await.is_pending());
    let conn = exchange.conn.as_ref().expect("the connection");
    assert!(!acks_at_once(&conn.stream), "nothing to acknowledge yet");

    let head = format!(
        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\nhello",
        5 + REST
    );
    go.send(head.into_bytes()).expect("worker");
    let mut body = exchange.await.expect("an answer").into_body();
    let mut read = Vec::new();
    while read.len() < 5 {
        let frame = body.frame().await.expect("a frame").expect("data");
        read.extend_from_slice(&frame.into_data().expect("data"));
    }
    assert_eq!(read, b"hello");
    // The rest has not come: the read that waits for it acknowledges the head and "hello".
    assert!(poll_once(&mut body.frame()).await.is_pending());
    assert!(acks_at_once(
        &body.conn.as_ref().expect("the connection").stream
    ));

    go.send(vec![b'x'; REST]).expect("worker");
    let (rest, _) = read_all(body).await;
    assert_eq!(rest.len(), REST);

    // The next request carries the acknowledgement of the last answer: its wait has none
    // to send.
    let conn = pool.take().expect("the connection back in the pool");
    delay_acks(&conn.stream);
    let mut exchange = Exchange::new(conn, &request, &pool);
    go.send(Vec::new()).expect("worker");
    assert!(poll_once(&mut exchange).await.is_pending());
    assert!(!acks_at_once(
        &exchange.conn.as_ref().expect("the connection").stream
    ));
    go.send(b"HTTP/1.1 204 No Content\r\n\r\n".to_vec())
        .expect("worker");
    let response = exchange.await.expect("an answer");
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
}

#[test]
fn only_bodiless_requests_without_an_upgrade_go_direct() {
    assert!(suits(
        &Request::get("/")
            .body(http_body_util::Empty::<Bytes>::new())
            .expect("r")
    ));
    let full = http_body_util::Full::new(Bytes::from_static(b"x"));
    assert!(!suits(&Request::post("/").body(full).expect("r")));
    let upgrade = Request::get("/")
        .header("upgrade", "websocket")
        .body(http_body_util::Empty::<Bytes>::new())
        .expect("r");
    assert!(!suits(&upgrade));
    let connect = Request::connect("worker:443")
        .body(http_body_util::Empty::<Bytes>::new())
        .expect("r");
    assert!(!suits(&connect));
}
