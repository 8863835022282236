//! Prometheus metrics of the proxy as a whole and per app; rendered, with
//! what the other components registered (per-target series, readiness,
//! process resources), as Prometheus text 0.0.4 for the admin `/metrics`.
//!
//! Label values come only from the config (app names) and fixed enums,
//! never from clients. The hot path touches no map: each app's handles are
//! looked up once, when its runtime is built, and cached in `AppMetrics`.

use std::sync::Arc;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

pub use super::labels::{HeaderFailure, Limit};
use super::process::ProcessCollector;
use crate::dataplane::{Demotion, EndReason, Plane, Transfer};
use crate::metric::registered;

/// Which way bytes went (`direction` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Direction {
    ClientToTarget,
    TargetToClient,
}

impl Direction {
    const ALL: [Direction; 2] = [Direction::ClientToTarget, Direction::TargetToClient];

    fn as_str(self) -> &'static str {
        match self {
            Direction::ClientToTarget => "client_to_target",
            Direction::TargetToClient => "target_to_client",
        }
    }
}

/// Label values are the enums' own names, the ones the log lines use.
macro_rules! label_value_by_name {
    ($($t:ty),*) => {$(
        impl EncodeLabelValue for $t {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
                EncodeLabelValue::encode(&self.as_str(), encoder)
            }
        }
    )*};
}

label_value_by_name!(EndReason, Plane, Limit, Direction, HeaderFailure, Demotion);

/// Upper bounds of the connection duration buckets, in seconds: from
/// request/response exchanges to sessions of hours.
const DURATION_BUCKETS: [f64; 14] = [
    0.005, 0.025, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 14400.0, 86400.0,
];

