//! Seeing what Squall does: its `/metrics` pass `promtool check metrics`, a real Prometheus
//! server scrapes `squall up` under load and answers the dashboard's queries (and scrapes an
//! admin listener behind a token with the token), every metric the dashboard uses is
//! exported, and the live page renders data in headless Chromium.
#![allow(clippy::unwrap_used)] // In tests a panic is a failed test, which is the point.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// The Grafana dashboard shipped in the Helm chart.
const DASHBOARD: &str = include_str!("../charts/squall/dashboards/squall.json");

/// `squall up` with the quick policy, a load of `clients` running until the guard drops.
struct Loaded {
    // Fields drop in order: the load stops before `squall up` does.
    _load: Load,
    up: Up,
    _case: Case,
}

impl Loaded {
    fn start(name: &str, clients: usize) -> Loaded {
        let case = Case::new(&format!("observe-{name}"));
        // A latency target, so the SLO series exists too.
        let text = quick_policy(1) + "# with an SLO\n";
        let text = text.replace(
            "target: {concurrency: 2}",
            "target: {concurrency: 2, latency_p95: 500ms}",
        );
        let up = case.up(&text);
        up.wait_for("the first worker", Duration::from_secs(30), |n| n >= 1);
        Loaded {
            _load: Load::start(up.listen, clients),
            up,
            _case: case,
        }
    }

    /// Waits until the scaler has cloned beyond `min`, so every series has data.
    fn wait_for_scale_up(&self) {
        self.up
            .wait_for("scaling up under load", Duration::from_secs(30), |n| n >= 2);
    }
}

/// Runs `promtool check metrics` on `text`; returns its complaints, if any.
fn promtool_check(text: &str) -> Result<(), String> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; scripts/install-deps installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The metric families a `/metrics` page declares, from its `# TYPE` lines.
fn families(text: &str) -> BTreeSet<(String, String)> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            Some((parts.next()?.to_owned(), parts.next()?.to_owned()))
        })
        .collect()
}

/// Every PromQL expression in the dashboard.
fn dashboard_queries() -> Vec<(String, String)> {
    let dashboard: serde_json::Value = serde_json::from_str(DASHBOARD).unwrap();
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        let title = panel["title"].as_str().unwrap().to_owned();
        for target in panel["targets"].as_array().unwrap() {
            queries.push((title.clone(), target["expr"].as_str().unwrap().to_owned()));
        }
    }
    queries
}

/// The `squall_*` names an expression refers to.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("squall_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

#[test]
fn every_metrics_page_passes_promtool_and_follows_the_conventions() {
    let loaded = Loaded::start("promtool", 6);
    loaded.wait_for_scale_up();
    let (status, text) = get(loaded.up.admin, "/metrics");
    assert_eq!(status, 200);
    promtool_check(&text).unwrap_or_else(|e| panic!("promtool on squall up's /metrics:\n{e}"));

    let families = families(&text);
    for (name, kind) in &families {
        assert!(
            name.starts_with("squall_"),
            "{name}: not in squall's namespace"
        );
        match kind.as_str() {
            "counter" => assert!(name.ends_with("_total"), "counter {name} lacks _total"),
            "histogram" => assert!(
                name.ends_with("_seconds"),
                "histogram {name} is not in seconds"
            ),
            _ => assert!(!name.ends_with("_total"), "{kind} {name} ends in _total"),
        }
    }
    // The three parts: the balancer's, the scaler's and the embedded forkd's.
    for name in [
        "squall_request_duration_seconds",
        "squall_desired_workers",
        "squall_clone_duration_seconds",
    ] {
        assert!(
            families.iter().any(|(n, _)| n == name),
            "{name} missing from:\n{text}"
        );
    }
    // Label sets are bounded: no label names a worker, a clone, a path or a client.
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        for label in ["worker=", "clone=", "id=", "path=", "client="] {
            assert!(!line.contains(label), "unbounded label in {line}");
        }
    }
    drop(loaded);

    // A forkd daemon on its own serves its /metrics too.
    let case = Case::new("promtool-forkd");
    let mut forkd = case.forkd(&[]);
    let addr = forkd.addr();
    let text = wait_for_http(addr, "/metrics", &mut forkd.child);
    promtool_check(&text).unwrap_or_else(|e| panic!("promtool on forkd's /metrics:\n{e}"));
}

