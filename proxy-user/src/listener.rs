//! Listening sockets, accept loops, connection limits and the per-connection
//! task (connect, carry, log).

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::Context;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::access_log::{self, AccessLog};
use crate::balancer::Balancer;
use crate::config::ProxyProtocol;
use crate::connect::{self, ConnectPolicy};
use crate::dataplane::{ConnInfo, DataPlane, EndReason, Transfer};
use crate::lifecycle::Tracker;
use crate::metrics::{AppMetrics, Limit, Metrics};

/// Backlog per listener: large enough to absorb bursts while we back off
/// from fd exhaustion, small enough not to hide a dead proxy for long.
const BACKLOG: u32 = 1024;

/// State shared by every listener and connection.
pub struct Shared {
    pub plane: DataPlane,
    pub policy: ConnectPolicy,
    pub idle_timeout: Option<Duration>,
    pub tracker: Arc<Tracker>,
    /// Global connection cap.
    pub global: Arc<Semaphore>,
    pub hard_stop: watch::Receiver<bool>,
    pub next_id: AtomicU64,
    pub limit_log: RateLimit,
    pub metrics: Arc<Metrics>,
    /// `--access-log`: close lines as JSON to a file of their own.
    pub access_log: Option<AccessLog>,
}

/// One app's runtime state, shared by all of its listeners. Immutable: a
/// reload that changes the app installs a new one (same `permits`), and
/// connections already running keep the one they started with.
pub struct AppRuntime {
    pub balancer: Arc<Balancer>,
    /// Per-app cap: isolation between apps.
    pub permits: Arc<Semaphore>,
    pub metrics: Arc<AppMetrics>,
    pub proxy_protocol: Option<ProxyProtocol>,
}

/// Which app a listening port serves; swapped by a reload without closing
/// the socket, so moving a port between apps refuses no client.
pub type AppSlot = Arc<RwLock<Arc<AppRuntime>>>;

fn current(slot: &AppSlot) -> Arc<AppRuntime> {
    slot.read().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Logs at most once per second, counting what it swallowed, so a flood
/// cannot turn into a log flood.
#[derive(Default)]
pub struct RateLimit {
    state: Mutex<(Option<Instant>, u64)>,
}

impl RateLimit {
    /// Returns Some(suppressed count) when the caller should log now.
    pub fn check(&self) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        match s.0 {
            Some(last) if now.duration_since(last) < Duration::from_secs(1) => {
                s.1 += 1;
                None
            }
            _ => {
                let suppressed = s.1;
                *s = (Some(now), 0);
                Some(suppressed)
            }
        }
    }
}

pub fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .context("cannot create socket")?;
    // Restarting must not fail on the previous process's TIME_WAIT sockets.
    sock.set_reuseaddr(true)
        .context("cannot set SO_REUSEADDR")?;
    if addr.is_ipv6() {
        // `::` should take IPv4 clients too, whatever the sysctl default.
        socket2::SockRef::from(&sock)
            .set_only_v6(false)
            .context("cannot clear IPV6_V6ONLY")?;
    }
    sock.bind(addr)
        .with_context(|| format!("cannot bind {addr}"))?;
    sock.listen(BACKLOG)
        .with_context(|| format!("cannot listen on {addr}"))
}

/// Errors that mean "out of fds/memory": retrying at once would spin.
fn is_resource_exhaustion(e: &io::Error) -> bool {
    connect::is_local_resource_error(e)
}

pub async fn accept_loop(
    listener: TcpListener,
    port: u16,
    slot: AppSlot,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let label = format!("{} port {port}", current(&slot).balancer.app);
    accept_until_stopped(&listener, &label, &shared, &mut stop, |sock, peer| {
        admit(sock, peer, port, &current(&slot), &shared)
    })
    .await;
    // Clients whose handshake the kernel already completed are served, not
    // reset: a reload that removes this port must not break them.
    while let Ok(Ok((sock, peer))) = tokio::time::timeout(Duration::ZERO, listener.accept()).await {
        admit(sock, peer, port, &current(&slot), &shared);
    }
    // Dropping the listener closes the port: new clients get refused
    // instead of queueing behind a proxy that is going away.
    drop(listener);
}