type DurationFamily = Family<AppLabels, Histogram, fn() -> Histogram>;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct HashLabels {
    sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct AppLabels {
    app: Arc<str>,
}

/// An app label and one more: `app` first, as the series always had it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RefusedLabels {
    app: Arc<str>,
    limit: Limit,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct HeaderLabels {
    app: Arc<str>,
    reason: HeaderFailure,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DemotionLabels {
    app: Arc<str>,
    reason: Demotion,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct EndLabels {
    app: Arc<str>,
    end: EndReason,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct PlaneLabels {
    app: Arc<str>,
    plane: Plane,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DirectionLabels {
    app: Arc<str>,
    direction: Direction,
}

/// One app's handles into the per-app families. Series are keyed by app
/// name, so an app rebuilt by a reload finds its series as they were.
#[derive(Debug)]
pub struct AppMetrics {
    accepted: Counter,
    refused: [Counter; Limit::ALL.len()],
    ends: [Counter; EndReason::ALL.len()],
    planes: [Counter; Plane::ALL.len()],
    active: Gauge,
    bytes: [Counter; Direction::ALL.len()],
    connect_attempts: Counter,
    promotions: Counter,
    demotions: [Counter; Demotion::ALL.len()],
    ledger_failures: Counter,
    overlaps_cut: Counter,
    duration: Histogram,
    header_failures: [Counter; HeaderFailure::ALL.len()],
}

/// Bytes of one connection already added to `proxy_bytes_total` while it
/// was live, so its close adds only the rest. Whatever reads the live
/// counts (the kernel's per-socket counters, `edge::live`, or a plane that
/// knows them exactly, such as a fastpath reading its BPF counters) calls
/// `advance` with running totals; counts that go backwards are ignored.
#[derive(Debug, Default)]
pub struct ByteTally {
    counted: [u64; Direction::ALL.len()],
}

impl ByteTally {
    /// A connection whose first `c2t` and `t2c` bytes were counted already
    /// (by the process that carried them before an upgrade moved it here).
    pub fn counted(c2t: u64, t2c: u64) -> ByteTally {
        ByteTally {
            counted: [c2t, t2c],
        }
    }

    /// The connection has moved `c2t` and `t2c` bytes so far.
    pub fn advance(&mut self, m: &AppMetrics, c2t: u64, t2c: u64) {
        for (d, total) in [
            (Direction::ClientToTarget, c2t),
            (Direction::TargetToClient, t2c),
        ] {
            let counted = &mut self.counted[d as usize];
            if total > *counted {
                m.bytes[d as usize].inc_by(total - *counted);
                *counted = total;
            }
        }
    }
}

impl AppMetrics {
    /// A client was accepted by a listener of this app (before limits).
    pub fn accepted(&self) {
        self.accepted.inc();
    }

    pub fn rejected(&self, limit: Limit) {
        self.refused[limit as usize].inc();
        self.ends[EndReason::Limit as usize].inc();
    }

    /// A client was cut for want of a good PROXY header: one of the
    /// connections `accepted` counted ends here.
    pub fn header_failed(&self, why: HeaderFailure) {
        self.header_failures[why as usize].inc();
        self.ends[EndReason::ProxyHeader as usize].inc();
    }

    /// Counts a connection as active until the guard drops.
    pub fn open(&self) -> ActiveConn {
        self.active.inc();
        ActiveConn(self.active.clone())
    }

    /// A connection ended after `lived`; `tally` holds what was counted of
    /// its bytes while it was live.
    pub fn finished(&self, t: &Transfer, attempts: u32, mut tally: ByteTally, lived: f64) {
        self.ends[t.end as usize].inc();
        self.planes[t.plane as usize].inc();
        tally.advance(self, t.client_to_target, t.target_to_client);
        self.connect_attempts.inc_by(u64::from(attempts));
        if t.promoted_after.is_some() {
            self.promotions.inc();
        }
        for (counter, n) in self.demotions.iter().zip(t.demoted) {
            counter.inc_by(u64::from(n));
        }
        if t.lost {
            self.ledger_failures.inc();
        }
        self.overlaps_cut.inc_by(t.overlaps_cut);
        self.duration.observe(lived);
    }
}

pub struct ActiveConn(Gauge);

impl Drop for ActiveConn {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The per-app families and the proxy-wide counters.
#[derive(Debug)]
pub struct Metrics {
    accepted: Family<AppLabels, Counter>,
    refused: Family<RefusedLabels, Counter>,
    ends: Family<EndLabels, Counter>,
    planes: Family<PlaneLabels, Counter>,
    active: Family<AppLabels, Gauge>,
    bytes: Family<DirectionLabels, Counter>,
    connect_attempts: Family<AppLabels, Counter>,
    promotions: Family<AppLabels, Counter>,
    demotions: Family<DemotionLabels, Counter>,
    ledger_failures: Family<AppLabels, Counter>,
    overlaps_cut: Family<AppLabels, Counter>,
    duration: DurationFamily,
    header_failures: Family<HeaderLabels, Counter>,
    pub accept_resource_errors: Counter,
    pub reloads_ok: Counter,
    pub reloads_failed: Counter,
    /// SIGHUPs that found the file as in force (nothing reloaded).
    pub reloads_unchanged: Counter,
    config_info: Family<HashLabels, Gauge>,
    /// Access log lines dropped because the writer fell behind.
    pub access_log_dropped: Counter,
}

impl Metrics {
    /// Registers the proxy's own metrics and the process collector.
    pub fn register(r: &mut Registry) -> Metrics {
        r.register_collector(Box::new(ProcessCollector));
        super::process::register_build_info(r);
        Metrics {
            accepted: registered(
                r,
                "proxy_connections_accepted",
                "Client connections accepted by a listener, by app \
                 (including ones then refused by a limit or reset for their PROXY header)",
            ),
            refused: registered(
                r,
                "proxy_connections_refused",
                "Client connections reset at accept because a connection limit \
                 was reached, by app and limit",
            ),
            ends: registered(
                r,
                "proxy_connections",
                "Client connections that ended, by app and how they ended \
                 (limit = refused at accept; proxy_header = reset for a bad PROXY header)",
            ),
            planes: registered(
                r,
                "proxy_connections_plane",
                "Connections that ended, by app and the data plane that carried them \
                 (copy-fallback = fastpath install failed; none = never connected)",
            ),
            active: registered(
                r,
                "proxy_connections_active",
                "Client connections open now, by app",
            ),
            bytes: registered(
                r,
                "proxy_bytes",
                "Bytes carried, by app and direction (client_to_target = bytes_in); \
                 counted while connections live, at most a flush interval late",
            ),
            connect_attempts: registered(
                r,
                "proxy_connect_attempts",
                "Upstream connect attempts of finished connections, by app \
                 (more than connections = failovers)",
            ),
            promotions: registered(
                r,
                "proxy_promotions",
                "Finished connections that --mode auto moved from userspace into the \
                 kernel fastpath, by app",
            ),
            demotions: registered(
                r,
                "proxy_demotions",
                "Directions of finished fastpath connections that the kernel handed back \
                 to userspace, by app and reason: bound (their receiver fell the in-flight \
                 bound behind) or busy (promoted by --mode auto, then busier than \
                 --promote-segments-below)",
            ),
            ledger_failures: registered(
                r,
                "proxy_fin_ledger_failures",
                "Fastpath connections reset because the FIN ledger found bytes of a \
                 direction lost or duplicated, by app (expected 0)",
            ),
            overlaps_cut: registered(
                r,
                "proxy_fastpath_overlap_bytes",
                "Bytes of retransmitted segments that overlapped bytes already received, \
                 cut by the fastpath's verdict so they went out once, by app",
            ),
            duration: {
                let f = DurationFamily::new_with_constructor(|| Histogram::new(DURATION_BUCKETS));
                r.register(
                    "proxy_connection_duration_seconds",
                    "Accept to close of client connections that reached a data plane or \
                     failed to connect, by app",
                    f.clone(),
                );
                f
            },
            header_failures: registered(
                r,
                "proxy_accept_proxy_header_failures",
                "Clients of apps with AcceptProxyProtocol cut before the proxy header was \
                 read, by app and reason (untrusted source, malformed, closed, timeout)",
            ),
            accept_resource_errors: registered(
                r,
                "proxy_accept_resource_errors",
                "Accepts that failed for lack of fds or memory (the listener backs off)",
            ),
            reloads_ok: registered(r, "proxy_config_reloads", "Config reloads applied"),
            reloads_failed: registered(
                r,
                "proxy_config_reload_failures",
                "Config reloads rejected (the running config stayed)",
            ),
            reloads_unchanged: registered(
                r,
                "proxy_config_reloads_unchanged",
                "SIGHUPs that found the config file as in force, so nothing was reloaded \
                 (logrotate's, to reopen the access log)",
            ),
            config_info: registered(
                r,
                "proxy_config_info",
                "Always 1; sha256 is the hash of the config file in force (as /config's X-Config-Sha256)",
            ),
            access_log_dropped: registered(
                r,
                "proxy_access_log_dropped",
                "Access log lines dropped because the writer fell behind",
            ),
        }
    }

    /// The config file whose hash is `sha256` is in force now.
    pub fn config_applied(&self, sha256: &str) {
        self.config_info.clear();
        self.config_info
            .get_or_create(&HashLabels {
                sha256: sha256.to_string(),
            })
            .set(1);
    }

    /// The handles of app `name`, every series created (at 0 until used).
    pub fn app(&self, name: &str) -> AppMetrics {
        let app: Arc<str> = name.into();
        let of = AppLabels { app: app.clone() };
        let app = || app.clone();
        AppMetrics {
            accepted: self.accepted.get_or_create_owned(&of),
            refused: Limit::ALL.map(|limit| {
                self.refused
                    .get_or_create_owned(&RefusedLabels { app: app(), limit })
            }),
            ends: EndReason::ALL.map(|end| {
                self.ends
                    .get_or_create_owned(&EndLabels { app: app(), end })
            }),
            planes: Plane::ALL.map(|plane| {
                self.planes
                    .get_or_create_owned(&PlaneLabels { app: app(), plane })
            }),
            active: self.active.get_or_create_owned(&of),
            bytes: Direction::ALL.map(|direction| {
                self.bytes.get_or_create_owned(&DirectionLabels {
                    app: app(),
                    direction,
                })
            }),
            connect_attempts: self.connect_attempts.get_or_create_owned(&of),
            promotions: self.promotions.get_or_create_owned(&of),
            demotions: Demotion::ALL.map(|reason| {
                self.demotions
                    .get_or_create_owned(&DemotionLabels { app: app(), reason })
            }),
            ledger_failures: self.ledger_failures.get_or_create_owned(&of),
            overlaps_cut: self.overlaps_cut.get_or_create_owned(&of),
            duration: self.duration.get_or_create_owned(&of),
            header_failures: HeaderFailure::ALL.map(|reason| {
                self.header_failures
                    .get_or_create_owned(&HeaderLabels { app: app(), reason })
            }),
        }
    }
}

impl Metrics {
    /// Drops every series of an app that left the config, as the target
    /// side does for a target (`TargetMetrics::remove`): with a fleet's
    /// apps coming and going, each name ever seen would otherwise stay in
    /// `/metrics` (about 50 series each) until a restart. Connections of
    /// the app still open keep their handles and are no longer rendered;
    /// an app of that name added later starts its series at 0, which
    /// Prometheus reads as the counter reset it is.
    pub fn remove_app(&self, name: &str) {
        let app: Arc<str> = name.into();
        let of = AppLabels { app: app.clone() };
        let app = || app.clone();
        for family in [
            &self.accepted,
            &self.connect_attempts,
            &self.promotions,
            &self.ledger_failures,
            &self.overlaps_cut,
        ] {
            family.remove(&of);
        }
        self.active.remove(&of);
        self.duration.remove(&of);
        for limit in Limit::ALL {
            self.refused.remove(&RefusedLabels { app: app(), limit });
        }
        for end in EndReason::ALL {
            self.ends.remove(&EndLabels { app: app(), end });
        }
        for plane in Plane::ALL {
            self.planes.remove(&PlaneLabels { app: app(), plane });
        }
        for direction in Direction::ALL {
            self.bytes.remove(&DirectionLabels {
                app: app(),
                direction,
            });
        }
        for reason in Demotion::ALL {
            self.demotions
                .remove(&DemotionLabels { app: app(), reason });
        }
        for reason in HeaderFailure::ALL {
            self.header_failures
                .remove(&HeaderLabels { app: app(), reason });
        }
    }
}

/// The registry as Prometheus text 0.0.4 (`prometheus_text::CONTENT_TYPE`):
/// what every Prometheus version and promtool read, unlike OpenMetrics.
pub fn render(registry: &Registry) -> String {
    let mut out = String::with_capacity(16 * 1024);
    // Writing into a String cannot fail; an error could only come from an
    // encoder bug, and a partial page is still better than none.
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, registry) {
        tracing::error!(error = %e, "rendering /metrics failed");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The per-app arrays are indexed by `label as usize`: each `ALL` must
    /// list its labels in declaration order, or a count lands under
    /// another label's series.
    #[test]
    fn every_label_indexes_its_own_slot() {
        macro_rules! in_order {
            ($($t:ty),*) => {$(
                for (i, l) in <$t>::ALL.iter().enumerate() {
                    assert_eq!(*l as usize, i, "{}::ALL[{i}] is {}", stringify!($t), l.as_str());
                }
            )*};
        }
        in_order!(EndReason, Plane, Limit, Direction, HeaderFailure, Demotion);
    }

    #[test]
    fn renders_counters_and_escapes_labels() {
        let mut registry = Registry::default();
        let m = Metrics::register(&mut registry);
        let a = m.app("we\"ird");
        let _open = a.open();
        // 4 bytes counted while live, the rest at close; nothing twice.
        let mut tally = ByteTally::default();
        tally.advance(&a, 4, 0);
        tally.advance(&a, 3, 0);
        a.finished(
            &Transfer {
                client_to_target: 10,
                target_to_client: 20,
                userspace_bytes: 30,
                ..Transfer::none(EndReason::Closed).on(Plane::Copy)
            },
            2,
            tally,
            0.2,
        );
        a.rejected(Limit::Global);
        a.accepted();
        // A rebuilt app (a reload) continues the same series.
        m.app("we\"ird").accepted();
        let text = render(&registry);
        let app = r#"app="we\"ird""#;
        for line in [
            format!(r#"proxy_connections_total{{{app},end="closed"}} 1"#),
            format!(r#"proxy_connections_total{{{app},end="limit"}} 1"#),
            format!(r#"proxy_connections_total{{{app},end="idle_timeout"}} 0"#),
            format!("proxy_connections_active{{{app}}} 1"),
            format!("proxy_connections_accepted_total{{{app}}} 2"),
            format!(r#"proxy_bytes_total{{{app},direction="target_to_client"}} 20"#),
            format!(r#"proxy_bytes_total{{{app},direction="client_to_target"}} 10"#),
            format!(r#"proxy_connection_duration_seconds_bucket{{{app},le="0.1"}} 0"#),
            format!(r#"proxy_connection_duration_seconds_bucket{{{app},le="0.5"}} 1"#),
            r#"proxy_build_info{version="0.1.0",commit="unknown"} 1"#.into(),
            format!("proxy_connect_attempts_total{{{app}}} 2"),
            format!(r#"proxy_connections_refused_total{{{app},limit="global"}} 1"#),
            format!(r#"proxy_connections_refused_total{{{app},limit="per_app"}} 0"#),
            format!(r#"proxy_connections_plane_total{{{app},plane="copy"}} 1"#),
            format!(r#"proxy_connections_plane_total{{{app},plane="none"}} 0"#),
            "# TYPE proxy_connections_total counter".into(),
            "proxy_config_reloads_total 0".into(),
        ] {
            assert!(text.contains(&format!("{line}\n")), "{line} in:\n{text}");
        }
        assert!(text.contains("\nprocess_open_fds "), "{text}");
        assert!(text.contains("\nprocess_resident_memory_bytes "));
        assert!(text.contains("\nprocess_cpu_seconds_total "));
        assert!(text.contains("\nprocess_start_time_seconds "));
        assert!(!text.contains("# EOF"));
    }

    /// Every series `app` creates, `remove_app` removes; another app's stay.
    #[test]
    fn a_removed_app_leaves_no_series() {
        let mut registry = Registry::default();
        let m = Metrics::register(&mut registry);
        let _kept = m.app("kept");
        let gone = m.app("gone");
        gone.accepted();
        m.remove_app("gone");
        let text = render(&registry);
        assert!(!text.contains(r#"app="gone""#), "{text}");
        assert!(
            text.contains("proxy_connections_accepted_total{app=\"kept\"} 0\n"),
            "{text}"
        );
        // Its open connections' handles still work, unrendered.
        gone.accepted();
        drop(gone.open());
        assert!(!render(&registry).contains(r#"app="gone""#));
    }
}
