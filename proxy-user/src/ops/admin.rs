//! The admin listener (`--admin-address`, off by default): `/metrics`,
//! `/healthz`, `/readyz`, `/config`, `/targets`.
//!
//! A deliberately tiny HTTP/1.1 server on tokio (one request per connection,
//! `Connection: close`): scrapers and probes need nothing more, and a full
//! HTTP stack would be most of the binary. Every request is bounded in size,
//! time and concurrency, so the admin port cannot be used to exhaust the
//! proxy.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use arc_swap::{ArcSwap, ArcSwapOption};
use prometheus_client::encoding::prometheus_text;
use prometheus_client::registry::Registry;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::config::{Config, ProxyProtocol};
use crate::ops::metrics;
use crate::ops::readiness::Readiness;
use crate::upstream::balancer::Balancer;

/// Largest request head accepted; ours are one line plus a few headers.
const MAX_HEAD: usize = 8 * 1024;
/// Whole exchange, so a client that sends nothing or reads nothing cannot
/// hold a task and an fd for long.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Concurrent admin connections; beyond this new ones are closed at once.
const MAX_CONNS: usize = 64;

/// What the endpoints answer from: every registered metric, readiness,
/// and what the server last published as in force (on start and on each
/// applied reload).
pub struct AdminState {
    registry: Registry,
    readiness: Readiness,
    config: ArcSwapOption<Config>,
    balancers: ArcSwap<Vec<Arc<Balancer>>>,
}

impl AdminState {
    pub fn new(registry: Registry, readiness: Readiness) -> AdminState {
        AdminState {
            registry,
            readiness,
            config: ArcSwapOption::empty(),
            balancers: ArcSwap::default(),
        }
    }

    pub fn readiness(&self) -> &Readiness {
        &self.readiness
    }

    /// The config in force and its balancers, for `/config` and `/targets`.
    pub fn publish(&self, config: &Config, balancers: Vec<Arc<Balancer>>) {
        self.config.store(Some(Arc::new(config.clone())));
        self.balancers.store(Arc::new(balancers));
    }
}

pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot bind --admin-address {addr}"))
}

/// Serves admin requests until the task is dropped.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNS));
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            // Out of fds: the data path matters more; try again shortly.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue; // dropping `sock` closes it
        };
        let state = state.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, exchange(sock, &state)).await;
            drop(slot);
        });
    }
}

struct Response {
    status: &'static str,
    content_type: &'static str,
    body: String,
    allow: bool,
}

impl Response {
    fn text(status: &'static str, body: impl Into<String>) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
            allow: false,
        }
    }

    fn json(v: &Value) -> Response {
        Response {
            status: "200 OK",
            content_type: "application/json",
            body: format!("{v:#}\n"),
            allow: false,
        }
    }
}

async fn exchange(mut sock: TcpStream, state: &AdminState) -> std::io::Result<()> {
    let (resp, head_only) = match read_head(&mut sock).await? {
        Head::Complete(head) => {
            let head_only = head.starts_with(b"HEAD ");
            (route(&head, state), head_only)
        }
        Head::TooLarge => (
            Response::text(
                "431 Request Header Fields Too Large",
                "request head too large\n",
            ),
            false,
        ),
        Head::Closed => return Ok(()),
    };
    let mut out = format!(
        "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
        resp.status,
        resp.content_type,
        resp.body.len()
    );
    if resp.allow {
        out.push_str("Allow: GET, HEAD\r\n");
    }
    out.push_str("\r\n");
    if !head_only {
        out.push_str(&resp.body);
    }
    sock.write_all(out.as_bytes()).await?;
    sock.shutdown().await?;
    // Lingering close: closing with unread request bytes (a body, an
    // oversized head) makes the kernel send RST, which can destroy the
    // response before the client reads it. Drain a bounded amount first.
    let mut sink = [0u8; 4096];
    let mut left = 1usize << 20;
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while let Ok(n @ 1..) = sock.read(&mut sink).await {
            left = left.saturating_sub(n);
            if left == 0 {
                break;
            }
        }
    })
    .await;
    Ok(())
}

enum Head {
    Complete(Vec<u8>),
    TooLarge,
    /// The client closed before finishing its request: nothing to answer.
    Closed,
}

/// Reads up to the blank line ending the request head; a body, if any, is
/// ignored (no endpoint takes one).
async fn read_head(sock: &mut TcpStream) -> std::io::Result<Head> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    loop {
        if let Some(end) = find_end(&head) {
            head.truncate(end);
            return Ok(Head::Complete(head));
        }
        if head.len() > MAX_HEAD {
            return Ok(Head::TooLarge);
        }
        let n = sock.read(&mut buf).await?;
        if n == 0 {
            return Ok(Head::Closed);
        }
        head.extend_from_slice(&buf[..n]);
    }
}