/// Accepts until `stop`, handing each connection to `on_accept`. Out of fds
/// or memory it backs off (100 ms doubling to 1 s) instead of spinning, and
/// recovers by itself when fds free up; other errors (a client gone before
/// the accept) are logged and skipped. `label` names the listener in logs.
pub(crate) async fn accept_until_stopped(
    listener: &TcpListener,
    label: &str,
    shared: &Shared,
    stop: &mut watch::Receiver<bool>,
    mut on_accept: impl FnMut(TcpStream, SocketAddr),
) {
    let mut backoff = Duration::ZERO;
    let err_log = RateLimit::default();
    loop {
        let accepted = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((sock, peer)) => {
                backoff = Duration::ZERO;
                on_accept(sock, peer);
            }
            Err(e) if is_resource_exhaustion(&e) => {
                shared
                    .metrics
                    .accept_resource_errors
                    .fetch_add(1, Ordering::Relaxed);
                // The pending connection stays in the backlog; try again
                // once some fds may have been freed.
                backoff = (backoff * 2).clamp(Duration::from_millis(100), Duration::from_secs(1));
                if let Some(suppressed) = err_log.check() {
                    tracing::warn!(listener = label, error = %e, backoff_ms = backoff.as_millis() as u64, suppressed, "accept failed: out of resources, backing off");
                }
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
            }
            Err(e) => {
                // ECONNABORTED and friends: that one client is gone, the
                // listener is fine.
                if let Some(suppressed) = err_log.check() {
                    tracing::debug!(listener = label, error = %e, suppressed, "accept failed, continuing");
                }
                // Unknown persistent errors must not spin a core.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
}

pub(crate) fn admit(
    sock: TcpStream,
    peer: SocketAddr,
    port: u16,
    app: &Arc<AppRuntime>,
    shared: &Arc<Shared>,
) {
    app.metrics.accepted();
    let permits = match (
        app.permits.clone().try_acquire_owned(),
        shared.global.clone().try_acquire_owned(),
    ) {
        (Ok(a), Ok(g)) => (a, g),
        (a, _g) => {
            let which = if a.is_err() {
                Limit::PerApp
            } else {
                Limit::Global
            };
            app.metrics.rejected(which);
            if let Some(suppressed) = shared.limit_log.check() {
                tracing::warn!(app = %app.balancer.app, port, client = %peer, limit = which.as_str(), suppressed, end = EndReason::Limit.as_str(), "connection limit reached, rejecting new connections");
            }
            // RST, not FIN: the client must not read an empty stream as a
            // complete response.
            let _ = socket2::SockRef::from(&sock).set_linger(Some(Duration::ZERO));
            drop(sock);
            return;
        }
    };
    let tracked = shared.tracker.track();
    let active = app.metrics.open();
    let app = app.clone();
    let shared = shared.clone();
    tokio::spawn(async move {
        handle(sock, peer, port, &app, &shared, permits).await;
        drop(active);
        drop(tracked);
    });
}

async fn handle(
    client: TcpStream,
    peer: SocketAddr,
    port: u16,
    app: &AppRuntime,
    shared: &Shared,
    _permits: (OwnedSemaphorePermit, OwnedSemaphorePermit),
) {
    let started = Instant::now();
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let _ = client.set_nodelay(true);
    let info_base = |target: String, upstream: SocketAddr| ConnInfo {
        id,
        app: app.balancer.app.clone(),
        listen_port: port,
        client: peer,
        target,
        upstream,
        idle_timeout: shared.idle_timeout,
        hard_stop: shared.hard_stop.clone(),
    };
    let mut hard_stop = shared.hard_stop.clone();
    let connected = tokio::select! {
        r = connect::connect(&app.balancer, &shared.policy) => r,
        _ = hard_stop.wait_for(|s| *s) => {
            log_close(shared, id, app, port, peer, "-", 0, started, &Transfer { client_to_target: 0, target_to_client: 0, userspace_bytes: 0, end: EndReason::DrainTimeout, plane: "none" });
            return;
        }
    };
    match connected {
        Err(failed) => {
            tracing::warn!(conn = id, app = %app.balancer.app, port, client = %peer, attempts = failed.attempts, error = %format!("{:#}", failed.last_error), "all connect attempts failed, closing client");
            let t = Transfer {
                client_to_target: 0,
                userspace_bytes: 0,
                target_to_client: 0,
                end: EndReason::ConnectFailed,
                plane: "none",
            };
            drop(client);
            log_close(
                shared,
                id,
                app,
                port,
                peer,
                "-",
                failed.attempts,
                started,
                &t,
            );
        }
        Ok(mut c) => {
            let target = c.guard.backend().target.to_string();
            if let Some(version) = app.proxy_protocol {
                if let Err(e) = send_proxy_header(&client, &mut c.stream, peer, version).await {
                    tracing::debug!(conn = id, error = %e, "sending PROXY header failed");
                    let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
                    let t = Transfer {
                        client_to_target: 0,
                        userspace_bytes: 0,
                        target_to_client: 0,
                        end: EndReason::TargetReset,
                        plane: "none",
                    };
                    log_close(
                        shared, id, app, port, peer, &target, c.attempts, started, &t,
                    );
                    return;
                }
            }
            let info = info_base(target.clone(), c.peer);
            let t = shared.plane.carry(client, c.stream, &info).await;
            drop(c.guard);
            log_close(
                shared, id, app, port, peer, &target, c.attempts, started, &t,
            );
        }
    }
}

/// Writes the PROXY header before any client byte can reach the target
/// (the data plane starts only after this returns).
async fn send_proxy_header(
    client: &TcpStream,
    upstream: &mut TcpStream,
    peer: SocketAddr,
    version: ProxyProtocol,
) -> io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let local = client.local_addr()?;
    let header = crate::proxy_protocol::header(version, peer, local);
    // A fresh socket's send buffer takes ~100 bytes at once; the timeout
    // only guards against a target that accepted and then froze.
    tokio::time::timeout(Duration::from_secs(5), upstream.write_all(&header))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "PROXY header write timed out"))?
}

