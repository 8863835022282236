//! Prometheus metrics: per-app connection, byte and outcome counters, per-
//! target active connections and health, served as text on `/metrics`.
//!
//! Hand-rolled (a few atomics and a tiny HTTP/1.0 responder) rather than a
//! metrics stack: the set is small and fixed, and the proxy's hot path only
//! does relaxed atomic adds.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::balancer::Balancer;
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

/// Counters of one app. Kept by name across reloads, so a reload does not
/// reset the series.
#[derive(Debug, Default)]
pub struct AppMetrics {
    ends: [AtomicU64; 7],
    active: AtomicI64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    connect_attempts: AtomicU64,
}

impl AppMetrics {
    pub fn rejected(&self) {
        self.ends[end_index(EndReason::Limit)].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a connection as active until the guard drops.
    pub fn open(self: &Arc<Self>) -> ActiveConn {
        self.active.fetch_add(1, Ordering::Relaxed);
        ActiveConn(self.clone())
    }

    pub fn finished(&self, t: &Transfer, attempts: u32) {
        self.ends[end_index(t.end)].fetch_add(1, Ordering::Relaxed);
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
    /// The balancers in force, for per-target gauges; replaced on reload.
    balancers: RwLock<Vec<Arc<Balancer>>>,
    pub accept_resource_errors: AtomicU64,
    pub reloads_ok: AtomicU64,
    pub reloads_failed: AtomicU64,
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

    pub fn render(&self) -> String {
        let apps = self.apps.read().unwrap_or_else(|p| p.into_inner()).clone();
        let mut out = String::with_capacity(4096);
        let section = |out: &mut String, name: &str, kind: &str, help: &str, lines: Vec<String>| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for l in lines {
                out.push_str(&l);
                out.push('\n');
            }
        };
        section(
            &mut out,
            "proxy_connections_total",
            "counter",
            "Client connections by app and how they ended (limit = rejected at accept).",
            apps.iter()
                .flat_map(|(a, m)| {
                    ENDS.iter().enumerate().map(move |(i, e)| {
                        format!(
                            "proxy_connections_total{{app=\"{}\",end=\"{}\"}} {}",
                            esc(a),
                            e.as_str(),
                            m.ends[i].load(Ordering::Relaxed)
                        )
                    })
                })
                .collect(),
        );
        section(
            &mut out,
            "proxy_connections_active",
            "gauge",
            "Client connections open now, by app.",
            apps.iter()
                .map(|(a, m)| {
                    format!(
                        "proxy_connections_active{{app=\"{}\"}} {}",
                        esc(a),
                        m.active.load(Ordering::Relaxed)
                    )
                })
                .collect(),
        );
        section(
            &mut out,
            "proxy_bytes_total",
            "counter",
            "Bytes carried by finished connections, by app and direction.",
            apps.iter()
                .flat_map(|(a, m)| {
                    [
                        format!(
                            "proxy_bytes_total{{app=\"{}\",direction=\"client_to_target\"}} {}",
                            esc(a),
                            m.bytes_in.load(Ordering::Relaxed)
                        ),
                        format!(
                            "proxy_bytes_total{{app=\"{}\",direction=\"target_to_client\"}} {}",
                            esc(a),
                            m.bytes_out.load(Ordering::Relaxed)
                        ),
                    ]
                })
                .collect(),
        );
        section(
            &mut out,
            "proxy_connect_attempts_total",
            "counter",
            "Upstream connect attempts of finished connections, by app (more than connections = failovers).",
            apps.iter()
                .map(|(a, m)| format!("proxy_connect_attempts_total{{app=\"{}\"}} {}", esc(a), m.connect_attempts.load(Ordering::Relaxed)))
                .collect(),
        );
        let balancers = self
            .balancers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let targets: Vec<(String, String, usize, bool)> = balancers
            .iter()
            .flat_map(|b| {
                b.backends
                    .iter()
                    .map(|t| {
                        (
                            b.app.to_string(),
                            t.target.to_string(),
                            t.active(),
                            t.health.is_up(),
                        )
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        section(
            &mut out,
            "proxy_target_active_connections",
            "gauge",
            "Connections using or connecting to each target.",
            targets
                .iter()
                .map(|(a, t, n, _)| {
                    format!(
                        "proxy_target_active_connections{{app=\"{}\",target=\"{}\"}} {n}",
                        esc(a),
                        esc(t)
                    )
                })
                .collect(),
        );
        section(
            &mut out,
            "proxy_target_up",
            "gauge",
            "1 if the target is considered healthy, 0 if down.",
            targets
                .iter()
                .map(|(a, t, _, up)| {
                    format!(
                        "proxy_target_up{{app=\"{}\",target=\"{}\"}} {}",
                        esc(a),
                        esc(t),
                        u8::from(*up)
                    )
                })
                .collect(),
        );
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
        ] {
            section(
                &mut out,
                name,
                "counter",
                help,
                vec![format!("{name} {}", v.load(Ordering::Relaxed))],
            );
        }
        out
    }
}

/// Prometheus label value escaping.
fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot bind --metrics-address {addr}"))
}

/// Serves `GET /metrics` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            // Out of fds: the data path matters more; try again shortly.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            // A scraper that stalls must not hold a task forever.
            let _ = tokio::time::timeout(Duration::from_secs(10), respond(sock, &metrics)).await;
        });
    }
}

async fn respond(mut sock: TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    let mut req = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    // Read the request head only; bounded so a client cannot grow it.
    while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 8192 {
        let n = sock.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        req.extend_from_slice(&buf[..n]);
    }
    let line = req.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, ctype, body) =
        if method == "GET" && (path == "/metrics" || path.starts_with("/metrics?")) {
            (
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                metrics.render(),
            )
        } else {
            (
                "404 Not Found",
                "text/plain",
                "try GET /metrics\n".to_string(),
            )
        };
    let head = format!(
        "HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    sock.write_all(head.as_bytes()).await?;
    sock.write_all(body.as_bytes()).await?;
    sock.shutdown().await
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
        a.rejected();
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
    }
}
