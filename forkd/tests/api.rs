//! forkd's API against an in-process daemon on a loopback port, with real warm-app templates
//! and clones.

// Helpers shared by several tests unwrap too: a panic anywhere here is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{Daemon, TOKEN, warm_app_spec};
use forkd::{CloneState, Config, Driver, ErrorCode, ExitStatus};
use test_support::http::{exchange_async, get_async};
use test_support::process::{alive, children, open_fds};
use test_support::{Scratch, eventually, eventually_async};

const AUTH: (&str, &str) = ("Authorization", "Bearer test-token");
const DEADLINE: Duration = Duration::from_secs(20);

/// Waits until `pid` is gone.
async fn gone(what: &str, pid: u32) {
    eventually(what, DEADLINE, || (!alive(pid)).then_some(())).await;
}

#[tokio::test]
async fn only_health_and_metrics_are_open_without_the_token() {
    let daemon = Daemon::start().await;
    assert_eq!(get_async(daemon.addr, "/healthz").await.status, 200);
    assert_eq!(get_async(daemon.addr, "/metrics").await.status, 200);
    for headers in [
        &[][..],
        &[("Authorization", "Bearer wrong")],
        &[("Authorization", TOKEN)],
        &[("Authorization", "Bearer test-token2")],
    ] {
        for (method, path) in [
            ("GET", "/v1/clones"),
            ("GET", "/v1/templates"),
            ("POST", "/v1/templates/web/clones"),
            ("DELETE", "/v1/clones/web-1"),
        ] {
            let reply = exchange_async(daemon.addr, method, path, headers, b"{\"count\":1}").await;
            assert_eq!(reply.status, 401, "{method} {path} with {headers:?}");
            assert_eq!(reply.header("www-authenticate"), Some("Bearer"));
            let body: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
            assert_eq!(body["error"], "missing or wrong bearer token");
            assert_eq!(body["code"], "unauthorized");
        }
    }
    assert_eq!(
        exchange_async(daemon.addr, "GET", "/v1/clones", &[AUTH], b"")
            .await
            .status,
        200
    );
    let wrong = forkd::Client::new(&format!("http://{}", daemon.addr), "nope").unwrap();
    let error = wrong.clones().await.unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::Unauthorized), "{error}");
    daemon.stop().await;
}

#[tokio::test]
async fn bad_requests_get_clear_errors() {
    let daemon = Daemon::with_template(8, &warm_app_spec("web", Driver::Spawn)).await;
    let cases: &[(&str, &str, &str, u16, &str)] = &[
        (
            "POST",
            "/v1/templates/nope/clones",
            r#"{"count":1}"#,
            404,
            "template \"nope\" not found",
        ),
        (
            "POST",
            "/v1/templates/web/clones",
            r#"{"count":0}"#,
            422,
            "invalid count 0: expected 1 to 8",
        ),
        (
            "POST",
            "/v1/templates/web/clones",
            r#"{"count":1000000}"#,
            422,
            "invalid count 1000000",
        ),
        (
            "POST",
            "/v1/templates/web/clones",
            r#"{"count":-1}"#,
            400,
            "invalid JSON body",
        ),
        (
            "POST",
            "/v1/templates/web/clones",
            r#"{"count":"#,
            400,
            "invalid JSON body",
        ),
        (
            "POST",
            "/v1/templates/web/clones",
            r#"{"count":1,"extra":2}"#,
            400,
            "unknown field `extra`",
        ),
        (
            "POST",
            "/v1/templates",
            r#"{"name":"Bad Name","driver":"spawn","command":["x"]}"#,
            422,
            "invalid template name",
        ),
        (
            "POST",
            "/v1/templates",
            r#"{"name":"ok","driver":"spawn","command":[]}"#,
            422,
            "invalid command",
        ),
        (
            "POST",
            "/v1/templates",
            r#"{"name":"ok","driver":"teleport","command":["x"]}"#,
            400,
            "unknown variant `teleport`",
        ),
        (
            "POST",
            "/v1/templates",
            r#"{"name":"web","driver":"spawn","command":["x"]}"#,
            409,
            "already exists",
        ),
        ("DELETE", "/v1/templates/nope", "", 404, "not found"),
        (
            "DELETE",
            "/v1/clones/web-99",
            "",
            404,
            "clone \"web-99\" not found",
        ),
        ("PUT", "/v1/clones", "", 405, "not allowed"),
        ("GET", "/v2/clones", "", 404, "no such endpoint"),
    ];
    for &(method, path, body, status, message) in cases {
        let reply = exchange_async(daemon.addr, method, path, &[AUTH], body.as_bytes()).await;
        assert_eq!(
            reply.status, status,
            "{method} {path} {body}: {}",
            reply.body
        );
        let error: forkd::api::ErrorBody = serde_json::from_str(&reply.body).unwrap();
        assert_eq!(error.code.status().as_u16(), status, "{error:?}");
        let error = error.error;
        assert!(
            error.contains(message),
            "{method} {path} {body}: {error:?} does not say {message:?}"
        );
    }
    let huge = vec![b' '; forkd::MAX_BODY + 1];
    assert_eq!(
        exchange_async(daemon.addr, "POST", "/v1/templates", &[AUTH], &huge)
            .await
            .status,
        413
    );
    // A fork template whose command exits at once is reported, not left half-made.
    let mut spec = warm_app_spec("broken", Driver::Fork);
    spec.command = vec!["/bin/false".into()];
    let error = daemon.client.create_template(&spec).await.unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::TemplateFailed), "{error}");
    assert!(
        error.to_string().contains("exited before it was ready"),
        "{error}"
    );
    daemon.stop().await;
}

