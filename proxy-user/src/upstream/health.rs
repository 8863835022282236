//! Target health: active TCP connect probes with rise/fall thresholds, plus
//! passive marking from real connection failures.
//!
//! Passive failures mark a target down at once (the next client should not
//! pay for a target that just refused); only probes bring it back, so one
//! lucky connection cannot flap it up.

use std::sync::Mutex;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::watch;

use super::loop_guard::LoopGuard;
use super::probe::{self, ProbeFailure, ProbeSpec};
use crate::config::Target;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transition {
    Up,
    Down,
}

#[derive(Debug)]
struct Streaks {
    up: bool,
    ok: u32,
    fail: u32,
}

/// A target's health as metrics: `proxy_target_up` and the transitions to
/// up and to down (`proxy_target_health_transitions_total`: flapping shows
/// there even when every scrape happens to see the target up). Handles into
/// the per-target families (`stats::TargetMetrics`), or standalone ones.
#[derive(Debug, Clone, Default)]
pub struct HealthSeries {
    pub up: Gauge,
    pub went_up: Counter,
    pub went_down: Counter,
}

/// Health of one target. The `up` gauge doubles as the balancer's lock-free
/// read, so the hot path never takes the lock and the metric cannot
/// disagree with what the balancer sees; the lock only guards the streaks.
#[derive(Debug)]
pub struct Health {
    streaks: Mutex<Streaks>,
    series: HealthSeries,
}

/// A point-in-time view of one target's health, for `/targets`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    pub up: bool,
    /// Consecutive successful probes (reset by any failure).
    pub successes: u32,
    /// Consecutive failed probes or connects (reset by any success).
    pub failures: u32,
    pub went_up: u64,
    pub went_down: u64,
}

impl Health {
    /// Targets start up: assuming down would refuse all traffic for
    /// `rise * interval` after every start; a dead target is found by the
    /// first failed connect anyway.
    pub fn new(series: HealthSeries) -> Self {
        series.up.set(1);
        Health {
            streaks: Mutex::new(Streaks {
                up: true,
                ok: 0,
                fail: 0,
            }),
            series,
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        let s = self.lock();
        Snapshot {
            up: s.up,
            successes: s.ok,
            failures: s.fail,
            went_up: self.series.went_up.get(),
            went_down: self.series.went_down.get(),
        }
    }

    fn set(&self, s: &mut Streaks, up: bool) {
        s.up = up;
        self.series.up.set(i64::from(up));
        let counter = if up {
            &self.series.went_up
        } else {
            &self.series.went_down
        };
        counter.inc();
    }

    pub fn is_up(&self) -> bool {
        self.series.up.get() != 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Streaks> {
        // A panic while holding this lock cannot leave the counters invalid.
        self.streaks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records one probe result; returns the state change, if any.
    pub fn probe(&self, ok: bool, rise: u32, fall: u32) -> Option<Transition> {
        let mut s = self.lock();
        if ok {
            s.ok = s.ok.saturating_add(1);
            s.fail = 0;
            if !s.up && s.ok >= rise.max(1) {
                self.set(&mut s, true);
                return Some(Transition::Up);
            }
        } else {
            s.fail = s.fail.saturating_add(1);
            s.ok = 0;
            if s.up && s.fail >= fall.max(1) {
                self.set(&mut s, false);
                return Some(Transition::Down);
            }
        }
        None
    }

    /// A real connection attempt failed: down now, recovery via probes.
    pub fn passive_failure(&self) -> Option<Transition> {
        let mut s = self.lock();
        s.ok = 0;
        s.fail = s.fail.saturating_add(1);
        if s.up {
            self.set(&mut s, false);
            return Some(Transition::Down);
        }
        None
    }
}

pub fn log_transition(app: &str, target: &Target, t: Transition, why: &str) {
    match t {
        Transition::Up => {
            tracing::info!(app, target = %target, reason = why, "target is up")
        }
        Transition::Down => {
            tracing::warn!(app, target = %target, reason = why, "target is down")
        }
    }
}

/// Probes `target` every interval until `stop` flips to true, feeding
/// `health`; skips the probes while `paused` says so (a disabled target). Probes start at a random point in the first interval so many
/// targets don't all connect in the same millisecond.
pub async fn probe_loop(
    app: &str,
    target: &Target,
    health: &Health,
    cfg: &ProbeSpec,
    guard: &LoopGuard,
    mut stop: watch::Receiver<bool>,
    paused: impl Fn() -> bool,
) {
    let jitter = cfg.interval.mul_f64(fastrand::f64());
    let start = tokio::time::Instant::now() + jitter;
    let mut tick = tokio::time::interval_at(start, cfg.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tick.tick() => {}
        }
        if paused() {
            continue;
        }
        let result = match probe::probe(target, cfg, guard).await {
            Ok(()) => Ok(()),
            Err(ProbeFailure::Target(e)) => Err(e),
            Err(ProbeFailure::Ours(e)) => {
                // Neither a success nor a failure: the streak stands.
                tracing::debug!(app, %target, error = %format!("{e:#}"), "health probe not made: this proxy is out of resources; the target's state stands");
                continue;
            }
        };
        if let Some(t) = health.probe(result.is_ok(), cfg.rise, cfg.fall) {
            let why = match &result {
                Ok(()) => format!("{} consecutive probes succeeded", cfg.rise),
                Err(e) => format!(
                    "{} consecutive {} probes failed, last: {e:#}",
                    cfg.fall,
                    cfg.kind()
                ),
            };
            log_transition(app, target, t, &why);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fall_needs_consecutive_failures() {
        let h = Health::new(HealthSeries::default());
        assert!(h.is_up());
        assert_eq!(h.probe(false, 2, 3), None);
        assert_eq!(h.probe(false, 2, 3), None);
        assert_eq!(h.probe(true, 2, 3), None); // streak broken
        assert_eq!(h.probe(false, 2, 3), None);
        assert_eq!(h.probe(false, 2, 3), None);
        assert_eq!(h.probe(false, 2, 3), Some(Transition::Down));
        assert!(!h.is_up());
        assert_eq!(h.probe(false, 2, 3), None); // logged once
    }

    #[test]
    fn rise_needs_consecutive_successes() {
        let h = Health::new(HealthSeries::default());
        assert_eq!(h.passive_failure(), Some(Transition::Down));
        assert_eq!(h.passive_failure(), None);
        assert_eq!(h.probe(true, 2, 3), None);
        assert_eq!(h.probe(false, 2, 3), None);
        assert_eq!(h.probe(true, 2, 3), None);
        assert_eq!(h.probe(true, 2, 3), Some(Transition::Up));
        assert!(h.is_up());
        assert_eq!(h.probe(true, 2, 3), None);
        let snap = h.snapshot();
        assert_eq!((snap.up, snap.successes, snap.failures), (true, 3, 0));
        assert_eq!((snap.went_up, snap.went_down), (1, 1));
    }

    #[test]
    fn passive_failure_resets_rise_progress() {
        let h = Health::new(HealthSeries::default());
        h.passive_failure();
        assert_eq!(h.probe(true, 2, 3), None);
        h.passive_failure();
        assert_eq!(h.probe(true, 2, 3), None);
        assert_eq!(h.probe(true, 2, 3), Some(Transition::Up));
    }
}
