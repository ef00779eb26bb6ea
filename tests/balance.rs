//! End-to-end tests of `squall balance`: the real binary on port 0 in front of a worker
//! served by the test, talked to over HTTP (and HTTPS, with curl), stopped with SIGTERM.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio::sync::Semaphore;

/// A worker that answers `hello from the worker`, and on `/hold` waits for a permit.
struct Worker {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    gate: Arc<Semaphore>,
}

async fn start_worker() -> Worker {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let hits = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Semaphore::new(0));
    let (server_hits, server_gate) = (Arc::clone(&hits), Arc::clone(&gate));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (hits, gate) = (Arc::clone(&server_hits), Arc::clone(&server_gate));
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                    let (hits, gate) = (Arc::clone(&hits), Arc::clone(&gate));
                    async move {
                        hits.fetch_add(1, Ordering::SeqCst);
                        if request.uri().path() == "/hold" {
                            gate.acquire().await.expect("open").forget();
                        }
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(
                            "hello from the worker",
                        ))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Worker { addr, hits, gate }
}

/// The running binary and the addresses it announced.
struct Squall {
    child: Child,
    listen: SocketAddr,
    admin: SocketAddr,
}

async fn start_squall(worker: SocketAddr) -> Squall {
    start_squall_with(worker, &[]).await
}

/// `squall balance` in front of `worker`, with `more` arguments.
async fn start_squall_with(worker: SocketAddr, more: &[&str]) -> Squall {
    let mut child = Command::new(env!("CARGO_BIN_EXE_squall"))
        .args([
            "balance",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
        ])
        .args(["--worker", &worker.to_string()])
        .args(more)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("squall starts");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    let mut listen = None;
    let mut admin = None;
    let announced = async {
        while listen.is_none() || admin.is_none() {
            let line = lines.next_line().await.expect("read").expect("a line");
            if let Some(addr) = line.strip_prefix("listening on ") {
                listen = Some(addr.parse().expect("address"));
            } else if let Some(addr) = line.strip_prefix("admin on ") {
                admin = Some(addr.parse().expect("address"));
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), announced)
        .await
        .expect("squall announces its listeners");
    Squall {
        child,
        listen: listen.expect("listen address"),
        admin: admin.expect("admin address"),
    }
}

async fn get(url: String) -> (StatusCode, String) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    get_with(&client, url).await.1
}

