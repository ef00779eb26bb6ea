//! The own path on real sockets: a server with a service whose body-less side says so in
//! its answers, and raw clients that write heads and read what comes back.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use crate::{Bodiless, HttpServer, Limits, Stop, Transport};

type TestBody = BoxBody<Bytes, Infallible>;

/// Answers hyper's requests with `hyper <method> <path> <body length>`, and the own path's
/// by path: `/chunked` with a body of unknown length and a trailer, `/soon` after the
/// answer's task has waited once, `/hold` only once
/// `release` is told (saying in `dropped` if it was given up), anything else with
/// `own <method> <path>`.
#[derive(Clone, Default)]
struct Answers {
    arrived: Arc<Notify>,
    release: Arc<Notify>,
    dropped: Arc<AtomicBool>,
}

fn text(body: String) -> Response<TestBody> {
    Response::new(Full::new(Bytes::from(body)).boxed())
}

impl hyper::service::Service<Request<Incoming>> for Answers {
    type Response = Response<TestBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<TestBody>, Infallible>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let length = body.collect().await.map_or(0, |body| body.to_bytes().len());
            Ok(text(format!(
                "hyper {} {} {length}",
                parts.method, parts.uri
            )))
        })
    }
}

/// Sets its flag when dropped: a request's future given up.
struct OnDrop(Arc<AtomicBool>);

impl Drop for OnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

impl Bodiless for Answers {
    type ResponseBody = TestBody;
    type Answer = Pin<Box<dyn Future<Output = Response<TestBody>> + Send>>;

    fn call_bodiless(&self, request: Request<()>) -> Self::Answer {
        let answers = self.clone();
        Box::pin(async move {
            match request.uri().path() {
                "/chunked" => {
                    let mut trailers = HeaderMap::new();
                    trailers.insert("x-sum", HeaderValue::from_static("9"));
                    // Not announced, and not to be taken from trailers: neither is sent.
                    trailers.insert("x-other", HeaderValue::from_static("1"));
                    trailers.insert("content-type", HeaderValue::from_static("text/html"));
                    let frames = [
                        Frame::data(Bytes::from_static(b"hello ")),
                        Frame::data(Bytes::from_static(b"world")),
                        Frame::trailers(trailers),
                    ];
                    let body = Pieces {
                        frames: frames.into(),
                        ready: false,
                    };
                    let mut response = Response::new(body.boxed());
                    response
                        .headers_mut()
                        .insert("trailer", HeaderValue::from_static("x-sum, content-type"));
                    response
                }
                "/hold" => {
                    let guard = OnDrop(Arc::clone(&answers.dropped));
                    answers.arrived.notify_one();
                    answers.release.notified().await;
                    std::mem::forget(guard);
                    text("held".into())
                }
                "/soon" => {
                    // Not at once, as an answer from a worker is not: after a wake-up.
                    tokio::task::yield_now().await;
                    text("soon".into())
                }
                "/switch" | "/early" => {
                    let mut response = text(String::new());
                    *response.status_mut() = if request.uri().path() == "/switch" {
                        http::StatusCode::SWITCHING_PROTOCOLS
                    } else {
                        http::StatusCode::from_u16(103).expect("a status")
                    };
                    response
                }
                path => text(format!("own {} {path}", request.method())),
            }
        })
    }
}

/// A body that gives its frames one at a time, pending once before each, so it is sent in
/// pieces and its length is not known ahead.
struct Pieces {
    frames: VecDeque<Frame<Bytes>>,
    ready: bool,
}

impl http_body::Body for Pieces {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if !self.ready {
            self.ready = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        self.ready = false;
        Poll::Ready(self.frames.pop_front().map(Ok))
    }
}

struct Running {
    addr: SocketAddr,
    answers: Answers,
    stop: Stop,
    task: tokio::task::JoinHandle<bool>,
}

async fn start(header_read_timeout: Duration) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let limits = Limits {
        header_read_timeout,
        max_connections: None,
        connection_lifetime: None,
        drain_timeout: Duration::from_secs(10),
        ..Limits::control()
    };
    let server = HttpServer::new("test", limits);
    let (stop, answers) = (Stop::new(), Answers::default());
    let (shutdown, service) = (stop.shutdown(), answers.clone());
    let task = tokio::spawn(async move {
        server
            .serve_bodiless(listener, &shutdown, |stream, _| (stream, service.clone()))
            .await
    });
    Running {
        addr,
        answers,
        stop,
        task,
    }
}

/// Connects and writes `bytes`.
async fn send(addr: SocketAddr, bytes: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    stream
}