/// The one line per connection. `bytes_in` is client→target and
/// `bytes_out` target→client, as seen from the client's side of the proxy
/// (HAProxy's and Envoy's convention for "received"/"sent" by the listener).
#[allow(clippy::too_many_arguments)]
fn log_close(
    shared: &Shared,
    id: u64,
    app: &AppRuntime,
    port: u16,
    client: SocketAddr,
    target: &str,
    attempts: u32,
    started: Instant,
    t: &Transfer,
) {
    app.metrics.finished(t, attempts);
    let duration_ms = started.elapsed().as_millis() as u64;
    if let Some(log) = &shared.access_log {
        log.record(&access_log::Entry {
            ts: access_log::rfc3339(std::time::SystemTime::now()),
            conn: id,
            app: &app.balancer.app,
            port,
            client: client.to_string(),
            target,
            attempts,
            bytes_in: t.client_to_target,
            bytes_out: t.target_to_client,
            userspace_bytes: t.userspace_bytes,
            duration_ms,
            plane: t.plane,
            end: t.end.as_str(),
        });
    }
    tracing::info!(
        conn = id,
        app = %app.balancer.app,
        port,
        client = %client,
        target,
        attempts,
        bytes_in = t.client_to_target,
        bytes_out = t.target_to_client,
        userspace_bytes = t.userspace_bytes,
        duration_ms,
        plane = t.plane,
        end = t.end.as_str(),
        "connection closed"
    );
}
