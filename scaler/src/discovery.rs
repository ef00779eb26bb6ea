//! Getting forkd hosts ready to clone on: creating the template on each (or taking over the
//! same template an earlier run left there), and, with a DNS name, finding daemons on new
//! hosts while Squall runs (a headless Service in Kubernetes resolves to one address per
//! forkd pod).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use forkd::TemplateSpec;
use lifecycle::{ErrorChain, Shutdown};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::host::{CloneHost, HostError};
use crate::hosts::{Host, Origin};

/// How often a DNS name is resolved again to find daemons on new hosts.
pub const DNS_REFRESH: Duration = Duration::from_secs(10);
/// How long creating (and warming) the template on a newly found host may take.
const WARM_LIMIT: Duration = Duration::from_secs(120);

/// Why a host could not be made ready.
#[derive(Debug, thiserror::Error)]
pub enum WarmError {
    /// The address is not a usable forkd URL.
    #[error("invalid forkd URL {url:?}")]
    Url {
        /// The URL.
        url: String,
        /// Why.
        #[source]
        source: forkd::ClientError,
    },
    /// The host refused or failed to create the template.
    #[error("creating template {template} on {host}")]
    Create {
        /// The template.
        template: String,
        /// The host.
        host: String,
        /// What it said.
        #[source]
        source: HostError,
    },
    /// The host has another template of the same name.
    #[error(
        "forkd at {host} already has a different template named {template} (driver {driver}, command {command:?}); delete it or rename the policy's template"
    )]
    Different {
        /// The template's name.
        template: String,
        /// The host.
        host: String,
        /// The other template's driver.
        driver: &'static str,
        /// The other template's command.
        command: Vec<String>,
    },
    /// A DNS name did not resolve.
    #[error("resolving {name}")]
    Resolve {
        /// The `HOST:PORT` name.
        name: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// No answer within the time a template may take to warm.
    #[error("{host} did not create the template within {WARM_LIMIT:?}")]
    Timeout {
        /// The host.
        host: String,
    },
}

/// The forkd URLs a `HOST:PORT` name resolves to, one per address.
pub async fn resolve(name: &str) -> Result<Vec<String>, WarmError> {
    let addrs = tokio::net::lookup_host(name)
        .await
        .map_err(|source| WarmError::Resolve {
            name: name.to_owned(),
            source,
        })?;
    Ok(addrs.map(|addr| format!("http://{addr}")).collect())
}

/// How many peers a new host tries to get a `vm` template's snapshot from before it boots
/// the template itself.
const SEED_TRIES: usize = 2;

/// Creates the template on `host`: a `vm` template from the snapshot of a host in `peers`
/// that has it (SnowFlock across hosts: no boot, no warm-up), trying `SEED_TRIES` (2) of them,
/// or booted there when no peer can serve it (or for another driver).
pub async fn create_seeded<H: CloneHost>(
    host: &H,
    name: &str,
    spec: &TemplateSpec,
    peers: &[Arc<str>],
) -> Result<(), HostError> {
    if spec.driver == forkd::Driver::Vm {
        for peer in peers.iter().filter(|p| ***p != *name).take(SEED_TRIES) {
            let seeded = TemplateSpec {
                source: Some(forkd::SnapshotSource {
                    url: peer.to_string(),
                }),
                ..spec.clone()
            };
            match host.create_template(&seeded).await {
                Ok(()) => {
                    tracing::info!(template = %spec.name, host = name, %peer, "template made from a peer's snapshot");
                    return Ok(());
                }
                Err(e @ HostError::Exists(_)) => return Err(e),
                Err(e) => {
                    tracing::warn!(template = %spec.name, host = name, %peer, error = %e, "cannot make the template from this peer's snapshot");
                }
            }
        }
    }
    host.create_template(spec).await
}

