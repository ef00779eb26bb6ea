//! SnowFlock across hosts, in network namespaces: `squall forkd` hosts on one bridge and
//! `squall up` in a namespace of its own (see `common/netns.rs`), real QEMU guests (TCG here,
//! KVM where it runs them). A host that joins while a surge runs gets the `vm` template from a
//! warm peer's snapshot instead of booting it, and serves clones; a peer that dies while it
//! sends, and a peer on another QEMU, are refused cleanly and the host boots the template
//! itself. Root is needed (namespaces); elsewhere the tests say so and pass.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::netns::Net;
use common::{APP_ARGS, Case, Forkd, Load, TOKEN, Up};

/// The demo app as a microVM's app, listening on the guest's port 80.
fn app() -> Vec<String> {
    let warm_app = Path::new(env!("CARGO_BIN_EXE_squall")).with_file_name("warm-app");
    assert!(
        warm_app.exists(),
        "build the demo app first: cargo build -p warm-app ({})",
        warm_app.display()
    );
    let mut app = vec![
        warm_app.display().to_string(),
        "--listen".into(),
        "0.0.0.0:80".into(),
    ];
    app.extend(APP_ARGS.map(String::from));
    app
}

/// `squall forkd` on `host`'s address, its clones there too, with `--max-clones max`, its
/// temporary files under the case's scratch directory; `path` first on its `PATH`, if given.
fn forkd(case: &Case, net: &Net, host: &str, max: usize, path: Option<&Path>) -> Forkd {
    let tmp = case.scratch.join(host);
    std::fs::create_dir_all(&tmp).unwrap();
    let addr = net.addr(host);
    let mut command = net.command(host, env!("CARGO_BIN_EXE_squall"));
    command
        .args(["forkd", "--kill-grace", "1", "--listen"])
        .arg(format!("{addr}:7070"))
        .arg("--clone-ip")
        .arg(addr.to_string())
        .args(["--max-clones", &max.to_string(), "--token-file"])
        .arg(&case.token_file)
        // The accelerator this host's KVM allows, from the start: no boot here pays a KVM
        // trial that is bound to fail (and `--vm-accel` is exercised).
        .args(["--vm-accel", &expected_accel()])
        .env("TMPDIR", &tmp);
    if let Some(dir) = path {
        let rest = std::env::var("PATH").unwrap_or_default();
        command.env("PATH", format!("{}:{rest}", dir.display()));
    }
    Forkd::spawn(command, &case.token_file, &case.marker)
}

/// The accelerator this host's KVM allows: `kvm` where it runs Linux guests, else `tcg`.
fn expected_accel() -> String {
    microvm::KvmSupport::probe().expected_accel().to_string()
}

/// The vm template of [`app`], as `squall up --driver vm` makes it.
fn spec() -> forkd::TemplateSpec {
    let mut spec = forkd::TemplateSpec::new("app", forkd::Driver::Vm, app());
    spec.health_path = "/healthz".into();
    spec.start_timeout_ms = 240_000;
    spec
}

fn seeded(from: &Forkd) -> forkd::TemplateSpec {
    forkd::TemplateSpec {
        source: Some(forkd::SnapshotSource {
            url: from.url.clone(),
        }),
        ..spec()
    }
}

/// RAM files in /dev/shm of the template `app` made by the forkd whose pid is `pid`.
fn ram_files_of(pid: u32) -> usize {
    let prefix = format!("squall-app-{pid}-");
    std::fs::read_dir("/dev/shm")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .count()
}

/// Stops `forkd` as SIGTERM does, and checks that its templates' RAM files went with it.
fn stop(mut forkd: Forkd) {
    let pid = forkd.child.id();
    assert!(common::terminate(&mut forkd.child).success());
    assert_eq!(ram_files_of(pid), 0, "forkd {pid} left a RAM file");
}

/// A runtime for the forkd clients: a request runs on its worker while the test waits.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

/// `squall up` in its own namespace finds forkd hosts by name; host h1 boots the template and
/// has room for two clones. A surge needs more: host h2 is added to the name while it runs,
/// gets the template from h1's snapshot (no boot), and serves clones; no request fails.
#[test]
fn a_host_that_joins_mid_surge_serves_clones_seeded_from_a_peer() {
    let Some(net) = Net::new(&["h1", "h2", "up"]) else {
        return;
    };
    let case = Case::new("cross-host-join");
    let h1 = forkd(&case, &net, "h1", 2, None);
    let h2 = forkd(&case, &net, "h2", 8, None);
    net.set_hosts_file("up", &format!("{} forkd\n", net.addr("h1")));
    case.write_policy(
        "name: surge\ntemplate: app\nworkers: {min: 1, max: 5}\ntarget: {concurrency: 2}\n\
         window: {stable: 4s, panic: 500ms}\nscale_down: {delay: 30s, drain_timeout: 5s}\n",
    );
    let up_addr = net.addr("up");
    let mut command = net.command("up", env!("CARGO_BIN_EXE_squall"));
    command
        .args(["up", "--driver", "vm", "--policy"])
        .arg(&case.policy)
        .args(["--listen", &format!("{up_addr}:0"), "--admin"])
        .arg(format!("{up_addr}:0"))
        .args(["--max-concurrency", "2", "--forkd-dns", "forkd:7070"])
        .arg("--forkd-token-file")
        .arg(&case.token_file)
        .arg("--")
        .args(app());
    let up = Up::spawn(command, &case.marker, None);
    up.wait_for("a first worker on h1", Duration::from_secs(180), |n| n >= 1);

    let mut load = Load::start(up.listen, 8);
    // h1 holds two at most: the scaler wants more than it can place.
    up.wait_for("h1 full", Duration::from_secs(60), |n| n >= 2);
    let joined = Instant::now();
    net.set_hosts_file(
        "up",
        &format!("{} forkd\n{} forkd\n", net.addr("h1"), net.addr("h2")),
    );
    up.wait_for("workers on h2", Duration::from_secs(90), |n| n >= 3);
    let serving = joined.elapsed();
    load.stop();
    assert_eq!(load.failed(), 0, "{} answered", load.ok());

    let rt = runtime();
    let templates = rt.block_on(h2.client(TOKEN).templates()).unwrap();
    assert_eq!(templates.len(), 1, "{templates:?}");
    assert_eq!(
        templates[0].seeded_from.as_deref(),
        Some(h1.url.as_str()),
        "h2 made the template from h1's snapshot"
    );
    let on_h2 = rt.block_on(h2.client(TOKEN).clones()).unwrap().clones;
    assert!(on_h2.iter().any(|c| c.ready), "h2 serves clones: {on_h2:?}");
    eprintln!(
        "h2 joined (its name added) and served a worker {serving:?} later, seeded from h1 (DNS refreshed every 10 s)"
    );
    common::assert_expected_accelerator(&case.marker);
    drop(up);
    stop(h1);
    stop(h2);
}

