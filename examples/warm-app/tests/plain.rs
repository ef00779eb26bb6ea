//! warm-app as a plain server: it serves from its cache, and never serves more than
//! `--concurrency` requests at once.
// A panic anywhere here is a failed test.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};

struct App(Child);

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(args: &[&str]) -> (App, SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_warm-app"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--warmup-ms",
            "0",
            "--cache-mib",
            "1",
        ])
        .args(args)
        .env_remove("PORT")
        .env_remove("SQUALL_ZYGOTE")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let app = App(child);
    let line = lines.next().unwrap().unwrap();
    let addr = line
        .strip_prefix("warm-app listening on ")
        .unwrap()
        .parse()
        .unwrap();
    (app, addr)
}

fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response[9..12].parse().unwrap();
    (
        status,
        response.split_once("\r\n\r\n").unwrap().1.to_owned(),
    )
}

#[test]
fn serves_at_most_its_concurrency_at_once() {
    let (_app, addr) = start(&["--service-ms", "300", "--concurrency", "2"]);
    let requests: Vec<_> = (0..6)
        .map(|_| std::thread::spawn(move || get(addr, "/")))
        .collect();
    for request in requests {
        let (status, body) = request.join().unwrap();
        assert_eq!(status, 200);
        assert!(body.starts_with("plain "), "{body}");
    }
    let (_, stats) = get(addr, "/stats");
    assert_eq!(stats, "served 6\nbusy 0\npeak_busy 2\n");
}

#[test]
fn unknown_paths_are_404_and_health_is_200() {
    let (_app, addr) = start(&[]);
    assert_eq!(get(addr, "/healthz"), (200, "ok\n".to_owned()));
    assert_eq!(get(addr, "/nope").0, 404);
}

#[test]
fn slow_takes_as_long_as_asked_and_refuses_the_unbounded() {
    let (_app, addr) = start(&[]);
    let started = std::time::Instant::now();
    assert_eq!(
        get(addr, "/slow?ms=300"),
        (200, "slept 300 ms\n".to_owned())
    );
    assert!(started.elapsed() >= std::time::Duration::from_millis(300));
    for bad in ["/slow", "/slow?ms=60001", "/slow?ms=x", "/slow?s=1"] {
        assert_eq!(get(addr, bad).0, 400, "{bad}");
    }
}
