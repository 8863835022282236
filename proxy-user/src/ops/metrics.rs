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

use crate::config::Config;
use crate::dataplane::{EndReason, Plane, Transfer};
use crate::upstream::balancer::Balancer;
use crate::upstream::dial::FailureReason;

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
    ends: [AtomicU64; EndReason::ALL.len()],
    planes: [AtomicU64; Plane::ALL.len()],
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
        self.ends[EndReason::Limit as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a connection as active until the guard drops.
    pub fn open(self: &Arc<Self>) -> ActiveConn {
        self.active.fetch_add(1, Ordering::Relaxed);
        ActiveConn(self.clone())
    }

    pub fn finished(&self, t: &Transfer, attempts: u32) {
        self.ends[t.end as usize].fetch_add(1, Ordering::Relaxed);
        self.planes[t.plane as usize].fetch_add(1, Ordering::Relaxed);
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
            for (i, e) in EndReason::ALL.iter().enumerate() {
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
            for (i, p) in Plane::ALL.iter().enumerate() {
                let v = m.planes[i].load(Ordering::Relaxed);
                let _ = writeln!(
                    o,
                    "proxy_connections_plane_total{{app=\"{}\",plane=\"{}\"}} {v}",
                    esc(a),
                    p.as_str()
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

        let targets: Vec<(String, Arc<crate::upstream::balancer::Backend>)> = self
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
            for r in FailureReason::ALL {
                let _ = writeln!(
                    o,
                    "proxy_target_connect_failures_total{{{l},reason=\"{}\"}} {}",
                    r.as_str(),
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
                plane: Plane::Copy,
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
}
