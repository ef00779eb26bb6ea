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

/// What to measure, from the command line.
struct Args {
    image_dir: PathBuf,
    /// Asked until it answers 200: "the clone serves".
    health_path: String,
    single: usize,
    cold_runs: usize,
    concurrent: usize,
    /// Each of the concurrent clones serves this many requests to `serve_path` before its
    /// memory is read, so the figure is that of a clone in service, not of one just born.
    requests: usize,
    serve_path: String,
    /// KSM's `pages_to_scan` while the benchmark runs it.
    ksm_pages: u32,
}

const USAGE: &str = "usage: clone_bench IMAGE_DIR [--health PATH] [--single N] [--cold N] \
                     [--concurrent N] [--requests N] [--serve PATH] [--ksm-pages N]";

impl Args {
    fn parse() -> Self {
        let mut args = std::env::args().skip(1);
        let image_dir = PathBuf::from(args.next().expect(USAGE));
        let mut parsed = Self {
            image_dir,
            health_path: "/".into(),
            single: 20,
            cold_runs: 3,
            concurrent: 16,
            requests: 20,
            serve_path: String::new(),
            ksm_pages: 1000,
        };
        while let Some(flag) = args.next() {
            let value = args.next().expect(USAGE);
            let count = || value.parse::<usize>().expect(USAGE);
            match flag.as_str() {
                "--health" => parsed.health_path = value.clone(),
                "--single" => parsed.single = count(),
                "--cold" => parsed.cold_runs = count(),
                "--concurrent" => parsed.concurrent = count(),
                "--requests" => parsed.requests = count(),
                "--serve" => parsed.serve_path = value.clone(),
                "--ksm-pages" => parsed.ksm_pages = value.parse().expect(USAGE),
                _ => panic!("{USAGE}"),
            }
        }
        if parsed.serve_path.is_empty() {
            parsed.serve_path = parsed.health_path.clone();
        }
        parsed
    }
}

/// Sends `n` requests to `path`, one after another, each on its own connection as a
/// balancer's first requests to a new worker would be; every one must answer 200.
async fn serve(addr: std::net::SocketAddr, path: &str, n: usize) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    for _ in 0..n {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut response = Vec::new();
        s.read_to_end(&mut response).await.unwrap();
        assert!(response.starts_with(b"HTTP/1.") && &response[9..12] == b"200");
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let Args {
        image_dir,
        health_path,
        single,
        cold_runs,
        concurrent,
        requests,
        serve_path,
        ksm_pages,
    } = Args::parse();

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
        let vm = microvm::boot_cold(&image, &config, template.accel(), &format!("cold{i}"))
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
        let pool = Pool::start(
            Arc::clone(&template),
            2,
            mode,
            microvm::pool::numbered_ids("pooled"),
        );
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
        microvm::pool::numbered_ids("burst"),
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
    // Every clone serves some requests (all at once, as a flash crowd would have them do),
    // then the memory of all of them is read.
    let mut serving = tokio::task::JoinSet::new();
    for vm in &clones {
        let (addr, path) = (vm.addr(), serve_path.clone());
        serving.spawn(async move { serve(addr, &path, requests).await });
    }
    while let Some(done) = serving.join_next().await {
        done.unwrap();
    }
    // Memory as the host runs now, then (if KSM was off and we may switch it on) once KSM
    // has merged what it can, on the same clones.
    let host_merging = microvm::MemoryMerging::on_this_host();
    let memory = Memory::read(&clones, template.ram_path());
    let merged = match Ksm::switch_on(ksm_pages) {
        Ok(ksm) => {
            // Interrupted, the host's settings must still be put back (by the guard's drop).
            let cost = tokio::select! {
                cost = ksm.settle() => cost,
                _ = tokio::signal::ctrl_c() => {
                    drop(ksm);
                    std::process::exit(130);
                }
            };
            let merged = Memory::read(&clones, template.ram_path());
            drop(ksm);
            Ok((merged, cost))
        }
        Err(why) => Err(why),
    };
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
    let serving = format!("{concurrent} running, after {requests} requests to {serve_path} each");
    let as_host_has_it = match host_merging {
        microvm::MemoryMerging::On => "KSM running (the host's)",
        _ => "KSM off",
    };
    memory.print(&format!("PSS per clone with {serving}, {as_host_has_it}"));
    match merged {
        Ok((merged, cost)) => {
            merged.print(&format!("PSS per clone with {serving}, KSM merged"));
            println!("{cost}");
        }
        Err(why) => println!("not measured with KSM: {why}"),
    }
    println!(
        "clone vs cold boot, p50: {:.0}x faster from waiting QEMUs, {:.0}x from paused guests",
        cold_p50.as_secs_f64() / pooled_p50.as_secs_f64(),
        cold_p50.as_secs_f64() / restored_p50.as_secs_f64()
    );
}

/// The memory of a set of clones: PSS of each, and where it goes.
struct Memory {
    pss: Vec<u64>,
    breakdowns: Vec<Breakdown>,
}

impl Memory {
    fn read(clones: &[microvm::VmClone], ram: &std::path::Path) -> Self {
        Self {
            pss: clones.iter().map(|vm| vm.pss_bytes().unwrap()).collect(),
            breakdowns: clones
                .iter()
                .map(|vm| Breakdown::of(vm.pid().unwrap(), ram))
                .collect(),
        }
    }

    fn print(&self, title: &str) {
        let mean = self.pss.iter().sum::<u64>() as f64 / self.pss.len() as f64 / 1e6;
        let max = *self.pss.iter().max().unwrap() as f64 / 1e6;
        println!("{title}: mean {mean:.1} MB, max {max:.1} MB");
        Breakdown::print_mean(&self.breakdowns);
    }
}

