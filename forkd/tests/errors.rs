//! Every error code the API answers with, each produced by a real request to an in-process
//! daemon and decoded by `forkd::Client` into the right `ErrorCode` (read from the raw body
//! for the few requests the client cannot make), with the status the docs give it.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::net::IpAddr;
use std::time::Duration;

use common::{Daemon, TOKEN, warm_app_spec, warm_app_spec_warming};
use forkd::{Client, ClientError, CloneState, Config, Driver, ErrorCode, TemplateSpec};
use test_support::eventually_async;
use test_support::http::exchange_async;

const DEADLINE: Duration = Duration::from_secs(20);

/// An error answer's status and code; `None` for a success or no answer at all.
type Answer = Option<(u16, ErrorCode)>;

/// The status and code of an error answer.
fn answer<T: std::fmt::Debug>(result: Result<T, ClientError>) -> Answer {
    match result {
        Err(ClientError::Api { status, code, .. }) => Some((status.as_u16(), code)),
        other => {
            eprintln!("not an error answer: {other:?}");
            None
        }
    }
}

/// A spawn template whose app exits at once.
fn exits_at_once(name: &str, driver: Driver) -> TemplateSpec {
    TemplateSpec::new(name, driver, vec!["/bin/false".into()])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_code_comes_from_a_real_request() {
    let mut config = Config::new(TOKEN);
    config.max_clones = 2;
    let daemon = Daemon::with_config(config).await;
    let client = &daemon.client;
    let web = warm_app_spec("web", Driver::Spawn);
    client.create_template(&web).await.unwrap();
    client
        .create_template(&warm_app_spec_warming("slow", Driver::Spawn, 1500))
        .await
        .unwrap();
    client
        .create_template(&exits_at_once("broken", Driver::Spawn))
        .await
        .unwrap();
    let mut cases: Vec<(ErrorCode, &str, Answer)> = Vec::new();

    let wrong_token = Client::new(&format!("http://{}", daemon.addr), "nope").unwrap();
    cases.push((
        ErrorCode::Unauthorized,
        "a wrong token",
        answer(wrong_token.clones().await),
    ));
    let wrong_path = Client::new(&format!("http://{}/nope", daemon.addr), TOKEN).unwrap();
    cases.push((
        ErrorCode::NotFound,
        "a path with no endpoint",
        answer(wrong_path.clones().await),
    ));
    let mut huge = web.clone();
    huge.name = "huge".into();
    huge.command.push("x".repeat(forkd::MAX_BODY));
    cases.push((
        ErrorCode::BodyTooLarge,
        "a spec larger than MAX_BODY",
        answer(client.create_template(&huge).await),
    ));
    let mut bad_name = web.clone();
    bad_name.name = "Bad Name".into();
    cases.push((
        ErrorCode::InvalidTemplate,
        "an invalid template name",
        answer(client.create_template(&bad_name).await),
    ));
    cases.push((
        ErrorCode::TemplateExists,
        "a second template of the same name",
        answer(client.create_template(&web).await),
    ));
    cases.push((
        ErrorCode::TemplateFailed,
        "a fork template that exits at once",
        answer(
            client
                .create_template(&exits_at_once("dead", Driver::Fork))
                .await,
        ),
    ));
    cases.push((
        ErrorCode::InvalidCount,
        "a count of 0",
        answer(client.create_clones("web", 0).await),
    ));
    cases.push((
        ErrorCode::TemplateNotFound,
        "clones of no template",
        answer(client.create_clones("nope", 1).await),
    ));
    cases.push((
        ErrorCode::ClonesFailed,
        "clones of an app that exits at once",
        answer(client.create_clones("broken", 1).await),
    ));
    cases.push((
        ErrorCode::CloneNotFound,
        "killing no clone",
        answer(client.kill("web-99").await),
    ));

    let held = client.create_clones("web", 2).await.unwrap();
    cases.push((
        ErrorCode::NoCapacity,
        "a clone beyond --max-clones",
        answer(client.create_clones("web", 1).await),
    ));
    for clone in held {
        client.kill(&clone.id).await.unwrap();
    }
    cases.push((
        ErrorCode::NotPortable,
        "the snapshot of a template that is not a vm's",
        answer(client.snapshot("web").await),
    ));

    let slow = tokio::spawn({
        let client = client.clone();
        async move { client.create_clones("slow", 1).await }
    });
    let starting = eventually_async("a slow clone is starting", DEADLINE, || async {
        let listed = client.clones().await.unwrap().clones;
        listed.into_iter().find(|c| c.state == CloneState::Starting)
    })
    .await;
    cases.push((
        ErrorCode::CloneStarting,
        "killing a clone that is starting",
        answer(client.kill(&starting.id).await),
    ));
    slow.await.unwrap().unwrap();

    // A daemon told to put clones on an address this host does not have cannot bind them.
    let mut elsewhere = Config::new(TOKEN);
    elsewhere.clone_ip = IpAddr::from([192, 0, 2, 1]); // TEST-NET-1, never local
    let elsewhere = Daemon::with_config(elsewhere).await;
    elsewhere.client.create_template(&web).await.unwrap();
    cases.push((
        ErrorCode::Internal,
        "a clone whose socket cannot be bound",
        answer(elsewhere.client.create_clones("web", 1).await),
    ));
    elsewhere.stop().await;

    // What the client cannot send: read the code from the raw answer.
    let auth = ("Authorization", "Bearer test-token");
    for (code, what, method, path, body) in [
        (
            ErrorCode::MethodNotAllowed,
            "PUT on the clone list",
            "PUT",
            "/v1/clones",
            "",
        ),
        (
            ErrorCode::BadRequest,
            "a negative count",
            "POST",
            "/v1/templates/web/clones",
            r#"{"count":-1}"#,
        ),
    ] {
        let reply = exchange_async(daemon.addr, method, path, &[auth], body.as_bytes()).await;
        let body: forkd::api::ErrorBody = serde_json::from_str(&reply.body).unwrap();
        cases.push((code, what, Some((reply.status, body.code))));
    }

    // A template still warming up cannot be deleted; if shutdown begins meanwhile, its
    // creation ends with `shutting_down` once it is warm (and it is stopped).
    let warming = tokio::spawn({
        let client = client.clone();
        async move {
            let spec = warm_app_spec_warming("warming", Driver::Fork, 3000);
            client.create_template(&spec).await
        }
    });
    let refused = eventually_async("the template is warming", DEADLINE, || async {
        match client.delete_template("warming").await {
            // Its creation has not arrived yet.
            Err(e) if e.code() == Some(ErrorCode::TemplateNotFound) => None,
            other => Some(answer(other)),
        }
    })
    .await;
    cases.push((
        ErrorCode::TemplateWarming,
        "deleting a template that warms up",
        refused,
    ));
    daemon.signal_stop();
    cases.push((
        ErrorCode::ShuttingDown,
        "a template that got warm after shutdown began",
        answer(warming.await.unwrap()),
    ));
    daemon.stop().await;

    for (code, what, got) in &cases {
        assert_eq!(
            *got,
            Some((code.status().as_u16(), *code)),
            "{what}: expected {} {code}",
            code.status()
        );
    }
    let produced: HashSet<ErrorCode> = cases.iter().map(|(code, ..)| *code).collect();
    for code in ErrorCode::ALL {
        assert!(produced.contains(&code), "no request here produces {code}");
    }
}
