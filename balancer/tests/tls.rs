//! TLS on the balancer's client-facing listener, on real loopback sockets with real clients:
//! curl over HTTP/1.1 and HTTP/2, `openssl s_client` (ALPN, and an old protocol refused),
//! and Rust clients (tokio-rustls with and without ALPN, the `h2` crate). Each test makes its
//! own certificate authority and certificates (rcgen), in files laid out as a Kubernetes
//! Secret volume lays them out, so that a reload is tested the way a cluster does it.
//!
//! A test whose tool (curl, openssl) is missing says so and passes without it;
//! `scripts/install-deps` installs both.
#![allow(clippy::unwrap_used)] // In tests a panic is a failed test, which is the point.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use balancer::{Config, TlsError, TlsFiles};
use bytes::Bytes;
use common::{Running, WAIT};
use http::{Request, StatusCode};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
    SanType, SerialNumber,
};
use rustls::pki_types::{CertificateDer, ServerName};
use test_support::{Scratch, eventually, eventually_async};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// A certificate authority of the test's own: a root, or an intermediate under one.
struct Authority {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A server certificate for `localhost` and 127.0.0.1, with its key, in PEM.
struct Leaf {
    cert: String,
    key: String,
    der: CertificateDer<'static>,
}

impl Authority {
    fn params(name: &str) -> CertificateParams {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.distinguished_name.push(DnType::CommonName, name);
        params
    }

    fn root(name: &str) -> Self {
        let issuer = CertifiedIssuer::self_signed(Self::params(name), KeyPair::generate().unwrap());
        Self {
            issuer: issuer.unwrap(),
        }
    }

    fn intermediate(&self, name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let issuer = CertifiedIssuer::signed_by(Self::params(name), key, &self.issuer);
        Self {
            issuer: issuer.unwrap(),
        }
    }

    fn der(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }

    fn leaf(&self, name: &str, serial: u64) -> Leaf {
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        params.distinguished_name.push(DnType::CommonName, name);
        params.serial_number = Some(SerialNumber::from(serial));
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
            der: cert.der().clone(),
        }
    }
}

/// A directory laid out as Kubernetes lays out a Secret volume: `tls.crt` and `tls.key` are
/// symlinks through `..data` to a directory of the version; an update writes a new version
/// and swaps `..data` in one rename.
struct SecretVolume {
    dir: Scratch,
    version: usize,
}

impl SecretVolume {
    fn new(cert: &str, key: &str) -> Self {
        let mut volume = Self {
            dir: Scratch::new("tls"),
            version: 0,
        };
        volume.update(cert, key);
        for name in ["tls.crt", "tls.key"] {
            std::os::unix::fs::symlink(Path::new("..data").join(name), volume.dir.join(name))
                .unwrap();
        }
        volume
    }

    fn update(&mut self, cert: &str, key: &str) {
        self.version += 1;
        let version = format!("..v{}", self.version);
        std::fs::create_dir(self.dir.join(&version)).unwrap();
        std::fs::write(self.dir.join(&version).join("tls.crt"), cert).unwrap();
        std::fs::write(self.dir.join(&version).join("tls.key"), key).unwrap();
        let swapping = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(&version, &swapping).unwrap();
        std::fs::rename(&swapping, self.dir.join("..data")).unwrap();
    }

    fn cert(&self) -> PathBuf {
        self.dir.join("tls.crt")
    }

    fn key(&self) -> PathBuf {
        self.dir.join("tls.key")
    }

    fn files(&self, poll: Duration) -> TlsFiles {
        TlsFiles::load(self.cert(), self.key())
            .unwrap()
            .poll_every(poll)
    }
}

/// A balancer terminating TLS with `files`, in front of one worker.
async fn start(files: TlsFiles) -> (common::TestWorker, Running) {
    let config = Config {
        tls: Some(files),
        ..Config::default()
    };
    Running::with_one_worker(config).await
}

/// A balancer serving one leaf of a CA of its own, from a Secret volume, with `config`.
struct Setup {
    ca: Authority,
    leaf: Leaf,
    volume: SecretVolume,
    worker: common::TestWorker,
    running: Running,
}

impl Setup {
    async fn start(config: Config) -> Self {
        let ca = Authority::root("Squall test CA");
        let leaf = ca.leaf("squall-test", 1);
        let volume = SecretVolume::new(&leaf.cert, &leaf.key);
        let config = Config {
            tls: Some(volume.files(Duration::from_secs(1))),
            ..config
        };
        let (worker, running) = Running::with_one_worker(config).await;
        Self {
            ca,
            leaf,
            volume,
            worker,
            running,
        }
    }

