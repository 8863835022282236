//! The admin listener (`--admin-address`, off by default): `/metrics`,
//! `/healthz`, `/readyz`, `/config`, `/targets`, and with
//! `--admin-token-file` the write API (`write`: drain, disable, enable a
//! target).
//!
//! A deliberately tiny HTTP/1.1 server on tokio (one request per connection,
//! `Connection: close`): scrapers and probes need nothing more, and a full
//! HTTP stack would be most of the binary. Every request is bounded in size,
//! time and concurrency, so the admin port cannot be used to exhaust the
//! proxy.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use arc_swap::{ArcSwap, ArcSwapOption};
use prometheus_client::encoding::prometheus_text;
use prometheus_client::registry::Registry;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::AbortHandle;

use crate::ops::metrics;
use crate::ops::readiness::Readiness;
use crate::upstream::balancer::Balancer;
use http::{Head, Response};
pub use write::Token;

mod http;
mod write;

/// Time to send the request head; a probe sends it with the connect.
const HEAD_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections waiting for their head at once; beyond it the oldest goes.
const MAX_WAITING: usize = 1024;
/// Answers made at once (rendering /metrics is the costly one).
const MAX_BUSY: usize = 64;
/// Answers being sent at once: each holds its body until the client read
/// it (or `REQUEST_TIMEOUT`), so this bounds their memory.
const MAX_SENDING: usize = 1024;
/// Answering one request, so a client that reads nothing cannot hold a task
/// and an fd for long.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// What the endpoints answer from: every registered metric, readiness,
/// and what the server last published as in force (on start and on each
/// applied reload).
pub struct AdminState {
    registry: Registry,
    readiness: Readiness,
    /// The text of the config in force, as the file had it.
    config_text: ArcSwapOption<ConfigText>,
    balancers: ArcSwap<Vec<Arc<Balancer>>>,
    /// Where the config in force came from, when not the file (etcd: its
    /// revision); shown as `Source` in `/config`.
    source: ArcSwapOption<Value>,
    /// None: the write API answers 403.
    token: Option<Token>,
}

impl AdminState {
    pub fn new(registry: Registry, readiness: Readiness) -> AdminState {
        AdminState {
            registry,
            readiness,
            config_text: ArcSwapOption::empty(),
            balancers: ArcSwap::default(),
            source: ArcSwapOption::empty(),
            token: None,
        }
    }

    /// Turns the write API on, for requests carrying `token`.
    pub fn with_token(mut self, token: Option<Token>) -> AdminState {
        self.token = token;
        self
    }

    pub fn readiness(&self) -> &Readiness {
        &self.readiness
    }

    /// The text of the config in force (`/config`).
    pub fn publish_text(&self, text: ConfigText) {
        self.config_text.store(Some(Arc::new(text)));
    }

    /// The balancers of the config in force, for `/targets`.
    pub fn publish(&self, balancers: Vec<Arc<Balancer>>) {
        self.balancers.store(Arc::new(balancers));
    }
}

impl AdminState {
    /// Where the config in force came from (etcd revision, cache).
    pub fn publish_source(&self, source: Value) {
        self.source.store(Some(Arc::new(source)));
    }
}

pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot bind --admin-address {addr}"))
}

/// A config file's text and its SHA-256 (hex).
pub struct ConfigText {
    pub text: String,
    pub sha256: String,
}

impl ConfigText {
    pub fn new(text: &str) -> ConfigText {
        use sha2::{Digest, Sha256};
        let digest = Sha256::digest(text.as_bytes());
        ConfigText {
            text: text.to_string(),
            sha256: digest.iter().map(|b| format!("{b:02x}")).collect(),
        }
    }
}

/// Serves admin requests until the task is dropped.
///
/// A connection first waits for its request head (at most `HEAD_TIMEOUT`);
/// up to `MAX_WAITING` may wait at once, and beyond that the one that has
/// waited longest is dropped to make room. Probes send their head at once,
/// so idle or slow connections, however many, cannot keep `/healthz` from
/// answering. Answering is then limited to `MAX_BUSY` at a time. With a
/// `gate`, nothing is accepted until it opens.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AdminState>,
    gate: Option<tokio::sync::watch::Receiver<bool>>,
) {
    if let Some(mut gate) = gate {
        if gate.wait_for(|open| *open).await.is_err() {
            return;
        }
    }
    let busy = Arc::new(Semaphore::new(MAX_BUSY));
    let sending = Arc::new(Semaphore::new(MAX_SENDING));
    let waiting: Arc<Mutex<Waiting>> = Arc::default();
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            // Out of fds: the data path matters more; try again shortly.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let (state, busy, queue) = (state.clone(), busy.clone(), waiting.clone());
        let sending = sending.clone();
        let id = lock(&waiting).next_id();
        let task = tokio::spawn(async move {
            let _waiting = Waited(queue.clone(), id);
            let head = tokio::time::timeout(HEAD_TIMEOUT, http::read_head(&sock)).await;
            drop(_waiting);
            let Ok(Ok(head)) = head else { return };
            let Ok(_sending) = sending.acquire().await else {
                return;
            };
            // The permit covers making the answer (the /metrics render),
            // not sending it: a client that reads slowly, or keeps its
            // socket open after the answer (the lingering close waits up to
            // a second for it), held one before, and 64 of them kept the
            // next probe waiting.
            let answer = {
                let Ok(_permit) = busy.acquire().await else {
                    return;
                };
                answer(head, &state)
            };
            if let Some((resp, head_only)) = answer {
                let sent = http::respond(&mut sock, &resp, head_only);
                let _ = tokio::time::timeout(REQUEST_TIMEOUT, sent).await;
            }
        });
        lock(&waiting).push(id, task.abort_handle());
    }
}

