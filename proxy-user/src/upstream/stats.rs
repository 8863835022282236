//! Connect counters and latency of one target, kept with its backend
//! across reloads and read by the metrics renderer.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::dial::FailureReason;

/// Upper bounds of the connect latency buckets, in seconds: loopback
/// connects land in the first buckets, cross-region ones around 0.1 s, and
/// the default 2 s connect timeout sits inside the range.
const LATENCY_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// A fixed-bucket histogram of durations; the sum is kept in nanoseconds so
/// it stays an atomic integer.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = LATENCY_BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(
            u64::try_from(d.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Writes `_bucket` (cumulative), `_sum` and `_count` lines.
    pub fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (i, le) in LATENCY_BUCKETS.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {cumulative}");
        }
        let count = self.count();
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
    }
}

/// Connect counters of one target (client connects only, not probes).
#[derive(Debug, Default)]
pub struct TargetStats {
    pub attempts: AtomicU64,
    failures: [AtomicU64; FailureReason::ALL.len()],
    /// Time to an established connection, successful attempts only (a
    /// failure's time is mostly the timeout, which would swamp the buckets).
    pub latency: Histogram,
}

impl TargetStats {
    /// One connect attempt took `took`; `failure` names why it failed.
    pub fn attempt(&self, took: Duration, failure: Option<FailureReason>) {
        self.attempts.fetch_add(1, Ordering::Relaxed);
        match failure {
            None => self.latency.observe(took),
            Some(reason) => {
                self.failures[reason as usize].fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub fn failures(&self, reason: FailureReason) -> u64 {
        self.failures[reason as usize].load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(300));
        h.observe(Duration::from_millis(30));
        h.observe(Duration::from_secs(10));
        let mut out = String::new();
        h.render(&mut out, "x", "a=\"b\"");
        assert!(out.contains("x_bucket{a=\"b\",le=\"0.0005\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{a=\"b\",le=\"0.05\"} 2\n"));
        assert!(out.contains("x_bucket{a=\"b\",le=\"2.5\"} 2\n"));
        assert!(out.contains("x_bucket{a=\"b\",le=\"+Inf\"} 3\n"));
        assert!(out.contains("x_count{a=\"b\"} 3\n"));
    }

    #[test]
    fn connect_failures_by_reason() {
        let t = TargetStats::default();
        t.attempt(Duration::from_millis(1), None);
        t.attempt(Duration::from_millis(1), Some(FailureReason::Refused));
        t.attempt(Duration::from_millis(1), Some(FailureReason::Other));
        assert_eq!(t.attempts.load(Ordering::Relaxed), 3);
        assert_eq!(t.failures(FailureReason::Refused), 1);
        assert_eq!(t.failures(FailureReason::Other), 1);
        assert_eq!(t.latency.count(), 1);
    }
}
