//! Clone latency, `fork` against `spawn`, of the same warm-app, measured through a running
//! forkd: from sending the clone request to the clone's first HTTP 200. `bench/clone/run`
//! starts forkd and runs this; see there.
//!
//! Usage: `fork_clone_bench URL TOKEN WARM_APP WARMUP_MS FORK_CLONES SPAWN_CLONES SPAWN_BATCH`
#![allow(clippy::print_stdout, clippy::unwrap_used, missing_docs)]

mod common;

use common::{measure, percentile, report};
use forkd::{Client, Driver, TemplateSpec};

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
    measure(&client, "bench-fork", "/", 5, 1).await;
    let mut fork = measure(&client, "bench-fork", "/", fork_clones.parse().unwrap(), 1).await;
    let mut spawn = measure(
        &client,
        "bench-spawn",
        "/",
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
