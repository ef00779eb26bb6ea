//! The Python zygote (`forkd/zygote/python`, `python3 -m squall_zygote`) under a real forkd,
//! with apps no one here wrote: httpbin (Flask, served by waitress) and a Starlette app (served
//! by uvicorn), from the virtualenv `scripts/install-deps` makes. Also every kind of bad input:
//! each gives a clear message on the template's or the clone's stderr and a failed template or
//! an exited clone in forkd, never a hang.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::Daemon;
use forkd::{CloneInfo, CloneState, Driver, ErrorCode, ExitStatus, TemplateSpec};
use test_support::http::get_async;
use test_support::process::{alive, sigkill, socket_inodes};
use test_support::python::{apps_dir, venv_python};
use test_support::{Scratch, eventually, eventually_async};

const DEADLINE: Duration = Duration::from_secs(20);

/// A template running `python3 -m squall_zygote ARGS` from the tests' virtualenv, with the test
/// apps importable and its stderr (and its clones') appended to `stderr`.
fn zygote(name: &str, driver: Driver, args: &[&str], stderr: &Path) -> TemplateSpec {
    let mut command: Vec<String> = vec![
        "/bin/sh".into(),
        "-c".into(),
        // `exec`: the template's pid is Python's, as forkd expects.
        r#"exec "$@" 2>>"$SQUALL_TEST_STDERR""#.into(),
        "sh".into(),
        venv_python().display().to_string(),
        "-m".into(),
        "squall_zygote".into(),
    ];
    command.extend(args.iter().map(|&arg| arg.to_owned()));
    let mut spec = TemplateSpec::new(name, driver, command);
    spec.env
        .insert("PYTHONPATH".into(), apps_dir().display().to_string());
    spec.env
        .insert("SQUALL_TEST_STDERR".into(), stderr.display().to_string());
    spec
}

fn read(stderr: &Path) -> String {
    std::fs::read_to_string(stderr).unwrap_or_default()
}

/// A daemon with a fork template of `squall_zygote ARGS` named `name`, created and warm.
struct Running {
    daemon: Daemon,
    template: forkd::TemplateInfo,
    stderr: PathBuf,
    _scratch: Scratch,
}

impl Running {
    async fn start(name: &str, args: &[&str]) -> Running {
        let scratch = Scratch::new(&format!("py-{name}"));
        let stderr = scratch.join("stderr");
        let daemon = Daemon::start().await;
        let spec = zygote(name, Driver::Fork, args, &stderr);
        let template = daemon.client.create_template(&spec).await.unwrap();
        Running {
            daemon,
            template,
            stderr,
            _scratch: scratch,
        }
    }

    /// What the template and its clones wrote to stderr so far.
    fn stderr(&self) -> String {
        read(&self.stderr)
    }

    /// `count` new clones, all ready.
    async fn clones(&self, count: usize) -> Vec<CloneInfo> {
        let clones = self
            .daemon
            .client
            .create_clones(&self.template.spec.name, count)
            .await
            .unwrap();
        assert!(
            clones.iter().all(|c| c.ready),
            "{clones:?}\n{}",
            self.stderr()
        );
        clones
    }
}

/// Waits until `pid` is gone.
async fn gone(what: &str, pid: u32) {
    eventually(what, DEADLINE, || (!alive(pid)).then_some(())).await;
}

/// Waits until forkd lists `clone` as exited, and returns how.
async fn exit_of(daemon: &Daemon, clone: &CloneInfo) -> ExitStatus {
    eventually_async("the clone's exit is reported", DEADLINE, || async {
        let listed = daemon.client.clones().await.unwrap().clones;
        let found = listed.into_iter().find(|c| c.id == clone.id).unwrap();
        (found.state == CloneState::Exited).then(|| found.exit.unwrap())
    })
    .await
}

