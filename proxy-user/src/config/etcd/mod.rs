//! The app table from etcd (`--config-etcd`) instead of a file.
//!
//! Keys under a prefix (`table`) are read at one revision, then watched
//! from the next; every revision becomes config text that goes through the
//! same validate-then-diff reload as a file change. The last applied one is
//! kept on disk (`cache`) for a start while etcd is unreachable.

use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::metric::registered;

pub mod cache;
pub mod table;
mod watcher;

pub use watcher::{first, spawn, Snapshot};

/// Where the table is: `--config-etcd`, `--config-etcd-prefix`,
/// `--config-etcd-cache`.
#[derive(Debug, Clone)]
pub struct EtcdSettings {
    pub endpoints: Vec<String>,
    /// Ends with `/`: `<prefix>apps/<name>`, `<prefix>targets/<app>/<id>`.
    pub prefix: String,
    pub cache: Option<std::path::PathBuf>,
    /// How long the first read may take before the cache is used.
    pub start_timeout: Duration,
}

impl EtcdSettings {
    /// Names this source in logs and errors.
    pub fn describe(&self) -> String {
        format!("etcd {} prefix {}", self.endpoints.join(","), self.prefix)
    }
}

/// The series of the etcd source.
#[derive(Debug, Clone, Default)]
pub struct EtcdMetrics {
    /// The etcd revision of the config in force.
    pub revision: Gauge,
    /// 1 while the watch is established.
    pub connected: Gauge,
    /// 1 while the config in force came from the cache file.
    pub from_cache: Gauge,
    /// Watch connections lost (each is followed by a reconnect).
    pub disconnects: Counter,
}

impl EtcdMetrics {
    pub fn register(r: &mut Registry) -> EtcdMetrics {
        EtcdMetrics {
            revision: registered(
                r,
                "proxy_config_etcd_revision",
                "etcd revision of the config in force (--config-etcd)",
            ),
            connected: registered(
                r,
                "proxy_config_etcd_connected",
                "1 while the etcd watch is established",
            ),
            from_cache: registered(
                r,
                "proxy_config_etcd_from_cache",
                "1 while the config in force was read from --config-etcd-cache, not etcd",
            ),
            disconnects: registered(
                r,
                "proxy_config_etcd_disconnects",
                "etcd watch connections lost (each is retried with back-off)",
            ),
        }
    }
}
