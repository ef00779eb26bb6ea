//! Choosing a worker: power of two choices on peak-EWMA cost.
//!
//! From Mitzenmacher's "The Power of Two Choices in Randomized Load Balancing", as used by
//! Finagle and linkerd2-proxy: pick two distinct eligible workers at random and send the
//! request to the cheaper one. It avoids both the herd behaviour of "always the least
//! loaded" (every balancer thread piling onto the same worker) and the blindness of random.
//!
//! The cost is the worker's peak-EWMA latency times (in-flight + 1), so a worker that is
//! slow *or* busy costs more. While either candidate has no latency sample yet the two are
//! compared by in-flight count alone (least outstanding), since a made-up latency would bias
//! every new worker one way or the other.
//!
//! Eligible means: not draining, not ejected, below its concurrency limit, and not the
//! worker a retried request just failed to reach. The chosen worker's slot is reserved
//! before it is returned, so the limit holds even when many requests pick at once.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use rand::Rng;

use crate::load::Nanos;
use crate::pool::Snapshot;
use crate::worker::Worker;

/// Picks and reserves a worker, or `None` when no worker is eligible.
pub(crate) fn pick(
    snapshot: &Snapshot,
    limit: usize,
    exclude: Option<&Arc<Worker>>,
    now: Nanos,
    rng: &mut impl Rng,
) -> Option<Arc<Worker>> {
    let eligible = |w: &Worker| {
        !w.health.is_ejected()
            && w.in_flight.load(Ordering::SeqCst) < limit
            && !exclude.is_some_and(|excluded| std::ptr::eq(excluded.as_ref(), w))
    };
    let candidates = || {
        snapshot
            .members
            .iter()
            .filter(|m| !m.draining && eligible(&m.worker))
            .map(|m| &m.worker)
    };
    // Two passes over the snapshot instead of collecting the candidates: one counts them, the
    // other finds the two drawn, so a pick allocates nothing. A worker that changed between
    // the passes, or a lost race for the last slot of a worker, makes us look again; the loop
    // ends because every pass either reserves a slot or sees fewer eligible workers.
    loop {
        let chosen = match candidates().count() {
            0 => return None,
            1 => candidates().next(),
            n => {
                let a = rng.random_range(0..n);
                let b = (a + rng.random_range(1..n)) % n;
                let (first, second) = (a.min(b), a.max(b));
                let mut drawn = candidates().skip(first);
                match (drawn.next(), drawn.nth(second - first - 1)) {
                    // In the order drawn: a tie goes to the first drawn, not the first listed.
                    (Some(x), Some(y)) if a < b => Some(cheaper(x, y, now)),
                    (Some(x), Some(y)) => Some(cheaper(y, x, now)),
                    _ => None,
                }
            }
        };
        if let Some(chosen) = chosen
            && chosen.try_reserve(limit)
        {
            return Some(Arc::clone(chosen));
        }
    }
}

fn cheaper<'a>(a: &'a Arc<Worker>, b: &'a Arc<Worker>, now: Nanos) -> &'a Arc<Worker> {
    let pending = |w: &Worker| w.in_flight.load(Ordering::Acquire);
    match (a.load.estimate(now), b.load.estimate(now)) {
        (Some(la), Some(lb)) => {
            let cost = |latency: std::time::Duration, w: &Worker| {
                latency.as_nanos() as f64 * (pending(w) + 1) as f64
            };
            if cost(lb, b) < cost(la, a) { b } else { a }
        }
        _ => {
            if pending(b) < pending(a) {
                b
            } else {
                a
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Balancer, Config};
    use rand::SeedableRng;
    use rand::rngs::StdRng;
    use std::time::Duration;

    fn balancer_with(workers: &[&str]) -> Balancer {
        let balancer = Balancer::new(Config::default()).expect("valid config");
        for (i, id) in workers.iter().enumerate() {
            let addr = format!("127.0.0.1:{}", 10_000 + i)
                .parse()
                .expect("address");
            balancer.pool().add_worker(*id, addr).expect("new id");
        }
        balancer
    }

    fn worker(balancer: &Balancer, id: &str) -> Arc<Worker> {
        let snapshot = balancer.core.snapshot.load();
        let member = snapshot.members.iter().find(|m| m.worker.id.id() == id);
        Arc::clone(&member.expect("worker in pool").worker)
    }

    #[test]
    fn least_outstanding_before_samples() {
        let balancer = balancer_with(&["a", "b"]);
        worker(&balancer, "a").in_flight.store(3, Ordering::Release);
        let mut rng = StdRng::seed_from_u64(7);
        let snapshot = balancer.core.snapshot.load();
        for _ in 0..10 {
            let chosen = pick(&snapshot, 100, None, 0, &mut rng).expect("eligible");
            assert_eq!(chosen.id.id(), "b");
            chosen.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
    }

    #[test]
    fn lower_peak_ewma_cost_wins() {
        let balancer = balancer_with(&["fast", "slow"]);
        worker(&balancer, "fast")
            .load
            .observe(Duration::from_millis(1), 0);
        worker(&balancer, "slow")
            .load
            .observe(Duration::from_millis(50), 0);
        // Even with some requests pending, the fast worker is cheaper: 1 ms × 4 < 50 ms × 1.
        worker(&balancer, "fast")
            .in_flight
            .store(3, Ordering::Release);
        let mut rng = StdRng::seed_from_u64(1);
        let snapshot = balancer.core.snapshot.load();
        let chosen = pick(&snapshot, 100, None, 0, &mut rng).expect("eligible");
        assert_eq!(chosen.id.id(), "fast");
    }

    #[test]
    fn skips_draining_ejected_full_and_excluded_workers() {
        let balancer = balancer_with(&["draining", "ejected", "full", "excluded", "ok"]);
        let pool = balancer.pool();
        pool.drain(&"draining".into()).expect("known");
        worker(&balancer, "ejected").health.eject(
            0,
            Duration::from_secs(1),
            Duration::from_secs(1),
        );
        worker(&balancer, "full")
            .in_flight
            .store(2, Ordering::Release);
        let excluded = worker(&balancer, "excluded");
        let mut rng = StdRng::seed_from_u64(3);
        let snapshot = balancer.core.snapshot.load();
        for _ in 0..20 {
            let chosen = pick(&snapshot, 2, Some(&excluded), 0, &mut rng);
            let chosen = chosen.expect("one eligible worker");
            assert_eq!(chosen.id.id(), "ok");
            chosen.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
        let ok = worker(&balancer, "ok");
        ok.in_flight.store(2, Ordering::Release);
        assert!(pick(&snapshot, 2, Some(&excluded), 0, &mut rng).is_none());
    }
}
