//! The accept loop on real sockets: limits, timeouts, drains and shutdowns.

use std::convert::Infallible;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use super::*;

use crate::Stop;

/// Requests to `/hold` tell `arrived`, then wait for `release`.
#[derive(Default)]
struct Hold {
    arrived: Notify,
    release: Notify,
}

/// A server under test, serving on a loopback port until `stop` is stopped or dropped.
struct Running {
    addr: SocketAddr,
    /// The task serving, which yields `serve`'s result.
    task: tokio::task::JoinHandle<bool>,
    stop: Stop,
    /// What holds its requests to `/hold`.
    hold: Arc<Hold>,
}

async fn start(limits: Limits) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = HttpServer::new("test", limits);
    let (stop, hold) = (Stop::new(), Arc::new(Hold::default()));
    let (shutdown, held) = (stop.shutdown(), Arc::clone(&hold));
    let task = tokio::spawn(async move {
        server
            .serve(listener, &shutdown, |stream, _| {
                let hold = Arc::clone(&held);
                let service = service_fn(move |request: Request<Incoming>| {
                    let hold = Arc::clone(&hold);
                    async move {
                        if request.uri().path() == "/hold" {
                            hold.arrived.notify_one();
                            hold.release.notified().await;
                        }
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("ok"))))
                    }
                });
                (stream, service)
            })
            .await
    });
    Running {
        addr,
        task,
        stop,
        hold,
    }
}

fn limits() -> Limits {
    Limits {
        drain_timeout: Duration::from_secs(10),
        ..Limits::control()
    }
}

/// Sends one HTTP/1.1 request on `stream` and reads the response head's status line.
async fn request(stream: &mut TcpStream, path: &str) -> String {
    let head = format!("GET {path} HTTP/1.1\r\nhost: t\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 1024];
    let n = stream.read(&mut buf).await.unwrap();
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .unwrap_or("")
        .to_owned()
}

/// Reads until the server closes the connection; how long that took.
async fn closed_after(stream: &mut TcpStream) -> Duration {
    let start = Instant::now();
    let mut buf = [0u8; 1024];
    while stream.read(&mut buf).await.unwrap_or(0) > 0 {}
    start.elapsed()
}

#[tokio::test]
async fn a_full_listener_takes_the_next_connection_only_when_one_closes() {
    let limits = Limits {
        max_connections: Some(2),
        ..limits()
    };
    let server = start(limits).await;
    let mut first = TcpStream::connect(server.addr).await.unwrap();
    let mut second = TcpStream::connect(server.addr).await.unwrap();
    assert!(request(&mut first, "/").await.contains("200"));
    assert!(request(&mut second, "/").await.contains("200"));
    // The third is queued by the kernel, not served: its request gets no answer while the
    // other two stay open...
    let mut third = TcpStream::connect(server.addr).await.unwrap();
    let waiting = tokio::time::timeout(Duration::from_millis(500), request(&mut third, "/"));
    assert!(waiting.await.is_err(), "a third connection was served");
    // ...and is served as soon as one of them closes.
    drop(first);
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(10), third.read(&mut buf))
        .await
        .expect("the queued connection was never served")
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("200"));
}

#[tokio::test]
async fn a_client_that_sends_no_whole_head_is_closed_after_the_header_timeout() {
    let limits = Limits {
        header_read_timeout: Duration::from_millis(300),
        ..limits()
    };
    let server = start(limits).await;
    // One client starts a head and stops; the other sends nothing at all.
    for (client, sent) in [
        ("an idle client", &b"GET / HT"[..]),
        ("a silent client", b""),
    ] {
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        stream.write_all(sent).await.unwrap();
        let took = tokio::time::timeout(Duration::from_secs(10), closed_after(&mut stream))
            .await
            .unwrap_or_else(|_| panic!("{client} was never closed"));
        assert!(
            took >= Duration::from_millis(250),
            "{client} closed after {took:?}"
        );
    }
    // A client that speaks in time is served as usual, HTTP/1 or HTTP/2.
    let mut prompt = TcpStream::connect(server.addr).await.unwrap();
    assert!(request(&mut prompt, "/").await.contains("200"));
}