#[tokio::test]
async fn httpbin_clones_each_answer_with_their_own_clone_id() {
    let running = Running::start("httpbin", &["wsgi", "httpbin:app"]).await;
    let clones = running.clones(3).await;
    let mut ids = HashSet::new();
    for clone in &clones {
        let reply = get_async(clone.addr, "/get").await;
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_eq!(reply.header("x-squall-clone-id"), Some(clone.id.as_str()));
        assert!(reply.body.contains("\"url\""), "{}", reply.body);
        ids.insert(clone.id.clone());
    }
    assert_eq!(ids.len(), 3);
    // No clone holds a socket of the template's (its zygote connection) or of another clone
    // (its listener): the template closed its copy of each listener after the fork.
    let template = running.template.pid.unwrap();
    let template_sockets = socket_inodes(template);
    for (n, clone) in clones.iter().enumerate() {
        let sockets = socket_inodes(clone.pid.unwrap());
        assert!(
            sockets.is_disjoint(&template_sockets),
            "clone {n} holds a socket of the template's"
        );
        for other in &clones[n + 1..] {
            let shared = sockets
                .intersection(&socket_inodes(other.pid.unwrap()))
                .count();
            assert_eq!(
                shared, 0,
                "clones {} and {} share a socket",
                clone.id, other.id
            );
        }
    }

    // Killed through forkd: gone; killed behind its back: reported by the template.
    running.daemon.client.kill(&clones[0].id).await.unwrap();
    assert!(!alive(clones[0].pid.unwrap()));
    sigkill(clones[1].pid.unwrap());
    assert_eq!(
        exit_of(&running.daemon, &clones[1]).await,
        ExitStatus::Signal(9)
    );
    assert_eq!(get_async(clones[2].addr, "/get").await.status, 200);

    let said = running.stderr();
    assert!(!said.contains("squall-zygote:"), "{said}");
    running.daemon.stop().await;
    gone("the template is gone", template).await;
    gone("the last clone is gone", clones[2].pid.unwrap()).await;
}

#[tokio::test]
async fn a_starlette_app_is_warmed_once_and_each_clone_has_its_own_id_and_random_stream() {
    let args = ["asgi", "hello_asgi:app", "--warmup", "hello_asgi:warm"];
    let running = Running::start("hello", &args).await;
    let clones = running.clones(2).await;
    let mut randoms = HashSet::new();
    for clone in &clones {
        let reply = get_async(clone.addr, "/").await;
        assert_eq!(reply.status, 200, "{reply:?}\n{}", running.stderr());
        assert_eq!(reply.header("x-squall-clone-id"), Some(clone.id.as_str()));
        let body: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
        assert_eq!(body["clone"], clone.id.as_str(), "SQUALL_CLONE_ID");
        assert_eq!(body["cache"], 100_000, "the warm-up ran in the template");
        assert_eq!(body["pid"], clone.pid.unwrap());
        randoms.insert(body["random"].to_string());
    }
    assert_eq!(randoms.len(), 2, "the clones share a random stream");
    running.daemon.stop().await;
}

#[tokio::test]
async fn each_clone_draws_its_own_numbers_from_numpys_global_generator() {
    // NumPy's import may start OpenBLAS's thread pool, which restarts itself after a fork.
    let args = ["wsgi", "numpy_random:app", "--allow-native-threads"];
    let running = Running::start("numpy", &args).await;
    let mut draws = HashSet::new();
    let clones = running.clones(4).await;
    for clone in &clones {
        let reply = get_async(clone.addr, "/").await;
        assert_eq!(reply.status, 200, "{reply:?}\n{}", running.stderr());
        draws.insert(reply.body);
    }
    assert_eq!(
        draws.len(),
        4,
        "clones repeat each other's draws: {draws:?}"
    );
    let seeded = get_async(clones[0].addr, "/seeded").await.body;
    assert!(
        !draws.contains(&seeded),
        "a clone drew the template's next number {seeded}"
    );
    running.daemon.stop().await;
}

