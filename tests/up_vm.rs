//! `squall up --driver vm`: the demo app in a microVM, cloned from a warm snapshot under
//! QEMU (TCG on machines where KVM cannot run the guest), absorbing a small surge.
#![allow(clippy::unwrap_used)] // In tests a panic is a failed test, which is the point.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

struct Up(Child);

impl Drop for Up {
    fn drop(&mut self) {
        // SIGTERM, so the embedded forkd kills its microVMs and removes their files.
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").unwrap();
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    let status = reply
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, reply)
}

fn ready_workers(admin: SocketAddr) -> u64 {
    let (_, reply) = get(admin, "/status");
    let body = reply.split("\r\n\r\n").nth(1).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    v["worker_counts"]["ready"].as_u64().unwrap()
}

fn wait_for(admin: SocketAddr, what: &str, deadline: Duration, check: impl Fn(u64) -> bool) -> u64 {
    let start = Instant::now();
    loop {
        let ready = ready_workers(admin);
        if check(ready) {
            return ready;
        }
        assert!(
            start.elapsed() < deadline,
            "{what}: {ready} ready workers after {deadline:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn squall_up_with_the_vm_driver_absorbs_a_small_surge() {
    let squall = std::path::Path::new(env!("CARGO_BIN_EXE_squall"));
    // The demo app as its own, smaller binary: it goes into the guest's initramfs.
    let warm_app = squall.with_file_name("warm-app");
    assert!(
        warm_app.exists(),
        "build the demo app first: cargo build -p warm-app ({})",
        warm_app.display()
    );
    let dir = std::env::temp_dir().join(format!("squall-up-vm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let policy = dir.join("policy.yaml");
    std::fs::write(
        &policy,
        "name: vm\ntemplate: app\nworkers: {min: 1, max: 4}\ntarget: {concurrency: 2}\n\
         window: {stable: 2s, panic: 500ms}\nscale_down: {delay: 2s, drain_timeout: 5s}\n",
    )
    .unwrap();
    let mut child = Command::new(squall)
        .args(["up", "--driver", "vm", "--policy"])
        .arg(&policy)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--max-concurrency",
            "2",
            "--",
        ])
        .arg(&warm_app)
        .args([
            "--listen",
            "0.0.0.0:80",
            "--warmup-ms",
            "200",
            "--service-ms",
            "40",
            "--concurrency",
            "2",
            "--cache-mib",
            "1",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let up = Up(child);
    let addr = |after: &str| -> SocketAddr {
        let rest = line
            .split(after)
            .nth(1)
            .unwrap_or_else(|| panic!("no {after} in {line:?}"));
        rest.split('/').next().unwrap().parse().unwrap()
    };
    let (listen, admin) = (addr("send traffic to http://"), addr("status http://"));
    wait_for(
        admin,
        "first microVM worker",
        Duration::from_secs(120),
        |n| n >= 1,
    );
    let (status, reply) = get(listen, "/random");
    assert_eq!(status, 200, "{reply}");

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let clients: Vec<_> = (0..6)
        .map(|_| {
            let (stop, ok, failed) = (Arc::clone(&stop), Arc::clone(&ok), Arc::clone(&failed));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match get(listen, "/").0 {
                        200 => ok.fetch_add(1, Ordering::Relaxed),
                        _ => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    let peak = wait_for(admin, "scale up", Duration::from_secs(60), |n| n >= 2);
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    assert!(peak >= 2);
    wait_for(admin, "back to min", Duration::from_secs(60), |n| n == 1);
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "{} answered",
        ok.load(Ordering::Relaxed)
    );
    drop(up);
    let _ = std::fs::remove_dir_all(&dir);
}
