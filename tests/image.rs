//! `squall image build --rootfs` / `--oci`, run as a user runs them: what it prints, what it
//! writes, and what it says about a bad input.
#![allow(clippy::unwrap_used)] // In tests a panic is a failed test, which is the point.

mod common;

use common::{Scratch, squall_exits, squall_ok};

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