#[tokio::test]
async fn the_same_command_serves_on_port_under_the_spawn_driver() {
    let scratch = Scratch::new("py-spawn");
    let stderr = scratch.join("stderr");
    let daemon = Daemon::start().await;
    for (name, args, path) in [
        ("wsgi", ["wsgi", "httpbin:app"], "/get"),
        ("asgi", ["asgi", "hello_asgi:app"], "/"),
    ] {
        let mut spec = zygote(name, Driver::Spawn, &args, &stderr);
        spec.health_path = path.into();
        daemon.client.create_template(&spec).await.unwrap();
        let clone = daemon
            .client
            .create_clones(name, 1)
            .await
            .unwrap()
            .remove(0);
        let reply = get_async(clone.addr, path).await;
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_eq!(reply.header("x-squall-clone-id"), Some(clone.id.as_str()));
    }
    daemon.stop().await;
}

#[tokio::test]
async fn a_killed_template_takes_its_spares_but_its_clones_serve_on() {
    let running = Running::start("doomed", &["wsgi", "httpbin:app"]).await;
    let clones = running.clones(2).await;
    let template = running.template.pid.unwrap();
    // The two clones and the two spares forked ahead of the next requests.
    let children = eventually("the clones and the spares", DEADLINE, || {
        let children = children(template);
        (children.len() == 4).then_some(children)
    })
    .await;
    sigkill(template);
    let clone_pids: HashSet<u32> = clones.iter().map(|c| c.pid.unwrap()).collect();
    for &spare in children.difference(&clone_pids) {
        gone("a spare dies with its template", spare).await;
    }
    // The clones watch forkd's lifeline, not their template.
    for clone in &clones {
        assert!(alive(clone.pid.unwrap()), "a clone died with its template");
        assert_eq!(get_async(clone.addr, "/get").await.status, 200);
    }
    running.daemon.stop().await;
    for pid in clone_pids {
        gone("the clones are gone with forkd", pid).await;
    }
}

/// Asserts that creating a fork template from `args` fails with `template_failed`, the
/// template having exited with `status`, and that its stderr says each of `says`.
async fn assert_template_fails(args: &[&str], status: i32, says: &[&str]) {
    let scratch = Scratch::new("py-bad");
    let stderr = scratch.join("stderr");
    let daemon = Daemon::start().await;
    let error = daemon
        .client
        .create_template(&zygote("bad", Driver::Fork, args, &stderr))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::TemplateFailed), "{error}");
    let message = error.to_string();
    assert!(
        message.contains(&format!(
            "exited before it was ready (exit status: {status})"
        )),
        "{message}"
    );
    let stderr = read(&stderr);
    for said in says {
        assert!(stderr.contains(said), "stderr lacks {said:?}:\n{stderr}");
    }
    daemon.stop().await;
}

#[tokio::test]
async fn an_import_error_in_the_app_fails_the_template() {
    assert_template_fails(
        &["wsgi", "broken_import:app"],
        2,
        &[
            "squall-zygote: importing 'broken_import' (from 'broken_import:app') failed",
            "RuntimeError: boom while importing the app",
        ],
    )
    .await;
}

#[tokio::test]
async fn an_app_that_does_not_exist_fails_the_template() {
    assert_template_fails(
        &["wsgi", "no_such_module:app"],
        2,
        &["squall-zygote: cannot import 'no_such_module' (from 'no_such_module:app'): no module named 'no_such_module'"],
    )
    .await;
    assert_template_fails(
        &["wsgi", "httpbin:no_such_app"],
        2,
        &["squall-zygote: module 'httpbin' has no 'no_such_app'"],
    )
    .await;
    assert_template_fails(
        &["wsgi", "httpbin"],
        2,
        &["squall-zygote: 'httpbin' is not MODULE:APP"],
    )
    .await;
}