/// Clones, checks that each serves as itself, kills them, and checks they are gone.
async fn clone_and_kill(driver: Driver) {
    let daemon = Daemon::start().await;
    let template = daemon
        .client
        .create_template(&warm_app_spec("web", driver))
        .await
        .unwrap();
    assert_eq!(template.pid.is_some(), driver == Driver::Fork);
    let clones = daemon.client.create_clones("web", 2).await.unwrap();
    assert_eq!(clones.len(), 2);
    let mut randoms = HashSet::new();
    for clone in &clones {
        assert_eq!(
            (clone.state, clone.ready, clone.driver),
            (CloneState::Ready, true, driver),
            "{clone:?}"
        );
        let reply = get_async(clone.addr, "/").await;
        assert_eq!(reply.status, 200);
        assert!(
            reply
                .body
                .starts_with(&format!("{} {}:", clone.id, clone.pid.unwrap())),
            "{reply:?} from {clone:?}"
        );
        randoms.insert(get_async(clone.addr, "/random").await.body);
    }
    assert_eq!(randoms.len(), 2, "clones must not share their random state");
    let listed = daemon.client.clones().await.unwrap().clones;
    assert_eq!(listed, clones);

    daemon.client.kill(&clones[0].id).await.unwrap();
    assert!(!alive(clones[0].pid.unwrap()));
    let listed = daemon.client.clones().await.unwrap().clones;
    assert_eq!(
        listed.iter().map(|c| &c.id).collect::<Vec<_>>(),
        [&clones[1].id]
    );
    assert!(
        tokio::net::TcpStream::connect(clones[0].addr)
            .await
            .is_err(),
        "the killed clone's socket must be closed"
    );

    let driver = driver.as_str();
    daemon
        .assert_metrics([
            format!("squall_clones_total{{driver=\"{driver}\",outcome=\"ready\"}} 2"),
            format!("squall_clone_exits_total{{cause=\"killed\",driver=\"{driver}\"}} 1"),
            format!("squall_live_clones{{driver=\"{driver}\"}} 1"),
            format!("squall_clone_duration_seconds_count{{driver=\"{driver}\"}} 2"),
        ])
        .await;

    // Deleting the template kills the rest, and the template itself.
    daemon.client.delete_template("web").await.unwrap();
    assert!(daemon.client.clones().await.unwrap().clones.is_empty());
    assert!(daemon.client.templates().await.unwrap().is_empty());
    gone("the last clone is gone", clones[1].pid.unwrap()).await;
    if let Some(pid) = template.pid {
        gone("the template is gone", pid).await;
    }
    daemon.stop().await;
}