/// The host's KSM, switched on for the second memory reading and put back as it was.
struct Ksm {
    /// `run` and `pages_to_scan` as the host had them.
    saved_run: String,
    saved_pages_to_scan: String,
    ksmd: u32,
    pages_to_scan: u32,
    /// ksmd's pause between batches, in ms.
    sleep_ms: String,
}

/// What KSM cost to merge the clones' pages.
struct KsmCost {
    /// False if it was still merging when the wait ran out.
    settled: bool,
    sleep_ms: String,
    settle: Duration,
    ksmd_cpu: Duration,
    idle_share: f64,
    pages_to_scan: u32,
}

impl std::fmt::Display for KsmCost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "KSM (pages_to_scan {}, every {} ms): {} {:.1} s using {:.2} s of ksmd CPU; \
             then ksmd used {:.1} % of a core to keep scanning",
            self.pages_to_scan,
            self.sleep_ms,
            if self.settled {
                "merged in"
            } else {
                "STILL MERGING after"
            },
            self.settle.as_secs_f64(),
            self.ksmd_cpu.as_secs_f64(),
            self.idle_share * 100.0
        )
    }
}

const KSM: &str = "/sys/kernel/mm/ksm";

impl Ksm {
    fn read(name: &str) -> String {
        std::fs::read_to_string(format!("{KSM}/{name}"))
            .unwrap_or_default()
            .trim()
            .to_owned()
    }

    fn write(name: &str, value: &str) -> std::io::Result<()> {
        std::fs::write(format!("{KSM}/{name}"), value)
    }

    /// Starts ksmd if the host has KSM, it is off, and we may switch it.
    fn switch_on(pages_to_scan: u32) -> Result<Self, String> {
        let merging = microvm::MemoryMerging::on_this_host();
        if merging != microvm::MemoryMerging::Off {
            return Err(format!("{merging}"));
        }
        let ksmd = std::fs::read_dir("/proc")
            .map_err(|e| e.to_string())?
            .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .find(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .is_ok_and(|c| c.trim() == "ksmd")
            })
            .ok_or("no ksmd thread")?;
        // The guard first: whatever is written below is put back when it drops.
        let ksm = Self {
            saved_run: Self::read("run"),
            saved_pages_to_scan: Self::read("pages_to_scan"),
            ksmd,
            pages_to_scan,
            sleep_ms: Self::read("sleep_millisecs"),
        };
        Self::write("pages_to_scan", &pages_to_scan.to_string())
            .and_then(|()| Self::write("run", "1"))
            .map_err(|e| format!("cannot switch KSM on ({e}); run as root"))?;
        Ok(ksm)
    }

    /// ksmd's CPU time so far.
    fn cpu(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.ksmd)).unwrap();
        // Fields after the command's closing parenthesis; utime and stime are 14 and 15.
        let fields: Vec<u64> = stat[stat.rfind(')').unwrap() + 2..]
            .split_whitespace()
            .filter_map(|f| f.parse().ok())
            .collect();
        // USER_HZ is 100 on Linux/x86.
        Duration::from_millis((fields[10] + fields[11]) * 10)
    }

    /// Waits until KSM has merged what it can (a full scan that adds under 1 % to the merged
    /// pages, after at least four: a page is merged on the second scan that finds it
    /// unchanged, and the first scan may have begun before the switch), at most two minutes;
    /// then measures what ksmd costs over five more seconds.
    async fn settle(&self) -> KsmCost {
        let (start, cpu_start) = (Instant::now(), self.cpu());
        let sharing = || Self::read("pages_sharing").parse::<u64>().unwrap_or(0);
        let scans = || Self::read("full_scans").parse::<u64>().unwrap_or(0);
        let (first_scan, mut last_scans, mut last_sharing) = (scans(), scans(), sharing());
        let mut settled = false;
        while !settled && start.elapsed() < Duration::from_secs(120) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let (now_scans, now_sharing) = (scans(), sharing());
            if now_scans == last_scans {
                continue;
            }
            settled =
                now_scans >= first_scan + 4 && now_sharing <= last_sharing + last_sharing / 100;
            (last_scans, last_sharing) = (now_scans, now_sharing);
        }
        let (settle, ksmd_cpu) = (start.elapsed(), self.cpu() - cpu_start);
        let (idle_start, idle_cpu_start) = (Instant::now(), self.cpu());
        tokio::time::sleep(Duration::from_secs(5)).await;
        KsmCost {
            settled,
            sleep_ms: self.sleep_ms.clone(),
            settle,
            ksmd_cpu,
            idle_share: (self.cpu() - idle_cpu_start).as_secs_f64()
                / idle_start.elapsed().as_secs_f64(),
            pages_to_scan: self.pages_to_scan,
        }
    }
}

impl Drop for Ksm {
    fn drop(&mut self) {
        // Pages merged so far stay merged until their clones exit.
        let _ = Self::write("run", &self.saved_run);
        let _ = Self::write("pages_to_scan", &self.saved_pages_to_scan);
    }
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
        fn row(label: &str, [a, b, c, d]: [impl std::fmt::Display; 4]) {
            println!("{label:<34} {a:>9} {b:>9} {c:>9} {d:>9}");
        }
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
        // The mean per clone of a sum of kB, in MB.
        let mean_mb = |kb: &[u64; 4]| kb.map(|kb| format!("{:.1}", kb as f64 / n * 1024.0 / 1e6));
        row(
            "mean per clone, MB (10^6 bytes)",
            ["PSS", "RSS", "anon", "priv.dirty"],
        );
        let mut total = [0u64; 4];
        for (kind, v) in &sum {
            row(kind, mean_mb(v));
            for i in 0..4 {
                total[i] += v[i];
            }
        }
        row("total", mean_mb(&total));
    }
}
