//! The daemon's bookkeeping at unit level: slots, waits and shutdown, with real `sleep`
//! processes standing in for clones.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use kernel::Pidfd;
use test_support::process::alive;

use super::Daemon;
use super::clones::Claim;
use super::templates::Template;
use crate::api::{CloneState, Driver, TemplateSpec};
use crate::config::Config;
use crate::driver::{
    CloneHandle, Life, Lifeline, Placement, Process, Started, TemplateKind, exit_status,
};
use crate::error::{CloneFailure, CreateClonesError};

fn daemon(max_clones: usize) -> Arc<Daemon> {
    Daemon::new(Config {
        max_clones,
        ..Config::new("token")
    })
}

fn spawn_template(name: &str) -> Arc<Template> {
    Arc::new(Template::new(
        TemplateSpec::new(name, Driver::Spawn, vec!["sleep".into()]),
        TemplateKind::Spawn,
    ))
}

/// A clone that is a real `sleep` process, watched the way the spawn driver does it.
fn sleeper(id: &str) -> Started {
    let mut child = tokio::process::Command::new("sleep")
        .arg("600")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pidfd = Arc::new(Pidfd::open(child.id().unwrap()).unwrap());
    let (life, lifeline) = Lifeline::new();
    tokio::spawn(async move {
        let status = child.wait().await;
        life.send_replace(Life::Ended(exit_status(status)));
    });
    Started {
        id: id.to_owned(),
        addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 1)),
        handle: CloneHandle::Process(Process::new(pidfd, lifeline)),
    }
}

fn claims(daemon: &Arc<Daemon>, template: &Template, placements: &[Placement]) -> Vec<Claim> {
    let slots = daemon.reserve(template, placements.len()).unwrap();
    daemon.list_starting(template, placements, slots).unwrap()
}

#[tokio::test]
async fn slots_count_against_max_clones_until_filled_or_dropped() {
    let daemon = daemon(3);
    let template = spawn_template("web");
    let two = daemon.reserve(&template, 2).unwrap();
    let refused = daemon.reserve(&template, 2).err().unwrap();
    assert!(
        matches!(
            refused,
            CreateClonesError::NoCapacity {
                count: 2,
                used: 2,
                max: 3
            }
        ),
        "{refused}"
    );
    let one = daemon.reserve(&template, 1).unwrap();
    assert!(daemon.reserve(&template, 1).is_err());
    // A request whose clones failed drops its slots, which gives them back.
    drop(two);
    assert_eq!(daemon.reserved.load(Ordering::Acquire), 1);
    // A listed clone fills its slot: it counts as a record now, not as a slot.
    let placement = template
        .kind
        .place_clone(IpAddr::from([127, 0, 0, 1]), || "web-1".to_owned())
        .unwrap();
    let _claims = daemon
        .list_starting(&template, std::slice::from_ref(&placement), one)
        .unwrap();
    assert_eq!(daemon.reserved.load(Ordering::Acquire), 0);
    assert!(daemon.reserve(&template, 3).is_err());
    assert_eq!(daemon.reserve(&template, 2).unwrap().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_kill_waits_for_the_start_without_a_timer_then_kills() {
    let daemon = daemon(4);
    let template = spawn_template("web");
    let placement = template
        .kind
        .place_clone(IpAddr::from([127, 0, 0, 1]), || "web-1".to_owned())
        .unwrap();
    let claim = claims(&daemon, &template, std::slice::from_ref(&placement)).remove(0);
    let before = tokio::time::Instant::now();
    let killer = tokio::spawn({
        let daemon = daemon.clone();
        async move { daemon.kill_when_started("web-1").await }
    });
    // Leave the runtime idle for a while (a thread, not a timer, wakes us). The clock is
    // paused: idle, it jumps to the next timer at once, so a kill that polled would move
    // it, again and again.
    let (wake, idle) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(100));
        let _ = wake.send(());
    });
    idle.await.unwrap();
    assert!(!killer.is_finished(), "it was killed while it started");
    assert_eq!(tokio::time::Instant::now(), before, "the kill polled");

    let started = sleeper("web-1");
    let pid = started.handle.pid().unwrap();
    let (info, failure) = daemon
        .settle(&template, claim, Ok(started), Instant::now())
        .await;
    assert_eq!((info.state, failure.is_none()), (CloneState::Ready, true));
    killer.await.unwrap();
    assert!(!alive(pid), "the kill returned with the clone alive");
    assert!(daemon.clone_list().clones.is_empty());
}

#[tokio::test]
async fn a_vm_clone_that_starts_after_its_template_is_deleted_is_killed() {
    let daemon = daemon(1);
    let template = spawn_template("web");
    let claim = claims(&daemon, &template, &[Placement::Pool]).remove(0);
    assert_eq!(daemon.reserved.load(Ordering::Acquire), 1);
    template.retired.store(true, Ordering::Release); // as `delete_template` does
    let started = sleeper("web-7");
    let pid = started.handle.pid().unwrap();
    let (info, failure) = daemon
        .settle(&template, claim, Ok(started), Instant::now())
        .await;
    assert_eq!(info.state, CloneState::Failed);
    assert!(matches!(failure, Some(CloneFailure::TemplateDeleted)));
    assert!(!alive(pid));
    assert_eq!(daemon.reserved.load(Ordering::Acquire), 0);
    assert!(daemon.clone_list().clones.is_empty());
}

#[tokio::test(start_paused = true)]
async fn shutdown_waits_for_reserved_slots_and_refuses_new_ones() {
    let daemon = daemon(2);
    let template = spawn_template("web");
    let slot = daemon.reserve(&template, 1).unwrap();
    let stopping = tokio::spawn({
        let daemon = daemon.clone();
        async move { daemon.shut_down().await }
    });
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    assert!(
        !stopping.is_finished(),
        "shutdown did not wait for the slot"
    );
    assert!(matches!(
        daemon.reserve(&template, 1),
        Err(CreateClonesError::ShuttingDown)
    ));
    drop(slot);
    stopping.await.unwrap();
}
