//! The `vm` driver through forkd's API: real QEMU guests (KVM where it can run them, TCG
//! otherwise), so these run in the `vm` nextest group, one at a time. Each prints the
//! accelerator its guests ran under.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod common;

use std::time::Duration;

use common::{Daemon, clone_in_parallel, httpd_spec};
use forkd::{CloneState, Driver, ExitStatus, TemplateSpec};
use test_support::http::get_async;
use test_support::process::alive;
use test_support::{eventually, eventually_async};

/// Booting a guest under TCG on a loaded machine takes a while.
const DEADLINE: Duration = Duration::from_secs(60);

/// The accelerator on QEMU's command line (`-accel kvm` or `-accel tcg,...`).
/// The accelerator `qemu` runs its guest under, printed for the log and checked against
/// what this host's KVM can do (KVM where it runs Linux guests, TCG otherwise).
fn accelerator(qemu: u32) -> String {
    let accel = test_support::process::qemu_accelerator(qemu).expect("a QEMU with -accel");
    let expected = microvm::KvmSupport::probe().expected_accel().to_string();
    assert_eq!(accel, expected, "the accelerator this host's KVM allows");
    accel
}

async fn gone(what: &str, pid: u32) {
    eventually(what, DEADLINE, || (!alive(pid)).then_some(())).await;
}

/// Concurrent clone requests on the `vm` driver never get more clones than `--max-clones`
/// between them (they each reserve their slots before any QEMU is resumed), and each one
/// refused says `no_capacity`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_concurrent_clone_requests_never_exceed_max_clones() {
    let daemon = Daemon::with_template(2, &httpd_spec("vm")).await;
    let (granted, refused) = clone_in_parallel(&daemon.client, "vm", &[2, 1, 2, 1]).await;
    let listed = daemon.client.clones().await.unwrap();
    println!(
        "vm guests ran under {}",
        accelerator(granted[0].pid.unwrap())
    );
    assert!(
        granted.len() <= 2 && listed.clones.len() == granted.len(),
        "{} granted, {} listed, with --max-clones 2",
        granted.len(),
        listed.clones.len()
    );
    assert!(refused >= 1, "6 clones asked for, none refused");
    for clone in &granted {
        assert_eq!(get_async(clone.addr, "/init").await.status, 200);
    }

    // Killing one makes room for one more.
    daemon.client.kill(&granted[0].id).await.unwrap();
    assert!(!alive(granted[0].pid.unwrap()), "killed, yet its QEMU runs");
    let more = daemon.client.create_clones("vm", 1).await.unwrap();
    assert!(more[0].ready, "{more:?}");
    let pids: Vec<u32> = granted
        .iter()
        .chain(&more)
        .map(|c| c.pid.unwrap())
        .collect();
    daemon.stop().await;
    for pid in pids {
        gone("every QEMU is gone after shutdown", pid).await;
    }
}

/// A clone whose QEMU dies on its own is reported `exited`, with the signal that killed it,
/// and forgetting it frees its slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_a_clone_whose_qemu_dies_is_reported_exited() {
    let daemon = Daemon::with_template(1, &httpd_spec("vm")).await;
    let clone = daemon
        .client
        .create_clones("vm", 1)
        .await
        .unwrap()
        .remove(0);
    let qemu = clone.pid.unwrap();
    println!("vm guests ran under {}", accelerator(qemu));
    test_support::process::sigkill(qemu);
    let exited = eventually_async("the dead QEMU is noticed", DEADLINE, || async {
        let listed = daemon.client.clones().await.unwrap().clones;
        listed
            .into_iter()
            .find(|c| c.id == clone.id && c.state == CloneState::Exited)
    })
    .await;
    // How it ended is known: the signal that killed QEMU.
    assert_eq!(
        (exited.ready, exited.exit),
        (false, Some(ExitStatus::Signal(9)))
    );
    daemon.client.kill(&clone.id).await.unwrap();
    let next = daemon.client.create_clones("vm", 1).await.unwrap();
    assert!(next[0].ready, "{next:?}");
    daemon.stop().await;
}

/// A container image through the API: `image` with `command` as the arguments that replace
/// its `Cmd` and `app_port` as the port the app listens on in the guest (the Flask test
/// image's app listens on `PORT`). The disk is built into the daemon's image cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_an_image_template_runs_its_app_with_the_arguments_and_port_given() {
    let image = test_support::images::flask();
    let cache = test_support::Scratch::new("forkd-image-cache");
    let mut config = forkd::Config::new(common::TOKEN);
    config.image_cache = cache.path().to_owned();
    let daemon = Daemon::with_config(config).await;
    let mut spec = TemplateSpec::new("flask", Driver::Vm, vec!["--from-the-api".into()]);
    spec.image = Some(image);
    spec.app_port = Some(9000);
    spec.start_timeout_ms = 120_000;
    daemon.client.create_template(&spec).await.unwrap();
    let clones = daemon.client.create_clones("flask", 1).await.unwrap();
    println!(
        "vm guests ran under {}",
        accelerator(clones[0].pid.unwrap())
    );
    let answer = get_async(clones[0].addr, "/whoami").await;
    assert_eq!(answer.status, 200);
    assert_eq!(
        answer.body.trim(),
        "uid=65534 gid=65534 cwd=/app args=--from-the-api"
    );
    let disks: Vec<_> = std::fs::read_dir(cache.path())
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "erofs"))
        .collect();
    assert_eq!(disks.len(), 1, "{disks:?}");
    daemon.stop().await;
}
