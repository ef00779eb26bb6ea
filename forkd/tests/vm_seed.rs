//! A `vm` template made on one forkd host from another's snapshot, without booting: real QEMU
//! guests (KVM where it can run them, TCG otherwise), so the test that boots one runs in the
//! `vm` nextest group. The stream is also cut and corrupted on its way, by a relay between
//! the daemons, and each failure must leave nothing behind and allow a retry.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Instant;

use common::{Daemon, TOKEN, httpd_spec};
use forkd::{Client, Config, Driver, ErrorCode, SnapshotSource, TemplateSpec};
use test_support::http::get_async;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

fn seeded(spec: &TemplateSpec, peer: SocketAddr) -> TemplateSpec {
    TemplateSpec {
        source: Some(SnapshotSource {
            url: format!("http://{peer}"),
        }),
        ..spec.clone()
    }
}

/// A daemon with a runtime directory of its own under `dir`.
async fn daemon_in(dir: &Path) -> Daemon {
    std::fs::create_dir_all(dir).unwrap();
    Daemon::with_config(Config {
        runtime_dir: dir.to_owned(),
        ..Config::new(TOKEN)
    })
    .await
}

/// This process's template RAM files in /dev/shm.
fn ram_files() -> Vec<PathBuf> {
    let prefix = format!("squall-web-{}-", std::process::id());
    test_support::files_under(Path::new("/dev/shm"))
        .into_iter()
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&prefix))
        })
        .collect()
}

/// What the relay does to the peer's answer after `at` bytes.
#[derive(Clone, Copy)]
enum Fault {
    /// Flips one bit of byte `at`.
    Flip,
    /// Closes both connections there.
    Cut,
}

/// A TCP relay to `upstream` that spoils every answer at byte `at`.
async fn relay(upstream: SocketAddr, fault: Fault, at: usize) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            tokio::spawn(async move {
                let server = TcpStream::connect(upstream).await.unwrap();
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
                });
                let mut seen = 0usize;
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    let n = match server_read.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    let piece = &mut buf[..n];
                    if (seen..seen + n).contains(&at) {
                        match fault {
                            Fault::Flip => piece[at - seen] ^= 0x10,
                            Fault::Cut => {
                                let _ = client_write.write_all(&piece[..at - seen]).await;
                                return;
                            }
                        }
                    }
                    seen += n;
                    if client_write.write_all(piece).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// Host A boots the template; host B makes it from A's snapshot and serves a clone, without