/// `GET url` with `client`: the HTTP version, the status and the body.
async fn get_with(
    client: &Client<HttpConnector, Empty<Bytes>>,
    url: String,
) -> (hyper::Version, (StatusCode, String)) {
    let response = client
        .get(url.parse().expect("url"))
        .await
        .expect("response");
    let (version, status) = (response.version(), response.status());
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (
        version,
        (status, String::from_utf8_lossy(&body).into_owned()),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_and_reports_metrics_and_status() {
    let worker = start_worker().await;
    let squall = start_squall(worker.addr).await;
    for _ in 0..3 {
        let (status, body) = get(format!("http://{}/", squall.listen)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, "hello from the worker");
    }
    assert_eq!(worker.hits.load(Ordering::SeqCst), 3);

    let (status, metrics) = get(format!("http://{}/metrics", squall.admin)).await;
    assert_eq!(status, StatusCode::OK);
    for line in [
        "squall_requests_total{code=\"2xx\"} 3",
        "squall_request_duration_seconds_count 3",
        "squall_workers{state=\"ready\"} 1",
        "squall_in_flight_requests 0",
        "squall_queue_depth 0",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} missing:\n{metrics}"
        );
    }

    let (status, text) = get(format!("http://{}/status", squall.admin)).await;
    assert_eq!(status, StatusCode::OK);
    let document: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(document["workers"][0]["state"], "ready");
    assert_eq!(document["workers"][0]["addr"], worker.addr.to_string());
    assert_eq!(document["workers"][0]["responses"], 3);
    assert_eq!(document["stable"]["window_seconds"], 10.0);

    let (status, _) = get(format!("http://{}/nothing-here", squall.admin)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_clients_are_served_end_to_end() {
    let worker = start_worker().await;
    let squall = start_squall(worker.addr).await;
    // HTTP/2 with prior knowledge (h2c), as gRPC clients and h2-speaking proxies talk.
    let client = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<Empty<Bytes>>();
    for _ in 0..3 {
        let answer = get_with(&client, format!("http://{}/", squall.listen)).await;
        let hello = (StatusCode::OK, "hello from the worker".to_owned());
        assert_eq!(answer, (hyper::Version::HTTP_2, hello));
    }
    // The worker itself speaks HTTP/1.1 only; the balancer translated every request.
    assert_eq!(worker.hits.load(Ordering::SeqCst), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_requests_and_exits_zero() {
    let worker = start_worker().await;
    let mut squall = start_squall(worker.addr).await;
    let held = tokio::spawn(get(format!("http://{}/hold", squall.listen)));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while worker.hits.load(Ordering::SeqCst) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "request never arrived"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let pid = squall.child.id().expect("running").to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status().await;
    assert!(killed.expect("kill runs").success());
    // It stops accepting new connections while the held request is still in flight.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(squall.listen).await.is_ok() {
        assert!(tokio::time::Instant::now() < deadline, "still accepting");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    worker.gate.add_permits(1);
    let (status, body) = held.await.expect("held request");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "hello from the worker");
    let exit = tokio::time::timeout(Duration::from_secs(20), squall.child.wait())
        .await
        .expect("squall exits")
        .expect("exit status");
    assert!(exit.success(), "{exit}");
}

#[tokio::test]
async fn refuses_to_start_without_workers() {
    let output = Command::new(env!("CARGO_BIN_EXE_squall"))
        .args(["balance", "--listen", "127.0.0.1:0"])
        .output()
        .await
        .expect("squall runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--worker"), "{stderr}");
}

#[tokio::test]
async fn tls_flags_come_in_pairs_and_an_unusable_file_is_named() {
    let squall = |args: Vec<String>| async move {
        let output = Command::new(env!("CARGO_BIN_EXE_squall"))
            .args([
                "balance",
                "--listen",
                "127.0.0.1:0",
                "--worker",
                "127.0.0.1:9",
            ])
            .args(args)
            .output()
            .await
            .expect("squall runs");
        assert!(!output.status.success(), "squall started");
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let dir = test_support::Scratch::new("balance-tls");
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(
        &cert,
        "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n",
    )
    .expect("write");
    let stderr = squall(vec!["--tls-cert".into(), cert.display().to_string()]).await;
    assert!(stderr.contains("--tls-key"), "{stderr}");
    let stderr = squall(vec!["--tls-key".into(), key.display().to_string()]).await;
    assert!(stderr.contains("--tls-cert"), "{stderr}");
    let both = vec![
        "--tls-cert".into(),
        cert.display().to_string(),
        "--tls-key".into(),
        key.display().to_string(),
    ];
    let stderr = squall(both).await;
    assert!(
        stderr.contains(&format!("{} is not valid PEM", cert.display())),
        "{stderr}"
    );
}

/// A self-signed certificate for `localhost`, in PEM, and its key.
fn self_signed(name: &str) -> (String, String) {
    let mut params =
        rcgen::CertificateParams::new(vec!["localhost".to_owned()]).expect("valid name");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let key = rcgen::KeyPair::generate().expect("a key");
    let cert = params.self_signed(&key).expect("a certificate");
    (cert.pem(), key.serialize_pem())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_https_and_takes_a_new_certificate_from_the_files() {
    if tokio::process::Command::new("curl")
        .arg("--version")
        .output()
        .await
        .is_err()
    {
        println!("skipped: curl is not installed (scripts/install-deps installs it)");
        return;
    }
    let worker = start_worker().await;
    let dir = test_support::Scratch::new("balance-https");
    let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    let (first, second) = (self_signed("first"), self_signed("second"));
    for (name, pair) in [("first", &first), ("second", &second)] {
        std::fs::write(dir.join(format!("{name}.pem")), &pair.0).expect("write");
    }
    std::fs::write(&cert, &first.0).expect("write");
    std::fs::write(&key, &first.1).expect("write");
    let (cert_arg, key_arg) = (cert.display().to_string(), key.display().to_string());
    let mut squall = start_squall_with(
        worker.addr,
        &["--tls-cert", &cert_arg, "--tls-key", &key_arg],
    )
    .await;
    let port = squall.listen.port();
    // curl trusting one certificate only: the request succeeds while it is the one served.
    let curl = |trusted: &str| {
        let trusted = dir.join(format!("{trusted}.pem"));
        let resolve = format!("localhost:{port}:127.0.0.1");
        let url = format!("https://localhost:{port}/");
        async move {
            tokio::process::Command::new("curl")
                .args(["--silent", "--show-error", "--http2", "--cacert"])
                .arg(trusted)
                .args(["--resolve", &resolve, &url])
                .output()
                .await
                .expect("curl runs")
        }
    };
    let out = curl("first").await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from the worker"
    );
    assert!(
        !curl("second").await.status.success(),
        "an untrusted certificate passed"
    );

    // The files change (as a renewal writes them): new connections get the new pair.
    std::fs::write(&key, &second.1).expect("write");
    std::fs::write(&cert, &second.0).expect("write");
    test_support::eventually_async(
        "the new certificate to be served",
        Duration::from_secs(20),
        || async { curl("second").await.status.success().then_some(()) },
    )
    .await;
    squall.child.start_kill().expect("kill");
    let _ = squall.child.wait().await;
}

/// The CPUs in a kernel CPU list such as `0-2,5`.
fn cpu_list(list: &str) -> Vec<usize> {
    let number = |n: &str| n.parse::<usize>().expect("a CPU number");
    list.trim()
        .split(',')
        .flat_map(|part| match part.split_once('-') {
            Some((first, last)) => (number(first)..=number(last)).collect::<Vec<_>>(),
            None => vec![number(part)],
        })
        .collect()
}

/// The CPUs each serving thread of `pid` may run on, by thread name, once it has `threads`
/// of them.
async fn serving_threads_cpus(pid: u32, threads: usize) -> Vec<(String, Vec<usize>)> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mut serving = Vec::new();
        for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("tasks") {
            let path = task.expect("task").path();
            let (Ok(name), Ok(status)) = (
                std::fs::read_to_string(path.join("comm")),
                std::fs::read_to_string(path.join("status")),
            ) else {
                continue; // a thread that has just ended
            };
            if !name.starts_with("squall-serve-") {
                continue;
            }
            let list = status
                .lines()
                .find_map(|line| line.strip_prefix("Cpus_allowed_list:"))
                .expect("Cpus_allowed_list");
            serving.push((name.trim().to_owned(), cpu_list(list)));
        }
        if serving.len() == threads {
            serving.sort();
            return serving;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} serving threads, not {threads}",
            serving.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serving_threads_get_cpus_of_their_own_unless_told_otherwise() {
    let allowed = kernel::allowed_cpus().expect("sched_getaffinity");
    if allowed.len() < 2 {
        eprintln!("skipped: this process may use {allowed:?}, and spreading needs two CPUs");
        return;
    }
    let worker = start_worker().await;
    let threads = allowed.len().to_string();
    let squall = start_squall_with(worker.addr, &["--threads", &threads]).await;
    let pid = squall.child.id().expect("running");
    let spread = serving_threads_cpus(pid, allowed.len()).await;
    // One CPU each, all different: every allowed CPU has exactly one serving thread.
    let mut dealt: Vec<usize> = spread.iter().flat_map(|(_, cpus)| cpus.clone()).collect();
    assert!(spread.iter().all(|(_, cpus)| cpus.len() == 1), "{spread:?}");
    dealt.sort_unstable();
    assert_eq!(dealt, allowed, "{spread:?}");
    let (status, body) = get(format!("http://{}/", squall.listen)).await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, "hello from the worker")
    );

    // More threads than CPUs, or `--cpus any`: the kernel places them, anywhere allowed.
    let more = (allowed.len() + 1).to_string();
    for (args, threads) in [
        (vec!["--threads", &threads, "--cpus", "any"], allowed.len()),
        (vec!["--threads", &more], allowed.len() + 1),
    ] {
        let squall = start_squall_with(worker.addr, &args).await;
        let pid = squall.child.id().expect("running");
        for (name, cpus) in serving_threads_cpus(pid, threads).await {
            assert_eq!(cpus, allowed, "{name} with {args:?}");
        }
        let (status, _) = get(format!("http://{}/", squall.listen)).await;
        assert_eq!(status, StatusCode::OK);
    }
}
