//! Squall's system calls on the kernel its users run, not only on this host's: the unit
//! tests of the crates that call the kernel (`kernel`, `zygote`) run inside a microVM booted
//! with the guest kernel of `/boot` — Debian's own, 6.1 on Debian 12, older than the hosts
//! these tests run on — and must pass there, skipping (with the reason printed) only what
//! that kernel truly lacks.
#![allow(clippy::unwrap_used)] // In tests a panic is a failed test, which is the point.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use microvm::{AppSource, ImageSpec};
use test_support::Scratch;

/// How long the guest may take to boot and run the tests (TCG on a busy host).
const GUEST_LIMIT: Duration = Duration::from_secs(60);

/// The unit-test executable of `package`, built if it is not already.
fn unit_tests_of(package: &str) -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "test",
            "-p",
            package,
            "--lib",
            "--no-run",
            "--message-format=json",
        ])
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "building {package}'s tests failed");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == package)
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .unwrap_or_else(|| panic!("no test executable for {package}"))
}

/// The guest kernel's command line: under TCG on a busy host a kernel left to calibrate its
/// TSC can hang, so it is told the rate, as the vm driver's guests are.
fn kernel_command_line() -> String {
    let mut line = String::from("console=ttyS0 panic=-1 quiet");
    if let Some(khz) = microvm::host::tsc_khz() {
        line.push_str(&format!(" tsc_early_khz={khz} tsc=reliable"));
    }
    line
}

/// A QEMU killed if the test gives up on it.
struct Qemu(std::process::Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Boots `image` (its app runs once and the guest powers off) and returns the console.
fn boot_to_end(image: &microvm::Image) -> String {
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args([
        "-M",
        "microvm,acpi=on,rtc=off",
        "-accel",
        "tcg",
        "-cpu",
        "max",
    ])
    .args(["-smp", "1", "-m", "256M", "-nodefaults", "-no-user-config"])
    .args(["-display", "none", "-no-reboot"])
    .args(["-bios", "/usr/share/qemu/qboot.rom", "-serial", "stdio"])
    .arg("-kernel")
    .arg(&image.kernel)
    .arg("-initrd")
    .arg(&image.initramfs)
    .arg("-append")
    .arg(kernel_command_line())
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    let mut qemu = Qemu(
        qemu.spawn()
            .expect("qemu-system-x86_64 (scripts/install-deps)"),
    );
    let stdout = qemu.0.stdout.take().unwrap();
    let console = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut std::io::BufReader::new(stdout), &mut text);
        text
    });
    // QEMU exits when the guest powers off; if it does not, the console says where it was.
    let started = std::time::Instant::now();
    while qemu.0.try_wait().unwrap().is_none() && started.elapsed() < GUEST_LIMIT {
        std::thread::sleep(Duration::from_millis(100));
    }
    let powered_off = qemu.0.try_wait().unwrap().is_some();
    drop(qemu);
    let console = console.join().unwrap().replace('\r', "");
    assert!(
        powered_off,
        "the guest did not power off within {GUEST_LIMIT:?}:\n{console}"
    );
    console
}

#[test]
fn the_kernel_calling_crates_pass_their_tests_on_the_guest_kernel() {
    for package in ["kernel", "zygote"] {
        let scratch = Scratch::new(&format!("guest-kernel-{package}"));
        let image = microvm::image::build(
            &ImageSpec {
                app: AppSource::Executable {
                    path: unit_tests_of(package),
                    args: ["--test-threads", "1", "--nocapture"]
                        .map(String::from)
                        .to_vec(),
                },
                kernel: None,
                busybox: None,
                files: Vec::new(),
            },
            &scratch.join("image"),
        )
        .unwrap();
        let console = boot_to_end(&image);
        let tests: String = console
            .lines()
            .skip_while(|l| !l.starts_with("running "))
            .collect::<Vec<_>>()
            .join("\n");
        // The accelerator is TCG on every host: this test is about the guest's kernel.
        println!(
            "{package}'s tests on Linux {} (accelerator: tcg):\n{tests}",
            image.kernel_release
        );
        assert!(
            tests.contains("test result: ok.")
                && console.contains("squall-guest: app exited with status 0"),
            "{package}'s tests failed on Linux {}:\n{console}",
            image.kernel_release
        );
    }
}