#[tokio::test]
async fn an_object_that_is_not_an_app_of_the_kind_fails_the_template() {
    assert_template_fails(
        &["wsgi", "bad_apps:greeting"],
        2,
        &["squall-zygote: 'bad_apps:greeting' is a str, not a WSGI application"],
    )
    .await;
    assert_template_fails(
        &["wsgi", "hello_asgi:app"],
        2,
        &[
            "'hello_asgi:app' looks like an ASGI application",
            "serve it with `asgi`",
        ],
    )
    .await;
    assert_template_fails(
        &["asgi", "httpbin:app"],
        2,
        &[
            "'httpbin:app' looks like a WSGI application",
            "serve it with `wsgi`",
        ],
    )
    .await;
}

#[tokio::test]
async fn a_failing_warm_up_hook_fails_the_template() {
    assert_template_fails(
        &[
            "asgi",
            "hello_asgi:app",
            "--warmup",
            "bad_apps:failing_warmup",
        ],
        2,
        &[
            "squall-zygote: the warm-up 'bad_apps:failing_warmup' failed",
            "OSError: the model file is missing",
        ],
    )
    .await;
    assert_template_fails(
        &["asgi", "hello_asgi:app", "--warmup", "hello_asgi:no_such_hook"],
        2,
        &["squall-zygote: module 'hello_asgi' has no 'no_such_hook' (from 'hello_asgi:no_such_hook'): expected MODULE:FUNC"],
    )
    .await;
}

#[tokio::test]
async fn threads_python_does_not_know_fail_the_template_unless_allowed() {
    assert_template_fails(
        &["wsgi", "native_threads_at_import:app"],
        3,
        &[
            "squall-zygote: refusing to fork 'native_threads_at_import:app': 1 thread(s) that Python's threading does not know",
            "pass --allow-native-threads",
        ],
    )
    .await;
    let allowed = Running::start(
        "native",
        &[
            "wsgi",
            "native_threads_at_import:app",
            "--allow-native-threads",
        ],
    )
    .await;
    let clone = allowed.clones(1).await.remove(0);
    assert_eq!(get_async(clone.addr, "/").await.status, 200);
    allowed.daemon.stop().await;
}

#[tokio::test]
async fn threads_started_at_import_fail_the_template_naming_them() {
    assert_template_fails(
        &["wsgi", "threads_at_import:app"],
        3,
        &["squall-zygote: refusing to fork 'threads_at_import:app': it started 1 thread(s) before the fork: 'cache-refresher'"],
    )
    .await;
}

#[tokio::test]
async fn a_crash_in_a_clone_is_reported_as_its_exit_with_the_stack_on_stderr() {
    let running = Running::start("crash", &["wsgi", "bad_apps:crash_on_request"]).await;
    let clones = running.clones(2).await;
    assert_eq!(get_async(clones[0].addr, "/").await.status, 200);
    // The crashing request gets no answer; the connection closes.
    let addr = clones[0].addr;
    let _ = tokio::task::spawn_blocking(move || test_support::http::try_get(addr, "/crash")).await;
    assert_eq!(
        exit_of(&running.daemon, &clones[0]).await,
        ExitStatus::Signal(11)
    );
    let said = running.stderr();
    assert!(
        said.contains("Fatal Python error: Segmentation fault"),
        "{said}"
    );
    assert!(said.contains("crash_on_request"), "{said}");
    assert_eq!(
        get_async(clones[1].addr, "/").await.status,
        200,
        "the other clone serves on"
    );
    running.daemon.stop().await;
}

#[tokio::test]
async fn a_clone_whose_app_fails_to_start_exits_with_the_reason_on_stderr() {
    let running = Running::start("startup", &["asgi", "bad_apps:fails_at_startup"]).await;
    let clone = running.clones(1).await.remove(0);
    assert_eq!(exit_of(&running.daemon, &clone).await, ExitStatus::Code(3));
    let said = running.stderr();
    assert!(
        said.contains("RuntimeError: the database is unreachable"),
        "{said}"
    );
    assert!(
        said.contains(&format!(
            "squall-zygote: clone {}: the server exited with status 3",
            clone.id
        )),
        "{said}"
    );
    running.daemon.stop().await;
}