/// Creates the template on `host` (from a peer's snapshot where it can, see
/// [`create_seeded`]), or takes over the same template left by an earlier run that did not
/// stop cleanly (the scaler kills clones of it that it does not know). A different template
/// of the same name is an error.
pub async fn create_or_adopt<H: CloneHost>(
    host: &H,
    name: &str,
    spec: &TemplateSpec,
    peers: &[Arc<str>],
) -> Result<(), WarmError> {
    let create = |source| WarmError::Create {
        template: spec.name.clone(),
        host: name.to_owned(),
        source,
    };
    match create_seeded(host, name, spec, peers).await {
        Ok(()) => Ok(()),
        Err(HostError::Exists(message)) => {
            let existing = host.templates().await.map_err(create)?;
            match existing.iter().find(|t| t.spec.name == spec.name) {
                Some(t) if t.spec == *spec && t.alive => {
                    tracing::warn!(template = %spec.name, host = name, "the template is already there (left by an earlier run): using it");
                    Ok(())
                }
                Some(t) if t.spec != *spec => Err(WarmError::Different {
                    template: spec.name.clone(),
                    host: name.to_owned(),
                    driver: t.spec.driver.as_str(),
                    command: t.spec.command.clone(),
                }),
                _ => Err(create(HostError::Exists(message))),
            }
        }
        Err(e) => Err(create(e)),
    }
}

/// Makes each daemon at `urls` ready: a client with `token`, the template created or
/// adopted, its clone limit read. A `vm` template is booted on the first and made on each
/// later one from a warm one's snapshot. A daemon that refuses is left out (a name may
/// resolve to addresses no daemon listens on, such as ::1 next to 127.0.0.1), unless it is
/// the only one, whose error is returned.
pub async fn warm_hosts(
    urls: &[String],
    token: &str,
    spec: &TemplateSpec,
    origin: Origin,
) -> Result<Vec<Host<forkd::Client>>, WarmError> {
    let mut hosts: Vec<Host<forkd::Client>> = Vec::new();
    for url in urls {
        let peers: Vec<Arc<str>> = hosts.iter().rev().map(|h| Arc::clone(&h.name)).collect();
        match warm_host(url, token, spec, origin, &peers).await {
            Ok(host) => hosts.push(host),
            Err(e) if urls.len() > 1 => {
                tracing::warn!(forkd = %url, error = %ErrorChain(&e), "cannot create the template there; leaving this host out");
            }
            Err(e) => return Err(e),
        }
    }
    Ok(hosts)
}

async fn warm_host(
    url: &str,
    token: &str,
    spec: &TemplateSpec,
    origin: Origin,
    peers: &[Arc<str>],
) -> Result<Host<forkd::Client>, WarmError> {
    let client = forkd::Client::new(url, token).map_err(|source| WarmError::Url {
        url: url.to_owned(),
        source,
    })?;
    tracing::info!(template = %spec.name, driver = spec.driver.as_str(), forkd = %url, "warming the template");
    create_or_adopt(&client, url, spec, peers).await?;
    // Its limit, for placement; the first host check reads it again if this fails.
    let max_clones = client.list().await.ok().and_then(|l| l.max_clones);
    Ok(Host {
        name: url.into(),
        client,
        origin,
        max_clones,
    })
}

/// Finds forkd daemons on new hosts while Squall runs.
pub struct Discovery {
    /// How often to look.
    pub every: Duration,
    /// The daemons' bearer token.
    pub token: String,
    /// The template to create on each.
    pub spec: Arc<TemplateSpec>,
    /// The hosts the scaler uses now (a retired host leaves it and may be found again).
    pub in_use: Arc<ArcSwap<Vec<Arc<str>>>>,
    /// Those of them that are up: a new host gets a `vm` template's snapshot from them.
    pub peers: Arc<ArcSwap<Vec<Arc<str>>>>,
    /// Where new hosts go, template warm.
    pub hosts: mpsc::UnboundedSender<Host<forkd::Client>>,
}