/// booting; a snapshot corrupted or cut on its way is refused, leaves nothing, and a retry
/// succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_made_from_a_peers_snapshot_serves_clones_and_a_spoilt_transfer_leaves_nothing()
{
    let scratch = test_support::Scratch::new("vm-seed");
    let spec = httpd_spec("web");
    let a = daemon_in(&scratch.join("a")).await;
    let booted = Instant::now();
    a.client.create_template(&spec).await.unwrap();
    let boot = booted.elapsed();
    let rams = ram_files();
    assert_eq!(rams.len(), 1, "host A's template RAM: {rams:?}");

    // Spoilt on the way: one bit flipped well inside the RAM, or the stream cut there.
    let c_dir = scratch.join("c");
    let c = daemon_in(&c_dir).await;
    for (fault, what) in [(Fault::Flip, "corrupt"), (Fault::Cut, "broke off")] {
        let via = relay(a.addr, fault, 300_000).await;
        let err = c
            .client
            .create_template(&seeded(&spec, via))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::TemplateFailed), "{err}");
        assert!(err.to_string().contains(what), "{err}");
        println!("spoilt transfer refused: {err}");
        assert_eq!(ram_files(), rams, "a spoilt transfer left a RAM file");
        assert_eq!(
            test_support::files_under(&c_dir),
            Vec::<PathBuf>::new(),
            "a spoilt transfer left files"
        );
        assert!(c.client.templates().await.unwrap().is_empty());
    }

    // Another spec under the same name is refused.
    let mut other = spec.clone();
    other.health_path = "/bin/busybox".into();
    let err = c
        .client
        .create_template(&seeded(&other, a.addr))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("another spec"), "{err}");
    assert_eq!(test_support::files_under(&c_dir), Vec::<PathBuf>::new());

    // Host B: made from A's snapshot, and its clone serves.
    let b = daemon_in(&scratch.join("b")).await;
    let started = Instant::now();
    let info = b
        .client
        .create_template(&seeded(&spec, a.addr))
        .await
        .unwrap();
    let seed = started.elapsed();
    assert_eq!(info.spec, spec, "the spec is kept without its source");
    assert_eq!(info.seeded_from, Some(format!("http://{}", a.addr)));
    let clones = b.client.create_clones("web", 1).await.unwrap();
    assert!(clones[0].ready, "{clones:?}");
    let answer = get_async(clones[0].addr, "/init").await;
    assert_eq!(answer.status, 200);
    let accel = test_support::process::qemu_accelerator(clones[0].pid.unwrap()).unwrap();
    println!(
        "host A booted its template in {boot:?}; host B made it from A's snapshot and restored a standby in {seed:?} (guests under {accel})"
    );
    // The retry on C, straight from A, succeeds after the failures.
    c.client
        .create_template(&seeded(&spec, a.addr))
        .await
        .unwrap();
    let clones = c.client.create_clones("web", 1).await.unwrap();
    assert_eq!(get_async(clones[0].addr, "/init").await.status, 200);
    // Each daemon counts what it received.
    b.assert_metrics([r#"squall_snapshot_transfers_total{direction="received",outcome="ok"} 1"#])
        .await;
    c.assert_metrics([
        r#"squall_snapshot_transfers_total{direction="received",outcome="failed"} 3"#,
        r#"squall_snapshot_transfers_total{direction="received",outcome="ok"} 1"#,
    ])
    .await;
    let received = b.client.metrics().await.unwrap();
    assert!(
        received.lines().any(|l| l
            .strip_prefix(r#"squall_snapshot_bytes_total{direction="received"} "#)
            .and_then(|n| n.parse::<u64>().ok())
            .is_some_and(|n| n > 1_000_000)),
        "{received}"
    );
    // B's own snapshot is portable too: a template made from a snapshot can seed another.
    let d = daemon_in(&scratch.join("d")).await;
    d.client
        .create_template(&seeded(&spec, b.addr))
        .await
        .unwrap();
    for daemon in [a, b, c, d] {
        daemon.stop().await;
    }
    assert!(ram_files().is_empty(), "RAM files left: {:?}", ram_files());
}

/// Only a `vm` template has a snapshot; asking for one needs the token; a source that is
/// not a peer's base URL, or that does not answer, is refused with the reason.
#[tokio::test]
async fn a_snapshot_needs_a_vm_template_and_the_token_and_a_source_must_be_a_peer() {
    let daemon = Daemon::start().await;
    let spawn = TemplateSpec::new("plain", Driver::Spawn, vec!["true".into()]);
    daemon.client.create_template(&spawn).await.unwrap();
    let err = daemon.client.snapshot("plain").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotPortable), "{err}");
    assert!(err.to_string().contains("only vm templates"), "{err}");
    let err = daemon.client.snapshot("nothing").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::TemplateNotFound), "{err}");
    let stranger = Client::new(&format!("http://{}", daemon.addr), "wrong").unwrap();
    let err = stranger.snapshot("plain").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Unauthorized), "{err}");

    let err = daemon
        .client
        .create_template(&seeded(&spawn, daemon.addr))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::InvalidTemplate), "{err}");
    // Nothing listens on port 1: refused with where it went, and nothing is left.
    let nowhere: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let err = daemon
        .client
        .create_template(&seeded(&httpd_spec("web"), nowhere))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::TemplateFailed), "{err}");
    assert!(err.to_string().contains("127.0.0.1:1"), "{err}");
    assert_eq!(daemon.client.templates().await.unwrap().len(), 1);
    daemon.stop().await;
}
