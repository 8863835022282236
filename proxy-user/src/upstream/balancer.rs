//! Choosing a target for a new connection.
//!
//! Default is least-connections by power of two random choices (P2C): as
//! good as full least-conn in practice, O(1), and it avoids the herd effect
//! of every acceptor picking the same "least loaded" target at once.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::watch;

use super::health::{self, Health, HealthConfig};
use super::loop_guard::LoopGuard;
use super::stats::TargetStats;
use crate::config::{Balance, Target};

#[derive(Debug)]
pub struct Backend {
    pub target: Target,
    /// Connections currently using (or connecting to) this target.
    pub active: AtomicUsize,
    pub health: Health,
    /// Connect counters and latency; kept with the backend across reloads.
    pub stats: TargetStats,
}

impl Backend {
    pub fn new(target: Target) -> Self {
        Backend {
            target,
            active: AtomicUsize::new(0),
            health: Health::new(),
            stats: TargetStats::default(),
        }
    }

    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Counts a connection against this target until the guard drops.
    pub fn acquire(self: &Arc<Self>) -> ActiveGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(self.clone())
    }
}

#[derive(Debug)]
pub struct ActiveGuard(Arc<Backend>);

impl ActiveGuard {
    pub fn backend(&self) -> &Arc<Backend> {
        &self.0
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Debug)]
pub struct Balancer {
    pub app: Arc<str>,
    pub policy: Balance,
    pub backends: Vec<Arc<Backend>>,
    rr: AtomicUsize,
}

impl Balancer {
    #[cfg(test)]
    pub fn new(app: &str, policy: Balance, targets: &[Target]) -> Self {
        Balancer::reusing(app, policy, targets, &[])
    }

    /// Like `new`, but targets also in `previous` keep their `Backend` (its
    /// health and active count) across a reload.
    pub fn reusing(
        app: &str,
        policy: Balance,
        targets: &[Target],
        previous: &[Arc<Backend>],
    ) -> Self {
        Balancer {
            app: app.into(),
            policy,
            backends: targets
                .iter()
                .map(|t| {
                    previous
                        .iter()
                        .find(|b| b.target == *t)
                        .cloned()
                        .unwrap_or_else(|| Arc::new(Backend::new(t.clone())))
                })
                .collect(),
            // Start round robin at a random offset so restarts don't always
            // hit the first target first.
            rr: AtomicUsize::new(fastrand::usize(..1024)),
        }
    }

    /// One probe task per target, until `stop` flips to true.
    pub fn spawn_probes(
        &self,
        cfg: HealthConfig,
        guard: &Arc<LoopGuard>,
        stop: watch::Receiver<bool>,
    ) {
        for backend in self.backends.iter().cloned() {
            let app = self.app.clone();
            let (guard, stop) = (guard.clone(), stop.clone());
            tokio::spawn(async move {
                let (target, health) = (&backend.target, &backend.health);
                health::probe_loop(&app, target, health, cfg, &guard, stop).await;
            });
        }
    }

    /// Picks a target index not in `tried`: healthy targets first; if none
    /// is healthy, any untried one (fail open: probes may lag reality and a
    /// refused client is worse than a retried connect).
    pub fn pick(&self, tried: &[usize]) -> Option<usize> {
        let untried = (0..self.backends.len()).filter(|i| !tried.contains(i));
        let healthy: Vec<usize> = untried
            .clone()
            .filter(|&i| self.backends[i].health.is_up())
            .collect();
        let pool = if healthy.is_empty() {
            untried.collect()
        } else {
            healthy
        };
        if pool.is_empty() {
            return None;
        }
        Some(choose(self.policy, &pool, &self.rr, |i| {
            self.backends[i].active()
        }))
    }
}

