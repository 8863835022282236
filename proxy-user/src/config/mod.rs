//! Loading and validating `config.json` (Fly's format).
//!
//! The file is read with limits (`file`), parsed refusing duplicate keys
//! (`json`) and validated in one pure pass before anything is bound or
//! spawned, so a hot reload can reject a bad file without disturbing the
//! running proxy. Every problem is reported with its field path
//! (`Apps[1].Ports[2]`), the bad value and a fix.

use std::fmt;

mod accept;
pub mod etcd;
pub mod file;
mod health;
mod json;
pub mod own;
mod ports;
mod target;
#[cfg(test)]
mod tests;
mod validate;
pub mod watch;

pub use accept::AcceptProxy;
pub use health::{HealthCheck, MAX_PROBE_BYTES};
pub use own::Listen;
#[cfg(test)]
pub use target::parse_target;

/// Largest port range accepted in one entry with one listener per port, so
/// a typo like `"1-65535"` must not silently open 65k sockets.
pub const MAX_RANGE_PORTS: u32 = 1024;

/// With `--steering sk_lookup` a port is a map entry, not a socket: any
/// range is fine.
pub const ANY_RANGE: u32 = 65_535;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub apps: Vec<App>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct App {
    pub name: String,
    pub ports: Vec<u16>,
    pub targets: Vec<Target>,
    pub balance: Balance,
    /// Send a PROXY protocol header to targets so they see the real client.
    pub proxy_protocol: Option<ProxyProtocol>,
    /// The app's own probe settings (`HealthCheck`); None: the flags'.
    pub health: Option<HealthCheck>,
    /// Clients come behind a PROXY protocol header (`AcceptProxyProtocol`).
    pub accept_proxy: Option<AcceptProxy>,
    /// Most connections one client address may hold in this app.
    pub max_per_client: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyProtocol {
    V1,
    V2,
}

/// An upstream as written in the config. Resolved at connect time, never at
/// load time: targets may move and DNS may be down when we start.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Balance {
    /// Power of two random choices, pick the one with fewer active connections.
    #[default]
    LeastConn,
    RoundRobin,
    Random,
}

impl Balance {
    pub fn as_str(self) -> &'static str {
        match self {
            Balance::LeastConn => "least_conn",
            Balance::RoundRobin => "round_robin",
            Balance::Random => "random",
        }
    }
}

/// What validation needs to know about the proxy that will run the config.
#[derive(Debug, Clone)]
pub struct Context {
    /// Largest port range one `Ports` entry may cover.
    pub max_range: u32,
    /// Where our listeners are reached: a target there on one of our ports
    /// is the proxy itself.
    pub listen: Listen,
    /// Ports of ours that are not in the config (a fixed `--steering-port`).
    pub extra_ports: Vec<u16>,
    /// An empty `Apps` is fine: a table in etcd is empty until the first
    /// app is written, or once the last is removed; in a file it is a
    /// mistake.
    pub allow_no_apps: bool,
}

impl Default for Context {
    /// The defaults of the flags: one listener per port on 0.0.0.0.
    fn default() -> Self {
        Context {
            max_range: MAX_RANGE_PORTS,
            listen: Listen::default(),
            extra_ports: Vec::new(),
            allow_no_apps: false,
        }
    }
}

impl Config {
    /// Parses config text; `source` names the file in error messages.
    #[cfg(test)]
    pub fn parse(text: &str, source: &str) -> anyhow::Result<Config> {
        Config::parse_with(text, source, &Context::default())
    }

    /// Like `parse`, for a proxy described by `ctx`.
    pub fn parse_with(text: &str, source: &str, ctx: &Context) -> anyhow::Result<Config> {
        let mut errors = Vec::new();
        let value = json::parse(text, &mut errors).map_err(|e| {
            // serde_json ends its message with the position, said first here.
            let (line, column) = (e.line(), e.column());
            let what = e.to_string();
            let what = what
                .strip_suffix(&format!(" at line {line} column {column}"))
                .unwrap_or(&what);
            anyhow::anyhow!(
                "{source}: invalid JSON at line {line} column {column}: {what}; \
                 fix the syntax there (often a missing or extra comma, quote or bracket just before it)"
            )
        })?;
        let config = validate::validate(&value, &mut errors, ctx);
        if errors.is_empty() {
            if let Some(config) = config {
                return Ok(config);
            }
        }
        let n = errors.len();
        let list = errors
            .iter()
            .map(|e| format!("  {source}: {e}"))
            .collect::<Vec<_>>()
            .join("\n");
        anyhow::bail!(
            "{source}: {n} problem{} in config:\n{list}",
            if n == 1 { "" } else { "s" }
        )
    }

    /// Every (app index, port) pair, in config order.
    pub fn listeners(&self) -> impl Iterator<Item = (usize, u16)> + '_ {
        self.apps
            .iter()
            .enumerate()
            .flat_map(|(i, app)| app.ports.iter().map(move |p| (i, *p)))
    }
}