#[tokio::test]
async fn fork_clones_serve_and_die_when_killed() {
    clone_and_kill(Driver::Fork).await;
}

#[tokio::test]
async fn spawn_clones_serve_and_die_when_killed() {
    clone_and_kill(Driver::Spawn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_clone_requests_in_parallel() {
    let daemon = Daemon::start_with_template(&warm_app_spec("web", Driver::Fork)).await;
    let mut requests = tokio::task::JoinSet::new();
    for _ in 0..100 {
        let client = daemon.client.clone();
        requests.spawn(async move { client.create_clones("web", 1).await });
    }
    let mut clones = Vec::new();
    while let Some(result) = requests.join_next().await {
        clones.extend(result.unwrap().unwrap());
    }
    assert_eq!(clones.len(), 100);
    assert!(clones.iter().all(|c| c.ready));
    assert_eq!(
        clones.iter().map(|c| &c.id).collect::<HashSet<_>>().len(),
        100
    );
    assert_eq!(
        clones.iter().map(|c| c.addr).collect::<HashSet<_>>().len(),
        100
    );
    assert_eq!(
        clones.iter().map(|c| c.pid).collect::<HashSet<_>>().len(),
        100
    );
    for clone in clones.iter().step_by(10) {
        assert_eq!(get_async(clone.addr, "/healthz").await.status, 200);
    }
    daemon.stop().await;
    for clone in &clones {
        gone("every clone is gone after shutdown", clone.pid.unwrap()).await;
    }
}

#[tokio::test]
async fn a_crashing_clone_is_noticed_and_reported() {
    let daemon = Daemon::start_with_template(&warm_app_spec("web", Driver::Fork)).await;
    let clones = daemon.client.create_clones("web", 2).await.unwrap();
    // The crash aborts the clone mid-request: there is no response to read.
    let mut stream = tokio::net::TcpStream::connect(clones[0].addr)
        .await
        .unwrap();
    tokio::io::AsyncWriteExt::write_all(
        &mut stream,
        b"POST /crash HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    )
    .await
    .unwrap();
    let crashed = eventually_async("the crash is reported", DEADLINE, || async {
        let listed = daemon.client.clones().await.unwrap().clones;
        listed
            .into_iter()
            .find(|c| c.id == clones[0].id && c.exit.is_some())
    })
    .await;
    assert_eq!(
        (crashed.state, crashed.ready, crashed.exit),
        (CloneState::Exited, false, Some(ExitStatus::Signal(6)))
    );
    daemon
        .assert_metrics([
            "squall_clone_exits_total{cause=\"crashed\",driver=\"fork\"} 1",
            "squall_live_clones{driver=\"fork\"} 1",
        ])
        .await;
    // The other clone is untouched; deleting the crashed one just forgets it.
    assert_eq!(get_async(clones[1].addr, "/").await.status, 200);
    daemon.client.kill(&clones[0].id).await.unwrap();
    assert_eq!(daemon.client.clones().await.unwrap().clones.len(), 1);
    daemon.stop().await;
}

#[tokio::test]
async fn capacity_is_bounded_by_max_clones() {
    let daemon = Daemon::with_template(3, &warm_app_spec("web", Driver::Fork)).await;
    let listed = daemon.client.clones().await.unwrap();
    assert_eq!((listed.clones.len(), listed.max_clones), (0, 3));
    daemon.client.create_clones("web", 2).await.unwrap();
    let error = daemon.client.create_clones("web", 2).await.unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::NoCapacity), "{error}");
    assert!(
        error.to_string().contains("exceed --max-clones 3"),
        "{error}"
    );
    assert_eq!(
        daemon.client.create_clones("web", 1).await.unwrap().len(),
        1
    );
    let listed = daemon.client.clones().await.unwrap();
    assert_eq!((listed.clones.len(), listed.max_clones), (3, 3));
    // The raw answer says it too, under the documented name.
    let raw = exchange_async(daemon.addr, "GET", "/v1/clones", &[AUTH], b"").await;
    let raw: serde_json::Value = serde_json::from_str(&raw.body).unwrap();
    assert_eq!(raw["max_clones"], 3);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_clone_kill_cycles_leave_nothing_behind() {
    let temp = Scratch::new("forkd-cycles");
    let runtime_dir = temp.path().to_owned();
    let mut config = Config::new(TOKEN);
    config.runtime_dir = runtime_dir.clone();
    let daemon = Daemon::with_config(config).await;
    let template = daemon
        .client
        .create_template(&warm_app_spec("web", Driver::Fork))
        .await
        .unwrap();
    let template_pid = template.pid.unwrap();
    let me = std::process::id();
    let cycle = |count: usize| {
        let client = daemon.client.clone();
        async move {
            let clones = client.create_clones("web", count).await.unwrap();
            let mut kills = tokio::task::JoinSet::new();
            for clone in clones {
                let client = client.clone();
                kills.spawn(async move { client.kill(&clone.id).await.unwrap() });
            }
            while kills.join_next().await.is_some() {}
        }
    };
    // One round first, so that lazily opened descriptors (pools, the reactor) count as baseline.
    cycle(10).await;
    eventually("the first round is reaped", DEADLINE, || {
        children(template_pid).is_empty().then_some(())
    })
    .await;
    let (my_fds, template_fds) = (open_fds(me), open_fds(template_pid));
    for _ in 0..100 {
        cycle(10).await;
    }
    eventually("every clone is reaped", DEADLINE, || {
        children(template_pid).is_empty().then_some(())
    })
    .await;
    assert!(daemon.client.clones().await.unwrap().clones.is_empty());
    assert_eq!(
        open_fds(template_pid),
        template_fds,
        "the template leaks descriptors"
    );
    // The client's pool may hold a different number of idle connections; allow for that.
    let now = open_fds(me);
    assert!(
        now <= my_fds + 4,
        "forkd leaks descriptors: {my_fds} before, {now} after"
    );
    daemon
        .assert_metrics([
            "squall_clones_total{driver=\"fork\",outcome=\"ready\"} 1010",
            "squall_live_clones{driver=\"fork\"} 0",
        ])
        .await;
    let left: Vec<_> = std::fs::read_dir(&runtime_dir).unwrap().collect();
    assert!(left.is_empty(), "zygote sockets left behind: {left:?}");
    daemon.stop().await;
    gone("the template is gone", template_pid).await;
}

#[tokio::test]
async fn shutdown_kills_every_clone_and_template() {
    let daemon = Daemon::start().await;
    let mut pids = Vec::new();
    for (name, driver) in [("warm", Driver::Fork), ("cold", Driver::Spawn)] {
        let template = daemon
            .client
            .create_template(&warm_app_spec(name, driver))
            .await;
        // A spawn template runs no process of its own.
        pids.extend(template.unwrap().pid);
        let clones = daemon.client.create_clones(name, 2).await.unwrap();
        pids.extend(clones.iter().map(|c| c.pid.unwrap()));
    }
    assert_eq!(pids.len(), 5, "the fork template and four clones: {pids:?}");
    assert!(pids.iter().all(|&pid| alive(pid)));
    daemon.stop().await;
    for pid in pids {
        gone("every process is gone", pid).await;
    }
}

/// The Python example in `forkd/zygote/PROTOCOL.md`, run as a `fork` template: the documented
/// protocol is the implemented one.
#[tokio::test]
async fn the_python_example_in_the_protocol_spec_works() {
    let spec = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/zygote/PROTOCOL.md"))
        .unwrap();
    let code = spec
        .split("```python\n")
        .nth(1)
        .unwrap()
        .split("```")
        .next()
        .unwrap();
    let script =
        std::env::temp_dir().join(format!("forkd-zygote-example-{}.py", std::process::id()));
    std::fs::write(&script, code).unwrap();
    let daemon = Daemon::start().await;
    let command = vec!["python3".to_owned(), script.display().to_string()];
    let template = daemon
        .client
        .create_template(&forkd::TemplateSpec::new("py", Driver::Fork, command))
        .await
        .unwrap();
    let clones = daemon.client.create_clones("py", 2).await.unwrap();
    for clone in &clones {
        let reply = get_async(clone.addr, "/").await;
        assert_eq!(
            (reply.status, reply.body.as_str()),
            (
                200,
                format!("hello from {}, cache size 200000\n", clone.id).as_str()
            )
        );
    }
    daemon.client.kill(&clones[0].id).await.unwrap();
    assert!(!alive(clones[0].pid.unwrap()));
    // A clone killed behind forkd's back is reported by the template with its signal.
    test_support::process::sigkill(clones[1].pid.unwrap());
    eventually_async("the exit is reported", DEADLINE, || async {
        let listed = daemon.client.clones().await.unwrap().clones;
        (listed[0].exit == Some(ExitStatus::Signal(9))).then_some(())
    })
    .await;
    daemon.stop().await;
    gone("the template is gone", template.pid.unwrap()).await;
    std::fs::remove_file(script).unwrap();
}

/// A client that hangs up mid-request does not leave a half-made clone behind: the clone is
/// finished, listed, and can be killed.
#[tokio::test]
async fn a_clone_request_abandoned_by_its_client_still_completes() {
    let daemon = Daemon::start_with_template(&warm_app_spec("cold", Driver::Spawn)).await;
    let mut stream = tokio::net::TcpStream::connect(daemon.addr).await.unwrap();
    let body = r#"{"count":1}"#;
    let request = format!(
        "POST /v1/templates/cold/clones HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    tokio::io::AsyncWriteExt::write_all(&mut stream, request.as_bytes())
        .await
        .unwrap();
    // Hang up once the daemon has the request, while the clone warms up (200 ms).
    eventually_async("the clone request arrives", DEADLINE, || async {
        let listed = daemon.client.clones().await.unwrap().clones;
        (!listed.is_empty()).then_some(())
    })
    .await;
    drop(stream);
    let clone = eventually_async("the clone finishes starting", DEADLINE, || async {
        let clones = daemon.client.clones().await.unwrap().clones;
        assert_eq!(clones.len(), 1, "{clones:?}");
        (clones[0].state != CloneState::Starting).then(|| clones[0].clone())
    })
    .await;
    assert!(clone.ready, "{clone:?}");
    assert_eq!(get_async(clone.addr, "/healthz").await.status, 200);
    daemon.client.kill(&clone.id).await.unwrap();
    assert!(!alive(clone.pid.unwrap()));
    daemon.stop().await;
}

/// A template that dies leaves its clones serving (they watch forkd's lifeline, not their
/// template); forkd starts the template again under the same name, and the new one makes
/// clones. Deleting the template kills the old clones too.
#[tokio::test]
async fn a_dead_template_is_started_again_and_its_clones_live_on() {
    let daemon = Daemon::start_with_template(&warm_app_spec("web", Driver::Fork)).await;
    let clones = daemon.client.create_clones("web", 2).await.unwrap();
    let first = daemon.client.templates().await.unwrap()[0].pid.unwrap();
    test_support::process::sigkill(first);
    gone("the template dies", first).await;
    let again = eventually_async("the template is started again", DEADLINE, || async {
        let templates = daemon.client.templates().await.unwrap();
        templates
            .first()
            .filter(|t| t.alive && t.pid != Some(first))
            .cloned()
    })
    .await;
    assert_eq!(again.spec, warm_app_spec("web", Driver::Fork));
    for clone in &clones {
        assert!(alive(clone.pid.unwrap()), "a clone died with its template");
        assert_eq!(get_async(clone.addr, "/healthz").await.status, 200);
    }
    let listed = daemon.client.clones().await.unwrap().clones;
    assert!(
        listed.iter().all(|c| c.state == CloneState::Ready),
        "{listed:?}"
    );
    let fresh = daemon.client.create_clones("web", 1).await.unwrap();
    assert_eq!(get_async(fresh[0].addr, "/healthz").await.status, 200);
    daemon
        .assert_metrics([r#"squall_template_restarts_total{driver="fork"} 1"#])
        .await;
    daemon.client.delete_template("web").await.unwrap();
    for pid in [again.pid, clones[0].pid, clones[1].pid, fresh[0].pid] {
        gone(
            "deleting the template stops it and every clone of its name",
            pid.unwrap(),
        )
        .await;
    }
    daemon.stop().await;
}

/// Parallel clone requests on the `fork` driver never get more clones than `--max-clones`
/// between them, and each one refused says `no_capacity`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_fork_clone_requests_never_exceed_max_clones() {
    let daemon = Daemon::with_template(5, &warm_app_spec("web", Driver::Fork)).await;
    let counts = [1, 2, 3, 1, 2, 3, 1, 2];
    let (granted, refused) = common::clone_in_parallel(&daemon.client, "web", &counts).await;
    let granted = granted.len();
    let listed = daemon.client.clones().await.unwrap();
    assert!(
        granted <= 5 && listed.clones.len() == granted,
        "{granted} granted, {} listed, with --max-clones 5",
        listed.clones.len()
    );
    assert!(refused >= 1, "15 clones asked for, none refused");
    daemon.stop().await;
}

/// Deleting a template whose clone is still starting waits for the start to finish, then
/// kills the clone: the clone request is answered, and nothing is left running.
#[tokio::test]
async fn deleting_a_template_waits_for_a_starting_clone_then_kills_it() {
    let daemon = Daemon::start().await;
    let slow = common::warm_app_spec_warming("slow", Driver::Spawn, 1500);
    daemon.client.create_template(&slow).await.unwrap();
    let request = tokio::spawn({
        let client = daemon.client.clone();
        async move { client.create_clones("slow", 1).await }
    });
    let starting = eventually_async("the clone is listed as starting", DEADLINE, || async {
        let listed = daemon.client.clones().await.unwrap().clones;
        listed.into_iter().find(|c| c.state == CloneState::Starting)
    })
    .await;
    let refused = daemon.client.kill(&starting.id).await.unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::CloneStarting), "{refused}");

    daemon.client.delete_template("slow").await.unwrap();
    let answered = request.await.unwrap().unwrap();
    assert_eq!(answered[0].id, starting.id);
    assert!(answered[0].ready, "it finished starting: {answered:?}");
    assert!(
        !alive(answered[0].pid.unwrap()),
        "deleting the template returned with its clone alive"
    );
    assert!(daemon.client.clones().await.unwrap().clones.is_empty());
    daemon.stop().await;
}

/// Reads until the peer closes the connection; how long that took.
async fn closed_after(stream: &mut tokio::net::TcpStream) -> Duration {
    use tokio::io::AsyncReadExt;
    let started = std::time::Instant::now();
    let mut buf = [0u8; 1024];
    while stream.read(&mut buf).await.unwrap_or(0) > 0 {}
    started.elapsed()
}

/// forkd speaks HTTP/1.1 only, so a client cannot hold its connections (and lock the
/// scaler out) by opening HTTP/2 connections and going quiet: those are refused at once,
/// and a keep-alive connection that goes quiet is closed after the header-read timeout.
#[tokio::test]
async fn connections_cannot_be_held_open_without_requests() {
    use tokio::io::AsyncWriteExt;
    let daemon = Daemon::start().await;
    let mut h2 = tokio::net::TcpStream::connect(daemon.addr).await.unwrap();
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let took = tokio::time::timeout(Duration::from_secs(5), closed_after(&mut h2))
        .await
        .expect("an HTTP/2 connection was held open");
    assert!(took < Duration::from_secs(5));
    // One request on a keep-alive connection, then silence.
    let mut quiet = tokio::net::TcpStream::connect(daemon.addr).await.unwrap();
    quiet
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: forkd\r\n\r\n")
        .await
        .unwrap();
    let took = tokio::time::timeout(Duration::from_secs(30), closed_after(&mut quiet))
        .await
        .expect("a quiet keep-alive connection was held open");
    assert!(
        took >= Duration::from_secs(9) && took < Duration::from_secs(25),
        "closed after {took:?}, against a 10 s header-read timeout"
    );
    daemon.stop().await;
}
