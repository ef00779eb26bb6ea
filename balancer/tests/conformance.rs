//! HTTP conformance of the balancer's front, with requests written by hand: what RFC 9112
//! asks a server to refuse is refused, and what it allows is forwarded.
#![allow(clippy::unwrap_used)] // In tests a panic is a failed test, which is the point.

mod common;

use balancer::Config;
use common::Running;
use tokio::io::AsyncReadExt;

/// Sends `request` on a new connection and returns the answer's status line.
async fn status_line(running: &Running, request: &str) -> String {
    let mut stream = running.send_raw(request.as_bytes()).await;
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    while !answer.ends_with(b"\r\n") {
        if stream.read(&mut byte).await.expect("read") == 0 {
            break;
        }
        answer.push(byte[0]);
    }
    String::from_utf8_lossy(&answer).trim_end().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_header_missing_from_http_1_1_or_repeated_is_a_bad_request() {
    let (_worker, running) = Running::with_one_worker(Config::default()).await;
    // RFC 9112 §3.2: an HTTP/1.1 request without Host, or any request with two, gets 400.
    for request in [
        "GET / HTTP/1.1\r\nConnection: close\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\nConnection: close\r\n\r\n",
        "GET / HTTP/1.0\r\nHost: a.example\r\nHost: b.example\r\n\r\n",
    ] {
        let line = status_line(&running, request).await;
        assert!(line.ends_with(" 400 Bad Request"), "{request:?}: {line}");
    }
    // One Host, or none in HTTP/1.0, is forwarded.
    for request in [
        "GET / HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n",
        "GET / HTTP/1.0\r\n\r\n",
    ] {
        let line = status_line(&running, request).await;
        assert!(line.ends_with(" 200 OK"), "{request:?}: {line}");
    }
    running.shutdown().await;
}
