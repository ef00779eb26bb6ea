//! gRPC end to end: real gRPC servers (Python's grpcio, `tests/grpc/server.py`, serving the
//! Greeter of `tests/grpc/helloworld.proto`) behind `squall balance --worker-protocol h2c`
//! and `squall up --driver spawn --worker-protocol h2c`, called by a real gRPC client
//! (`tests/grpc/client.py`) over one channel. The Python stubs are generated into each
//! test's scratch directory with `grpc_tools.protoc`; grpcio comes from the virtualenv
//! `scripts/install-deps` makes.
#![allow(clippy::unwrap_used)] // In tests a panic is a failed test, which is the point.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Case, ChildGuard, Up, quick_policy};
use serde_json::Value;

/// Where the proto and the Python server and client are.
fn grpc_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/grpc")
}

/// The virtualenv's Python with grpcio, and the Greeter's stubs generated for it.
struct Grpc {
    python: PathBuf,
    stubs: PathBuf,
}

impl Grpc {
    /// Checks that the virtualenv has grpcio and grpcio-tools (failing with what to run if
    /// not) and generates the stubs into `case`'s scratch directory.
    fn new(case: &Case) -> Grpc {
        let python = test_support::python::venv_python();
        let imports = Command::new(&python)
            .args(["-c", "import grpc, grpc_tools.protoc"])
            .output()
            .unwrap();
        assert!(
            imports.status.success(),
            "the Python virtualenv at {} has no grpcio or grpcio-tools: run scripts/install-deps\n{}",
            test_support::python::venv().display(),
            String::from_utf8_lossy(&imports.stderr)
        );
        let stubs = case.scratch.join("stubs");
        std::fs::create_dir_all(&stubs).unwrap();
        let out = format!("{}", stubs.display());
        let generated = Command::new(&python)
            .args(["-m", "grpc_tools.protoc", "-I"])
            .arg(grpc_dir())
            .arg(format!("--python_out={out}"))
            .arg(format!("--grpc_python_out={out}"))
            .arg("helloworld.proto")
            .output()
            .unwrap();
        assert!(
            generated.status.success(),
            "protoc: {}",
            String::from_utf8_lossy(&generated.stderr)
        );
        Grpc { python, stubs }
    }

    /// The server's command line, without its port.
    fn server_command(&self) -> Vec<String> {
        vec![
            self.python.display().to_string(),
            grpc_dir().join("server.py").display().to_string(),
            self.stubs.display().to_string(),
        ]
    }

    /// A server on a port of its choosing, killed when dropped; returns it and its address
    /// once it serves.
    fn server(&self) -> (ChildGuard, SocketAddr) {
        let command = self.server_command();
        let mut child = Command::new(&command[0])
            .args(&command[1..])
            .arg("0")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let guard = ChildGuard(child);
        let mut line = String::new();
        BufReader::new(stderr).read_line(&mut line).unwrap();
        let port: u16 = line
            .trim()
            .strip_prefix("serving on ")
            .unwrap_or_else(|| panic!("the server said {line:?}"))
            .parse()
            .unwrap();
        (guard, SocketAddr::from(([127, 0, 0, 1], port)))
    }

    /// Runs one client scenario against `target` on one channel; returns its outcome.
    fn call(&self, target: SocketAddr, scenario: &[&str]) -> Value {
        let output = Command::new(&self.python)
            .arg(grpc_dir().join("client.py"))
            .arg(&self.stubs)
            .arg(target.to_string())
            .args(scenario)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "client {scenario:?}: {stderr}");
        serde_json::from_slice(&output.stdout).unwrap()
    }
}

/// The port a reply names ("Hello NAME from PORT").
fn answered_by(message: &Value) -> u16 {
    let message = message.as_str().unwrap();
    let (_, port) = message.rsplit_once(" from ").unwrap();
    port.parse().unwrap()
}

/// `squall balance --worker-protocol h2c` in front of `workers`, killed when dropped; its
/// listener and admin addresses.
fn balance_h2c(workers: &[SocketAddr]) -> (ChildGuard, SocketAddr, SocketAddr) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_squall"));
    command.args([
        "balance",
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--worker-protocol",
        "h2c",
    ]);
    for worker in workers {
        command.args(["--worker", &worker.to_string()]);
    }
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let guard = ChildGuard(child);
    let mut announced = |what: &str| -> SocketAddr {
        let line = lines.next().unwrap().unwrap();
        line.strip_prefix(what)
            .unwrap_or_else(|| panic!("expected {what:?}, got {line:?}"))
            .trim()
            .parse()
            .unwrap()
    };
    let listen = announced("listening on");
    let admin = announced("admin on");
    (guard, listen, admin)
}

