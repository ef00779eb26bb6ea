//! The balancer's admin listener on a real loopback socket: what it serves, and the limits of
//! a control listener (`lifecycle::Limits::control`) that keep it reachable under abuse — at
//! most 64 connections, 10 s to send a request head, 60 s per connection.
//!
//! The timed tests run on tokio's paused clock, which jumps ahead whenever every task waits,
//! so a 60 s limit is checked exactly and at once.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use balancer::{Balancer, Config, WorkerId};
use common::{WAIT, assert_ended_at};
use lifecycle::{Limits, Stop};
use test_support::eventually;
use test_support::http::get_async;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// A balancer's admin listener on a loopback port; stops when the returned `Stop` drops.
async fn admin(balancer: &Balancer) -> (SocketAddr, Stop) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let stop = Stop::new();
    let (serving, shutdown) = (balancer.clone(), stop.shutdown());
    tokio::spawn(async move { serving.serve_admin(listener, shutdown).await });
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
