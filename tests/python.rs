//! `squall up --driver fork` in front of Python web apps no one here wrote (httpbin, a Flask
//! app from PyPI, served by waitress; a Starlette app, served by uvicorn), forked warm by the
//! drop-in zygote `python3 -m squall_zygote wsgi|asgi`.
#![allow(clippy::unwrap_used)] // In tests a panic is a failed test, which is the point.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{Case, Load, Up, quick_policy};

/// `squall up --driver fork -- APP` (a `squall_zygote` command) through a surge of 8 closed-loop
/// clients: the pool grows to three or more, answers come from three clones or more, each
/// naming itself, the pool shrinks back to one, and no request failed.
fn grows_and_shrinks_through_a_surge(name: &str, app: &[String], health: &str) {
    let case = Case::new(name);
    case.write_policy(&quick_policy(1));
    let extra = ["--health-path".to_owned(), health.to_owned()];
    let up = Up::start_full(&case.policy, &case.marker, "fork", &extra, app);
    up.wait_for("a first worker", Duration::from_secs(60), |n| n >= 1);

    let mut load = Load::start(up.listen, 8);
    let peak = up.wait_for("the pool grows", Duration::from_secs(60), |n| n >= 3);
    // Each worker is its own clone, and says which: the app knows nothing of it, the zygote
    // adds the header to every response.
    let mut clones = BTreeSet::new();
    test_support::wait_until("answers from three clones", Duration::from_secs(30), || {
        let reply = test_support::http::get(up.listen, health);
        assert_eq!(reply.status, 200, "{}", reply.body);
        let id = reply
            .header("x-squall-clone-id")
            .unwrap_or_else(|| panic!("no clone id in {}", reply.head))
            .to_owned();
        clones.insert(id);
        (clones.len() >= 3).then_some(())
    });
    load.stop();
    up.wait_for("the pool shrinks", Duration::from_secs(60), |n| n == 1);
    assert_eq!(load.failed(), 0, "{} answered", load.ok());
    eprintln!(
        "{name}: peak {peak} workers, {} requests, clones seen {clones:?}",
        load.ok()
    );
}

#[test]
fn httpbin_forked_by_the_python_zygote_grows_and_shrinks_through_a_surge_with_nothing_failed() {
    let python = test_support::python::venv_python();
    let app = [
        python.display().to_string(),
        "-m".into(),
        "squall_zygote".into(),
        "wsgi".into(),
        "httpbin:app".into(),
    ];
    grows_and_shrinks_through_a_surge("python", &app, "/get");
}

#[test]
fn a_starlette_app_served_by_uvicorn_grows_and_shrinks_through_a_surge_with_nothing_failed() {
    let python = test_support::python::venv_python();
    let apps = test_support::python::apps_dir();
    let app = [
        "/usr/bin/env".to_owned(),
        format!("PYTHONPATH={}", apps.display()),
        python.display().to_string(),
        "-m".into(),
        "squall_zygote".into(),
        "asgi".into(),
        "hello_asgi:app".into(),
        "--warmup".into(),
        "hello_asgi:warm".into(),
    ];
    grows_and_shrinks_through_a_surge("python-asgi", &app, "/");
}

#[test]
fn the_heavy_example_is_built_once_in_the_template_and_served_by_every_clone() {
    let python = test_support::python::venv_python();
    let heavy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/python-heavy");
    let case = Case::new("python-heavy");
    case.write_policy(&quick_policy(2));
    // A small table keeps the test quick; the benchmark builds the full 256 MiB.
    let app = [
        "/usr/bin/env".to_owned(),
        "HEAVY_TABLE_MIB=16".into(),
        format!("PYTHONPATH={}", heavy.display()),
        python.display().to_string(),
        "-m".into(),
        "squall_zygote".into(),
        "wsgi".into(),
        "heavy:app".into(),
    ];
    let up = Up::start_full(&case.policy, &case.marker, "fork", &[], &app);
    up.wait_for("two workers", Duration::from_secs(60), |n| n >= 2);
    let mut answers = std::collections::BTreeMap::new();
    test_support::wait_until("lookups from both clones", Duration::from_secs(30), || {
        let reply = test_support::http::get(up.listen, "/lookup?key=1234");
        assert_eq!(reply.status, 200, "{}", reply.body);
        let clone = reply.header("x-squall-clone-id").unwrap().to_owned();
        answers.insert(clone, reply.body);
        (answers.len() >= 2).then_some(())
    });
    let bodies: BTreeSet<&String> = answers.values().collect();
    assert_eq!(
        bodies.len(),
        1,
        "the same table in every clone: {answers:?}"
    );
    // Built by one process (the template) and served by others (the clones).
    let mut builders = BTreeSet::new();
    let mut servers = BTreeSet::new();
    test_support::wait_until("two clones say who built", Duration::from_secs(30), || {
        let (status, body) = common::get(up.listen, "/");
        assert_eq!(status, 200);
        assert!(body.starts_with("table 16 MiB, built in "), "{body}");
        let pid_after = |label: &str| -> String {
            let rest = body.split(label).nth(1).unwrap();
            rest.split(|c: char| !c.is_ascii_digit())
                .next()
                .unwrap()
                .to_owned()
        };
        builders.insert(pid_after("by pid "));
        servers.insert(pid_after("served by pid "));
        (servers.len() >= 2).then_some(())
    });
    assert_eq!(builders.len(), 1, "built once: {builders:?}");
    assert!(builders.is_disjoint(&servers), "{builders:?} {servers:?}");
}