/// A peer on another QEMU is refused before anything is written; a peer that dies while it
/// sends leaves nothing on the host that was receiving, which then boots the template itself
/// and serves.
#[test]
fn a_mismatched_or_dying_peer_is_refused_and_the_host_boots_the_template_itself() {
    let Some(net) = Net::new(&["h1", "h2", "h3"]) else {
        return;
    };
    let case = Case::new("cross-host-peer");
    // h3's QEMU says it is another version (and is otherwise the real one).
    let qemu = Command::new("sh")
        .args(["-c", "command -v qemu-system-x86_64"])
        .output()
        .unwrap();
    let qemu = String::from_utf8(qemu.stdout).unwrap().trim().to_owned();
    let bin = case.scratch.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let wrapper = bin.join("qemu-system-x86_64");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\n[ \"$1\" = --version ] && {{ echo 'QEMU emulator version 1.0.0'; exit 0; }}\nexec {qemu} \"$@\"\n"
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();

    let mut h1 = forkd(&case, &net, "h1", 4, None);
    let h2 = forkd(&case, &net, "h2", 4, None);
    let h3 = forkd(&case, &net, "h3", 4, Some(&bin));
    let rt = runtime();
    rt.block_on(h1.client(TOKEN).create_template(&spec()))
        .unwrap();

    let err = rt
        .block_on(h3.client(TOKEN).create_template(&seeded(&h1)))
        .unwrap_err();
    assert_eq!(err.code(), Some(forkd::ErrorCode::TemplateFailed), "{err}");
    assert!(
        err.to_string().contains("the snapshot was saved with QEMU"),
        "{err}"
    );
    eprintln!("another QEMU refused: {err}");

    // h1 sends slowly, and dies once h2 has had some of it.
    net.shape("h1", "40mbit");
    let before = net.sent("h1");
    let (h2_client, from_h1) = (h2.client(TOKEN), seeded(&h1));
    let receiving = rt.spawn(async move { h2_client.create_template(&from_h1).await });
    let deadline = Instant::now() + Duration::from_secs(60);
    while net.sent("h1") - before < 2_000_000 {
        assert!(Instant::now() < deadline, "h1 sent nothing to h2");
        std::thread::sleep(Duration::from_millis(20));
    }
    let h1_pid = h1.child.id();
    h1.child.kill().unwrap();
    h1.child.wait().unwrap();
    let err = rt.block_on(receiving).unwrap().unwrap_err();
    eprintln!("a peer dying mid-transfer: {err}");
    assert_eq!(err.code(), Some(forkd::ErrorCode::TemplateFailed), "{err}");
    assert!(err.to_string().contains(&h1.url), "{err}");
    assert!(err.to_string().contains("broke off"), "{err}");
    // Killed outright, h1 could not remove its template's RAM file: the test does.
    for entry in std::fs::read_dir("/dev/shm").unwrap().flatten() {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(&format!("squall-app-{h1_pid}-"))
        {
            std::fs::remove_file(entry.path()).unwrap();
        }
    }
    // Neither refusal left anything behind.
    for (host, forkd) in [("h2", &h2), ("h3", &h3)] {
        assert_eq!(
            test_support::files_under(&case.scratch.join(host)),
            Vec::<std::path::PathBuf>::new()
        );
        assert_eq!(ram_files_of(forkd.child.id()), 0, "{host} left a RAM file");
        assert!(
            rt.block_on(forkd.client(TOKEN).templates())
                .unwrap()
                .is_empty()
        );
    }

    // h2 boots the template itself, and serves.
    rt.block_on(h2.client(TOKEN).create_template(&spec()))
        .unwrap();
    let clones = rt
        .block_on(h2.client(TOKEN).create_clones("app", 1))
        .unwrap();
    assert!(clones[0].ready, "{clones:?}");
    let addr: SocketAddr = clones[0].addr;
    assert_eq!(common::get(addr, "/healthz").0, 200);
    stop(h2);
    stop(h3);
    assert_eq!(ram_files_of(h1_pid), 0);
}