#[test]
fn the_dashboard_uses_only_exported_metrics_and_has_every_panel() {
    let queries = dashboard_queries();
    let titles: Vec<String> = queries.iter().map(|(t, _)| t.to_lowercase()).collect();
    for wanted in [
        "workers",
        "p95",
        "request rate",
        "queue depth",
        "panic mode",
        "clone latency by driver",
    ] {
        assert!(
            titles.iter().any(|t| t.contains(wanted)),
            "no panel about {wanted}"
        );
    }
    let workers = &queries
        .iter()
        .find(|(t, _)| t.to_lowercase().starts_with("workers"))
        .unwrap()
        .0;
    let worker_exprs: String = queries
        .iter()
        .filter(|(t, _)| t == workers)
        .map(|(_, e)| e.as_str())
        .collect();
    for state in ["desired", "ready", "pending", "draining"] {
        assert!(
            worker_exprs.contains(state),
            "the workers panel does not show {state}"
        );
    }

    let loaded = Loaded::start("dashboard", 6);
    loaded.wait_for_scale_up();
    let text = get(loaded.up.admin, "/metrics").1;
    let exported: BTreeSet<String> = families(&text)
        .into_iter()
        .flat_map(|(name, kind)| {
            let mut names = vec![name.clone()];
            if kind == "histogram" {
                names.extend(["_bucket", "_sum", "_count"].map(|s| format!("{name}{s}")));
            }
            names
        })
        .collect();
    let mut missing = Vec::new();
    for (title, expr) in &queries {
        for name in metric_names(expr) {
            if !exported.contains(&name) {
                missing.push(format!("{name} (panel {title:?})"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics squall does not export: {missing:?}"
    );
}

/// Waits until `addr` answers `path` with 200 and returns the body; fails if `child` exits.
fn wait_for_http(addr: SocketAddr, path: &str, child: &mut Child) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("{path} server exited before answering: {status}");
        }
        if std::net::TcpStream::connect(addr).is_ok() {
            let (status, body) = get(addr, path);
            if status == 200 {
                return body;
            }
        }
        assert!(Instant::now() < deadline, "{addr}{path} never answered 200");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Percent-encodes a PromQL expression for a query string.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Runs an instant PromQL query; returns the result vector.
fn query(prometheus: SocketAddr, expr: &str) -> Vec<serde_json::Value> {
    let (status, body) = get(prometheus, &format!("/api/v1/query?query={}", encode(expr)));
    assert_eq!(status, 200, "query {expr}: {body}");
    let reply: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(reply["status"], "success", "query {expr}: {body}");
    reply["data"]["result"].as_array().unwrap().clone()
}

/// The values of a result vector.
fn values(result: &[serde_json::Value]) -> Vec<f64> {
    result
        .iter()
        .map(|r| r["value"][1].as_str().unwrap().parse::<f64>().unwrap())
        .collect()
}

/// Prometheus, scraping `target` every second, with its data in `dir`.
fn start_prometheus(dir: &Path, target: SocketAddr) -> (ChildGuard, SocketAddr) {
    let job = format!("  - job_name: squall\n    static_configs:\n      - targets: ['{target}']\n");
    start_prometheus_with(dir, &job)
}

/// Prometheus with the scrape jobs `jobs` (YAML list items), scraping every second, with its
/// data in `dir`.
fn start_prometheus_with(dir: &Path, jobs: &str) -> (ChildGuard, SocketAddr) {
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n{jobs}"
        ),
    )
    .unwrap();
    // Port 0: Prometheus binds one and logs it ("Listening on" address=...).
    let mut child = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg("--web.listen-address=127.0.0.1:0")
        .arg("--log.level=info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("prometheus (Debian's prometheus package; scripts/install-deps installs it)");
    let addr = bound_address(&mut child, "Listening on", "address");
    wait_for_http(addr, "/-/ready", &mut child);
    (ChildGuard(child), addr)
}

#[test]
fn a_real_prometheus_scrapes_squall_up_and_answers_the_dashboards_queries() {
    let scratch = Scratch::new("prometheus");
    let loaded = Loaded::start("prometheus-up", 6);
    let (_prometheus, prometheus) = start_prometheus(scratch.path(), loaded.up.admin);
    loaded.wait_for_scale_up();

    // Wait until Prometheus has a few scrapes of the loaded, scaled-up squall.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let scrapes = values(&query(
            prometheus,
            "count_over_time(squall_desired_workers[1m])",
        ));
        if scrapes.first().is_some_and(|n| *n >= 6.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus did not scrape squall up: {scrapes:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let up = values(&query(prometheus, r#"up{job="squall"}"#));
    assert_eq!(up, [1.0], "the scrape target is not up");

    // Every query of the dashboard has data (`All` namespaces, as outside Kubernetes).
    for (title, expr) in dashboard_queries() {
        let expr = expr
            .replace("$__rate_interval", "5s")
            .replace("$namespace", ".*");
        let result = query(prometheus, &expr);
        assert!(!result.is_empty(), "panel {title:?}: no data for {expr}");
    }
    let ready = values(&query(prometheus, r#"sum(squall_workers{state="ready"})"#));
    assert!(
        ready.first().is_some_and(|n| *n >= 2.0),
        "ready workers: {ready:?}"
    );
    let desired = values(&query(prometheus, "max(squall_desired_workers)"));
    assert!(
        desired.first().is_some_and(|n| *n >= 2.0),
        "desired workers: {desired:?}"
    );
    let p95 = values(&query(
        prometheus,
        "histogram_quantile(0.95, sum by (le) (rate(squall_request_duration_seconds_bucket[5s])))",
    ));
    assert!(
        p95.first()
            .is_some_and(|s| s.is_finite() && *s > 0.0 && *s < 30.0),
        "p95 over the last 5 s: {p95:?}"
    );
    let slo = values(&query(prometheus, "max(squall_latency_slo_seconds > 0)"));
    assert_eq!(slo, [0.5], "the SLO series");
}

#[test]
fn a_real_prometheus_scrapes_a_token_protected_admin_listener_with_its_token() {
    let case = Case::new("observe-admin-token");
    let token_file = case.scratch.join("admin-token");
    std::fs::write(&token_file, "prometheus-s3cret\n").unwrap();
    case.write_policy(&quick_policy(1));
    let extra = [
        "--admin-token-file".to_owned(),
        token_file.display().to_string(),
    ];
    let up = Up::start_full(&case.policy, &case.marker, "fork", &extra, &demo_app());
    // The same target twice: once with the token, as the Helm chart's ServiceMonitor
    // scrapes it, once without.
    let target = up.admin;
    let jobs = format!(
        "  - job_name: with-token\n    authorization:\n      credentials_file: {}\n\
         \x20   static_configs:\n      - targets: ['{target}']\n\
         \x20 - job_name: without-token\n    static_configs:\n      - targets: ['{target}']\n",
        token_file.display()
    );
    let (_prometheus, prometheus) = start_prometheus_with(case.scratch.path(), &jobs);
    let up_of = |job: &str| values(&query(prometheus, &format!("up{{job=\"{job}\"}}")));
    let deadline = Instant::now() + Duration::from_secs(60);
    while up_of("with-token").is_empty() || up_of("without-token").is_empty() {
        assert!(
            Instant::now() < deadline,
            "Prometheus did not scrape both jobs"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        up_of("with-token"),
        [1.0],
        "the scrape with the token failed"
    );
    assert_eq!(
        up_of("without-token"),
        [0.0],
        "a scrape without the token succeeded"
    );
    let desired = values(&query(
        prometheus,
        r#"squall_desired_workers{job="with-token"}"#,
    ));
    assert_eq!(
        desired.len(),
        1,
        "no squall metrics through the token: {desired:?}"
    );
}

#[test]
fn the_live_page_renders_data_in_headless_chromium() {
    let scratch = Scratch::new("chromium");
    let loaded = Loaded::start("chromium-up", 6);
    loaded.wait_for_scale_up();
    // A few seconds of history to draw.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let body = get(loaded.up.admin, "/api/history").1;
        let history: serde_json::Value = serde_json::from_str(&body).unwrap();
        if history["samples"].as_array().unwrap().len() >= 3 {
            break;
        }
        assert!(Instant::now() < deadline, "no history: {body}");
        std::thread::sleep(Duration::from_millis(200));
    }

    let url = format!("http://{}/", loaded.up.admin);
    let mut chromium = ChildGuard(
        common::browser::chromium(&scratch.join("profile"))
            .args(["--virtual-time-budget=4000", "--dump-dom"])
            .arg(&url)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromium (Debian's chromium package; scripts/install-deps installs it)"),
    );
    let mut stdout = chromium.0.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut dom = String::new();
        stdout.read_to_string(&mut dom).unwrap();
        dom
    });
    let deadline = Instant::now() + Duration::from_secs(90);
    while chromium.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "chromium did not finish");
        std::thread::sleep(Duration::from_millis(100));
    }
    let dom = reader.join().unwrap();

    let attribute = |after: &str, name: &str| -> Option<String> {
        let at = dom.find(after)?;
        let tail = &dom[at..];
        let end = tail.find('>')?;
        let tag = &tail[..end];
        let start = tag.find(&format!("{name}=\""))? + name.len() + 2;
        Some(tag[start..].split('"').next()?.to_owned())
    };
    let number_after = |marker: &str| -> f64 {
        let at = dom
            .find(marker)
            .unwrap_or_else(|| panic!("{marker} not in the page:\n{dom}"));
        let tail = &dom[at + marker.len()..];
        let text = &tail[tail.find('>').unwrap() + 1..];
        text[..text.find('<').unwrap()]
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap_or_else(|_| panic!("no number after {marker}: {}", &text[..40]))
    };
    let samples: usize = attribute("<body", "data-samples").unwrap().parse().unwrap();
    assert!(samples >= 3, "the page drew {samples} samples:\n{dom}");
    for id in ["workers", "latency", "rate", "queue", "clones"] {
        assert!(
            dom.contains(&format!(r#"aria-label="{id}""#)),
            "no {id} chart:\n{dom}"
        );
    }
    let points: usize = attribute(r#"data-series="ready" data-points"#, "data-points")
        .unwrap()
        .parse()
        .unwrap();
    assert!(points >= 3, "the ready line has {points} points");
    assert!(
        number_after(r#"class="value" data-series="ready""#) >= 2.0,
        "the legend's ready workers"
    );
    assert!(
        number_after(r#"class="value" data-series="rate""#) > 0.0,
        "the legend's request rate"
    );
    assert!(
        dom.contains(r#"data-series="p95" data-points"#),
        "no p95 line"
    );
    assert!(
        !dom.contains("Cannot reach squall"),
        "the page reported an error:\n{dom}"
    );
}
