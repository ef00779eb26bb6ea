//! What the clone benchmarks share: the first HTTP 200 of a new clone, clones made through
//! forkd's API and timed from the request to that 200, and percentiles.
#![allow(dead_code)] // Each benchmark uses its own part.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use forkd::Client;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends `GET path` until it answers 200; returns when it does.
pub(crate) async fn first_ok(addr: SocketAddr, path: &str) {
    loop {
        if let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await {
            let _ = stream.set_nodelay(true);
            let request =
                format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
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

/// Timings of clones: the API's answer, and the first HTTP 200.
pub(crate) struct Samples {
    pub(crate) api: Vec<Duration>,
    pub(crate) first_ok: Vec<Duration>,
}

/// The `p`th percentile of `sorted`.
pub(crate) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Prints p50, p99 and max of each kind of sample, sorting them.
pub(crate) fn report(driver: &str, samples: &mut Samples) {
    for (what, values) in [
        ("API response", &mut samples.api),
        ("first HTTP 200", &mut samples.first_ok),
    ] {
        values.sort();
        println!(
            "{driver:<10} {what:<15} n={:<4} p50={:>10.3} ms  p99={:>10.3} ms  max={:>10.3} ms",
            values.len(),
            percentile(values, 50.0).as_secs_f64() * 1e3,
            percentile(values, 99.0).as_secs_f64() * 1e3,
            values[values.len() - 1].as_secs_f64() * 1e3,
        );
    }
}

/// Makes `clones` clones of `template`, `batch` at a time, timing each from the request to
/// its first 200 on `path`, and kills them; each batch follows the last at once.
pub(crate) async fn measure(
    client: &Client,
    template: &str,
    path: &str,
    clones: usize,
    batch: usize,
) -> Samples {
    measure_paced(client, template, path, clones, batch, Duration::ZERO).await
}

/// As [`measure`], but each batch starts no sooner than `pace` after the last one started
/// (as a scaler's ticks ask for clones), unless the last one took longer.
pub(crate) async fn measure_paced(
    client: &Client,
    template: &str,
    path: &str,
    clones: usize,
    batch: usize,
    pace: Duration,
) -> Samples {
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
            let (addr, path) = (clone.addr, path.to_owned());
            firsts.spawn(async move {
                first_ok(addr, &path).await;
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
        tokio::time::sleep_until((start + pace).into()).await;
        done += count;
    }
    samples
}
