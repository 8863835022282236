//! What a server is started with, and what validating a config for it
//! needs to know about it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::config::etcd::EtcdSettings;
use crate::config::{self, Config, Listen};
use crate::dataplane::{CopyPlane, FastpathOptions, FinTimeouts, Mode, SocketBuffers};
use crate::edge::listener::listen_addr;
use crate::edge::steering::Steering;
use crate::upstream::connect::ConnectPolicy;
use crate::upstream::probe::HealthConfig;

/// Everything a server needs to start; `Cli::settings` fills it from flags.
#[derive(Debug, Clone)]
pub struct Settings {
    pub config: PathBuf,
    pub listen_address: String,
    pub mode: Mode,
    pub copy: CopyPlane,
    /// The splice plane's pipe per direction (`--splice-pipe`).
    pub splice_pipe: usize,
    pub fastpath: FastpathOptions,
    pub connect: ConnectPolicy,
    /// None: connections are never closed for being idle.
    pub idle_timeout: Option<Duration>,
    pub fin_timeouts: FinTimeouts,
    pub health: HealthConfig,
    pub socket_buffers: SocketBuffers,
    /// None: as many as the fd limit carries (`budget`).
    pub max_connections: Option<u32>,
    pub max_per_app: usize,
    /// `--max-connections-per-client`: per client address, over all apps.
    pub max_per_client: Option<usize>,
    pub drain_timeout: Duration,
    pub admin_address: Option<SocketAddr>,
    /// Turns on the admin write API for requests carrying this file's token.
    pub admin_token_file: Option<PathBuf>,
    pub access_log: Option<PathBuf>,
    /// False: no "connection closed" log line (the access log has them).
    pub log_connections: bool,
    /// How often live connections count their bytes; None: at close only.
    pub bytes_flush: Option<Duration>,
    pub steering: Steering,
    pub steering_port: u16,
    /// Zero: reload on SIGHUP (`Handle::reload`) only.
    pub watch_config: Duration,
    /// Where this proxy waits for a successor (`handoff`).
    pub handoff_socket: Option<std::path::PathBuf>,
    /// Start by taking over from the proxy waiting at this path.
    pub takeover: Option<std::path::PathBuf>,
    /// Some: the app table comes from etcd, and `config` is not read.
    pub etcd: Option<EtcdSettings>,
}

impl Settings {
    /// Validates `text` (from `source`, named in errors) as the config of
    /// this proxy; also returns where the proxy is reached, as read now (the
    /// host's addresses may have changed since the last reload).
    pub(super) fn parse_config(
        &self,
        text: &str,
        source: &str,
    ) -> anyhow::Result<(Config, Listen)> {
        let ip = listen_addr(&self.listen_address, 0)?.ip();
        let (max_range, extra_ports) = match self.steering {
            Steering::Listeners => (config::MAX_RANGE_PORTS, Vec::new()),
            // The steered socket's port is ours too, when it is known now.
            Steering::SkLookup => (
                config::ANY_RANGE,
                Some(self.steering_port)
                    .filter(|p| *p != 0)
                    .into_iter()
                    .collect(),
            ),
        };
        let ctx = config::Context {
            max_range,
            listen: Listen::on(ip),
            extra_ports,
            allow_no_apps: self.etcd.is_some(),
        };
        let config = Config::parse_with(text, source, &ctx)?;
        Ok((config, ctx.listen))
    }
}

/// `proxy --check`: reads and validates the config as `start` would, and
/// binds nothing. Ok: a one-line summary; Err: every problem found.
pub async fn check(settings: &Settings) -> anyhow::Result<String> {
    let text = config::file::read(&settings.config).await?;
    let source = settings.config.display().to_string();
    let (config, _) = settings.parse_config(&text, &source)?;
    let targets: usize = config.apps.iter().map(|a| a.targets.len()).sum();
    Ok(format!(
        "{}: config ok: {} apps, {} ports, {} targets",
        settings.config.display(),
        config.apps.len(),
        config.listeners().count(),
        targets
    ))
}
