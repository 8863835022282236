//! Prometheus metrics: per-app connection, byte and outcome counters,
//! per-target connect counters, latency and health, process resources;
//! rendered as Prometheus text for the admin listener's `/metrics`.
//!
//! Hand-rolled (a few atomics and a text renderer) rather than a metrics
//! crate: the set is small and fixed, label values come only from the config
//! (app names, targets) and fixed enums, never from clients, and the hot path
//! only does relaxed atomic adds.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::balancer::Balancer;
use crate::config::Config;
use crate::dataplane::{EndReason, Transfer};

const ENDS: [EndReason; 7] = [
    EndReason::Closed,
    EndReason::ClientReset,
    EndReason::TargetReset,
    EndReason::IdleTimeout,
    EndReason::DrainTimeout,
    EndReason::ConnectFailed,
    EndReason::Limit,
];

fn end_index(e: EndReason) -> usize {
    ENDS.iter().position(|x| *x == e).unwrap_or(0)
}

/// Values of the `plane` label. "none": the connection never reached a data
/// plane (every connect failed, or the drain deadline hit while connecting).
/// "copy-fallback": the fastpath could not take the pair (install failed) and
/// the copy plane carried it, so it doubles as the install-failure count.
pub const PLANES: [&str; 5] = ["fastpath", "splice", "copy", "copy-fallback", "none"];

/// Which connection limit refused a client (`limit` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    PerApp,
    Global,
}

impl Limit {
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::PerApp => "per_app",
            Limit::Global => "global",
        }
    }
}

/// Counters of one app. Kept by name across reloads, so a reload does not
/// reset the series.
#[derive(Debug, Default)]
pub struct AppMetrics {
    accepted: AtomicU64,
    refused: [AtomicU64; 2],
    ends: [AtomicU64; 7],
    planes: [AtomicU64; PLANES.len()],
    active: AtomicI64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    connect_attempts: AtomicU64,
}

impl AppMetrics {
    /// A client was accepted by a listener of this app (before limits).
    pub fn accepted(&self) {
        self.accepted.fetch_add(1, Ordering::Relaxed);
    }

