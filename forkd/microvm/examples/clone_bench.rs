//! The vm driver's clone benchmark: clone-to-first-200 for a warm microVM clone (with and
//! without the standby pool) against a cold boot of the same image, single clones and 16 at
//! once, and the memory each clone costs. Run through `bench/vm-clone/run`.
#![allow(clippy::unwrap_used, clippy::print_stdout)] // A benchmark reports or stops.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use microvm::{Image, Pool, PoolMode, Template, VmConfig};

fn percentile(samples: &mut [Duration], q: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    samples.sort();
    let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len()) - 1;
    samples[rank]
}

/// Asks `GET path` until it answers 200: the clone's first HTTP 200.
async fn first_200(addr: std::net::SocketAddr, path: &str) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        if let Ok(mut s) = tokio::net::TcpStream::connect(addr).await {
            let _ = s
                .write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
                .await;
            let mut head = [0u8; 12];
            if s.read_exact(&mut head).await.is_ok() && &head[9..12] == b"200" {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let image_dir = PathBuf::from(
        args.next()
            .expect("usage: clone_bench IMAGE_DIR [HEALTH_PATH] [SINGLE] [COLD] [CONCURRENT]"),
    );
    let health_path = args.next().unwrap_or_else(|| "/".into());
    let single: usize = args.next().map_or(20, |a| a.parse().unwrap());
    let cold_runs: usize = args.next().map_or(3, |a| a.parse().unwrap());
    let concurrent: usize = args.next().map_or(16, |a| a.parse().unwrap());

    let image = Image::open(&image_dir).unwrap();
    let config = VmConfig {
        health_path,
        tcg_cache_mib: std::env::var("SQUALL_TCG_CACHE_MIB")
            .map_or(VmConfig::default().tcg_cache_mib, |v| v.parse().unwrap()),
        ..VmConfig::default()
    };
    let started = Instant::now();
    let template = Arc::new(
        Template::create("bench", &image, &config, 20)
            .await
            .unwrap(),
    );
    println!(
        "template: booted, warmed and snapshotted in {} under {}",
        ms(started.elapsed()),
        template.accel()
    );

    // Cold boots of the same image: the baseline.
    let mut cold = Vec::new();
    for i in 0..cold_runs {
        let t = Instant::now();
        let vm = microvm::vm::boot_cold(&image, &config, template.accel(), &format!("cold{i}"))
            .await
            .unwrap();
        cold.push(t.elapsed());
        vm.kill().await;
    }

    // Single clones without a pool: QEMU launch on the critical path.
    let mut unpooled = Vec::new();
    let mut launch_part = Vec::new();
    for i in 0..single {
        let t = Instant::now();
        let standby = template.launch(&format!("direct{i}")).await.unwrap();
        launch_part.push(t.elapsed());
        let vm = standby.start(&template).await.unwrap();
        first_200(vm.addr(), &config.health_path).await;
        unpooled.push(t.elapsed());
        vm.kill().await;
    }

    // Single clones from the pool, each timed once the pool has refilled, as it would be
    // between flash crowds: waiting QEMUs (restore and resume on the critical path), then
    // restored and paused guests (resume only).
    let mut pooled = Vec::new();
    let mut restored = Vec::new();
    for (mode, samples) in [
        (PoolMode::Waiting, &mut pooled),
        (PoolMode::Restored, &mut restored),
    ] {
        let pool = Pool::start(Arc::clone(&template), 2, mode, counter("pooled"));
        for _ in 0..single {
            while pool.ready().await < 2 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let t = Instant::now();
            let vm = pool.clone_vm().await.unwrap();
            first_200(vm.addr(), &config.health_path).await;
            samples.push(t.elapsed());
            vm.kill().await;
        }
        pool.shutdown().await;
    }

    // Many at once, from a pool of paused guests sized for them.
    let pool = Pool::start(
        Arc::clone(&template),
        concurrent,
        PoolMode::Restored,
        counter("burst"),
    );
    while pool.ready().await < concurrent {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let t = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrent {
        let pool = Arc::clone(&pool);
        let path = config.health_path.clone();
        tasks.spawn(async move {
            let vm = pool.clone_vm().await.unwrap();
            first_200(vm.addr(), &path).await;
            (vm, Instant::now())
        });
    }
    let mut burst = Vec::new();
    let mut clones = Vec::new();
    while let Some(done) = tasks.join_next().await {
        let (vm, at) = done.unwrap();
        burst.push(at - t);
        clones.push(vm);
    }
    let all_serving = t.elapsed();
    pool.shutdown().await;
    let pss: Vec<u64> = clones.iter().map(|vm| vm.pss_bytes().unwrap()).collect();
    let breakdowns: Vec<Breakdown> = clones
        .iter()
        .map(|vm| Breakdown::of(vm.pid().unwrap(), template.ram_path()))
        .collect();
    let mean_pss = pss.iter().sum::<u64>() as f64 / pss.len() as f64 / 1e6;
    let max_pss = *pss.iter().max().unwrap() as f64 / 1e6;
    for vm in clones {
        vm.kill().await;
    }

    let cold_p50 = percentile(&mut cold, 0.5);
    let pooled_p50 = percentile(&mut pooled, 0.5);
    println!();
    println!("accelerator: {}", template.accel());
    println!(
        "{:<34} {:>10} {:>10} {:>6}",
        "clone to first HTTP 200", "p50", "p99", "n"
    );
    println!(
        "{:<34} {:>10} {:>10} {:>6}",
        "cold boot of the image",
        ms(cold_p50),
        ms(percentile(&mut cold, 0.99)),
        cold.len()
    );
    println!(
        "{:<34} {:>10} {:>10} {:>6}",
        "clone, QEMU launched on demand",
        ms(percentile(&mut unpooled, 0.5)),
        ms(percentile(&mut unpooled, 0.99)),
        unpooled.len()
    );
    println!(
        "{:<34} {:>10} {:>10} {:>6}",
        "clone from a pool of waiting QEMUs",
        ms(pooled_p50),
        ms(percentile(&mut pooled, 0.99)),
        pooled.len()
    );
    let restored_p50 = percentile(&mut restored, 0.5);
    println!(
        "{:<34} {:>10} {:>10} {:>6}",
        "clone from a pool of paused guests",
        ms(restored_p50),
        ms(percentile(&mut restored, 0.99)),
        restored.len()
    );
    println!(
        "{:<34} {:>10} {:>10} {:>6}",
        format!("{concurrent} clones at once (each)"),
        ms(percentile(&mut burst, 0.5)),
        ms(percentile(&mut burst, 0.99)),
        burst.len()
    );
    println!(
        "{concurrent} clones at once, all serving after {}",
        ms(all_serving)
    );
    println!(
        "of a clone launched on demand, QEMU start and monitor took p50 {}",
        ms(percentile(&mut launch_part, 0.5))
    );
    println!("PSS per clone with {concurrent} running: mean {mean_pss:.1} MB, max {max_pss:.1} MB");
    Breakdown::print_mean(&breakdowns);
    println!(
        "clone vs cold boot, p50: {:.0}x faster from waiting QEMUs, {:.0}x from paused guests",
        cold_p50.as_secs_f64() / pooled_p50.as_secs_f64(),
        cold_p50.as_secs_f64() / restored_p50.as_secs_f64()
    );
}

/// Where a clone's memory goes, from `/proc/PID/smaps`, in kB per kind of mapping.
#[derive(Default)]
struct Breakdown {
    /// kind -> (Pss, Rss, Anonymous, Private_Dirty)
    kinds: std::collections::BTreeMap<&'static str, [u64; 4]>,
}

impl Breakdown {
    const FIELDS: [&'static str; 4] = ["Pss:", "Rss:", "Anonymous:", "Private_Dirty:"];

    fn of(pid: u32, ram: &std::path::Path) -> Self {
        let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
        if let Ok(dir) = std::env::var("SQUALL_BENCH_SMAPS_DIR") {
            std::fs::write(format!("{dir}/{pid}.smaps"), &text).unwrap();
        }
        let ram = ram.display().to_string();
        let mut breakdown = Self::default();
        let mut kind = "";
        for line in text.lines() {
            let first = line.split_whitespace().next().unwrap_or_default();
            if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
                let parts: Vec<&str> = line.split_whitespace().collect();
                let perms = parts.get(1).copied().unwrap_or_default();
                let name = parts.get(5..).map(|p| p.join(" ")).unwrap_or_default();
                kind = if name.contains("tcg-jit") {
                    "TCG translation cache"
                } else if name.starts_with(&ram) {
                    "guest RAM (file, private)"
                } else if name == "[heap]" {
                    "heap"
                } else if name.starts_with("[stack") {
                    "main stack"
                } else if name.starts_with('/') {
                    "binary and libraries"
                } else if perms.contains('x') || name.contains("tcg") {
                    "TCG translation cache"
                } else if name.is_empty() {
                    "other anonymous"
                } else {
                    "other"
                };
                continue;
            }
            for (i, field) in Self::FIELDS.iter().enumerate() {
                if let Some(v) = line.strip_prefix(field) {
                    let kb: u64 = v.trim().trim_end_matches("kB").trim().parse().unwrap();
                    breakdown.kinds.entry(kind).or_default()[i] += kb;
                }
            }
        }
        breakdown
    }

    fn print_mean(all: &[Self]) {
        let mut sum: std::collections::BTreeMap<&'static str, [u64; 4]> = Default::default();
        for b in all {
            for (kind, v) in &b.kinds {
                let s = sum.entry(kind).or_default();
                for i in 0..4 {
                    s[i] += v[i];
                }
            }
        }
        let n = all.len().max(1) as f64;
        println!(
            "{:<34} {:>9} {:>9} {:>9} {:>9}",
            "mean per clone, MB (10^6 bytes)", "PSS", "RSS", "anon", "priv.dirty"
        );
        let mut total = [0u64; 4];
        for (kind, v) in &sum {
            let mb: Vec<String> = v
                .iter()
                .map(|kb| format!("{:.1}", *kb as f64 / n * 1024.0 / 1e6))
                .collect();
            println!(
                "{:<34} {:>9} {:>9} {:>9} {:>9}",
                kind, mb[0], mb[1], mb[2], mb[3]
            );
            for i in 0..4 {
                total[i] += v[i];
            }
        }
        let mb: Vec<String> = total
            .iter()
            .map(|kb| format!("{:.1}", *kb as f64 / n * 1024.0 / 1e6))
            .collect();
        println!(
            "{:<34} {:>9} {:>9} {:>9} {:>9}",
            "total", mb[0], mb[1], mb[2], mb[3]
        );
    }
}

/// Clone ids `prefix1`, `prefix2`, ...
fn counter(prefix: &'static str) -> impl Fn() -> String + Send + Sync + 'static {
    let next = std::sync::atomic::AtomicU64::new(1);
    move || {
        format!(
            "{prefix}{}",
            next.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        )
    }
}