/// Writes `bytes`, then reads until the server closes the connection (within a bound).
async fn exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    read_to_close(&mut send(addr, bytes).await).await
}

async fn read_to_close(stream: &mut TcpStream) -> String {
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut all))
        .await
        .expect("the server closes the connection")
        .unwrap();
    String::from_utf8(all).unwrap()
}

/// Reads until `count` responses with `Content-Length` bodies have come.
async fn read_responses(stream: &mut TcpStream, count: usize) -> Vec<String> {
    let mut all = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&all).into_owned();
        let bodies: Vec<String> = text
            .split("HTTP/1.")
            .skip(1)
            .filter_map(|response| {
                let (head, body) = response.split_once("\r\n\r\n")?;
                let length: usize = head
                    .lines()
                    .find_map(|line| line.strip_prefix("content-length: "))?
                    .parse()
                    .ok()?;
                (body.len() >= length).then(|| body[..length].to_owned())
            })
            .collect();
        if bodies.len() >= count {
            return bodies;
        }
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk))
            .await
            .expect("responses within the bound")
            .unwrap();
        assert!(n > 0, "closed after {text:?}");
        all.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_and_a_body_hands_the_connection_to_hyper() {
    let running = start(Duration::from_secs(10)).await;
    let mut stream = send(running.addr, b"GET /a HTTP/1.1\r\nhost: t\r\n\r\nHEAD /b HTTP/1.1\r\nhost: t\r\n\r\nGET /c HTTP/1.1\r\nhost: t\r\n\r\n").await;
    let bodies = read_responses(&mut stream, 2).await;
    assert_eq!(bodies, ["own GET /a", "own GET /c"]);

    // A body: hyper serves the connection from that request on.
    stream
        .write_all(b"POST /d HTTP/1.1\r\nhost: t\r\ncontent-length: 3\r\n\r\nabcGET /e HTTP/1.1\r\nhost: t\r\n\r\n")
        .await
        .unwrap();
    let bodies = read_responses(&mut stream, 2).await;
    assert_eq!(bodies, ["hyper POST /d 3", "hyper GET /e 0"]);
    running.stop.stop();
    assert!(running.task.await.unwrap());
}

