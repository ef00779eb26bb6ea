//! The balancer's admin listener on a real loopback socket: what it serves, what it asks of a
//! request when it has a token, and the limits of a control listener (`lifecycle::Limits::control`) that keep it reachable under abuse — at
//! most 64 connections, 10 s to send a request head, 60 s per connection.
//!
//! The timed tests run on tokio's paused clock, which jumps ahead whenever every task waits,
//! so a 60 s limit is checked exactly and at once.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use balancer::{Balancer, Config, WorkerId};
use common::{WAIT, assert_ended_at};
use lifecycle::{AdminAuth, Limits, Stop, TokenFile};
use test_support::http::{exchange_async, get_async};
use test_support::{Scratch, eventually};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// A balancer's admin listener on a loopback port; stops when the returned `Stop` drops.
async fn admin(balancer: &Balancer) -> (SocketAddr, Stop) {
    admin_with(balancer, AdminAuth::open()).await
}

/// [`admin`], asking `auth` of each request.
async fn admin_with(balancer: &Balancer, auth: AdminAuth) -> (SocketAddr, Stop) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let stop = Stop::new();
    let (serving, shutdown) = (balancer.clone(), stop.shutdown());
    tokio::spawn(async move { serving.serve_admin(listener, auth, shutdown).await });
    (addr, stop)
}

/// The admin listener of a balancer with the default configuration and no workers.
async fn default_admin() -> (SocketAddr, Stop) {
    admin(&Balancer::new(Config::default()).expect("valid config")).await
}

/// Reads until the server closes the connection.
async fn until_closed(stream: &mut TcpStream) {
    let mut buf = [0u8; 4096];
    while stream.read(&mut buf).await.unwrap_or(0) > 0 {}
}

/// Sends one keep-alive request and reads its whole (small) answer; `false` once the server
/// has closed the connection.
async fn keep_alive_request(stream: &mut TcpStream) -> bool {
    let head = b"GET /metrics HTTP/1.1\r\nhost: admin\r\n\r\n";
    if stream.write_all(head).await.is_err() {
        return false;
    }
    let mut answer = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
        }
        let text = String::from_utf8_lossy(&answer);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .and_then(|n| n.parse::<usize>().ok());
            if length.is_some_and(|length| body.len() >= length) {
                return true;
            }
        }
    }
}