/// End of the head: CRLF CRLF, or bare LF LF from hand-typed requests.
fn find_end(b: &[u8]) -> Option<usize> {
    let crlf = b.windows(4).position(|w| w == b"\r\n\r\n");
    let lf = b.windows(2).position(|w| w == b"\n\n");
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn route(head: &[u8], state: &AdminState) -> Response {
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let Ok(line) = std::str::from_utf8(line) else {
        return Response::text("400 Bad Request", "request line is not UTF-8\n");
    };
    let parts: Vec<&str> = line.trim_end_matches('\r').split(' ').collect();
    let [method, target, version] = parts[..] else {
        return Response::text("400 Bad Request", "malformed request line\n");
    };
    if !version.starts_with("HTTP/1.") || !target.starts_with('/') {
        return Response::text("400 Bad Request", "expected `GET /path HTTP/1.1`\n");
    }
    let path = target.split('?').next().unwrap_or(target);
    let known = ["/metrics", "/healthz", "/readyz", "/config", "/targets"];
    if !known.contains(&path) {
        return Response::text(
            "404 Not Found",
            "endpoints: /metrics /healthz /readyz /config /targets\n",
        );
    }
    if method != "GET" && method != "HEAD" {
        let mut r = Response::text("405 Method Not Allowed", "use GET\n");
        r.allow = true;
        return r;
    }
    match path {
        "/metrics" => Response {
            status: "200 OK",
            content_type: prometheus_text::CONTENT_TYPE,
            body: metrics::render(&state.registry),
            allow: false,
        },
        // Liveness: the runtime answers, nothing more; restarting a proxy
        // because a target is down would only make things worse.
        "/healthz" => Response::text("200 OK", "ok\n"),
        "/readyz" if state.readiness.is_ready() => Response::text("200 OK", "ready\n"),
        "/readyz" => Response::text(
            "503 Service Unavailable",
            "not ready: starting (config, listeners) or draining\n",
        ),
        "/config" => match state.config.load_full() {
            Some(c) => Response::json(&config_json(&c)),
            None => Response::text("503 Service Unavailable", "no config loaded yet\n"),
        },
        _ => Response::json(&targets_json(&state.balancers.load())),
    }
}

/// The config in force in the file's own format, so it can be diffed
/// against the file (a rejected reload shows up as a difference).
pub fn config_json(c: &Config) -> Value {
    let apps: Vec<Value> = c
        .apps
        .iter()
        .map(|a| {
            let mut v = json!({
                "Name": a.name,
                "Ports": a.ports,
                "Targets": a.targets.iter().map(|t| t.to_string()).collect::<Vec<_>>(),
                "Balance": a.balance.as_str(),
            });
            if let Some(p) = a.proxy_protocol {
                v["ProxyProtocol"] = match p {
                    ProxyProtocol::V1 => "v1",
                    ProxyProtocol::V2 => "v2",
                }
                .into();
            }
            v
        })
        .collect();
    json!({ "Apps": apps })
}

/// Every target of every app in force, with its health.
pub fn targets_json(balancers: &[Arc<Balancer>]) -> Value {
    let mut balancers = balancers.to_vec();
    balancers.sort_by(|a, b| a.app.cmp(&b.app));
    let apps: Vec<Value> = balancers
        .iter()
        .map(|b| {
            let targets: Vec<Value> = b
                .backends
                .iter()
                .map(|t| {
                    let h = t.health.snapshot();
                    json!({
                        "target": t.target.to_string(),
                        "state": if h.up { "up" } else { "down" },
                        "consecutive_successes": h.successes,
                        "consecutive_failures": h.failures,
                        "active_connections": t.active(),
                        "transitions_up": h.went_up,
                        "transitions_down": h.went_down,
                    })
                })
                .collect();
            json!({ "app": &*b.app, "balance": b.policy.as_str(), "targets": targets })
        })
        .collect();
    json!({ "apps": apps })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(req: &str, m: &AdminState) -> &'static str {
        route(req.as_bytes(), m).status
    }

    #[test]
    fn routes_and_errors() {
        let mut registry = Registry::default();
        let readiness = Readiness::register(&mut registry);
        let m = AdminState::new(registry, readiness);
        assert_eq!(status("GET /healthz HTTP/1.1\r\nHost: x", &m), "200 OK");
        assert_eq!(status("GET /metrics?x=1 HTTP/1.0", &m), "200 OK");
        assert_eq!(status("HEAD /metrics HTTP/1.1", &m), "200 OK");
        assert_eq!(
            status("GET /readyz HTTP/1.1", &m),
            "503 Service Unavailable"
        );
        m.readiness().set(true);
        assert_eq!(status("GET /readyz HTTP/1.1", &m), "200 OK");
        assert!(route(b"GET /metrics HTTP/1.1", &m)
            .body
            .contains("proxy_ready 1\n"));
        assert_eq!(
            status("GET /config HTTP/1.1", &m),
            "503 Service Unavailable"
        );
        m.publish(&Config { apps: Vec::new() }, Vec::new());
        assert_eq!(status("GET /config HTTP/1.1", &m), "200 OK");
        assert_eq!(status("GET /nope HTTP/1.1", &m), "404 Not Found");
        assert_eq!(
            status("POST /metrics HTTP/1.1", &m),
            "405 Method Not Allowed"
        );
        assert!(route(b"DELETE /config HTTP/1.1", &m).allow);
        for bad in [
            "",
            "GET",
            "GET /metrics",
            "GET metrics HTTP/1.1",
            "GET / SPDY/3",
            "\u{ff}",
        ] {
            assert_eq!(status(bad, &m), "400 Bad Request", "{bad:?}");
        }
        assert_eq!(route(b"GET /x\xff HTTP/1.1", &m).status, "400 Bad Request");
    }

    #[test]
    fn config_round_trips_through_the_parser() {
        let text = r#"{"Apps":[{"Name":"a","Ports":[1,2],"Targets":["h:1","[::1]:2"],"Balance":"round_robin","ProxyProtocol":"v1"}]}"#;
        let c = Config::parse(text, "t").unwrap();
        let again = Config::parse(&config_json(&c).to_string(), "t").unwrap();
        assert_eq!(c, again);
    }

    #[test]
    fn head_end() {
        assert_eq!(find_end(b"GET / HTTP/1.1\r\n\r\nbody"), Some(14));
        assert_eq!(find_end(b"GET / HTTP/1.1\n\n"), Some(14));
        assert_eq!(find_end(b"GET / HTTP/1.1\r\n"), None);
    }
}