/// Connections still waiting for their request head, oldest first.
#[derive(Default)]
struct Waiting {
    last_id: u64,
    conns: VecDeque<(u64, AbortHandle)>,
}

impl Waiting {
    fn next_id(&mut self) -> u64 {
        self.last_id += 1;
        self.last_id
    }

    fn push(&mut self, id: u64, task: AbortHandle) {
        if task.is_finished() {
            return;
        }
        self.conns.push_back((id, task));
        if self.conns.len() > MAX_WAITING {
            if let Some((_, oldest)) = self.conns.pop_front() {
                oldest.abort();
            }
        }
    }

    fn remove(&mut self, id: u64) {
        if let Some(i) = self.conns.iter().position(|(c, _)| *c == id) {
            self.conns.remove(i);
        }
    }
}

/// Takes a connection off the waiting list however its wait ends.
struct Waited(Arc<Mutex<Waiting>>, u64);

impl Drop for Waited {
    fn drop(&mut self) {
        lock(&self.0).remove(self.1);
    }
}

fn lock(w: &Mutex<Waiting>) -> std::sync::MutexGuard<'_, Waiting> {
    // The list is consistent after every call; a panic cannot break it.
    w.lock().unwrap_or_else(|p| p.into_inner())
}

/// The response to `head`, and whether to send its head only (None: the
/// client closed before finishing its request).
fn answer(head: Head, state: &AdminState) -> Option<(Response, bool)> {
    Some(match head {
        Head::Complete(head) => (route(&head, state), head.starts_with(b"HEAD ")),
        Head::TooLarge => (
            Response::text(
                "431 Request Header Fields Too Large",
                "request head too large\n",
            ),
            false,
        ),
        Head::Closed => return None,
    })
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
    if write::is_write_path(path) {
        if method != "POST" {
            return Response::text("405 Method Not Allowed", "use POST\n")
                .with_headers("Allow: POST\r\n");
        }
        let Ok(head) = std::str::from_utf8(head) else {
            return Response::text("400 Bad Request", "request head is not UTF-8\n");
        };
        return write::post(head, path, state);
    }
    let known = ["/metrics", "/healthz", "/readyz", "/config", "/targets"];
    if !known.contains(&path) {
        return Response::text(
            "404 Not Found",
            "endpoints: /metrics /healthz /readyz /config /targets\n",
        );
    }
    if method != "GET" && method != "HEAD" {
        return Response::text("405 Method Not Allowed", "use GET\n")
            .with_headers("Allow: GET, HEAD\r\n");
    }
    match path {
        "/metrics" => Response {
            status: "200 OK",
            content_type: prometheus_text::CONTENT_TYPE,
            body: metrics::render(&state.registry),
            headers: "".into(),
        },
        // Liveness: the runtime answers, nothing more; restarting a proxy
        // because a target is down would only make things worse.
        "/healthz" => Response::text("200 OK", "ok\n"),
        "/readyz" if state.readiness.is_ready() => Response::text("200 OK", "ready\n"),
        "/readyz" => Response::text(
            "503 Service Unavailable",
            "not ready: starting (config, listeners) or draining\n",
        ),
        // The file's own text, so `diff <(curl -s .../config) config.json`
        // shows exactly what a rejected reload left out; its hash in a header.
        // From etcd: the table with `Source` (revision, cache) added.
        "/config" => match state.config_text.load_full() {
            Some(c) => {
                let headers = format!("X-Config-Sha256: {}\r\n", c.sha256).into();
                match state.source.load_full() {
                    Some(source) => {
                        let mut body: Value = serde_json::from_str(&c.text).unwrap_or_default();
                        body["Source"] = (*source).clone();
                        Response {
                            headers,
                            ..Response::json(&body)
                        }
                    }
                    None => Response {
                        status: "200 OK",
                        content_type: "application/json",
                        body: c.text.clone(),
                        headers,
                    },
                }
            }
            None => Response::text("503 Service Unavailable", "no config loaded yet\n"),
        },
        _ => Response::json(&targets_json(&state.balancers.load())),
    }
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
                        "admin_state": t.rotation.get().as_str(),
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
        m.publish_text(ConfigText::new("{\"Apps\": []}\n"));
        let c = route(b"GET /config HTTP/1.1", &m);
        assert_eq!((c.status, c.body.as_str()), ("200 OK", "{\"Apps\": []}\n"));
        assert!(c.headers.starts_with("X-Config-Sha256: "), "{}", c.headers);
        assert_eq!(status("GET /nope HTTP/1.1", &m), "404 Not Found");
        assert_eq!(
            status("POST /metrics HTTP/1.1", &m),
            "405 Method Not Allowed"
        );
        assert!(route(b"DELETE /config HTTP/1.1", &m)
            .headers
            .starts_with("Allow: GET"));
        // Writes: off without a token file; then only with the token.
        let drain = "POST /targets/a/h:1/drain HTTP/1.1\r\n";
        assert_eq!(status(drain, &m), "403 Forbidden");
        let m = m.with_token(Some(Token::new("t0k")));
        assert_eq!(status(drain, &m), "401 Unauthorized");
        let authed = |req: &str| format!("{req}Authorization: Bearer t0k\r\n");
        assert_eq!(status(&authed(drain), &m), "404 Not Found");
        assert_eq!(
            status(&authed("POST /targets/a/h:1/maint HTTP/1.1\r\n"), &m),
            "400 Bad Request"
        );
        assert_eq!(
            status("GET /targets/a/h:1/drain HTTP/1.1", &m),
            "405 Method Not Allowed"
        );
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
}