impl Discovery {
    /// Calls `lookup` every `every` and hands daemons not in use to the scaler, once their
    /// template is warm. Daemons that vanish are the scaler's health checks' business.
    pub async fn run<Lookup: Future<Output = Result<Vec<String>, WarmError>>>(
        &self,
        lookup: impl Fn() -> Lookup,
        shutdown: Shutdown,
    ) {
        // Addresses that did not take the template, warned about once.
        let mut refused: HashSet<String> = HashSet::new();
        loop {
            tokio::select! {
                () = shutdown.wait() => return,
                () = tokio::time::sleep(self.every) => {}
            }
            let urls = tokio::select! {
                () = shutdown.wait() => return,
                urls = lookup() => match urls {
                    Ok(urls) => urls,
                    Err(e) => {
                        tracing::warn!("{}; keeping the hosts found before", ErrorChain(&e));
                        continue;
                    }
                },
            };
            let in_use = self.in_use.load_full();
            let up = self.peers.load_full();
            // Every new address is warmed at once, each on its own, so one that never
            // answers neither hides nor delays the others; shutdown waits for none of them.
            let mut warming = JoinSet::new();
            let new = urls
                .into_iter()
                .filter(|u| !in_use.iter().any(|h| **h == **u));
            for (i, url) in new.enumerate() {
                let (token, spec) = (self.token.clone(), Arc::clone(&self.spec));
                // Hosts in use and up have the template warm: a new one is seeded from
                // them, each new host starting with another, so that no one host sends
                // every snapshot.
                let mut peers = up.to_vec();
                if !peers.is_empty() {
                    let first = i % peers.len();
                    peers.rotate_left(first);
                }
                warming.spawn(async move {
                    let warm = warm_host(&url, &token, &spec, Origin::Found, &peers);
                    let result = tokio::time::timeout(WARM_LIMIT, warm)
                        .await
                        .unwrap_or_else(|_| Err(WarmError::Timeout { host: url.clone() }));
                    (url, result)
                });
            }
            loop {
                let (url, result) = tokio::select! {
                    () = shutdown.wait() => return,
                    joined = warming.join_next() => match joined {
                        Some(Ok(warmed)) => warmed,
                        // A warming task that panicked: its address is tried again next time.
                        Some(Err(_)) => continue,
                        None => break,
                    },
                };
                match result {
                    Ok(host) => {
                        refused.remove(&url);
                        if let Err(unsent) = self.hosts.send(host) {
                            // The scaler has stopped: leave the daemon as it was.
                            let _ = unsent.0.client.delete_template(&self.spec.name).await;
                            return;
                        }
                    }
                    Err(e) if refused.insert(url.clone()) => {
                        tracing::warn!(forkd = %url, "forkd host not usable (will keep trying quietly): {}", ErrorChain(&e));
                    }
                    Err(e) => {
                        tracing::debug!(forkd = %url, "forkd host still not usable: {}", ErrorChain(&e));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hosts::RETIRE_AFTER;

    /// An in-process forkd on a loopback port; stops when the returned `Stop` drops.
    async fn forkd_daemon(token: &str) -> (String, lifecycle::Stop) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let stop = lifecycle::Stop::new();
        let shutdown = stop.shutdown();
        let config = forkd::Config::new(token.to_owned());
        tokio::spawn(forkd::serve(listener, config, shutdown));
        (url, stop)
    }

    #[tokio::test]
    async fn a_vm_template_is_seeded_from_a_peer_that_can_serve_it_else_booted() {
        use crate::fake::{FakeHost, OnClone};
        let vm = TemplateSpec::new("web", forkd::Driver::Vm, vec!["app".into()]);
        let peers: Vec<Arc<str>> = ["http://self", "http://a", "http://b", "http://c"]
            .map(Arc::from)
            .to_vec();
        // The host itself is skipped; a fails, b serves.
        let host = FakeHost::new(OnClone::Grant, None);
        host.sim().seedable_from = vec!["http://b".into(), "http://c".into()];
        create_seeded(&host, "http://self", &vm, &peers)
            .await
            .unwrap();
        let tries = host.sim().seed_tries.clone();
        assert_eq!(
            tries,
            [
                ("http://a".to_owned(), false),
                ("http://b".to_owned(), true)
            ]
        );
        assert_eq!(host.sim().templates, std::slice::from_ref(&vm));
        // No peer can serve: two are tried, then the template is booted there.
        let host = FakeHost::new(OnClone::Grant, None);
        create_seeded(&host, "http://self", &vm, &peers)
            .await
            .unwrap();
        assert_eq!(host.sim().seed_tries.len(), SEED_TRIES);
        assert_eq!(host.sim().templates, std::slice::from_ref(&vm));
        // A template of the name is there already: no cold boot behind it.
        let err = create_seeded(&host, "http://self", &vm, &peers)
            .await
            .unwrap_err();
        assert!(matches!(err, HostError::Exists(_)), "{err}");
        // Other drivers have no snapshot to seed from.
        let fork = TemplateSpec::new("web", forkd::Driver::Fork, vec!["app".into()]);
        let host = FakeHost::new(OnClone::Grant, None);
        host.sim().seedable_from = vec!["http://a".into()];
        create_seeded(&host, "http://self", &fork, &peers)
            .await
            .unwrap();
        assert!(host.sim().seed_tries.is_empty());
    }

    #[tokio::test]
    async fn daemons_that_appear_later_join_with_their_template_warm() {
        let token = "discovery-test-token";
        let (first, _first) = forkd_daemon(token).await;
        let (second, _second) = forkd_daemon(token).await;
        // The name first resolves to one daemon, then to both, plus an address where
        // nothing listens (it must not stop the others from joining).
        let answers = std::sync::Mutex::new(vec![
            vec![first.clone()],
            vec![
                first.clone(),
                "http://127.0.0.1:1".to_owned(),
                second.clone(),
            ],
        ]);
        let lookups = std::sync::atomic::AtomicUsize::new(0);
        let lookup = || {
            lookups.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut answers = answers.lock().unwrap();
            let next = if answers.len() > 1 {
                answers.remove(0)
            } else {
                answers[0].clone()
            };
            std::future::ready(Ok(next))
        };
        // Spawn makes no process for a template, so nothing runs here.
        let spec = Arc::new(TemplateSpec::new(
            "web".to_owned(),
            forkd::Driver::Spawn,
            vec!["true".to_owned()],
        ));
        let in_use = Arc::new(ArcSwap::from_pointee(vec![Arc::<str>::from(
            first.as_str(),
        )]));
        let (hosts, mut joined) = mpsc::unbounded_channel();
        let stop = lifecycle::Stop::new();
        let discovery = Discovery {
            every: Duration::from_millis(20),
            token: token.to_owned(),
            spec: Arc::clone(&spec),
            peers: Arc::clone(&in_use),
            in_use: Arc::clone(&in_use),
            hosts,
        };
        let discovery = discovery.run(lookup, stop.shutdown());
        // Every wait has a deadline: a regression fails the test instead of hanging it.
        let within = Duration::from_secs(10);
        let check = async {
            let host = tokio::time::timeout(within, joined.recv())
                .await
                .expect("the second daemon joins")
                .unwrap();
            assert_eq!(&*host.name, second.as_str());
            assert_eq!(host.origin, Origin::Found);
            assert!(RETIRE_AFTER > Duration::ZERO);
            // The scaler now uses it.
            in_use.store(Arc::new(vec![
                first.as_str().into(),
                second.as_str().into(),
            ]));
            let templates = host.client.templates().await.unwrap();
            assert_eq!(
                templates.len(),
                1,
                "the template is created before the host joins"
            );
            assert_eq!(templates[0].spec, *spec);
            // Nothing else joins while both are in use and the dead address never answers:
            // five more lookups go by without a host.
            let seen = lookups.load(std::sync::atomic::Ordering::SeqCst);
            test_support::eventually("five more lookups", within, || {
                (lookups.load(std::sync::atomic::Ordering::SeqCst) >= seen + 5).then_some(())
            })
            .await;
            let more = joined.try_recv();
            assert!(more.is_err(), "unexpected host: {:?}", more.map(|h| h.name));
            // Once the scaler drops the second (down too long), it is found again: its daemon
            // still has the same template, which is taken over rather than refused.
            in_use.store(Arc::new(vec![first.as_str().into()]));
            let again = tokio::time::timeout(within, joined.recv())
                .await
                .expect("the second daemon is found again")
                .unwrap();
            assert_eq!(&*again.name, second.as_str());
            stop.stop();
        };
        let ((), ()) = tokio::join!(discovery, check);
    }
}
