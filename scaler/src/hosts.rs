//! The forkd hosts the scaler clones on: where each came from, whether it is up, resting or
//! retired, how much room it has, and where the next clones go.
//!
//! **Placement** is a pure function (`place`): each clone goes to the host with the most
//! free room (the host's own clone limit, less the clones of others it runs, less ours, less
//! what we asked it for and it has not answered), so a batch spreads across hosts. A host
//! that is down, resting after a failed request, or over the batch limit a refusal left is
//! not asked.
//!
//! **Health**: a host that fails a check, or lost the template, is down: its workers leave
//! the pool and none is placed on it until a check succeeds again. A host found by DNS that
//! stays down for long is retired for good.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::host::Listing;

/// Where a forkd host came from, which decides what the scaler does when it goes down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The daemon inside this process: it keeps its template for as long as it runs.
    Embedded,
    /// Given by address: checked until it comes back, its template created again if lost.
    Given,
    /// Found by a DNS name: as given, but retired after [`RETIRE_AFTER`] down, since
    /// addresses of daemons that went away do not come back.
    Found,
}

/// How long a host found by DNS may stay down before it is retired.
pub const RETIRE_AFTER: Duration = Duration::from_secs(60);

/// A forkd host that has the template, ready to clone on.
#[derive(Debug, Clone)]
pub struct Host<H> {
    /// Its name in logs and in worker ids: its address, usually.
    pub name: Arc<str>,
    /// How to talk to it.
    pub client: H,
    /// Where it came from.
    pub origin: Origin,
    /// Its clone limit, if it said (from the listing taken when it joined).
    pub max_clones: Option<usize>,
}

/// What the scaler knows of one host.
#[derive(Debug)]
pub(crate) struct HostState<H> {
    pub(crate) host: Host<H>,
    pub(crate) up: bool,
    /// When it went down, while it is down.
    pub(crate) down_since: Option<Instant>,
    /// Down for longer than it may be: no longer checked or used.
    pub(crate) retired: bool,
    /// Clones asked for and not yet answered.
    pub(crate) pending: u32,
    /// A check is under way.
    pub(crate) checking: bool,
    /// It refused clones for want of room, or a clone request failed: not asked again
    /// before this (another host is, if one has room).
    pub(crate) rest_until: Option<Instant>,
    /// After a refusal for want of room: ask for at most this many at once (halved at each
    /// refusal, so a host with a little room left gets asked for what fits; lifted when
    /// clones are granted).
    pub(crate) batch_limit: Option<u32>,
    /// Live clones that are not ours, at the last listing.
    pub(crate) others: usize,
}

impl<H> HostState<H> {
    pub(crate) fn new(host: Host<H>) -> Self {
        Self {
            host,
            up: true,
            down_since: None,
            retired: false,
            pending: 0,
            checking: false,
            rest_until: None,
            batch_limit: None,
            others: 0,
        }
    }

    /// Records a listing: its clone limit, and how many live clones are of templates other
    /// than ours (`template`). Clones of ours are counted as our workers and pending clones
    /// instead, whether the listing came before or after they joined.
    pub(crate) fn listed(&mut self, listing: &Listing, template: &str) {
        if listing.max_clones.is_some() {
            self.host.max_clones = listing.max_clones;
        }
        self.others = listing.live_except(template);
    }

    /// Goes down at `now` (if it was up).
    pub(crate) fn down(&mut self, now: Instant) {
        self.up = false;
        self.down_since.get_or_insert(now);
    }

    /// Is up again.
    pub(crate) fn back(&mut self) {
        self.up = true;
        self.down_since = None;
    }

    /// Whether it has been down for longer than its origin allows, at `now`.
    pub(crate) fn overdue(&self, now: Instant) -> bool {
        self.host.origin == Origin::Found
            && self
                .down_since
                .is_some_and(|since| now.duration_since(since) >= RETIRE_AFTER)
    }

    /// What placement needs to know of it at `now`, given `ours` workers on it.
    pub(crate) fn view(&self, now: Instant, ours: u32) -> HostView {
        HostView {
            usable: self.up && !self.retired && self.rest_until.is_none_or(|until| now >= until),
            load: u64::from(ours) + u64::from(self.pending) + self.others as u64,
            limit: self.host.max_clones.map(|max| max as u64),
            batch_limit: self.batch_limit,
        }
    }
}

/// One host as placement sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HostView {
    /// Up, not retired, not resting.
    pub(crate) usable: bool,
    /// Clones it runs or was asked for: ours, others', and ours still pending.
    pub(crate) load: u64,
    /// Its clone limit; `None` when it never said (taken as unbounded).
    pub(crate) limit: Option<u64>,
    /// The most to ask of it in one batch.
    pub(crate) batch_limit: Option<u32>,
}

impl HostView {
    /// Free slots after `given` more.
    fn room(&self, given: u32) -> u64 {
        self.limit
            .unwrap_or(u64::MAX)
            .saturating_sub(self.load + u64::from(given))
    }
}

