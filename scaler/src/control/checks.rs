//! The scaler's host checks: every second each host lists what it runs, and the listing is
//! squared with the fleet — workers the host no longer knows leave the pool, workers that
//! exited are killed, clones of our template that nobody here asked for (orphans of an
//! earlier run) are killed, and a host that does not answer is down, its workers out of the
//! pool until it is back (with the template created again if its daemon lost it).

use std::collections::HashSet;
use std::sync::Arc;

use balancer::WorkerId;
use forkd::CloneState;
use tokio::time::Instant;

use super::{CHECK_LIMIT, Report, Scaler, TEMPLATE_CHECK_LIMIT};
use crate::front::Front;
use crate::host::{CloneHost, Listing, within};
use crate::hosts::Origin;

impl<F: Front, H: CloneHost> Scaler<F, H> {
    pub(super) fn check_hosts(&mut self, now: Instant) {
        let mut retired = false;
        for host in self.hosts.iter_mut().filter(|h| !h.retired) {
            if host.overdue(now) {
                tracing::warn!(host = %host.host.name, "forkd host down for too long; dropping it");
                host.retired = true;
                retired = true;
            }
        }
        if retired {
            self.publish_hosts();
        }
        let up_hosts: Vec<Arc<str>> = self
            .hosts
            .iter()
            .filter(|h| h.up && !h.retired)
            .map(|h| Arc::clone(&h.host.name))
            .collect();
        for (i, host) in self.hosts.iter_mut().enumerate() {
            if host.checking || host.retired {
                continue;
            }
            host.checking = true;
            let client = host.host.client.clone();
            // A host that comes back may have restarted and lost the template.
            let template = (!host.up && host.host.origin != Origin::Embedded)
                .then(|| Arc::clone(&self.config.template));
            // Creating a template warms it, which can take a while (a microVM boots).
            let limit = if template.is_some() {
                TEMPLATE_CHECK_LIMIT
            } else {
                CHECK_LIMIT
            };
            let reports = self.reports.clone();
            // Hosts that are up have the template warm: a `vm` one is seeded from them.
            let name = host.host.name.to_string();
            let peers = up_hosts.clone();
            tokio::spawn(async move {
                let check = async {
                    let listing = client.list().await?;
                    if let Some(spec) = template {
                        let templates = client.templates().await?;
                        if !templates.iter().any(|t| t.spec.name == spec.name) {
                            tracing::info!(template = %spec.name, "forkd host is back without the template; creating it again");
                            crate::discovery::create_seeded(&client, &name, &spec, &peers).await?;
                        }
                    }
                    Ok(listing)
                };
                let result = within(limit, check).await;
                let _ = reports.send(Report::Checked {
                    host: i,
                    at: now,
                    result,
                });
            });
        }
    }

    /// A host listed what it runs, in answer to a check sent at `at`.
    pub(super) fn checked(&mut self, host: usize, at: Instant, listing: &Listing) {
        let name = Arc::clone(&self.hosts[host].host.name);
        if !self.hosts[host].up {
            tracing::info!(host = %name, "forkd host is back");
            self.hosts[host].back();
            self.publish_hosts();
        }
        // The listed clones that are our workers, by clone id.
        let known: HashSet<&str> = listing
            .clones
            .iter()
            .filter(|c| {
                self.fleet
                    .get(&WorkerId::new(Arc::clone(&name), c.id.as_str()))
                    .is_some()
            })
            .map(|c| c.id.as_str())
            .collect();
        self.hosts[host].listed(listing, &self.config.template.name);
        // Workers the host no longer lists are gone (its daemon restarted). Only those that
        // joined before the check was sent: a newer one may not be listed yet.
        let joined_before = self.since_start(at);
        let vanished: Vec<WorkerId> = self
            .fleet
            .iter()
            .filter(|(w, m)| {
                w.host() == &*name
                    && m.joined < joined_before
                    && m.phase != policies::Phase::Killing
                    && !listing.clones.iter().any(|c| c.id == w.id())
            })
            .map(|(w, _)| w.clone())
            .collect();
        for worker in vanished {
            tracing::warn!(%worker, "worker no longer known to its forkd host; it leaves the pool");
            self.front.remove(&worker);
            self.fleet.gone(&worker);
        }
        // Clones of our template we do not know are orphans: left by an earlier run, or
        // forgotten while the host was down. With no clone request in flight to this host,
        // every clone we asked for is known by now.
        if self.hosts[host].pending == 0 {
            let orphans: Vec<String> = listing
                .clones
                .iter()
                .filter(|c| c.template == self.config.template.name)
                .filter(|c| matches!(c.state, CloneState::Ready | CloneState::Starting))
                .filter(|c| !known.contains(c.id.as_str()))
                .map(|c| c.id.clone())
                .collect();
            for id in orphans {
                tracing::warn!(host = %name, clone = %id, "killing a clone of ours the scaler does not know (an orphan)");
                let client = self.hosts[host].host.client.clone();
                tokio::spawn(async move {
                    if let Err(e) = client.kill(&id).await {
                        tracing::warn!(clone = %id, error = %e, "killing an orphan failed");
                    }
                });
            }
        }
        // Workers that ended on their own leave the pool.
        let exited: Vec<WorkerId> = listing
            .clones
            .iter()
            .filter(|c| c.state == CloneState::Exited)
            .map(|c| WorkerId::new(Arc::clone(&name), c.id.as_str()))
            .filter(|w| {
                self.fleet
                    .get(w)
                    .is_some_and(|m| m.phase != policies::Phase::Killing)
            })
            .collect();
        for worker in exited {
            tracing::warn!(%worker, "worker exited on its own");
            self.front.remove(&worker);
            self.kill(&worker);
        }
    }

    /// The host is down at `now`: its workers leave the pool and the fleet.
    pub(super) fn host_down(&mut self, host: usize, now: Instant) {
        self.hosts[host].down(now);
        self.publish_hosts();
        let name = Arc::clone(&self.hosts[host].host.name);
        let gone: Vec<WorkerId> = self
            .fleet
            .iter()
            .filter(|(w, _)| w.host() == &*name)
            .map(|(w, _)| w.clone())
            .collect();
        for worker in gone {
            self.front.remove(&worker);
            self.fleet.gone(&worker);
        }
    }
}
