//! What the microVM tests share: HTTP to a guest, the QEMUs a test started, the accelerator.
#![allow(clippy::unwrap_used)] // In tests a panic is a failed test, which is the point.

use std::path::Path;

use microvm::{Accel, KvmSupport};

/// `GET path`: the whole reply as text, status line and headers included.
pub(crate) async fn get(addr: std::net::SocketAddr, path: &str) -> String {
    let reply = test_support::http::get_async(addr, path).await;
    format!("{}\r\n\r\n{}", reply.head, reply.body)
}

/// QEMU processes whose command line mentions `dir` (each test has its own directory).
pub(crate) fn qemu_children(dir: &Path) -> usize {
    let needle = dir.display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            cmdline.contains("qemu-system-x86") && cmdline.contains(&needle)
        })
        .count()
}

/// States the accelerator a test's guests ran under, and checks that it is the one the host
/// probe says this host should run guests under.
pub(crate) fn accelerator_is_as_expected(accel: Accel) {
    let kvm = KvmSupport::probe();
    eprintln!("accelerator: {accel} ({kvm})");
    assert_eq!(accel, kvm.expected_accel(), "{kvm}");
}
