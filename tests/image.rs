//! Container images and root filesystems, run as a user runs them: `squall image build
//! --rootfs` / `--oci` (what it prints, what it writes, what it says about a bad input), and
//! `squall up --driver vm --image` running a container image built from Debian's packages
//! (the Flask app of `tests/images/flask`) as warm microVM workers.
#![allow(clippy::unwrap_used)] // In tests a panic is a failed test, which is the point.

mod common;

use std::time::Duration;

use common::{Case, Load, Scratch, Up, get, squall_exits, squall_ok};

#[test]
fn a_directory_becomes_a_disk_described_in_the_output_directory() {
    let scratch = Scratch::new("image-rootfs");
    let tree = scratch.join("tree");
    std::fs::create_dir_all(tree.join("bin")).unwrap();
    std::fs::write(tree.join("bin/app"), b"#!/bin/sh\n").unwrap();
    let out = scratch.join("out");
    let args = [
        "image",
        "build",
        "--rootfs",
        tree.to_str().unwrap(),
        "--port",
        "8000",
        "-o",
        out.to_str().unwrap(),
        "--",
        "/bin/app",
        "serve",
    ];
    let stdout = squall_ok(&args);
    for line in [
        "fs       erofs",
        "command  /bin/app serve",
        "ports    8000",
        "digest   sha256:",
    ] {
        assert!(stdout.contains(line), "no `{line}` in:\n{stdout}");
    }
    let description: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("rootfs.json")).unwrap()).unwrap();
    let disk = description["disk"].as_str().unwrap();
    assert!(stdout.contains(disk), "{stdout}");
    assert!(std::path::Path::new(disk).is_file());
}

#[test]
fn a_path_that_is_no_image_is_refused_and_nothing_is_written() {
    let scratch = Scratch::new("image-bad");
    std::fs::write(scratch.join("notes.txt"), b"hello").unwrap();
    let out = scratch.join("out");
    let stderr = squall_exits(
        1,
        &[
            "image",
            "build",
            "--oci",
            scratch.join("notes.txt").to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ],
    );
    assert!(
        stderr.contains("is neither an OCI image layout"),
        "{stderr}"
    );
    assert!(!out.exists());
    // An app and an image at once make no sense.
    squall_exits(
        2,
        &[
            "image",
            "build",
            "--app",
            "/bin/true",
            "--oci",
            "x",
            "-o",
            "y",
        ],
    );
}

#[test]
fn a_container_image_runs_as_vm_workers_that_scale_and_serve() {
    let image = test_support::images::flask();
    let case = Case::new("image");
    case.write_policy(
        "name: image\ntemplate: flask\nworkers: {min: 2, max: 4}\ntarget: {concurrency: 2}\n\
         window: {stable: 2s, panic: 500ms}\nscale_down: {delay: 2s, drain_timeout: 5s}\n",
    );
    // Disks go into the test's own cache, removed with it.
    let cache = case.scratch.join("images");
    let extra = [
        "--image".to_owned(),
        image.display().to_string(),
        "--image-cache".to_owned(),
        cache.display().to_string(),
        // Flask in a guest under TCG, beside other tests on two cores, has taken over the
        // default 30 s to answer.
        "--start-timeout".to_owned(),
        "180".to_owned(),
    ];
    let up = Up::start_full(&case.policy, &case.marker, "vm", &extra, &[]);
    up.wait_for("two Flask workers", Duration::from_secs(300), |n| n >= 2);

    // The image's own entrypoint, environment, user and working directory, on the port it
    // exposes (8000), reached through the balancer.
    let (status, body) = get(up.listen, "/");
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("hello from flask, clone "), "{body}");
    let (status, body) = get(up.listen, "/whoami");
    assert_eq!(
        (status, body.trim()),
        (200, "uid=65534 gid=65534 cwd=/app args=")
    );
    // Each worker is its own clone (its own clone id), and each can write where apps write.
    let mut clones = std::collections::BTreeSet::new();
    test_support::wait_until("answers from both workers", Duration::from_secs(30), || {
        let (status, body) = get(up.listen, "/");
        assert_eq!(status, 200, "{body}");
        clones.insert(body);
        (clones.len() >= 2).then_some(())
    });
    for _ in 0..4 {
        assert_eq!(get(up.listen, "/write"), (200, "written\n".to_owned()));
    }

    // A crowd scales the pool up with clones of the warm template, and back down.
    let mut load = Load::start(up.listen, 8);
    up.wait_for("a third worker", Duration::from_secs(60), |n| n >= 3);
    load.stop();
    up.wait_for("back to two", Duration::from_secs(60), |n| n == 2);
    assert_eq!(load.failed(), 0, "{} answered", load.ok());

    common::assert_expected_accelerator(&case.marker);
    // One disk for the template and every clone, kept in the cache.
    let disks: Vec<_> = std::fs::read_dir(&cache)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "erofs"))
        .collect();
    assert_eq!(disks.len(), 1, "{disks:?}");
    let run_dir = std::env::temp_dir().join(format!("squall-forkd-vm-{}", up.child.id()));
    drop(up);
    assert!(!run_dir.exists(), "{} is left behind", run_dir.display());
}

#[test]
fn an_image_needs_the_vm_driver_and_an_app_port_needs_an_image() {
    let stderr = squall_exits(1, &["up", "--image", "/nonexistent", "--", "x"]);
    assert!(
        stderr.contains("--image runs a container image in microVMs: it needs --driver vm"),
        "{stderr}"
    );
    let stderr = squall_exits(2, &["up", "--app-port", "8000", "--", "x"]);
    assert!(stderr.contains("--image <PATH>"), "{stderr}");
}

#[test]
fn squall_up_with_a_path_that_is_no_image_says_so_and_exits() {
    let case = Case::new("image-none");
    case.write_policy(&common::quick_policy(1));
    let notes = case.scratch.join("notes.txt");
    std::fs::write(&notes, b"hello").unwrap();
    let policy = case.policy.display().to_string();
    let notes = notes.display().to_string();
    let args = [
        "up",
        "--driver",
        "vm",
        "--policy",
        &policy,
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--image",
        &notes,
    ];
    let stderr = squall_exits(1, &args);
    assert!(
        stderr.contains("building the image's root filesystem failed")
            && stderr.contains(&format!("{notes} is neither an OCI image layout")),
        "{stderr}"
    );
}