/// How many of `count` new clones go to each host: one at a time to the usable host with
/// the most room (a host that never said its limit has the most, less its load, so those
/// spread evenly; ties to the first), within each host's batch limit. The sum is less than
/// `count` when the hosts cannot take them all.
pub(crate) fn place(count: u32, hosts: &[HostView]) -> Vec<u32> {
    let mut share = vec![0u32; hosts.len()];
    for _ in 0..count {
        let best = hosts
            .iter()
            .enumerate()
            .filter(|&(i, h)| {
                h.usable
                    && h.batch_limit.is_none_or(|limit| share[i] < limit)
                    && h.room(share[i]) > 0
            })
            .max_by_key(|&(i, h)| (h.room(share[i]), std::cmp::Reverse(i)))
            .map(|(i, _)| i);
        match best {
            Some(i) => share[i] += 1,
            None => break,
        }
    }
    share
}

#[cfg(test)]
mod tests {
    use forkd::{CloneInfo, CloneState};

    use super::*;

    /// A usable host with `load` clones and clone limit `limit`.
    fn host(load: u64, limit: Option<u64>) -> HostView {
        HostView {
            usable: true,
            load,
            limit,
            batch_limit: None,
        }
    }

    #[test]
    fn placement_fills_the_roomiest_host_first_and_spreads() {
        let cases: &[(&str, u32, Vec<HostView>, Vec<u32>)] = &[
            ("one host", 3, vec![host(0, Some(10))], vec![3]),
            (
                "most room first",
                2,
                vec![host(8, Some(10)), host(0, Some(5))],
                vec![0, 2],
            ),
            (
                "evens out, then alternates",
                6,
                vec![host(6, Some(10)), host(4, Some(10))],
                vec![2, 4],
            ),
            (
                "no limit: the least loaded first",
                5,
                vec![host(2, None), host(0, None)],
                vec![2, 3],
            ),
            (
                "full hosts take nothing",
                4,
                vec![host(3, Some(3)), host(0, Some(1))],
                vec![0, 1],
            ),
            (
                "down hosts take nothing",
                2,
                vec![
                    HostView {
                        usable: false,
                        ..host(0, None)
                    },
                    host(0, Some(1)),
                ],
                vec![0, 1],
            ),
            (
                "a batch limit caps a host",
                4,
                vec![
                    HostView {
                        batch_limit: Some(1),
                        ..host(0, Some(100))
                    },
                    host(0, Some(2)),
                ],
                vec![1, 2],
            ),
            ("nothing asked", 0, vec![host(0, None)], vec![0]),
            ("no hosts", 3, vec![], vec![]),
        ];
        for (name, count, hosts, expected) in cases {
            assert_eq!(&place(*count, hosts), expected, "{name}");
        }
    }

    #[test]
    fn room_counts_others_ours_and_pending() {
        let mut state = HostState::new(Host {
            name: "h".into(),
            client: (),
            origin: Origin::Given,
            max_clones: None,
        });
        let now = Instant::now();
        assert_eq!(state.view(now, 3).limit, None, "no limit said yet");
        let clone = |id: &str, template: &str, state: CloneState| CloneInfo {
            id: id.into(),
            template: template.into(),
            driver: forkd::Driver::Fork,
            addr: "127.0.0.1:1".parse().unwrap(),
            pid: None,
            state,
            ready: state == CloneState::Ready,
            exit: None,
            error: None,
        };
        // Two live clones of another template, one exited; ours (one still starting for a
        // request not yet answered, so also pending) are not someone else's.
        let listing = Listing {
            clones: vec![
                clone("b-1", "other", CloneState::Ready),
                clone("b-2", "other", CloneState::Stopping),
                clone("b-3", "other", CloneState::Exited),
                clone("a-1", "ours", CloneState::Ready),
                clone("a-2", "ours", CloneState::Starting),
            ],
            max_clones: Some(10),
        };
        state.listed(&listing, "ours");
        assert_eq!(state.others, 2);
        state.pending = 1;
        let view = state.view(now, 3);
        assert_eq!((view.load, view.limit), (6, Some(10)));
        assert_eq!(view.room(0), 4);
        assert_eq!(state.view(now, 20).room(0), 0);
        state.rest_until = Some(now + Duration::from_secs(1));
        assert!(!state.view(now, 0).usable);
        assert!(state.view(now + Duration::from_secs(1), 0).usable);
    }

    #[test]
    fn only_hosts_found_by_dns_are_retired() {
        let now = Instant::now();
        for (origin, overdue) in [
            (Origin::Embedded, false),
            (Origin::Given, false),
            (Origin::Found, true),
        ] {
            let mut state = HostState::new(Host {
                name: "h".into(),
                client: (),
                origin,
                max_clones: None,
            });
            state.down(now);
            assert!(!state.overdue(now + RETIRE_AFTER / 2));
            assert_eq!(state.overdue(now + RETIRE_AFTER), overdue, "{origin:?}");
            state.back();
            assert!(!state.overdue(now + RETIRE_AFTER * 2));
        }
    }
}