    /// The CA's certificate in a PEM file, for curl and openssl.
    fn ca_file(&self) -> PathBuf {
        let path = self.volume.dir.join("ca.pem");
        std::fs::write(&path, self.ca.issuer.pem()).unwrap();
        path
    }
}

/// A TLS connection to `addr` as `localhost`, trusting only `ca`, offering `alpn`.
async fn connect(
    addr: SocketAddr,
    ca: &CertificateDer<'static>,
    alpn: &[&[u8]],
) -> TlsStream<TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("TLS handshake")
}

/// The certificate chain the server sent on `stream`, leaf first.
fn served_chain(stream: &TlsStream<TcpStream>) -> Vec<CertificateDer<'static>> {
    let certs = stream
        .get_ref()
        .1
        .peer_certificates()
        .expect("a server certificate");
    certs.iter().map(|c| c.clone().into_owned()).collect()
}

/// The leaf certificate a new connection to `addr` is served.
async fn leaf_served(addr: SocketAddr, ca: &CertificateDer<'static>) -> CertificateDer<'static> {
    let stream = connect(addr, ca, &[b"h2"]).await;
    served_chain(&stream).swap_remove(0)
}

/// Waits until new connections to `addr` are served `leaf`.
async fn wait_for_leaf(addr: SocketAddr, ca: &CertificateDer<'static>, leaf: &Leaf) {
    eventually_async(
        "new connections to get the new certificate",
        WAIT,
        || async { (leaf_served(addr, ca).await == leaf.der).then_some(()) },
    )
    .await;
}

/// An HTTP/2 connection over `stream`, ready for requests.
async fn h2_over(stream: TlsStream<TcpStream>) -> h2::client::SendRequest<Bytes> {
    let (sender, connection) = h2::client::handshake(stream).await.expect("h2 handshake");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    sender.ready().await.expect("connection ready")
}

/// GETs `path` on an HTTP/2 connection: the status and the body.
async fn h2_get(sender: &h2::client::SendRequest<Bytes>, path: &str) -> (StatusCode, String) {
    let request = Request::get(format!("https://localhost{path}"))
        .body(())
        .unwrap();
    let mut ready = sender.clone().ready().await.unwrap();
    let (response, _) = ready.send_request(request, true).unwrap();
    let response = response.await.expect("response");
    let status = response.status();
    let mut body = response.into_body();
    let mut text = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        text.extend_from_slice(&chunk);
    }
    (status, String::from_utf8_lossy(&text).into_owned())
}

/// Whether `tool` can be run; if not, says the test skips it and why.
fn have(tool: &str, version_flag: &str) -> bool {
    let found = Command::new(tool).arg(version_flag).output().is_ok();
    if !found {
        println!("skipped: {tool} is not installed (scripts/install-deps installs it)");
    }
    found
}

