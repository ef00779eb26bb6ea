//! Clone latency, `fork` against `spawn`, of the same warm-app, measured through a running
//! forkd: from sending the clone request to the clone's first HTTP 200. `bench/clone/run`
//! starts forkd and runs this; see there.
//!
//! Usage: `fork_clone_bench URL TOKEN WARM_APP WARMUP_MS FORK_CLONES SPAWN_CLONES SPAWN_BATCH`
#![allow(clippy::print_stdout, clippy::unwrap_used, missing_docs)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use forkd::{Client, Driver, TemplateSpec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends `GET /` until it answers 200; returns when it does.
async fn first_ok(addr: SocketAddr) {
    loop {
        if let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await {
            let _ = stream.set_nodelay(true);
            let request = format!("GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
            let mut head = [0u8; 12];
            if stream.write_all(request.as_bytes()).await.is_ok()
                && stream.read_exact(&mut head).await.is_ok()
                && &head[9..12] == b"200"
            {
                return;
            }
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

struct Samples {
    api: Vec<Duration>,
    first_ok: Vec<Duration>,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn report(driver: &str, samples: &mut Samples) {
    for (what, values) in [
        ("API response", &mut samples.api),
        ("first HTTP 200", &mut samples.first_ok),
    ] {
        values.sort();
        println!(
            "{driver:<6} {what:<15} n={:<4} p50={:>10.3} ms  p99={:>10.3} ms  max={:>10.3} ms",
            values.len(),
            percentile(values, 50.0).as_secs_f64() * 1e3,
            percentile(values, 99.0).as_secs_f64() * 1e3,
            values[values.len() - 1].as_secs_f64() * 1e3,
        );
    }
}

async fn measure(client: &Client, template: &str, clones: usize, batch: usize) -> Samples {
    let mut samples = Samples {
        api: Vec::new(),
        first_ok: Vec::new(),
    };
    let mut done = 0;
    while done < clones {
        let count = batch.min(clones - done);
        let start = Instant::now();
        let made = client.create_clones(template, count).await.unwrap();
        let api = start.elapsed();
        let mut firsts = tokio::task::JoinSet::new();
        for clone in &made {
            assert!(clone.ready, "{clone:?}");
            let addr = clone.addr;
            firsts.spawn(async move {
                first_ok(addr).await;
                start.elapsed()
            });
        }
        while let Some(elapsed) = firsts.join_next().await {
            samples.first_ok.push(elapsed.unwrap());
            samples.api.push(api);
        }
        for clone in made {
            client.kill(&clone.id).await.unwrap();
        }
        done += count;
    }
    samples
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [
        url,
        token,
        app,
        warmup_ms,
        fork_clones,
        spawn_clones,
        spawn_batch,
    ] = &args[..]
    else {
        panic!(
            "usage: fork_clone_bench URL TOKEN WARM_APP WARMUP_MS FORK_CLONES SPAWN_CLONES SPAWN_BATCH"
        );
    };
    let client = Client::new(url, token).unwrap();
    let command = |extra: &[&str]| {
        let mut command = vec![app.clone(), "--warmup-ms".to_owned(), warmup_ms.clone()];
        command.extend(extra.iter().map(|s| s.to_string()));
        command
    };
    client
        .create_template(&TemplateSpec::new("bench-fork", Driver::Fork, command(&[])))
        .await
        .unwrap();
    client
        .create_template(&TemplateSpec::new(
            "bench-spawn",
            Driver::Spawn,
            command(&["--listen", "127.0.0.1:{port}"]),
        ))
        .await
        .unwrap();

    // A few unmeasured clones first, so both paths start with warm caches and pools.
    measure(&client, "bench-fork", 5, 1).await;
    let mut fork = measure(&client, "bench-fork", fork_clones.parse().unwrap(), 1).await;
    let mut spawn = measure(
        &client,
        "bench-spawn",
        spawn_clones.parse().unwrap(),
        spawn_batch.parse().unwrap(),
    )
    .await;
    println!("clone to first HTTP 200 of warm-app (--warmup-ms {warmup_ms}), through forkd's API:");
    report("fork", &mut fork);
    report("spawn", &mut spawn);
    let speedup = percentile(&spawn.first_ok, 50.0).as_secs_f64()
        / percentile(&fork.first_ok, 50.0).as_secs_f64();
    println!("fork is {speedup:.0}x faster than spawn at p50");
    client.delete_template("bench-fork").await.unwrap();
    client.delete_template("bench-spawn").await.unwrap();
}