/// The template's child processes (its clones and its spares).
fn children(pid: u32) -> HashSet<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect()
}

#[tokio::test]
async fn a_spare_clone_waits_ahead_of_each_request_and_one_that_dies_is_replaced_unreported() {
    let running = Running::start("spare", &["wsgi", "httpbin:app", "--spares", "1"]).await;
    let template = running.template.pid.unwrap();
    let spare = eventually("a spare forked ahead", DEADLINE, || {
        let children = children(template);
        (children.len() == 1).then(|| *children.iter().next().unwrap())
    })
    .await;
    // The request is the spare's: it becomes the clone, and the next spare is forked.
    let first = running.clones(1).await.remove(0);
    assert_eq!(first.pid, Some(spare), "the spare served the request");
    let next = eventually("the next spare", DEADLINE, || {
        let children = children(template);
        (children.len() == 2).then(|| *children.iter().find(|&&p| p != spare).unwrap())
    })
    .await;
    // A spare killed while it waits is reaped and not reported; the next request is forked
    // directly, and a spare is forked ahead again.
    sigkill(next);
    eventually("the dead spare reaped", DEADLINE, || {
        (children(template) == HashSet::from([spare])).then_some(())
    })
    .await;
    let second = running.clones(1).await.remove(0);
    assert_ne!(second.pid, Some(next));
    let reply = get_async(second.addr, "/get").await;
    assert_eq!(reply.header("x-squall-clone-id"), Some(second.id.as_str()));
    let listed = running.daemon.client.clones().await.unwrap().clones;
    assert_eq!(listed.len(), 2, "only the two clones: {listed:?}");
    let third_spare = eventually("a spare again", DEADLINE, || {
        let children = children(template);
        (children.len() == 3).then(|| {
            *children
                .iter()
                .find(|&&p| Some(p) != first.pid && Some(p) != second.pid)
                .unwrap()
        })
    })
    .await;
    running.daemon.stop().await;
    gone("the spare ends with the template", third_spare).await;
}

/// Waits until the template has `count` children, and returns them.
async fn children_once(template: u32, count: usize) -> HashSet<u32> {
    eventually(&format!("{count} children"), DEADLINE, || {
        let children = children(template);
        (children.len() == count).then_some(children)
    })
    .await
}

#[tokio::test]
async fn requests_take_the_spares_and_as_many_are_forked_ahead_again() {
    let running = Running::start("spares", &["wsgi", "httpbin:app", "--spares", "3"]).await;
    let template = running.template.pid.unwrap();
    let spares = children_once(template, 3).await;
    // Three requests at once: each is one of the spares forked ahead, and three more follow.
    let clones = running.clones(3).await;
    let served: HashSet<u32> = clones.iter().map(|c| c.pid.unwrap()).collect();
    assert_eq!(served, spares, "the spares served the requests");
    for clone in &clones {
        let reply = get_async(clone.addr, "/get").await;
        assert_eq!(reply.header("x-squall-clone-id"), Some(clone.id.as_str()));
    }
    let now = children_once(template, 6).await;
    let next: HashSet<u32> = now.difference(&served).copied().collect();
    assert_eq!(next.len(), 3);
    // A fourth request takes one of those, not a new fork.
    let fourth = running.clones(1).await.remove(0);
    assert!(
        next.contains(&fourth.pid.unwrap()),
        "{fourth:?} is one of {next:?}"
    );
    running.daemon.stop().await;
    for pid in now {
        gone("a clone or a spare ends with the template", pid).await;
    }
}

