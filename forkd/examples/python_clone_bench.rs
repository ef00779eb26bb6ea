//! A Python web app's workers, `fork` (a warm `squall_zygote` template) against `spawn` (the
//! same command started cold), measured through a running forkd from the clone request to
//! the worker's first HTTP 200; then the memory of warm clones in service: the PSS of each
//! clone against the template's RSS. `bench/python/run` starts forkd and runs this for each
//! app; see there.
//!
//! Usage: `python_clone_bench URL TOKEN HEALTH_PATH FORK_CLONES SPAWN_CLONES MEMORY_CLONES
//! REQUESTS -- COMMAND...`
#![allow(clippy::print_stdout, clippy::unwrap_used, missing_docs)]

mod common;

use std::collections::BTreeMap;

use std::time::Duration;

use common::{first_ok, measure, measure_paced, percentile, report};
use forkd::{Client, Driver, TemplateSpec};

/// A `/proc/PID/smaps_rollup` field, in kB.
fn rollup_kb(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap();
    text.lines()
        .find_map(|line| {
            let rest = line.strip_prefix(field)?.strip_prefix(':')?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/smaps_rollup"))
}

fn mb(kb: u64) -> f64 {
    kb as f64 * 1024.0 / 1e6
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: python_clone_bench URL TOKEN HEALTH_PATH FORK_CLONES SPAWN_CLONES \
                 MEMORY_CLONES REQUESTS -- COMMAND...";
    let split = args.iter().position(|a| a == "--").expect(usage);
    let (options, command) = (&args[..split], args[split + 1..].to_vec());
    let [
        url,
        token,
        health,
        fork_clones,
        spawn_clones,
        memory_clones,
        requests,
    ] = options
    else {
        panic!("{usage}");
    };
    let count = |s: &String| -> usize { s.parse().expect(usage) };
    let client = Client::new(url, token).unwrap();
    let spec = |name: &str, driver| {
        let mut spec = TemplateSpec::new(name, driver, command.clone());
        spec.health_path = health.clone();
        spec.start_timeout_ms = 120_000;
        spec
    };
    client
        .create_template(&spec("py-fork", Driver::Fork))
        .await
        .unwrap();
    client
        .create_template(&spec("py-spawn", Driver::Spawn))
        .await
        .unwrap();

    // A few unmeasured clones first, so both paths start with warm caches.
    measure(&client, "py-fork", health, 3, 1).await;
    measure(&client, "py-spawn", health, 1, 1).await;
    // Back to back: each clone is asked for as soon as the last one answered and was killed,
    // hundreds a second, so the spares forked ahead may not be ready; paced: one every 20 ms,
    // as a scaler asking for 5 clones per 100 ms tick would.
    let pace = Duration::from_millis(20);
    let mut fork = measure(&client, "py-fork", health, count(fork_clones), 1).await;
    let mut paced = measure_paced(&client, "py-fork", health, count(fork_clones), 1, pace).await;
    let mut spawn = measure(&client, "py-spawn", health, count(spawn_clones), 1).await;
    println!("clone to first HTTP 200 on {health}, through forkd's API: {command:?}");
    report("fork", &mut fork);
    report("fork/20ms", &mut paced);
    report("spawn", &mut spawn);
    let p50 = |samples: &common::Samples| percentile(&samples.first_ok, 50.0).as_secs_f64();
    println!(
        "fork is {:.0}x faster than spawn at p50 back to back, {:.0}x one every 20 ms",
        p50(&spawn) / p50(&fork),
        p50(&spawn) / p50(&paced)
    );

    // Memory: MEMORY_CLONES warm clones at once, each having served REQUESTS requests.
    let clones = client
        .create_clones("py-fork", count(memory_clones))
        .await
        .unwrap();
    for clone in &clones {
        for _ in 0..count(requests) {
            first_ok(clone.addr, health).await;
        }
    }
    let templates: BTreeMap<String, Option<u32>> = client
        .templates()
        .await
        .unwrap()
        .into_iter()
        .map(|t| (t.spec.name, t.pid))
        .collect();
    let template_pid = templates["py-fork"].expect("a fork template has a pid");
    let template_rss = rollup_kb(template_pid, "Rss");
    let mean = |field: &str| -> u64 {
        let values: Vec<u64> = clones
            .iter()
            .map(|c| rollup_kb(c.pid.unwrap(), field))
            .collect();
        values.iter().sum::<u64>() / values.len() as u64
    };
    let (pss, private) = (mean("Pss"), mean("Private_Clean") + mean("Private_Dirty"));
    println!(
        "memory with {} clones in service ({} requests each): template RSS {:.1} MB, \
         PSS per clone mean {:.1} MB = {:.1} % of the template's RSS; each clone's own \
         pages (private, whatever the number of clones) {:.1} MB = {:.1} %",
        clones.len(),
        requests,
        mb(template_rss),
        mb(pss),
        100.0 * pss as f64 / template_rss as f64,
        mb(private),
        100.0 * private as f64 / template_rss as f64
    );
    for clone in clones {
        client.kill(&clone.id).await.unwrap();
    }
    client.delete_template("py-fork").await.unwrap();
    client.delete_template("py-spawn").await.unwrap();
}
