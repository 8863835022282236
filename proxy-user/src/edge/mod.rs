//! The client side: listening sockets (one per port, or one steered by
//! sk_lookup), admission against the connection limits, and each accepted
//! connection's life from connect to its close record.

use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;

use crate::config::{AcceptProxy, ProxyProtocol};
use crate::dataplane::{DataPlane, Rules, SocketBuffers};
use crate::ops::access_log::AccessLog;
use crate::ops::metrics::{AppMetrics, Metrics};
use crate::upstream::balancer::Balancer;
use crate::upstream::connect::ConnectPolicy;
use crate::upstream::loop_guard::LoopGuard;

mod accept_proxy;
mod admission;
pub mod conn;
pub mod handover;
pub mod listener;
mod live;
pub mod per_client;
pub mod steering;
pub mod tracker;

pub use live::FlushClock;
use per_client::ClientCounts;
use tracker::Tracker;

/// State shared by every listener and connection.
pub struct Shared {
    pub plane: DataPlane,
    pub policy: ConnectPolicy,
    /// Refuses targets that resolve to our own listeners.
    pub loop_guard: Arc<LoopGuard>,
    /// The timeouts and signals every connection gets (`ConnInfo::rules`):
    /// the drain deadline and an upgrade's park request come through its
    /// `signals`.
    pub rules: Arc<Rules>,
    /// Set on every upstream socket (client sockets inherit the listener's).
    pub socket_buffers: SocketBuffers,
    pub tracker: Arc<Tracker>,
    /// Global connection cap.
    pub global: Arc<Semaphore>,
    pub global_cap: usize,
    /// Each app's own cap (its `AppRuntime::permits` start with this many).
    pub per_app_cap: usize,
    /// Apps in the config in force: sets the fair share of the global cap.
    pub apps: AtomicUsize,
    /// Accept loops wait for this to turn true: at once on a plain start,
    /// only once the old process stopped accepting on a takeover.
    pub accepting: watch::Receiver<bool>,
    /// Upgrades: parks userspace connections and hands them out.
    pub handover: handover::Handover,
    pub next_id: AtomicU64,
    pub limit_log: RateLimit,
    /// Paces "all connect attempts failed" warnings.
    pub connect_fail_log: RateLimit,
    pub metrics: Arc<Metrics>,
    /// `--access-log`: close lines as JSON to a file of their own.
    pub access_log: Option<AccessLog>,
    /// False: no "connection closed" line in the log (`--no-connection-log`;
    /// the access log still has every connection).
    pub log_connections: bool,
    /// Paces live connections adding their bytes to `proxy_bytes_total`
    /// (`--bytes-flush-interval`); None: at close only.
    pub flush_clock: Option<Arc<FlushClock>>,
    /// `--max-connections-per-client`, over all apps.
    pub per_client_cap: Option<usize>,
    pub per_client: Arc<ClientCounts>,
}

/// One app's runtime state, shared by all of its listeners. Immutable: a
/// reload that changes the app installs a new one (same `permits`), and
/// connections already running keep the one they started with.
pub struct AppRuntime {
    pub balancer: Arc<Balancer>,
    /// Per-app cap: isolation between apps.
    pub permits: Arc<Semaphore>,
    pub metrics: AppMetrics,
    pub proxy_protocol: Option<ProxyProtocol>,
    pub accept_proxy: Option<AcceptProxy>,
    /// The app's `MaxConnectionsPerClient`, counted in `clients` (which a
    /// reload hands on, like `permits`).
    pub max_per_client: Option<usize>,
    pub clients: Arc<ClientCounts>,
}

/// Which app a listening port serves; swapped by a reload without closing
/// the socket, so moving a port between apps refuses no client.
pub type AppSlot = Arc<ArcSwap<AppRuntime>>;

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
