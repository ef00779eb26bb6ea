//! Real microVMs under QEMU: image, template, clones, cleanup. These boot a Linux guest, so
//! they need qemu-system-x86, linux-image-amd64 and busybox-static (scripts/install-deps).
#![allow(clippy::unwrap_used)] // In tests a panic is a failed test, which is the point.

use std::path::{Path, PathBuf};
use std::time::Duration;

use microvm::{
    AppSource, ConfigError, CreateTemplateError, Image, ImageSpec, KvmSupport, Template, VmConfig,
    WaitError,
};

use common::{accelerator_is_as_expected, get, qemu_children};
use test_support::Scratch;

mod common;

/// A CGI script that tells who the guest is: its clone id (from fw_cfg) and 16 bytes from
/// its RNG.
fn identity_script(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("identity");
    let script = format!(
        "#!/bin/sh\necho 'Content-Type: text/plain'\necho\necho \"clone=$(tr -d ' ' < {})\"\necho \"random=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n')\"\n",
        microvm::image::CLONE_ID_GUEST_PATH
    );
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// An image whose app is busybox's web server, serving the guest's root: `/init` is a file
/// it can always serve, and `/cgi-bin/identity` tells who the guest is.
fn httpd_image(dir: &Path) -> Image {
    microvm::image::build(
        &ImageSpec {
            app: AppSource::Executable {
                path: PathBuf::from("/bin/busybox"),
                args: ["httpd", "-f", "-p", "80", "-h", "/"]
                    .map(String::from)
                    .to_vec(),
            },
            kernel: None,
            busybox: None,
            files: vec![(identity_script(dir), "/cgi-bin/identity".into())],
        },
        &dir.join("image"),
    )
    .unwrap()
}

fn config(dir: &Path) -> VmConfig {
    VmConfig {
        run_dir: dir.join("run"),
        health_path: "/init".into(),
        ..VmConfig::default()
    }
}

/// Files of ours left in the RAM directory.
fn shm_files(template: &str) -> Vec<String> {
    std::fs::read_dir("/dev/shm")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(&format!("squall-{template}-{}", std::process::id())))
        .collect()
}

/// How many TCP sockets listen on `ip` (IPv4), from `/proc/net/tcp`.
fn listeners_on(ip: std::net::IpAddr) -> usize {
    let std::net::IpAddr::V4(v4) = ip else {
        panic!("IPv4 only")
    };
    // The kernel prints the address as the hex of its in-memory (network order) u32.
    let hex = format!("{:08X}", u32::from_ne_bytes(v4.octets()));
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap()
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields[1].starts_with(&format!("{hex}:")) && fields[3] == "0A"
        })
        .count()
}