/// Runs `program` with `args` (no shell) off the runtime's threads.
async fn run(program: &'static str, args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        Command::new(program)
            .args(&args)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

fn metric(running: &Running, line_start: &str) -> Option<String> {
    let text = running.balancer.metrics_text();
    text.lines()
        .find(|line| line.starts_with(line_start))
        .map(|line| line[line_start.len()..].trim().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_gets_http1_and_http2_over_tls_and_the_worker_hears_https() {
    if !have("curl", "--version") {
        return;
    }
    let setup = Setup::start(Config::default()).await;
    let (running, ca_file) = (&setup.running, setup.ca_file());
    let port = running.addr.port();
    for (flag, version) in [("--http1.1", "1.1"), ("--http2", "2")] {
        let args = vec![
            "--silent".to_owned(),
            "--show-error".to_owned(),
            "--cacert".to_owned(),
            ca_file.display().to_string(),
            "--resolve".to_owned(),
            format!("localhost:{port}:127.0.0.1"),
            flag.to_owned(),
            "--write-out".to_owned(),
            "\n%{http_code} %{http_version}".to_owned(),
            format!("https://localhost:{port}/headers"),
        ];
        let out = run("curl", args).await;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "curl {flag}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.ends_with(&format!("\n200 {version}")),
            "curl {flag}: {stdout}"
        );
        assert!(stdout.contains("x-forwarded-proto: https\n"), "{stdout}");
    }
    setup.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_negotiates_h2_and_an_old_protocol_is_refused() {
    if !have("openssl", "version") {
        return;
    }
    let setup = Setup::start(Config::default()).await;
    let (running, ca_file) = (&setup.running, setup.ca_file());
    let s_client = |extra: &[&str]| {
        let mut args = vec![
            "s_client".to_owned(),
            "-connect".to_owned(),
            running.addr.to_string(),
            "-servername".to_owned(),
            "localhost".to_owned(),
            "-CAfile".to_owned(),
            ca_file.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        run("openssl", args)
    };
    let out = s_client(&["-alpn", "h2"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("ALPN protocol: h2"), "{stdout}");
    assert!(stdout.contains("Verify return code: 0 (ok)"), "{stdout}");
    assert_eq!(
        metric(running, "squall_tls_handshake_failures_total").as_deref(),
        Some("0")
    );

    // TLS 1.1, which the client is allowed to offer (security level 0): the balancer answers
    // its ClientHello with an alert, sends no certificate, and counts the failed handshake.
    let out = s_client(&["-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"]).await;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("Protocol  : TLSv1.1"),
        "the client offered TLS 1.1: {said}"
    );
    assert!(said.contains("SSL alert number"), "{said}");
    assert!(said.contains("no peer certificate available"), "{said}");
    eventually("the failed handshake to be counted", WAIT, || {
        (metric(running, "squall_tls_handshake_failures_total").as_deref() == Some("1"))
            .then_some(())
    })
    .await;
    setup.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rust_client_gets_h2_with_alpn_and_http1_without() {
    let Setup {
        ca,
        leaf,
        worker,
        running,
        ..
    } = Setup::start(Config::default()).await;

    let stream = connect(running.addr, &ca.der(), &[b"h2", b"http/1.1"]).await;
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    assert_eq!(served_chain(&stream), [leaf.der]);
    let sender = h2_over(stream).await;
    let (status, headers) = h2_get(&sender, "/headers").await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers.contains("x-forwarded-proto: https\n"), "{headers}");
    assert!(headers.contains("host: localhost\n"), "{headers}");

    // No ALPN at all: HTTP/1.1.
    let mut stream = connect(running.addr, &ca.der(), &[]).await;
    assert_eq!(stream.get_ref().1.alpn_protocol(), None);
    stream
        .write_all(b"GET /headers HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    // The answer, up to the close (a peer that closes without close_notify ends it too).
    let _ = stream.read_to_end(&mut answer).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(answer.contains("x-forwarded-proto: https\n"), "{answer}");
    assert_eq!(worker.hits(), 2);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_with_an_intermediate_is_served_whole() {
    let root = Authority::root("Squall test root");
    let intermediate = root.intermediate("Squall test intermediate");
    let leaf = intermediate.leaf("squall-test", 7);
    let chain = format!("{}{}", leaf.cert, intermediate.issuer.pem());
    let volume = SecretVolume::new(&chain, &leaf.key);
    let (_worker, running) = start(volume.files(Duration::from_secs(1))).await;
    // The client trusts only the root: it needs the intermediate from the server.
    let stream = connect(running.addr, &root.der(), &[b"h2"]).await;
    assert_eq!(served_chain(&stream), [leaf.der, intermediate.der()]);
    let (status, _) = h2_get(&h2_over(stream).await, "/").await;
    assert_eq!(status, StatusCode::OK);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_files_reach_new_connections_and_leave_open_ones_alone() {
    let ca = Authority::root("Squall test CA");
    let (first, second) = (ca.leaf("first", 1), ca.leaf("second", 2));
    let mut volume = SecretVolume::new(&first.cert, &first.key);
    let (_worker, running) = start(volume.files(Duration::from_millis(50))).await;
    assert_eq!(leaf_served(running.addr, &ca.der()).await, first.der);
    let before = h2_over(connect(running.addr, &ca.der(), &[b"h2"]).await).await;
    assert_eq!(h2_get(&before, "/").await.0, StatusCode::OK);

    // A half-made update (the new certificate with the old key) is refused whole.
    volume.update(&second.cert, &first.key);
    eventually("the mismatched pair to be refused", WAIT, || {
        // At least one: under `cargo test` another test's SIGHUP reaches this balancer too.
        metric(&running, "squall_tls_reloads_total{outcome=\"refused\"}")
            .is_some_and(|count| count != "0")
            .then_some(())
    })
    .await;
    let served = leaf_served(running.addr, &ca.der()).await;
    assert_eq!(served, first.der, "the old certificate stays");

    volume.update(&second.cert, &second.key);
    wait_for_leaf(running.addr, &ca.der(), &second).await;
    // The connection made before the swap is untouched.
    assert_eq!(h2_get(&before, "/").await.0, StatusCode::OK);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificate() {
    let ca = Authority::root("Squall test CA");
    let (first, second) = (ca.leaf("first", 1), ca.leaf("second", 2));
    let mut volume = SecretVolume::new(&first.cert, &first.key);
    // Files looked at once an hour: only the signal can reload in time.
    let (_worker, running) = start(volume.files(Duration::from_secs(3600))).await;
    let before = h2_over(connect(running.addr, &ca.der(), &[b"h2"]).await).await;
    assert_eq!(h2_get(&before, "/").await.0, StatusCode::OK);
    volume.update(&second.cert, &second.key);
    let served = leaf_served(running.addr, &ca.der()).await;
    assert_eq!(served, first.der, "nothing reloads by itself");

    // The balancer serves, so its SIGHUP watch is in place (see `Balancer::serve`).
    let pid = std::process::id().to_string();
    let sent = Command::new("kill").args(["-HUP", &pid]).status().unwrap();
    assert!(sent.success());
    wait_for_leaf(running.addr, &ca.der(), &second).await;
    assert_eq!(
        metric(&running, "squall_tls_reloads_total{outcome=\"applied\"}").as_deref(),
        Some("1")
    );
    assert_eq!(h2_get(&before, "/").await.0, StatusCode::OK);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_finishes_its_handshake_is_dropped_and_disturbs_no_one() {
    let config = Config {
        header_read_timeout: Duration::from_millis(300),
        ..Config::default()
    };
    let Setup { ca, running, .. } = Setup::start(config).await;
    // One client starts a ClientHello and stops; the other never says anything.
    let mut stalled = running.send_raw(&[0x16, 0x03, 0x01]).await;
    let mut silent = TcpStream::connect(running.addr).await.unwrap();
    // Meanwhile others are served.
    let sender = h2_over(connect(running.addr, &ca.der(), &[b"h2"]).await).await;
    assert_eq!(h2_get(&sender, "/").await.0, StatusCode::OK);
    for (client, stream) in [("stalled", &mut stalled), ("silent", &mut silent)] {
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(WAIT, stream.read_to_end(&mut rest)).await;
        assert!(closed.is_ok(), "the {client} client was never dropped");
    }
    eventually("both failed handshakes to be counted", WAIT, || {
        (metric(&running, "squall_tls_handshake_failures_total").as_deref() == Some("2"))
            .then_some(())
    })
    .await;
    assert_eq!(h2_get(&sender, "/").await.0, StatusCode::OK);
    running.shutdown().await;
}

#[test]
fn unusable_files_are_refused_with_an_error_naming_them() {
    let dir = Scratch::new("tls-errors");
    let ca = Authority::root("Squall test CA");
    let (leaf, other) = (ca.leaf("leaf", 1), ca.leaf("other", 2));
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let cert = write("cert.pem", &leaf.cert);
    let key = write("key.pem", &leaf.key);
    let other_key = write("other.pem", &other.key);
    let garbled = write(
        "garbled.pem",
        "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n",
    );
    let empty = write("empty.pem", "");
    let missing = dir.join("missing.pem");
    let said = |result: Result<TlsFiles, TlsError>| {
        let error = result.unwrap_err();
        let mut text = error.to_string();
        let mut source = std::error::Error::source(&error);
        while let Some(cause) = source {
            text.push_str(&format!(": {cause}"));
            source = cause.source();
        }
        (error, text)
    };
    let shown = |path: &Path| path.display().to_string();

    let (error, text) = said(TlsFiles::load(&missing, &key));
    assert!(matches!(error, TlsError::Read { .. }), "{text}");
    assert!(
        text.starts_with(&format!("cannot read {}", shown(&missing))),
        "{text}"
    );

    let (error, text) = said(TlsFiles::load(&garbled, &key));
    assert!(matches!(error, TlsError::Pem { .. }), "{text}");
    assert!(text.contains(&shown(&garbled)), "{text}");

    let (error, text) = said(TlsFiles::load(&empty, &key));
    assert!(matches!(error, TlsError::NoCertificate(_)), "{text}");
    assert!(text.contains(&shown(&empty)), "{text}");

    let (error, text) = said(TlsFiles::load(&cert, &cert));
    assert!(matches!(error, TlsError::NoKey(_)), "{text}");
    assert!(text.contains(&shown(&cert)), "{text}");

    let (error, text) = said(TlsFiles::load(&cert, &other_key));
    assert!(matches!(error, TlsError::Mismatch { .. }), "{text}");
    assert_eq!(
        text,
        format!(
            "the private key in {} does not match the certificate in {}",
            shown(&other_key),
            shown(&cert)
        )
    );

    // A good pair loads, and a balancer takes it.
    let files = TlsFiles::load(&cert, &key).unwrap();
    assert_eq!(files.cert_path(), cert);
    assert!(
        balancer::Balancer::new(Config {
            tls: Some(files),
            ..Config::default()
        })
        .is_ok()
    );
}
