//! Compiles the guest agent (`guest/agent.rs`) into a static executable for the images this
//! crate builds. It is a separate program for the guest, not part of this crate: it has no
//! dependencies, so rustc alone builds it, and a static binary needs no libraries in the guest.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let source = "guest/agent.rs";
    // The agent's own modules (`app_launch.rs`) are in the same directory.
    println!("cargo::rerun-if-changed=guest");
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let agent = out_dir.join("squall-guest-agent");
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let status = Command::new(rustc)
        .args([
            "--edition=2024",
            "--crate-name=squall_guest_agent",
            "--crate-type=bin",
            "-Copt-level=s",
            "-Cpanic=abort",
            "-Cstrip=symbols",
            // Static: the guest has no libc of its own (glibc's libc.a comes with libc6-dev,
            // which linking any Rust program here already needs).
            "-Ctarget-feature=+crt-static",
            "-o",
        ])
        .arg(&agent)
        .arg(source)
        .status()
        .expect("cannot run rustc to build the guest agent");
    assert!(
        status.success(),
        "building the guest agent ({source}) failed: {status}"
    );
}