#[tokio::test]
async fn a_head_response_has_the_length_and_no_body() {
    let running = start(Duration::from_secs(10)).await;
    let text = exchange(
        running.addr,
        b"HEAD /x HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    // What `GET /x` would have: `own HEAD /x`.
    assert!(text.contains("content-length: 11\r\n"), "{text}");
    assert!(text.contains("connection: close\r\n"), "{text}");
    assert!(text.ends_with("\r\n\r\n"), "no body: {text}");
}

#[tokio::test]
async fn http_1_0_is_answered_in_1_0_and_closed_unless_kept_alive() {
    let running = start(Duration::from_secs(10)).await;
    let text = exchange(running.addr, b"GET /old HTTP/1.0\r\n\r\n").await;
    assert!(text.starts_with("HTTP/1.0 200 OK\r\n"), "{text}");
    assert!(text.ends_with("own GET /old"), "{text}");

    let mut stream = send(
        running.addr,
        b"GET /kept HTTP/1.0\r\nconnection: keep-alive\r\n\r\n",
    )
    .await;
    assert_eq!(read_responses(&mut stream, 1).await, ["own GET /kept"]);
    stream
        .write_all(b"GET /again HTTP/1.0\r\n\r\n")
        .await
        .unwrap();
    // Kept alive once; this one is not, and the connection closes after it.
    let text = read_to_close(&mut stream).await;
    assert!(!text.contains("keep-alive"), "{text}");
    assert!(text.ends_with("own GET /again"), "{text}");
}

#[tokio::test]
async fn a_body_of_unknown_length_is_chunked_with_its_announced_trailers_for_a_client_that_takes_them()
 {
    let running = start(Duration::from_secs(10)).await;
    let text = exchange(
        running.addr,
        b"GET /chunked HTTP/1.1\r\nhost: t\r\nte: trailers\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(text.contains("transfer-encoding: chunked\r\n"), "{text}");
    assert!(
        text.ends_with("\r\n\r\n6\r\nhello \r\n5\r\nworld\r\n0\r\nx-sum: 9\r\n\r\n"),
        "{text}"
    );
    // Without `TE: trailers` they are left out.
    let text = exchange(
        running.addr,
        b"GET /chunked HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(text.ends_with("world\r\n0\r\n\r\n"), "{text}");
}

#[tokio::test]
async fn a_request_is_given_up_when_its_client_closes() {
    let running = start(Duration::from_secs(10)).await;
    let mut stream = send(running.addr, b"GET /hold HTTP/1.1\r\nhost: t\r\n\r\n").await;
    running.answers.arrived.notified().await;
    stream.shutdown().await.unwrap();
    let dropped = Arc::clone(&running.answers.dropped);
    test_support::eventually("the request given up", Duration::from_secs(10), || {
        dropped.load(Ordering::SeqCst).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_drain_lets_the_response_in_flight_finish_then_closes() {
    let running = start(Duration::from_secs(10)).await;
    let mut stream = send(running.addr, b"GET /hold HTTP/1.1\r\nhost: t\r\n\r\n").await;
    running.answers.arrived.notified().await;
    running.stop.stop();
    running.answers.release.notify_one();
    let text = read_to_close(&mut stream).await;
    assert!(text.contains("connection: close\r\n"), "{text}");
    assert!(text.ends_with("held"), "{text}");
    assert!(running.task.await.unwrap(), "every connection finished");
}

#[tokio::test(start_paused = true)]
async fn an_idle_keep_alive_connection_closes_after_the_header_read_timeout() {
    let running = start(Duration::from_secs(5)).await;
    let mut stream = send(running.addr, b"GET /one HTTP/1.1\r\nhost: t\r\n\r\n").await;
    assert_eq!(read_responses(&mut stream, 1).await, ["own GET /one"]);
    // Then nothing: the connection is closed once the timeout has passed.
    let text = read_to_close(&mut stream).await;
    assert_eq!(text, "");
}

#[tokio::test]
async fn pipelined_requests_then_a_half_close_are_all_answered() {
    let running = start(Duration::from_secs(10)).await;
    let mut stream = send(
        running.addr,
        b"GET /hold HTTP/1.1\r\nhost: t\r\n\r\nGET /b HTTP/1.1\r\nhost: t\r\n\r\n",
    )
    .await;
    stream.shutdown().await.unwrap();
    running.answers.arrived.notified().await;
    running.answers.release.notify_one();
    let text = read_to_close(&mut stream).await;
    assert!(text.contains("\r\n\r\nheld"), "{text}");
    assert!(text.ends_with("own GET /b"), "{text}");
    assert!(!running.answers.dropped.load(Ordering::SeqCst));
}

#[tokio::test]
async fn a_101_ends_the_connection_and_another_1xx_becomes_a_500() {
    let running = start(Duration::from_secs(10)).await;
    // Whatever follows a 101 is not HTTP: the connection closes after it, unread.
    let text = exchange(
        running.addr,
        b"GET /switch HTTP/1.1\r\nhost: t\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: t\r\n\r\n",
    )
    .await;
    assert!(
        text.starts_with("HTTP/1.1 101 Switching Protocols\r\n"),
        "{text}"
    );
    assert!(!text.contains("smuggled"), "{text}");
    assert_eq!(text.matches("HTTP/1.1").count(), 1, "{text}");

    let text = exchange(running.addr, b"GET /early HTTP/1.1\r\nhost: t\r\n\r\n").await;
    assert!(
        text.starts_with("HTTP/1.1 500 Internal Server Error\r\n"),
        "{text}"
    );
    assert!(text.contains("connection: close\r\n"), "{text}");
}

#[tokio::test]
async fn a_drain_closes_a_connection_with_a_head_only_begun() {
    let running = start(Duration::from_secs(60)).await;
    let mut stream = send(running.addr, b"GET /one HTTP/1.1\r\nhost: t\r\n\r\n").await;
    assert_eq!(read_responses(&mut stream, 1).await, ["own GET /one"]);
    stream.write_all(b"GET /two HTTP/1.1\r\nho").await.unwrap();
    running.stop.stop();
    // Closed well before the header-read timeout (60 s), with nothing sent: a plain close,
    // or a reset if the begun head was still unread when the socket closed.
    let mut rest = Vec::new();
    match tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest))
        .await
        .expect("closed within the bound")
    {
        Ok(_) => assert_eq!(rest, b""),
        Err(error) => assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset),
    }
    assert!(running.task.await.unwrap(), "every connection finished");
}

/// What [`Spy`] connections saw.
#[derive(Default)]
struct Counts {
    /// Times a connection was told its next write is its last.
    told: AtomicUsize,
    /// Connections that ended.
    ended: AtomicUsize,
    /// Connections that ended in the runtime's event loop (they had to wait once).
    joined: AtomicUsize,
}

/// A connection that counts into [`Counts`].
struct Spy {
    inner: crate::Stream,
    counts: Arc<Counts>,
}

impl Drop for Spy {
    fn drop(&mut self) {
        if self.inner.is_registered() {
            self.counts.joined.fetch_add(1, Ordering::SeqCst);
        }
        self.counts.ended.fetch_add(1, Ordering::SeqCst);
    }
}

impl tokio::io::AsyncRead for Spy {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Spy {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl Transport for Spy {
    fn last_write(&self) {
        self.counts.told.fetch_add(1, Ordering::SeqCst);
        self.inner.last_write();
    }

    fn in_event_loop(&self) -> bool {
        self.inner.in_event_loop()
    }
}

/// A server on the own path whose connections are [`Spy`]s.
async fn start_spied() -> (
    SocketAddr,
    Stop,
    Answers,
    Arc<Counts>,
    tokio::task::JoinHandle<bool>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = HttpServer::new("test", Limits::control());
    let (stop, answers, counts) = (Stop::new(), Answers::default(), Arc::new(Counts::default()));
    let (shutdown, service, spied) = (stop.shutdown(), answers.clone(), Arc::clone(&counts));
    let task = tokio::spawn(async move {
        server
            .serve_bodiless(listener, &shutdown, |inner, _| {
                let counts = Arc::clone(&spied);
                (Spy { inner, counts }, service.clone())
            })
            .await
    });
    (addr, stop, answers, counts, task)
}

/// Waits until `count` connections have ended.
async fn ended(counts: &Counts, count: usize) {
    test_support::eventually("the connections ended", Duration::from_secs(10), || {
        (counts.ended.load(Ordering::SeqCst) >= count).then_some(())
    })
    .await;
}

#[tokio::test]
async fn only_the_response_before_the_close_is_held_for_the_fin() {
    let (addr, stop, _, counts, task) = start_spied().await;
    let told = || counts.told.load(Ordering::SeqCst);

    // Two kept alive, then the last: only that one is held for the close.
    let text = exchange(
        addr,
        b"GET /a HTTP/1.1\r\nhost: t\r\n\r\nGET /b HTTP/1.1\r\nhost: t\r\n\r\nGET /c HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(text.matches("HTTP/1.1 200 OK\r\n").count(), 3, "{text}");
    assert!(text.ends_with("own GET /c"), "{text}");
    assert_eq!(told(), 1);

    // HTTP/1.0 without keep-alive closes after its one response.
    let text = exchange(addr, b"GET /d HTTP/1.0\r\n\r\n").await;
    assert!(text.ends_with("own GET /d"), "{text}");
    assert_eq!(told(), 2);

    // A connection the client closes between requests was never told.
    let mut kept = send(addr, b"GET /e HTTP/1.1\r\nhost: t\r\n\r\n").await;
    assert_eq!(read_responses(&mut kept, 1).await, ["own GET /e"]);
    drop(kept);
    stop.stop();
    assert!(task.await.unwrap());
    assert_eq!(told(), 2);
}

#[tokio::test]
async fn a_connection_answered_without_waiting_never_joins_the_event_loop() {
    let (addr, stop, answers, counts, task) = start_spied().await;
    let joined = || counts.joined.load(Ordering::SeqCst);

    // Its request comes with it (the listener hands it over with its first bytes) and is
    // answered soon, as a nearby worker answers: the client is not watched meanwhile, and
    // the connection never waits, so it is never registered.
    let text = exchange(
        addr,
        b"GET /soon HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(text.ends_with("soon"), "{text}");
    ended(&counts, 1).await;
    assert_eq!(joined(), 0);

    // An answer that takes longer than the watch's grace: the client is watched, which
    // takes the connection into the event loop, and its leaving is seen.
    let mut held = send(addr, b"GET /hold HTTP/1.1\r\nhost: t\r\n\r\n").await;
    answers.arrived.notified().await;
    tokio::time::sleep(super::WATCH_AFTER * 5).await;
    held.shutdown().await.unwrap();
    ended(&counts, 2).await;
    assert!(
        answers.dropped.load(Ordering::SeqCst),
        "the request was given up"
    );
    assert_eq!(joined(), 1);

    // A kept-alive connection waits for its next request, in the event loop.
    let mut kept = send(addr, b"GET /b HTTP/1.1\r\nhost: t\r\n\r\n").await;
    assert_eq!(read_responses(&mut kept, 1).await, ["own GET /b"]);
    kept.write_all(b"GET /c HTTP/1.1\r\nhost: t\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_responses(&mut kept, 1).await, ["own GET /c"]);
    drop(kept);
    ended(&counts, 3).await;
    assert_eq!(joined(), 2);
    stop.stop();
    assert!(task.await.unwrap());
}