#[tokio::test]
async fn a_busy_connection_ends_at_the_end_of_its_life() {
    let limits = Limits {
        connection_lifetime: Some(Duration::from_millis(500)),
        ..limits()
    };
    let server = start(limits).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let start = Instant::now();
    // Keep it busy: a request every 50 ms until the server closes it.
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let head = "GET / HTTP/1.1\r\nhost: t\r\n\r\n";
            if stream.write_all(head.as_bytes()).await.is_err() {
                break;
            }
            let mut buf = [0u8; 1024];
            if stream.read(&mut buf).await.unwrap_or(0) == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    ended.await.expect("the connection outlived its life");
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(450), "ended after {took:?}");
}

#[tokio::test]
async fn shutdown_waits_for_a_request_in_flight_then_returns() {
    let Running {
        addr,
        task,
        stop,
        hold,
    } = start(limits()).await;
    let mut held = TcpStream::connect(addr).await.unwrap();
    held.write_all(b"GET /hold HTTP/1.1\r\nhost: t\r\n\r\n")
        .await
        .unwrap();
    hold.arrived.notified().await;
    stop.stop();
    // New connections are refused once the listener is closed...
    let refused = async {
        while TcpStream::connect(addr).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), refused)
        .await
        .expect("the listener stayed open after shutdown");
    // ...while the request in flight keeps serve from returning until it is answered: a
    // serve that did not wait would return within microseconds of the listener closing.
    let mut task = task;
    let returned = tokio::time::timeout(Duration::from_millis(500), &mut task).await;
    assert!(returned.is_err(), "serve returned with a request in flight");
    hold.release.notify_one();
    let mut buf = vec![0u8; 1024];
    let n = held.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("200 OK"));
    let drained = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("serve did not return after its last request")
        .unwrap();
    assert!(drained, "every connection finished");
}

#[tokio::test]
async fn connections_that_have_not_said_what_they_speak_do_not_hold_up_a_drain() {
    // Timeouts far longer than the test's own: only closing them at once passes.
    let limits = Limits {
        header_read_timeout: Duration::from_secs(600),
        drain_timeout: Duration::from_secs(600),
        ..limits()
    };
    let Running {
        addr, task, stop, ..
    } = start(limits).await;
    let silent = TcpStream::connect(addr).await.unwrap();
    let mut partial = TcpStream::connect(addr).await.unwrap();
    partial.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    // Answered on a later connection: the partial one before it was accepted (the kernel
    // hands connections over in order once they have sent something; the silent one waits
    // in the kernel for its first second, and must not hold up the drain either).
    let mut later = TcpStream::connect(addr).await.unwrap();
    assert!(request(&mut later, "/").await.contains("200"));
    drop(later);
    stop.stop();
    let drained = tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .expect("serve waited for connections that had sent no request")
        .unwrap();
    assert!(drained, "every connection finished");
    drop((silent, partial));
}

#[tokio::test]
async fn shutdown_gives_up_on_a_request_after_the_drain_timeout() {
    let limits = Limits {
        drain_timeout: Duration::from_millis(500),
        ..limits()
    };
    let Running {
        addr,
        task,
        stop,
        hold,
    } = start(limits).await;
    let mut held = TcpStream::connect(addr).await.unwrap();
    held.write_all(b"GET /hold HTTP/1.1\r\nhost: t\r\n\r\n")
        .await
        .unwrap();
    hold.arrived.notified().await;
    let start = Instant::now();
    stop.stop();
    let drained = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("serve never gave up")
        .unwrap();
    let took = start.elapsed();
    assert!(!drained, "the held request cannot have finished");
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(5),
        "gave up after {took:?}, against a 500 ms drain timeout"
    );
}