/// Checks that the QEMU `pid` lets KSM merge its pages: guest RAM (`merge=on` on its command
/// line) and, where the kernel reports it (`ksm_merge_any` in `/proc/PID/ksm_stat`, Linux 6.14
/// and later), every other page of the process too.
fn memory_merging_is_on(pid: u32) {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(
        cmdline.contains(",merge=on"),
        "guest RAM is offered to KSM: {cmdline}"
    );
    let ksm_stat = std::fs::read_to_string(format!("/proc/{pid}/ksm_stat")).unwrap_or_default();
    match kernel::kernel_version() {
        Some(version) if version >= (6, 14) => assert!(
            ksm_stat.contains("ksm_merge_any: yes"),
            "the whole QEMU may be merged (PR_SET_MEMORY_MERGE): {ksm_stat}"
        ),
        version if ksm_stat.contains("ksm_merge_any:") => {
            assert!(
                ksm_stat.contains("ksm_merge_any: yes"),
                "kernel {version:?}: {ksm_stat}"
            )
        }
        version => eprintln!(
            "not checking that the whole QEMU may be merged: kernel {version:?} does not report \
             ksm_merge_any in /proc/PID/ksm_stat (Linux 6.14 and later do); checked merge=on only"
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_clone_serve_kill_and_clean_up() {
    let scratch = Scratch::new("lifecycle");
    let image = httpd_image(scratch.path());
    assert!(Image::open(&scratch.join("image")).unwrap() == image);
    // Clones listen on another loopback address than the template's: forkd's --clone-ip
    // (one no other test uses, so its listeners are this test's).
    let clone_ip = std::net::IpAddr::from([127, 0, 6, 2]);
    let config = VmConfig {
        clone_ip,
        ..config(scratch.path())
    };
    let template = Template::create("web", &image, &config, 5).await.unwrap();
    accelerator_is_as_expected(template.accel());
    assert_eq!(shm_files("web").len(), 1, "the template keeps one RAM file");

    // A standby's app cannot be reached before its guest has reseeded: its port is
    // forwarded only when the clone starts.
    let standby = template.launch("clone-a").await.unwrap();
    assert_eq!(listeners_on(clone_ip), 0, "a standby forwards no port");
    let a = standby.start(&template).await.unwrap();
    assert_eq!(listeners_on(clone_ip), 1);
    let b = template.clone_vm("clone-b").await.unwrap();
    assert_ne!(a.addr(), b.addr(), "each clone has its own port");
    assert_eq!(a.addr().ip(), clone_ip, "reported on the clone address");
    assert_eq!(b.addr().ip(), clone_ip);
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", a.addr().port()))
            .await
            .is_err(),
        "forwarded on the clone address only"
    );
    for clone in [&a, &b] {
        let reply = get(clone.addr(), "/init").await;
        assert!(
            reply.starts_with("HTTP/1.0 200") || reply.starts_with("HTTP/1.1 200"),
            "{reply}"
        );
        assert!(
            reply.contains("squall-guest: app started"),
            "serves the guest's /init"
        );
        let pss = clone.pss_bytes().unwrap();
        assert!(pss > 1 << 20, "a running QEMU has some memory: {pss}");
        // All of the clone's QEMU may be merged with its siblings where the host runs KSM.
        memory_merging_is_on(clone.pid().unwrap());
    }
    assert_eq!(qemu_children(scratch.path()), 2);

    // Each clone knows its id, and its RNG is its own: the guest agent reseeded the kernel's
    // CRNG with the clone's own seed before the clone was returned, so identical memory does
    // not mean identical randomness.
    let identity = |reply: String| {
        let field = |name: &str| {
            reply
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{name}=")))
                .unwrap_or_default()
                .to_owned()
        };
        (field("clone"), field("random"))
    };
    let reply_a = get(a.addr(), "/cgi-bin/identity").await;
    let (id_a, random_a) = identity(reply_a.clone());
    let (id_b, random_b) = identity(get(b.addr(), "/cgi-bin/identity").await);
    assert_eq!(id_a, "clone-a", "{reply_a}");
    assert_eq!(id_b, "clone-b");
    assert_eq!(random_a.len(), 32, "{random_a}");
    assert_ne!(random_a, random_b, "clones must not share random state");

    a.kill().await;
    b.kill().await;
    assert_eq!(
        qemu_children(scratch.path()),
        0,
        "killed clones leave no QEMU"
    );
    let leftovers: Vec<_> = std::fs::read_dir(&config.run_dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| !n.ends_with(".state"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "sockets and logs removed: {leftovers:?}"
    );
    drop(template);
    assert!(
        shm_files("web").is_empty(),
        "the template's RAM file is removed with it"
    );
    assert!(!config.run_dir.exists(), "and its run directory, now empty");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_clone_and_kill_leaves_nothing_behind() {
    // 20 direct clones, then 10 through a pool.
    let scratch = Scratch::new("cycles");
    let image = httpd_image(scratch.path());
    let config = config(scratch.path());
    let template = Template::create("cycles", &image, &config, 0)
        .await
        .unwrap();
    accelerator_is_as_expected(template.accel());
    let fds_before = std::fs::read_dir("/proc/self/fd").unwrap().count();
    for i in 0..20 {
        let clone = template.clone_vm(&format!("c{i}")).await.unwrap();
        assert!(get(clone.addr(), "/init").await.contains(" 200 "));
        clone.kill().await;
    }
    // The same through a pool of restored, paused guests.
    let template = std::sync::Arc::new(template);
    let pool = microvm::Pool::start(
        std::sync::Arc::clone(&template),
        2,
        microvm::PoolMode::Restored,
        microvm::pool::numbered_ids("p"),
    );
    let mut ids = std::collections::HashSet::new();
    let mut randoms = std::collections::HashSet::new();
    for _ in 0..10 {
        let clone = pool.clone_vm().await.unwrap();
        assert!(get(clone.addr(), "/init").await.contains(" 200 "));
        assert!(ids.insert(clone.id().to_owned()), "ids are unique");
        // Clones from restored, paused standbys reseeded before they were paused.
        let reply = get(clone.addr(), "/cgi-bin/identity").await;
        let random = reply
            .lines()
            .find_map(|l| l.strip_prefix("random="))
            .unwrap_or_default()
            .to_owned();
        assert_eq!(random.len(), 32, "{reply}");
        assert!(randoms.insert(random), "pool clones share random state");
        clone.kill().await;
    }
    pool.shutdown().await;
    // Standby QEMUs die with the pool.
    test_support::eventually("no QEMU left", Duration::from_secs(10), || {
        (qemu_children(scratch.path()) == 0).then_some(())
    })
    .await;
    drop(pool);
    let template = std::sync::Arc::into_inner(template).expect("the pool let go of the template");
    let fds_after = std::fs::read_dir("/proc/self/fd").unwrap().count();
    assert!(
        fds_after <= fds_before + 2,
        "fds: {fds_before} -> {fds_after}"
    );
    let run_files = std::fs::read_dir(&config.run_dir).unwrap().count();
    assert_eq!(run_files, 1, "only the template's state file remains");
    drop(template);
    assert!(shm_files("cycles").is_empty());
    assert!(
        !config.run_dir.exists(),
        "the run directory the template made is removed with it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_that_never_gets_healthy_fails_the_template_clearly() {
    let scratch = Scratch::new("unhealthy");
    let image = httpd_image(scratch.path());
    // One accelerator, the one this host should use: a KVM trial that fails would be
    // followed by TCG, and the error would be TCG's whatever the host.
    let expected = KvmSupport::probe().expected_accel();
    let config = VmConfig {
        health_path: "/no-such-page".into(),
        boot_timeout: Duration::from_secs(20),
        accel: Some(expected),
        ..config(scratch.path())
    };
    let err = Template::create("sick", &image, &config, 0)
        .await
        .unwrap_err();
    let CreateTemplateError::Boot { accel, source, .. } = &err else {
        panic!("not a boot failure: {err}")
    };
    accelerator_is_as_expected(*accel);
    assert!(matches!(source, WaitError::Unhealthy { .. }), "{err}");
    let text = lifecycle::ErrorChain(&err).to_string();
    assert!(
        text.contains("did not answer GET /no-such-page with 200 within 20s"),
        "{text}"
    );
    let console = text
        .split("last console output:\n")
        .nth(1)
        .unwrap_or_default();
    assert!(
        !console.trim().is_empty(),
        "shows the guest's console: {text}"
    );
    assert_eq!(qemu_children(scratch.path()), 0);
    assert!(shm_files("sick").is_empty());
}

#[test]
fn image_build_reports_a_missing_app() {
    let scratch = Scratch::new("missing");
    let err = microvm::image::build(
        &ImageSpec {
            app: AppSource::Executable {
                path: PathBuf::from("/nonexistent/app"),
                args: vec![],
            },
            kernel: None,
            busybox: None,
            files: vec![],
        },
        scratch.path(),
    )
    .unwrap_err();
    assert_eq!(err.to_string(), "the app not found at /nonexistent/app");
}

#[tokio::test]
async fn an_ipv6_clone_address_is_refused_before_anything_boots() {
    let scratch = Scratch::new("ipv6");
    let config = VmConfig {
        clone_ip: std::net::Ipv6Addr::LOCALHOST.into(),
        ..config(scratch.path())
    };
    let image = Image {
        kernel: scratch.join("vmlinuz"),
        initramfs: scratch.join("initramfs.img"),
        kernel_release: "none".into(),
        app: PathBuf::from("/bin/true"),
        guest_port: 80,
        rootfs: None,
    };
    let err = Template::create("v6", &image, &config, 0)
        .await
        .unwrap_err();
    eprintln!("accelerator: none (refused before any QEMU started)");
    assert!(
        matches!(
            err,
            CreateTemplateError::Config(ConfigError::Ipv6CloneIp { .. })
        ),
        "{err}"
    );
    let text = lifecycle::ErrorChain(&err).to_string();
    assert!(text.contains("IPv6"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_boot_serves_and_its_exit_is_seen_when_it_happens() {
    let scratch = Scratch::new("cold");
    let image = httpd_image(scratch.path());
    let config = config(scratch.path());
    // A cold boot is told its accelerator (a benchmark gives it its template's).
    let accel = KvmSupport::probe().expected_accel();
    accelerator_is_as_expected(accel);
    let mut vm = microvm::boot_cold(&image, &config, accel, "cold1")
        .await
        .unwrap();
    assert!(get(vm.addr(), "/init").await.contains(" 200 "));
    assert_eq!(
        vm.addr().ip(),
        config.clone_ip,
        "served on the clone address"
    );
    let own_ram = format!("squall-cold-cold1-{}-", std::process::id());
    let ram_files = || {
        std::fs::read_dir("/dev/shm")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with(&own_ram))
            .count()
    };
    assert_eq!(ram_files(), 1, "a cold boot has RAM of its own");
    assert!(!vm.has_exited());

    // Its QEMU dies behind its back: exited() resolves then, without polling.
    let pid = vm.pid().unwrap();
    test_support::process::sigkill(pid);
    let status = tokio::time::timeout(Duration::from_secs(10), vm.exited())
        .await
        .expect("exited() resolves once QEMU is gone")
        .unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9)
    );
    assert!(vm.has_exited());
    drop(vm);
    assert_eq!(ram_files(), 0, "its RAM file is removed with it");
    let left: Vec<_> = std::fs::read_dir(&config.run_dir).unwrap().collect();
    assert!(left.is_empty(), "and its run files: {left:?}");
}