fn status(admin: SocketAddr) -> Value {
    let reply = test_support::http::get(admin, "/status");
    assert_eq!(reply.status, 200, "{}", reply.body);
    serde_json::from_str(&reply.body).unwrap()
}

#[test]
fn grpc_calls_on_one_channel_are_balanced_per_request_and_keep_their_status_and_deadline() {
    let case = Case::new("grpc-balance");
    let grpc = Grpc::new(&case);
    let (_a, a) = grpc.server();
    let (_b, b) = grpc.server();
    let (_squall, listen, admin) = balance_h2c(&[a, b]);
    let workers = status(admin)["workers"].clone();
    let protocols: Vec<&str> = workers
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["protocol"].as_str().unwrap())
        .collect();
    assert_eq!(protocols, ["h2c", "h2c"]);

    // 40 unary calls at once on one channel (one HTTP/2 connection to the balancer), each
    // held 100 ms by the server: both servers answer, so the balancer spread the streams of
    // one connection, not the connection.
    let unary = grpc.call(listen, &["unary", "40", "0.1"]);
    let messages = unary["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 40);
    for (i, message) in messages.iter().enumerate() {
        assert!(
            message
                .as_str()
                .unwrap()
                .starts_with(&format!("Hello call {i} from ")),
            "{message}"
        );
    }
    let servers: BTreeSet<u16> = messages.iter().map(answered_by).collect();
    assert_eq!(servers, BTreeSet::from([a.port(), b.port()]));

    // A server-streaming call: every reply, in order, from one server.
    let stream = grpc.call(listen, &["stream", "25"]);
    let replies = stream["messages"].as_array().unwrap();
    assert_eq!(replies.len(), 25);
    let server = answered_by(&replies[0]);
    for (i, reply) in replies.iter().enumerate() {
        assert_eq!(
            reply.as_str().unwrap(),
            format!("Hello stream #{i} from {server}")
        );
    }

    // A call the server fails: its status and message travel in the trailers.
    let failed = grpc.call(listen, &["fail", "5"]);
    assert_eq!(failed["code"], "NOT_FOUND", "{failed}");
    let details = failed["details"].as_str().unwrap();
    assert!(
        details.starts_with("no greeting for nobody from "),
        "{details}"
    );

    // A deadline shorter than the server's delay: the client gives up at 300 ms, and the
    // balancer frees the worker's slot long before the server's 20 s would have.
    let late = grpc.call(listen, &["deadline", "20", "0.3"]);
    assert_eq!(late["code"], "DEADLINE_EXCEEDED", "{late}");
    test_support::wait_until("the slot is freed", Duration::from_secs(5), || {
        (status(admin)["in_flight"] == 0).then_some(())
    });
    // The balancer still answers after the cancelled stream.
    let after = grpc.call(listen, &["unary", "2", "0"]);
    assert_eq!(after["messages"].as_array().unwrap().len(), 2);
}

#[test]
fn squall_up_spawns_grpc_servers_and_balances_calls_to_them() {
    let case = Case::new("grpc-up");
    let grpc = Grpc::new(&case);
    case.write_policy(&quick_policy(1));
    let extra = ["--worker-protocol".to_owned(), "h2c".to_owned()];
    // Its log (and the servers') shows with a failure.
    let up = Up::start_with(
        &case.policy,
        &case.marker,
        "spawn",
        &extra,
        &grpc.server_command(),
        Stdio::inherit(),
    );
    up.wait_for("a first worker", Duration::from_secs(60), |n| n >= 1);
    let worker = &up.status()["workers"][0];
    assert_eq!(worker["protocol"], "h2c", "{worker}");
    // Ten calls at once, on one channel, through the balancer to the spawned servers.
    let unary = grpc.call(up.listen, &["unary", "10", "0"]);
    let messages = unary["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 10);
    for (i, message) in messages.iter().enumerate() {
        let text = message.as_str().unwrap();
        assert!(text.starts_with(&format!("Hello call {i} from ")), "{text}");
        answered_by(message);
    }
}