#[tokio::test]
async fn with_no_spares_each_clone_is_forked_when_asked_for() {
    let running = Running::start("no-spares", &["wsgi", "httpbin:app", "--spares", "0"]).await;
    let template = running.template.pid.unwrap();
    // Nothing is forked ahead, before a request or after one.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(children(template).is_empty());
    let clone = running.clones(1).await.remove(0);
    let reply = get_async(clone.addr, "/get").await;
    assert_eq!(reply.header("x-squall-clone-id"), Some(clone.id.as_str()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(children(template), HashSet::from([clone.pid.unwrap()]));
    running.daemon.stop().await;
}

#[tokio::test]
async fn a_bad_spares_count_is_refused() {
    assert_template_fails(
        &["wsgi", "httpbin:app", "--spares", "many"],
        2,
        &["--spares", "expected a number from 0 to 64, got 'many'"],
    )
    .await;
}

#[tokio::test]
async fn a_primed_spare_has_served_its_path_to_itself_before_its_first_request() {
    let primed = Running::start("primed", &["wsgi", "primed:app", "--prime", "/prime"]).await;
    let plain = Running::start("plain", &["wsgi", "primed:app"]).await;
    for (running, expected) in [(&primed, "primed=1"), (&plain, "primed=0")] {
        // The spares forked at start, then the next ones.
        for clone in running
            .clones(2)
            .await
            .into_iter()
            .chain(running.clones(2).await)
        {
            let reply = get_async(clone.addr, "/").await;
            assert_eq!(reply.body.trim(), expected, "{}", running.stderr());
        }
    }
    primed.daemon.stop().await;
    plain.daemon.stop().await;
}

#[tokio::test]
async fn a_prime_path_answered_with_an_error_is_said_and_the_clone_still_serves() {
    let running = Running::start(
        "bad-prime",
        &["wsgi", "httpbin:app", "--prime", "/status/404"],
    )
    .await;
    let clone = running.clones(1).await.remove(0);
    let reply = get_async(clone.addr, "/get").await;
    assert_eq!(reply.status, 200);
    let stderr = running.stderr();
    assert!(
        stderr.contains("priming with GET /status/404 was answered 'HTTP/1.1 404 NOT FOUND'"),
        "{stderr}"
    );
    running.daemon.stop().await;
}

/// A `/proc/PID/smaps_rollup` field, in KiB.
fn rollup_kib(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap();
    text.lines()
        .find_map(|line| {
            line.strip_prefix(field)?
                .strip_prefix(':')?
                .split_whitespace()
                .next()
        })
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn a_large_template_is_moved_into_huge_pages_and_its_clones_read_it_intact() {
    let running = Running::start("large", &["wsgi", "large:app"]).await;
    let stderr = running.stderr();
    if stderr.contains("cannot collapse memory into huge pages") {
        eprintln!("skipped: this kernel cannot collapse memory into huge pages (Linux 6.1+)");
        running.daemon.stop().await;
        return;
    }
    assert!(
        stderr.contains("MiB of the template's memory moved into huge pages"),
        "{stderr}"
    );
    let template = running.template.pid.unwrap();
    let huge = rollup_kib(template, "AnonHugePages");
    assert!(huge >= 60 << 10, "{huge} KiB in huge pages");
    // Clones, the spares and one forked directly, read the same table.
    let mut digests = HashSet::new();
    for clone in running.clones(3).await {
        digests.insert(get_async(clone.addr, "/").await.body);
    }
    assert_eq!(digests.len(), 1, "{digests:?}");
    running.daemon.stop().await;

    let plain = Running::start("large-plain", &["wsgi", "large:app", "--no-huge-pages"]).await;
    let clone = plain.clones(1).await.remove(0);
    assert!(digests.contains(&get_async(clone.addr, "/").await.body));
    assert!(!plain.stderr().contains("huge pages"), "{}", plain.stderr());
    plain.daemon.stop().await;
}
