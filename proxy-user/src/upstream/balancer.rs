//! Choosing a target for a new connection.
//!
//! Default is least-connections by power of two random choices (P2C): as
//! good as full least-conn in practice, O(1), and it avoids the herd effect
//! of every acceptor picking the same "least loaded" target at once.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::watch;

use super::health::{self, Health};
use super::loop_guard::LoopGuard;
use super::probe::ProbeSpec;
use super::rotation::Rotation;
use super::stats::{Series, TargetMetrics, TargetStats};
use crate::config::{Balance, Target};

#[derive(Debug)]
pub struct Backend {
    pub target: Target,
    /// `target` as text, formatted once: every connection's close line
    /// and upgrade record name it, and a format per connection costs an
    /// allocation on the accept path.
    pub label: Arc<str>,
    pub health: Health,
    /// Connect counters, latency and the active count; kept with the
    /// backend across reloads.
    pub stats: TargetStats,
    /// Set through the admin API; kept across reloads with the backend.
    pub rotation: Rotation,
}

impl Backend {
    fn new(target: Target, (stats, health, rotation): Series) -> Self {
        Backend {
            label: target.to_string().into(),
            target,
            health: Health::new(health),
            stats,
            rotation: Rotation::new(rotation),
        }
    }

    /// Connections currently using (or connecting to) this target.
    pub fn active(&self) -> usize {
        usize::try_from(self.stats.active.get()).unwrap_or(0)
    }

    /// Counts a connection against this target until the guard drops.
    pub fn acquire(self: &Arc<Self>) -> ActiveGuard {
        self.stats.active.inc();
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
        self.0.stats.active.dec();
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
        Balancer::reusing(app, policy, targets, &[], &TargetMetrics::unregistered())
    }

    /// Like `new`, but targets also in `previous` keep their `Backend` (its
    /// health, active count and series) across a reload; new targets get
    /// their series from `metrics`.
    pub fn reusing(
        app: &str,
        policy: Balance,
        targets: &[Target],
        previous: &[Arc<Backend>],
        metrics: &TargetMetrics,
    ) -> Self {
        let app: Arc<str> = app.into();
        Balancer {
            backends: targets
                .iter()
                .map(|t| {
                    previous
                        .iter()
                        .find(|b| b.target == *t)
                        .cloned()
                        .unwrap_or_else(|| {
                            Arc::new(Backend::new(t.clone(), metrics.series(&app, t)))
                        })
                })
                .collect(),
            app,
            policy,
            // Start round robin at a random offset so restarts don't always
            // hit the first target first.
            rr: AtomicUsize::new(fastrand::usize(..1024)),
        }
    }

    /// This balancer was replaced by `next` (None: its app is gone): the
    /// targets `next` did not keep leave the metrics. Kept ones share their
    /// backend with `next`, series and all.
    pub fn retire(&self, next: Option<&Balancer>, metrics: &TargetMetrics) {
        for old in &self.backends {
            let kept = next.is_some_and(|n| n.backends.iter().any(|b| Arc::ptr_eq(b, old)));
            if !kept {
                metrics.remove(&self.app, &old.target);
            }
        }
    }

    /// One probe task per target, until `stop` flips to true.
    pub fn spawn_probes(
        &self,
        cfg: &Arc<ProbeSpec>,
        guard: &Arc<LoopGuard>,
        stop: watch::Receiver<bool>,
    ) {
        for backend in self.backends.iter().cloned() {
            let app = self.app.clone();
            let (guard, stop, cfg) = (guard.clone(), stop.clone(), cfg.clone());
            tokio::spawn(async move {
                let (target, health) = (&backend.target, &backend.health);
                let paused = || !backend.rotation.probed();
                health::probe_loop(&app, target, health, &cfg, &guard, stop, paused).await;
            });
        }
    }

    /// Picks a target index not in `tried`: healthy targets first; if none
    /// is healthy, any untried one (fail open: probes may lag reality and a
    /// refused client is worse than a retried connect). Targets an operator
    /// drained or disabled are never picked, not even failing open: taking
    /// one out of rotation must hold however the others fare.
    pub fn pick(&self, tried: &[usize]) -> Option<usize> {
        let untried = (0..self.backends.len())
            .filter(|i| !tried.contains(i) && self.backends[*i].rotation.takes_new());
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
        let new = Balancer::reusing(
            "t",
            Balance::LeastConn,
            &targets,
            &old.backends,
            &TargetMetrics::unregistered(),
        );
        assert!(Arc::ptr_eq(&new.backends[0], &old.backends[1]));
        assert_eq!(new.backends[0].active(), 1);
        assert!(!new.backends[0].health.is_up());
        assert_eq!(new.backends[1].active(), 0);
    }

    #[test]
    fn reload_drops_series_of_removed_targets_only() {
        use prometheus_client::encoding::prometheus_text::encode;
        use prometheus_client::registry::Registry;
        use std::time::Duration;

        let mut registry = Registry::default();
        let metrics = TargetMetrics::register(&mut registry);
        let [gone, kept, added] =
            ["10.0.0.1:1", "10.0.0.2:2", "10.0.0.3:3"].map(|t| parse_target(t).unwrap());
        let old = Balancer::reusing(
            "a",
            Balance::LeastConn,
            &[gone, kept.clone()],
            &[],
            &metrics,
        );
        for b in &old.backends {
            b.stats.attempt(Duration::from_millis(1), None);
        }
        let new = Balancer::reusing(
            "a",
            Balance::LeastConn,
            &[kept, added],
            &old.backends,
            &metrics,
        );
        old.retire(Some(&new), &metrics);
        let render = || {
            let mut out = String::new();
            encode(&mut out, &registry).unwrap();
            out
        };
        let text = render();
        assert!(!text.contains("10.0.0.1:1"), "{text}");
        for line in [
            r#"proxy_target_connect_attempts_total{app="a",target="10.0.0.2:2"} 1"#,
            r#"proxy_target_connect_duration_seconds_count{app="a",target="10.0.0.2:2"} 1"#,
            r#"proxy_target_connect_attempts_total{app="a",target="10.0.0.3:3"} 0"#,
            r#"proxy_target_up{app="a",target="10.0.0.3:3"} 1"#,
        ] {
            assert!(text.contains(&format!("{line}\n")), "{line} in:\n{text}");
        }
        // The app is removed: nothing of it is left.
        new.retire(None, &metrics);
        assert!(!render().contains("proxy_target"), "{}", render());
    }

    #[test]
    fn never_picks_drained_or_disabled() {
        use crate::upstream::rotation::RotationState;
        let b = balancer(Balance::LeastConn, 3);
        b.backends[0].rotation.set(RotationState::Drain);
        b.backends[1].rotation.set(RotationState::Disabled);
        for _ in 0..100 {
            assert_eq!(b.pick(&[]), Some(2));
        }
        // The only one left is down: still not the drained ones.
        b.backends[2].health.passive_failure();
        assert_eq!(b.pick(&[]), Some(2));
        assert_eq!(b.pick(&[2]), None);
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
