//! The per-target series (`proxy_target_*`). The upstream side owns them:
//! `TargetMetrics` registers the families, each `Backend` holds handles to
//! its own series, and a reload that removes a target removes its series
//! (a target that stays keeps its backend, so its counters go on).

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::dial::FailureReason;
use super::health::{HealthSeries, Transition};
use super::rotation::RotationState;
use crate::config::Target;
use crate::metric::registered;

/// Upper bounds of the connect latency buckets, in seconds: loopback
/// connects land in the first buckets, cross-region ones around 0.1 s, and
/// the default 2 s connect timeout sits inside the range.
const LATENCY_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

impl EncodeLabelValue for FailureReason {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

/// The `to` label: the state a health transition entered.
impl EncodeLabelValue for Transition {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        let to = match self {
            Transition::Up => "up",
            Transition::Down => "down",
        };
        EncodeLabelValue::encode(&to, encoder)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TargetLabels {
    app: Arc<str>,
    /// As configured (`host:port`), not the resolved address.
    target: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct FailureLabels {
    #[prometheus(flatten)]
    of: TargetLabels,
    reason: FailureReason,
}

/// The `state` label: an admin state (`rotation`).
impl EncodeLabelValue for RotationState {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RotationLabels {
    #[prometheus(flatten)]
    of: TargetLabels,
    state: RotationState,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TransitionLabels {
    #[prometheus(flatten)]
    of: TargetLabels,
    to: Transition,
}

/// Every series of one target: connects, health, admin state.
pub type Series = (TargetStats, HealthSeries, [Gauge; RotationState::ALL.len()]);

type LatencyFamily = Family<TargetLabels, Histogram, fn() -> Histogram>;

/// The per-target families. Cloning shares them (handles, not copies).
#[derive(Debug, Clone)]
pub struct TargetMetrics {
    active: Family<TargetLabels, Gauge>,
    up: Family<TargetLabels, Gauge>,
    transitions: Family<TransitionLabels, Counter>,
    admin_state: Family<RotationLabels, Gauge>,
    attempts: Family<TargetLabels, Counter>,
    failures: Family<FailureLabels, Counter>,
    latency: LatencyFamily,
}

impl TargetMetrics {
    /// Families no registry renders: for balancers built in tests.
    #[cfg(test)]
    pub fn unregistered() -> Self {
        Self::register(&mut Registry::default())
    }

    pub fn register(r: &mut Registry) -> Self {
        TargetMetrics {
            active: registered(
                r,
                "proxy_target_active_connections",
                "Connections using or connecting to each target",
            ),
            up: registered(
                r,
                "proxy_target_up",
                "1 if the target is considered healthy, 0 if down",
            ),
            transitions: registered(
                r,
                "proxy_target_health_transitions",
                "Health state changes of each target, by the state entered",
            ),
            admin_state: registered(
                r,
                "proxy_target_admin_state",
                "1 for the admin state each target is in (enabled, drain, disabled; \
                 set through the admin API), 0 for the others",
            ),
            attempts: registered(
                r,
                "proxy_target_connect_attempts",
                "Connect attempts to each target on behalf of clients (health probes not included)",
            ),
            failures: registered(
                r,
                "proxy_target_connect_failures",
                "Failed connect attempts to each target, by reason",
            ),
            latency: {
                let f = LatencyFamily::new_with_constructor(|| Histogram::new(LATENCY_BUCKETS));
                r.register(
                    "proxy_target_connect_duration_seconds",
                    "Time to establish a connection to each target, DNS included; \
                     successful attempts only",
                    f.clone(),
                );
                f
            },
        }
    }

    /// Creates every series of a new target (so each `reason` and `to`
    /// shows 0 before its first use) and hands out its handles.
    pub fn series(&self, app: &Arc<str>, target: &Target) -> Series {
        let of = labels(app, target);
        let failure = |reason| FailureLabels {
            of: of.clone(),
            reason,
        };
        let transition = |to| TransitionLabels { of: of.clone(), to };
        let stats = TargetStats {
            active: self.active.get_or_create_owned(&of),
            attempts: self.attempts.get_or_create_owned(&of),
            failures: FailureReason::ALL.map(|r| self.failures.get_or_create_owned(&failure(r))),
            latency: self.latency.get_or_create_owned(&of),
        };
        let health = HealthSeries {
            up: self.up.get_or_create_owned(&of),
            went_up: self
                .transitions
                .get_or_create_owned(&transition(Transition::Up)),
            went_down: self
                .transitions
                .get_or_create_owned(&transition(Transition::Down)),
        };
        let rotation = RotationState::ALL.map(|state| {
            self.admin_state.get_or_create_owned(&RotationLabels {
                of: of.clone(),
                state,
            })
        });
        (stats, health, rotation)
    }

    /// Drops every series of a target that left the config. Connections
    /// still using it keep their handles; they just are not rendered.
    pub fn remove(&self, app: &Arc<str>, target: &Target) {
        let of = labels(app, target);
        self.active.remove(&of);
        self.up.remove(&of);
        self.attempts.remove(&of);
        self.latency.remove(&of);
        for to in [Transition::Up, Transition::Down] {
            self.transitions
                .remove(&TransitionLabels { of: of.clone(), to });
        }
        for state in RotationState::ALL {
            self.admin_state.remove(&RotationLabels {
                of: of.clone(),
                state,
            });
        }
        for reason in FailureReason::ALL {
            self.failures.remove(&FailureLabels {
                of: of.clone(),
                reason,
            });
        }
    }
}

fn labels(app: &Arc<str>, target: &Target) -> TargetLabels {
    TargetLabels {
        app: app.clone(),
        target: target.to_string(),
    }
}

/// One target's connect series (client connects only, not probes).
#[derive(Debug)]
pub struct TargetStats {
    /// Connections using or connecting to the target. Also what least-conn
    /// balances on, so the metric is exactly what the balancer saw.
    pub active: Gauge,
    attempts: Counter,
    failures: [Counter; FailureReason::ALL.len()],
    /// Time to an established connection, successful attempts only (a
    /// failure's time is mostly the timeout, which would swamp the buckets).
    latency: Histogram,
}

impl TargetStats {
    /// One connect attempt took `took`; `failure` names why it failed.
    pub fn attempt(&self, took: Duration, failure: Option<FailureReason>) {
        self.attempts.inc();
        match failure {
            None => self.latency.observe(took.as_secs_f64()),
            Some(reason) => {
                self.failures[reason as usize].inc();
            }
        }
    }

    #[cfg(test)]
    pub fn failures(&self, reason: FailureReason) -> u64 {
        self.failures[reason as usize].get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_target;
    use prometheus_client::encoding::prometheus_text::encode;

    fn render(registry: &Registry) -> String {
        let mut out = String::new();
        encode(&mut out, registry).unwrap();
        out
    }

    #[test]
    fn histogram_is_cumulative_and_failures_go_by_reason() {
        let mut registry = Registry::default();
        let m = TargetMetrics::register(&mut registry);
        let (t, _, _) = m.series(&"a".into(), &parse_target("h:1").unwrap());
        t.attempt(Duration::from_micros(300), None);
        t.attempt(Duration::from_millis(30), None);
        t.attempt(Duration::from_secs(10), None);
        t.attempt(Duration::from_millis(1), Some(FailureReason::Refused));
        t.attempt(Duration::from_millis(1), Some(FailureReason::Other));
        let out = render(&registry);
        let l = r#"app="a",target="h:1""#;
        for line in [
            format!(r#"proxy_target_connect_duration_seconds_bucket{{{l},le="0.0005"}} 1"#),
            format!(r#"proxy_target_connect_duration_seconds_bucket{{{l},le="0.05"}} 2"#),
            format!(r#"proxy_target_connect_duration_seconds_bucket{{{l},le="1"}} 2"#),
            format!(r#"proxy_target_connect_duration_seconds_bucket{{{l},le="2.5"}} 2"#),
            format!(r#"proxy_target_connect_duration_seconds_bucket{{{l},le="+Inf"}} 3"#),
            format!("proxy_target_connect_duration_seconds_count{{{l}}} 3"),
            format!("proxy_target_connect_attempts_total{{{l}}} 5"),
            format!(r#"proxy_target_connect_failures_total{{{l},reason="refused"}} 1"#),
            format!(r#"proxy_target_connect_failures_total{{{l},reason="other"}} 1"#),
            format!(r#"proxy_target_connect_failures_total{{{l},reason="timeout"}} 0"#),
            format!(r#"proxy_target_health_transitions_total{{{l},to="down"}} 0"#),
        ] {
            assert!(out.contains(&format!("{line}\n")), "{line} in:\n{out}");
        }
    }
}