/// The policy core, separated from health so it can be tested alone.
fn choose(
    policy: Balance,
    pool: &[usize],
    rr: &AtomicUsize,
    active: impl Fn(usize) -> usize,
) -> usize {
    match pool.len() {
        0 => unreachable!("caller checks for an empty pool"),
        1 => return pool[0],
        _ => {}
    }
    match policy {
        Balance::Random => pool[fastrand::usize(..pool.len())],
        Balance::RoundRobin => pool[rr.fetch_add(1, Ordering::Relaxed) % pool.len()],
        Balance::LeastConn => {
            let a = fastrand::usize(..pool.len());
            // Second choice distinct from the first.
            let mut b = fastrand::usize(..pool.len() - 1);
            if b >= a {
                b += 1;
            }
            let (a, b) = (pool[a], pool[b]);
            if active(b) < active(a) {
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
    use crate::config::parse_target;

    fn balancer(policy: Balance, n: usize) -> Balancer {
        let targets: Vec<Target> = (0..n)
            .map(|i| parse_target(&format!("127.0.0.1:{}", 1000 + i)).unwrap())
            .collect();
        Balancer::new("t", policy, &targets)
    }

    #[test]
    fn p2c_keeps_active_counts_even() {
        let b = balancer(Balance::LeastConn, 4);
        let mut guards = Vec::new();
        for _ in 0..4000 {
            let i = b.pick(&[]).unwrap();
            guards.push(b.backends[i].acquire());
        }
        let counts: Vec<usize> = b.backends.iter().map(|b| b.active()).collect();
        for c in &counts {
            // P2C keeps the max within a few of the mean.
            assert!((990..=1010).contains(c), "uneven spread {counts:?}");
        }
        drop(guards);
        assert!(b.backends.iter().all(|b| b.active() == 0));
    }

    #[test]
    fn p2c_prefers_idle_target() {
        let b = balancer(Balance::LeastConn, 2);
        let _busy: Vec<_> = (0..10).map(|_| b.backends[0].acquire()).collect();
        for _ in 0..100 {
            assert_eq!(b.pick(&[]), Some(1));
        }
    }

    #[test]
    fn round_robin_cycles() {
        let b = balancer(Balance::RoundRobin, 3);
        let picks: Vec<usize> = (0..9).map(|_| b.pick(&[]).unwrap()).collect();
        for w in picks.windows(3) {
            let mut s = w.to_vec();
            s.sort();
            assert_eq!(s, vec![0, 1, 2], "{picks:?}");
        }
    }

    #[test]
    fn random_covers_all() {
        let b = balancer(Balance::Random, 3);
        let mut seen = [0usize; 3];
        for _ in 0..3000 {
            seen[b.pick(&[]).unwrap()] += 1;
        }
        assert!(seen.iter().all(|&c| c > 800), "{seen:?}");
    }

    #[test]
    fn reload_keeps_state_of_kept_targets() {
        let old = balancer(Balance::LeastConn, 2);
        let _g = old.backends[1].acquire();
        old.backends[1].health.passive_failure();
        let targets = vec![
            old.backends[1].target.clone(),
            parse_target("10.0.0.1:1").unwrap(),
        ];
        let new = Balancer::reusing("t", Balance::LeastConn, &targets, &old.backends);
        assert!(Arc::ptr_eq(&new.backends[0], &old.backends[1]));
        assert_eq!(new.backends[0].active(), 1);
        assert!(!new.backends[0].health.is_up());
        assert_eq!(new.backends[1].active(), 0);
    }

    #[test]
    fn skips_down_and_tried_then_fails_open() {
        let b = balancer(Balance::LeastConn, 3);
        b.backends[0].health.passive_failure();
        for _ in 0..100 {
            assert_ne!(b.pick(&[]), Some(0));
        }
        assert_eq!(b.pick(&[1]), Some(2));
        // Only a down target left untried: still try it.
        assert_eq!(b.pick(&[1, 2]), Some(0));
        assert_eq!(b.pick(&[0, 1, 2]), None);
        // Everything down: fail open over all.
        b.backends[1].health.passive_failure();
        b.backends[2].health.passive_failure();
        assert!(b.pick(&[]).is_some());
    }
}
