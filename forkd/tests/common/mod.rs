//! What forkd's integration tests share beyond `test-support`: an in-process daemon on port
//! 0, and the demo app as a template.
// Test support: a panic here is a failed test, so unwrapping is what we want.
#![allow(dead_code, unreachable_pub, missing_docs, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::OnceLock;

use forkd::{Client, CloneInfo, Config, Driver, ErrorCode, TemplateSpec};
use lifecycle::Stop;

pub const TOKEN: &str = "test-token";

/// The warm-app binary, built if this test run did not build it already.
pub fn warm_app() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let exe = std::env::current_exe().unwrap();
        // target/debug/deps/<test> -> target/debug/warm-app
        let path = exe.parent().unwrap().parent().unwrap().join("warm-app");
        if !path.exists() {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let status = std::process::Command::new(cargo)
                .args(["build", "-p", "warm-app"])
                .status()
                .unwrap();
            assert!(status.success(), "building warm-app failed");
        }
        path
    })
    .clone()
}

/// A warm-app template: `fork` or `spawn`, a short warm-up and a small cache.
pub fn warm_app_spec(name: &str, driver: Driver) -> TemplateSpec {
    warm_app_spec_warming(name, driver, 200)
}

/// A warm-app template that takes `warmup_ms` to warm up (a `spawn` clone takes it to start).
pub fn warm_app_spec_warming(name: &str, driver: Driver, warmup_ms: u64) -> TemplateSpec {
    let app = warm_app().display().to_string();
    let mut command = vec![
        app,
        "--warmup-ms".into(),
        warmup_ms.to_string(),
        "--cache-mib".into(),
        "4".into(),
    ];
    if driver == Driver::Spawn {
        command.extend(["--listen".into(), "127.0.0.1:{port}".into()]);
    }
    TemplateSpec::new(name, driver, command)
}

/// A `vm` template whose guest app is busybox's web server: it serves the guest's root, so
/// `/init` answers.
pub fn httpd_spec(name: &str) -> TemplateSpec {
    let command = ["/bin/busybox", "httpd", "-f", "-p", "80", "-h", "/"]
        .map(String::from)
        .to_vec();
    let mut spec = TemplateSpec::new(name, Driver::Vm, command);
    spec.health_path = "/init".into();
    // Booting a guest under TCG on a loaded machine takes a while.
    spec.start_timeout_ms = 120_000;
    spec
}

/// A daemon served in this process on a loopback port.
pub struct Daemon {
    pub addr: SocketAddr,
    pub client: Client,
    stop: Stop,
    task: tokio::task::JoinHandle<Result<(), forkd::ServeError>>,
}

impl Daemon {
    pub async fn start() -> Daemon {
        Daemon::with_config(Config::new(TOKEN)).await
    }

    pub async fn with_config(config: Config) -> Daemon {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Stop::new();
        let task = tokio::spawn(forkd::serve(listener, config, stop.shutdown()));
        let client = Client::new(&format!("http://{addr}"), TOKEN).unwrap();
        Daemon {
            addr,
            client,
            stop,
            task,
        }
    }

    /// A daemon with the default limits and `spec` created (and warm).
    pub async fn start_with_template(spec: &TemplateSpec) -> Daemon {
        let daemon = Daemon::start().await;
        daemon.client.create_template(spec).await.unwrap();
        daemon
    }

    /// A daemon allowing `max_clones` clones, with `spec` created (and warm).
    pub async fn with_template(max_clones: usize, spec: &TemplateSpec) -> Daemon {
        let mut config = Config::new(TOKEN);
        config.max_clones = max_clones;
        let daemon = Daemon::with_config(config).await;
        daemon.client.create_template(spec).await.unwrap();
        daemon
    }

    /// Asserts that each of `samples` (a metric's name, labels and value, as rendered) is a
    /// line of the daemon's `/metrics`.
    pub async fn assert_metrics(&self, samples: impl IntoIterator<Item = impl AsRef<str>>) {
        let metrics = self.client.metrics().await.unwrap();
        for sample in samples {
            let sample = sample.as_ref();
            assert!(
                metrics.lines().any(|line| line == sample),
                "metrics lack {sample:?}:\n{metrics}"
            );
        }
    }

    /// Gives the shutdown signal, the way SIGTERM does, without waiting.
    pub fn signal_stop(&self) {
        self.stop.stop();
    }

    /// Shuts the daemon down the way SIGTERM does, and waits until it has.
    pub async fn stop(self) {
        self.stop.stop();
        self.task.await.unwrap().unwrap();
    }
}

/// Sends one clone request per count in `counts`, all at once, for clones of `template`;
/// returns the ready clones they got between them and how many requests were refused. Every
/// refusal must say `no_capacity`.
pub async fn clone_in_parallel(
    client: &Client,
    template: &str,
    counts: &[usize],
) -> (Vec<CloneInfo>, usize) {
    let mut requests = tokio::task::JoinSet::new();
    for &count in counts {
        let client = client.clone();
        let template = template.to_owned();
        requests.spawn(async move { client.create_clones(&template, count).await });
    }
    let (mut granted, mut refused) = (Vec::new(), 0);
    while let Some(result) = requests.join_next().await {
        match result.unwrap() {
            Ok(clones) => granted.extend(clones.into_iter().filter(|c| c.ready)),
            Err(error) => {
                assert_eq!(error.code(), Some(ErrorCode::NoCapacity), "{error}");
                refused += 1;
            }
        }
    }
    (granted, refused)
}