/// Connections waiting in the kernel's accept queue of the listening socket at `addr`, as
/// `/proc/net/tcp` shows them (its `rx_queue` column, for a socket in state LISTEN).
fn accept_queue(addr: SocketAddr) -> usize {
    let local = format!("0100007F:{:04X}", addr.port());
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    table
        .lines()
        .skip(1)
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .find(|fields| fields.get(1) == Some(&local.as_str()) && fields.get(3) == Some(&"0A"))
        .and_then(|fields| fields.get(4)?.split_once(':').map(|(_, rx)| rx.to_owned()))
        .and_then(|rx| usize::from_str_radix(&rx, 16).ok())
        .expect("the listening socket in /proc/net/tcp")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_each_workers_typed_id() {
    let balancer = Balancer::new(Config::default()).expect("valid config");
    let pool = balancer.pool();
    let on_a_host = WorkerId::new("host-a", "clone-1");
    pool.add_worker(on_a_host, "127.0.0.1:9".parse().expect("address"))
        .expect("new");
    pool.add_worker("127.0.0.1:10", "127.0.0.1:10".parse().expect("address"))
        .expect("new");
    let (addr, _stop) = admin(&balancer).await;
    let reply = get_async(addr, "/status").await;
    assert_eq!(reply.status, 200);
    let status: serde_json::Value = serde_json::from_str(&reply.body).expect("JSON");
    let workers = &status["workers"];
    assert_eq!(workers[0]["id"], "clone-1@host-a");
    assert_eq!(workers[0]["host"], "host-a");
    assert_eq!(workers[0]["clone"], "clone-1");
    assert_eq!(workers[1]["id"], "127.0.0.1:10");
    assert_eq!(workers[1]["host"], "");
    assert_eq!(workers[1]["clone"], "127.0.0.1:10");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_holds_connections_over_its_cap_in_the_kernel_queue() {
    let cap = Limits::control()
        .max_connections
        .expect("control listeners have a cap");
    let (addr, _stop) = default_admin().await;
    let mut open = Vec::new();
    for _ in 0..cap {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        assert!(keep_alive_request(&mut stream).await, "served");
        open.push(stream);
    }
    // One more is accepted by the kernel but not by the listener...
    let mut over = TcpStream::connect(addr).await.expect("connect");
    let answered = tokio::spawn(async move { keep_alive_request(&mut over).await });
    eventually("a connection waiting in the accept queue", WAIT, || {
        (accept_queue(addr) == 1).then_some(())
    })
    .await;
    assert!(
        !answered.is_finished(),
        "a connection over the cap was served"
    );
    // ...until one of the others closes.
    drop(open.pop());
    let served = tokio::time::timeout(WAIT, answered)
        .await
        .expect("the waiting connection is served once one closes");
    assert!(served.expect("task"));
    assert_eq!(accept_queue(addr), 0);
}

#[tokio::test(start_paused = true)]
async fn the_admin_listener_closes_a_client_that_sends_no_head_after_ten_seconds() {
    let limit = Limits::control().header_read_timeout;
    let (addr, _stop) = default_admin().await;
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(b"GET /metr").await.expect("write");
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(3600), until_closed(&mut stream))
        .await
        .expect("the admin listener kept a client that never finished its head");
    assert_ended_at("closed", started.elapsed(), limit, Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn the_admin_listener_ends_a_busy_connection_after_sixty_seconds() {
    let life = Limits::control()
        .connection_lifetime
        .expect("control listeners bound a connection's life");
    let (addr, _stop) = default_admin().await;
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let started = Instant::now();
    // A request every second, for as long as the connection lasts (an hour at most).
    let ended = tokio::time::timeout(Duration::from_secs(3600), async {
        while keep_alive_request(&mut stream).await {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    ended
        .await
        .expect("the admin listener kept a connection for an hour");
    assert_ended_at("ended", started.elapsed(), life, Duration::from_secs(2));
}

/// `GET path` with `Authorization: Bearer <token>` when given: the status, the
/// `WWW-Authenticate` header and the body.
async fn get_as(
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
) -> (u16, Option<String>, String) {
    let bearer = token.map(|token| format!("Bearer {token}"));
    let headers: Vec<(&str, &str)> = bearer
        .iter()
        .map(|b| ("Authorization", b.as_str()))
        .collect();
    let reply = exchange_async(addr, "GET", path, &headers, b"").await;
    let challenge = reply.header("www-authenticate").map(str::to_owned);
    (reply.status, challenge, reply.body)
}

/// The value of the sample `series` on `/metrics`, read with `token`.
async fn metric(addr: SocketAddr, series: &str, token: &str) -> f64 {
    let (_, _, text) = get_as(addr, "/metrics", Some(token)).await;
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in /metrics:\n{text}"))
}

/// A token file holding `token` (and a newline) in `scratch`.
fn token_file(scratch: &Scratch, token: &str) -> TokenFile {
    let path = scratch.join("admin-token");
    std::fs::write(&path, format!("{token}\n")).expect("write the token file");
    TokenFile::load(path).expect("a valid token file")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_admin_endpoints_answer_only_the_right_bearer() {
    let scratch = Scratch::new("balancer-admin-token");
    let balancer = Balancer::new(Config::default()).expect("valid config");
    let auth = AdminAuth::token(token_file(&scratch, "s3cret-admin"));
    let (addr, _stop) = admin_with(&balancer, auth).await;
    for path in ["/status", "/metrics", "/nothing-here"] {
        let (status, challenge, body) = get_as(addr, path, None).await;
        assert_eq!(status, 401, "{path} without a token: {body}");
        assert_eq!(challenge.as_deref(), Some(r#"Bearer realm="squall""#));
        assert!(body.contains("Authorization: Bearer"), "{body}");
        let (status, challenge, _) = get_as(addr, path, Some("s3cret-admi")).await;
        assert_eq!(status, 401, "{path} with a wrong token");
        assert_eq!(
            challenge.as_deref(),
            Some(r#"Bearer realm="squall", error="invalid_token""#)
        );
    }
    let (status, _, body) = get_as(addr, "/status", Some("s3cret-admin")).await;
    assert_eq!(status, 200);
    let status: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert!(status["workers"].is_array(), "{status}");
    assert_eq!(
        get_as(addr, "/nothing-here", Some("s3cret-admin")).await.0,
        404
    );
    // Probes need no token, and learn nothing.
    assert_eq!(
        get_as(addr, "/healthz", None).await,
        (200, None, "ok\n".to_owned())
    );
    // Six refusals above, each counted.
    let refused = metric(addr, "squall_admin_unauthorized_total", "s3cret-admin").await;
    assert_eq!(refused, 6.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_metrics_open_only_metrics_needs_no_token() {
    let scratch = Scratch::new("balancer-admin-metrics-open");
    let balancer = Balancer::new(Config::default()).expect("valid config");
    let auth = AdminAuth::token(token_file(&scratch, "s3cret-admin")).metrics_open(true);
    let (addr, _stop) = admin_with(&balancer, auth).await;
    let (status, _, text) = get_as(addr, "/metrics", None).await;
    assert_eq!(status, 200);
    assert!(text.contains("squall_queue_depth 0"), "{text}");
    assert_eq!(get_as(addr, "/status", None).await.0, 401);
    assert_eq!(get_as(addr, "/status", Some("s3cret-admin")).await.0, 200);
    assert!(text.contains("squall_admin_unauthorized_total 0"), "{text}");
    let refused = metric(addr, "squall_admin_unauthorized_total", "unused").await;
    assert_eq!(refused, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_the_admin_endpoints_stay_open() {
    let (addr, _stop) = default_admin().await;
    for path in ["/status", "/metrics", "/healthz"] {
        assert_eq!(get_as(addr, path, None).await.0, 200, "{path}");
        assert_eq!(get_as(addr, path, Some("anything")).await.0, 200, "{path}");
    }
}