    pub fn rejected(&self, limit: Limit) {
        self.refused[limit as usize].fetch_add(1, Ordering::Relaxed);
        self.ends[end_index(EndReason::Limit)].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a connection as active until the guard drops.
    pub fn open(self: &Arc<Self>) -> ActiveConn {
        self.active.fetch_add(1, Ordering::Relaxed);
        ActiveConn(self.clone())
    }

    pub fn finished(&self, t: &Transfer, attempts: u32) {
        self.ends[end_index(t.end)].fetch_add(1, Ordering::Relaxed);
        let plane = PLANES
            .iter()
            .position(|p| *p == t.plane)
            .unwrap_or(PLANES.len() - 1);
        self.planes[plane].fetch_add(1, Ordering::Relaxed);
        self.bytes_in
            .fetch_add(t.client_to_target, Ordering::Relaxed);
        self.bytes_out
            .fetch_add(t.target_to_client, Ordering::Relaxed);
        self.connect_attempts
            .fetch_add(u64::from(attempts), Ordering::Relaxed);
    }
}

pub struct ActiveConn(Arc<AppMetrics>);

impl Drop for ActiveConn {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Connect-failure reasons (`reason` label), as named by `connect::dial`.
pub const CONNECT_FAILURES: [&str; 7] = [
    "refused",
    "reset",
    "unreachable",
    "timeout",
    "resolve",
    "local_resource",
    "other",
];

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
    fn render(&self, out: &mut String, name: &str, labels: &str) {
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
    failures: [AtomicU64; CONNECT_FAILURES.len()],
    /// Time to an established connection, successful attempts only (a
    /// failure's time is mostly the timeout, which would swamp the buckets).
    pub latency: Histogram,
}

impl TargetStats {
    /// One connect attempt took `took`; `failure` names why it failed.
    pub fn attempt(&self, took: Duration, failure: Option<&str>) {
        self.attempts.fetch_add(1, Ordering::Relaxed);
        match failure {
            None => self.latency.observe(took),
            Some(reason) => {
                let i = CONNECT_FAILURES
                    .iter()
                    .position(|r| *r == reason)
                    .unwrap_or(CONNECT_FAILURES.len() - 1);
                self.failures[i].fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub fn failures(&self, reason: &str) -> u64 {
        CONNECT_FAILURES
            .iter()
            .position(|r| *r == reason)
            .map_or(0, |i| self.failures[i].load(Ordering::Relaxed))
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    apps: RwLock<BTreeMap<String, Arc<AppMetrics>>>,
    /// The balancers in force, for per-target series and `/targets`;
    /// replaced on reload.
    balancers: RwLock<Vec<Arc<Balancer>>>,
    /// The config in force, for `/config`; replaced on reload.
    config: RwLock<Option<Arc<Config>>>,
    /// Config loaded and every listener bound; false again while draining.
    ready: AtomicBool,
    pub accept_resource_errors: AtomicU64,
    pub reloads_ok: AtomicU64,
    pub reloads_failed: AtomicU64,
    /// Access log lines dropped because the writer fell behind.
    pub access_log_dropped: AtomicU64,
}

impl Metrics {
    pub fn app(&self, name: &str) -> Arc<AppMetrics> {
        if let Some(m) = self
            .apps
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
        {
            return m.clone();
        }
        let mut apps = self.apps.write().unwrap_or_else(|p| p.into_inner());
        apps.entry(name.to_string()).or_default().clone()
    }

    pub fn set_balancers(&self, balancers: Vec<Arc<Balancer>>) {
        *self.balancers.write().unwrap_or_else(|p| p.into_inner()) = balancers;
    }

    pub fn balancers(&self) -> Vec<Arc<Balancer>> {
        self.balancers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn set_config(&self, config: &Config) {
        *self.config.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(config.clone()));
    }

    pub fn config(&self) -> Option<Arc<Config>> {
        self.config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    pub fn render(&self) -> String {
        let apps = self.apps.read().unwrap_or_else(|p| p.into_inner()).clone();
        let mut out = String::with_capacity(16 * 1024);
        let o = &mut out;
        let per_app =
            |o: &mut String, name: &str, kind: &str, help: &str, f: &dyn Fn(&AppMetrics) -> u64| {
                header(o, name, kind, help);
                for (a, m) in &apps {
                    let _ = writeln!(o, "{name}{{app=\"{}\"}} {}", esc(a), f(m));
                }
            };
        per_app(o, "proxy_connections_accepted_total", "counter",
            "Client connections accepted by a listener, by app (including ones then refused by a limit).",
            &|m| m.accepted.load(Ordering::Relaxed));
        header(o, "proxy_connections_refused_total", "counter",
            "Client connections reset at accept because a connection limit was reached, by app and limit.");
        for (a, m) in &apps {
            for l in [Limit::PerApp, Limit::Global] {
                let v = m.refused[l as usize].load(Ordering::Relaxed);
                let _ = writeln!(
                    o,
                    "proxy_connections_refused_total{{app=\"{}\",limit=\"{}\"}} {v}",
                    esc(a),
                    l.as_str()
                );
            }
        }
        header(
            o,
            "proxy_connections_total",
            "counter",
            "Client connections that ended, by app and how they ended (limit = refused at accept).",
        );
        for (a, m) in &apps {
            for (i, e) in ENDS.iter().enumerate() {
                let v = m.ends[i].load(Ordering::Relaxed);
                let _ = writeln!(
                    o,
                    "proxy_connections_total{{app=\"{}\",end=\"{}\"}} {v}",
                    esc(a),
                    e.as_str()
                );
            }
        }
        header(o, "proxy_connections_plane_total", "counter",
            "Connections that ended, by app and the data plane that carried them (copy-fallback = fastpath install failed; none = never connected).");
        for (a, m) in &apps {
            for (i, p) in PLANES.iter().enumerate() {
                let v = m.planes[i].load(Ordering::Relaxed);
                let _ = writeln!(
                    o,
                    "proxy_connections_plane_total{{app=\"{}\",plane=\"{p}\"}} {v}",
                    esc(a)
                );
            }
        }
        header(
            o,
            "proxy_connections_active",
            "gauge",
            "Client connections open now, by app.",
        );
        for (a, m) in &apps {
            let _ = writeln!(
                o,
                "proxy_connections_active{{app=\"{}\"}} {}",
                esc(a),
                m.active.load(Ordering::Relaxed)
            );
        }
        header(o, "proxy_bytes_total", "counter",
            "Bytes carried by finished connections, by app and direction (client_to_target = bytes_in).");
        for (a, m) in &apps {
            for (dir, v) in [
                ("client_to_target", &m.bytes_in),
                ("target_to_client", &m.bytes_out),
            ] {
                let _ = writeln!(
                    o,
                    "proxy_bytes_total{{app=\"{}\",direction=\"{dir}\"}} {}",
                    esc(a),
                    v.load(Ordering::Relaxed)
                );
            }
        }
        per_app(o, "proxy_connect_attempts_total", "counter",
            "Upstream connect attempts of finished connections, by app (more than connections = failovers).",
            &|m| m.connect_attempts.load(Ordering::Relaxed));

        let targets: Vec<(String, Arc<crate::balancer::Backend>)> = self
            .balancers()
            .iter()
            .flat_map(|b| {
                b.backends
                    .iter()
                    .map(|t| (labels(&b.app, &t.target.to_string()), t.clone()))
            })
            .collect();
        header(
            o,
            "proxy_target_active_connections",
            "gauge",
            "Connections using or connecting to each target.",
        );
        for (l, t) in &targets {
            let _ = writeln!(o, "proxy_target_active_connections{{{l}}} {}", t.active());
        }
        header(
            o,
            "proxy_target_up",
            "gauge",
            "1 if the target is considered healthy, 0 if down.",
        );
        for (l, t) in &targets {
            let _ = writeln!(o, "proxy_target_up{{{l}}} {}", u8::from(t.health.is_up()));
        }
        header(
            o,
            "proxy_target_health_transitions_total",
            "counter",
            "Health state changes of each target, by the state entered.",
        );
        for (l, t) in &targets {
            let s = t.health.snapshot();
            let _ = writeln!(
                o,
                "proxy_target_health_transitions_total{{{l},to=\"up\"}} {}",
                s.went_up
            );
            let _ = writeln!(
                o,
                "proxy_target_health_transitions_total{{{l},to=\"down\"}} {}",
                s.went_down
            );
        }
        header(
            o,
            "proxy_target_connect_attempts_total",
            "counter",
            "Connect attempts to each target on behalf of clients (health probes not included).",
        );
        for (l, t) in &targets {
            let _ = writeln!(
                o,
                "proxy_target_connect_attempts_total{{{l}}} {}",
                t.stats.attempts.load(Ordering::Relaxed)
            );
        }
        header(
            o,
            "proxy_target_connect_failures_total",
            "counter",
            "Failed connect attempts to each target, by reason.",
        );
        for (l, t) in &targets {
            for r in CONNECT_FAILURES {
                let _ = writeln!(
                    o,
                    "proxy_target_connect_failures_total{{{l},reason=\"{r}\"}} {}",
                    t.stats.failures(r)
                );
            }
        }
        header(o, "proxy_target_connect_duration_seconds", "histogram",
            "Time to establish a connection to each target, DNS included; successful attempts only.");
        for (l, t) in &targets {
            t.stats
                .latency
                .render(o, "proxy_target_connect_duration_seconds", l);
        }

        for (name, help, v) in [
            (
                "proxy_accept_resource_errors_total",
                "Accepts that failed for lack of fds or memory (the listener backs off).",
                &self.accept_resource_errors,
            ),
            (
                "proxy_config_reloads_total",
                "Config reloads applied.",
                &self.reloads_ok,
            ),
            (
                "proxy_config_reload_failures_total",
                "Config reloads rejected (the running config stayed).",
                &self.reloads_failed,
            ),
            (
                "proxy_access_log_dropped_total",
                "Access log lines dropped because the writer fell behind.",
                &self.access_log_dropped,
            ),
        ] {
            header(o, name, "counter", help);
            let _ = writeln!(o, "{name} {}", v.load(Ordering::Relaxed));
        }
        header(
            o,
            "proxy_ready",
            "gauge",
            "1 when the config is loaded and every listener is bound (same as /readyz).",
        );
        let _ = writeln!(o, "proxy_ready {}", u8::from(self.is_ready()));
        process_metrics(o);
        out
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn labels(app: &str, target: &str) -> String {
    format!("app=\"{}\",target=\"{}\"", esc(app), esc(target))
}

/// Resource usage of this process from /proc, under the names the official
/// Prometheus clients use, so standard dashboards work. A value that cannot
/// be read is left out rather than reported as 0.
fn process_metrics(o: &mut String) {
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        header(
            o,
            "process_open_fds",
            "gauge",
            "Open file descriptors (clients, upstreams, listeners, BPF maps).",
        );
        // Minus one: the directory handle read_dir itself holds.
        let _ = writeln!(o, "process_open_fds {}", fds.count().saturating_sub(1));
    }
    // SAFETY: getrlimit writes into the struct we pass, nothing else.
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        header(o, "process_max_fds", "gauge", "Soft RLIMIT_NOFILE.");
        let _ = writeln!(o, "process_max_fds {}", lim.rlim_cur);
    }
    // SAFETY: sysconf only reads a system constant.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    let rss_pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok());
    if let (Some(pages), Ok(page)) = (rss_pages, u64::try_from(page)) {
        header(
            o,
            "process_resident_memory_bytes",
            "gauge",
            "Resident set size.",
        );
        let _ = writeln!(o, "process_resident_memory_bytes {}", pages * page);
    }
    // SAFETY: as above.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if let (Some(cpu), Ok(ticks @ 1..)) = (cpu_ticks(), u64::try_from(ticks)) {
        header(
            o,
            "process_cpu_seconds_total",
            "counter",
            "User and system CPU time.",
        );
        let _ = writeln!(o, "process_cpu_seconds_total {}", cpu as f64 / ticks as f64);
    }
}

/// utime + stime from /proc/self/stat, in clock ticks. Fields are counted
/// after the last ')' because the command name may contain spaces.
fn cpu_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // After ')': state is field 3; utime is 14 and stime 15 (1-based).
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Prometheus label value escaping.
fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_escapes_labels() {
        let m = Metrics::default();
        let a = m.app("we\"ird");
        let _open = a.open();
        a.finished(
            &Transfer {
                client_to_target: 10,
                target_to_client: 20,
                userspace_bytes: 30,
                end: EndReason::Closed,
                plane: "copy",
            },
            2,
        );
        a.rejected(Limit::Global);
        a.accepted();
        let text = m.render();
        assert!(
            text.contains("proxy_connections_total{app=\"we\\\"ird\",end=\"closed\"} 1"),
            "{text}"
        );
        assert!(text.contains("proxy_connections_total{app=\"we\\\"ird\",end=\"limit\"} 1"));
        assert!(text.contains("proxy_connections_active{app=\"we\\\"ird\"} 1"));
        assert!(text.contains("direction=\"target_to_client\"} 20"));
        assert!(text.contains("proxy_connect_attempts_total{app=\"we\\\"ird\"} 2"));
        assert!(text.contains("# TYPE proxy_target_up gauge"));
        assert!(
            text.contains("proxy_connections_refused_total{app=\"we\\\"ird\",limit=\"global\"} 1")
        );
        assert!(text.contains("proxy_connections_plane_total{app=\"we\\\"ird\",plane=\"copy\"} 1"));
        assert!(text.contains("process_open_fds "), "{text}");
        assert!(text.contains("process_resident_memory_bytes "));
    }

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
        t.attempt(Duration::from_millis(1), Some("refused"));
        t.attempt(Duration::from_millis(1), Some("no such reason"));
        assert_eq!(t.attempts.load(Ordering::Relaxed), 3);
        assert_eq!(t.failures("refused"), 1);
        assert_eq!(t.failures("other"), 1);
        assert_eq!(t.latency.count(), 1);
    }
}
