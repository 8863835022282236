//! Wiring: config → listeners, balancers, probes → accept loops → drain,
//! and reloads (SIGHUP or a config file change) that change all of that
//! without dropping connections. With `--steering sk_lookup` one socket and
//! the BPF `PORTS` map stand in for the per-port listeners.
//!
//! `start` brings a server up in the calling runtime and hands back a
//! `Handle` (its addresses, reload, shutdown): the binary drives it from
//! signals (`run`), the tests drive it directly.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};

use crate::config::{self, watch as config_watch, Config};
use crate::dataplane::{CopyPlane, DataPlane, FastpathOptions, Mode};
use crate::edge::steering::Steering;
use crate::edge::tracker::Tracker;
use crate::edge::{RateLimit, Shared};
use crate::ops::access_log::AccessLog;
use crate::ops::admin;
use crate::ops::metrics::Metrics;
use crate::upstream::connect::ConnectPolicy;
use crate::upstream::health::HealthConfig;
use lifecycle::{Request, Signals};
use state::{State, Trigger};

pub(crate) mod lifecycle;
mod state;
mod steer;

/// Time connections get to write their log line after a hard stop.
const HARD_STOP_GRACE: Duration = Duration::from_secs(2);

/// Everything a server needs to start; `Cli::settings` fills it from flags.
#[derive(Debug, Clone)]
pub struct Settings {
    pub config: PathBuf,
    pub listen_address: String,
    pub mode: Mode,
    pub copy: CopyPlane,
    pub fastpath: FastpathOptions,
    pub connect: ConnectPolicy,
    /// None: connections are never closed for being idle.
    pub idle_timeout: Option<Duration>,
    pub health: HealthConfig,
    pub max_connections: u32,
    pub max_per_app: usize,
    pub drain_timeout: Duration,
    pub admin_address: Option<SocketAddr>,
    pub access_log: Option<PathBuf>,
    pub steering: Steering,
    pub steering_port: u16,
    /// Zero: reload on SIGHUP (`Handle::reload`) only.
    pub watch_config: Duration,
}

impl Settings {
    /// Largest port range one `Ports` entry may cover.
    fn max_range(&self) -> u32 {
        match self.steering {
            Steering::Listeners => config::MAX_RANGE_PORTS,
            Steering::SkLookup => config::ANY_RANGE,
        }
    }
}

/// Runs a server until SIGTERM or SIGINT, then drains it; SIGHUP reloads.
/// A second stop signal during the drain exits the process at once.
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    // Before anything can fail slowly: a SIGTERM during startup must not
    // hit the default action.
    let mut signals = Signals::register()?;
    let server = start(settings).await?;
    let sig = loop {
        match signals.next().await {
            Request::Shutdown(sig) => break sig,
            Request::Reload => server.reload().await,
        }
    };
    // A second signal means "now": do not wait for the drain.
    tokio::spawn(async move {
        loop {
            if let Request::Shutdown(sig) = signals.next().await {
                tracing::warn!(signal = sig, "second signal, exiting immediately");
                std::process::exit(1);
            }
        }
    });
    server.shutdown(sig).await;
    Ok(())
}

/// What a `Handle` asks of the running server.
enum Command {
    Reload(oneshot::Sender<()>),
    Shutdown(&'static str, oneshot::Sender<()>),
}

/// A started server. Dropping it without `shutdown` leaves the server
/// running in its runtime until that runtime ends.
pub struct Handle {
    commands: mpsc::Sender<Command>,
    admin: Option<SocketAddr>,
    listening: Vec<(String, SocketAddr)>,
    steering: Option<SocketAddr>,
}

impl Handle {
    /// The admin listener's address, when one was asked for.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin
    }

    /// Every listening socket at start: (app, address), by port.
    pub fn listening(&self) -> &[(String, SocketAddr)] {
        &self.listening
    }

    /// The one steered socket of `--steering sk_lookup`.
    pub fn steering_addr(&self) -> Option<SocketAddr> {
        self.steering
    }

    /// Re-reads the config file, as SIGHUP does; returns once it was applied
    /// or rejected (rejected: logged, the running config stays).
    pub async fn reload(&self) {
        let (done, wait) = oneshot::channel();
        if self.commands.send(Command::Reload(done)).await.is_ok() {
            let _ = wait.await;
        }
    }

    /// Stops accepting, drains live connections up to the drain timeout,
    /// cuts the rest; returns when they are gone. `why` names the cause in
    /// the log.
    pub async fn shutdown(&self, why: &'static str) {
        let (done, wait) = oneshot::channel();
        if self
            .commands
            .send(Command::Shutdown(why, done))
            .await
            .is_ok()
        {
            let _ = wait.await;
        }
    }
}

/// Starts a server: admin first (so `/readyz` says 503 while the rest comes
/// up), then the config is read and every listener bound before anything is
/// served. Any error before "proxy ready" is returned, nothing left running.
pub async fn start(settings: Settings) -> anyhow::Result<Handle> {
    let metrics = Arc::new(Metrics::default());
    let admin = match settings.admin_address {
        Some(addr) => {
            let l = admin::bind(addr).await?;
            let local = l.local_addr().context("admin listener address")?;
            tracing::info!(address = %local, "admin listening on /metrics /healthz /readyz /config /targets");
            tokio::spawn(admin::serve(l, metrics.clone()));
            Some(local)
        }
        None => None,
    };
    let access_log = match &settings.access_log {
        Some(path) => Some(AccessLog::open(path, metrics.clone())?),
        None => None,
    };
    // Stamp before reading: a change in between is seen as a change.
    let stamp = config_watch::stamp(&settings.config);
    let text = state::read_config(&settings.config)?;
    let config = Config::parse_with(
        &text,
        &settings.config.display().to_string(),
        settings.max_range(),
    )?;
    check_fd_limit(&settings);
    let plane = DataPlane::select(settings.mode, settings.copy.clone(), settings.fastpath)?;

    let (hard_tx, hard_rx) = watch::channel(false);
    let tracker = Arc::new(Tracker::default());
    let shared = Arc::new(Shared {
        plane,
        policy: settings.connect,
        idle_timeout: settings.idle_timeout,
        tracker: tracker.clone(),
        global: Arc::new(Semaphore::new(settings.max_connections as usize)),
        hard_stop: hard_rx,
        next_id: AtomicU64::new(1),
        limit_log: RateLimit::default(),
        metrics,
        access_log,
    });

    let mut state = State {
        apps: HashMap::new(),
        listeners: BTreeMap::new(),
        steer: None,
        last_text: Some(text),
        closing: Vec::new(),
    };
    if settings.steering == Steering::SkLookup {
        let ports: Vec<u16> = config.listeners().map(|(_, port)| port).collect();
        state.steer = Some(steer::start(&settings, &ports, &shared)?);
    }
    // Bind everything before serving anything: a port clash fails startup
    // as a whole rather than leaving a half-working proxy.
    let bound = state::bind_new(&state, &config, &settings)?;
    state::apply(&mut state, &config, bound, &shared, &settings);
    if let Some(steer) = &mut state.steer {
        // Ready means every port reaches us, not just that PORTS says so.
        steer
            .verify(steer::START_WAIT)
            .await
            .context("--steering sk_lookup: not every configured port reaches this proxy")?;
    }
    shared.metrics.set_ready(true);
    let listening: Vec<(String, SocketAddr)> = state
        .listeners
        .values()
        .map(|l| (l.app.clone(), l.addr))
        .collect();
    let steering = state.steer.as_ref().map(|s| s.addr);
    log_ready(&state, &listening, &config, &shared);

    let (commands, rx) = mpsc::channel(4);
    let file_changes = (!settings.watch_config.is_zero())
        .then(|| config_watch::spawn(settings.config.clone(), stamp, settings.watch_config));
    tokio::spawn(control(
        Control {
            state,
            settings,
            shared,
            tracker,
            hard_stop: hard_tx,
        },
        rx,
        file_changes,
    ));
    Ok(Handle {
        commands,
        admin,
        listening,
        steering,
    })
}

fn log_ready(state: &State, listening: &[(String, SocketAddr)], config: &Config, shared: &Shared) {
    if let Some(steer) = &state.steer {
        tracing::info!(
            plane = shared.plane.plane().as_str(),
            steering = "sk_lookup",
            listener = %steer.addr,
            ports = steer.bpf.port_count(),
            apps = config.apps.len(),
            "proxy ready"
        );
    } else {
        let names: Vec<String> = listening
            .iter()
            .map(|(app, addr)| format!("{app}={addr}"))
            .collect();
        tracing::info!(
            plane = shared.plane.plane().as_str(),
            listeners = names.len(),
            apps = config.apps.len(),
            listening = %names.join(" "),
            "proxy ready"
        );
    }
}

/// Each proxied connection holds two fds (client + upstream), and on the
/// splice plane up to two pipes (two fds each) more.
fn check_fd_limit(settings: &Settings) {
    match lifecycle::raise_fd_limit() {
        Ok(nofile) => {
            let per_conn = if settings.mode == Mode::Splice { 6 } else { 2 };
            let needed = per_conn * u64::from(settings.max_connections);
            if nofile < needed {
                tracing::warn!(
                    nofile,
                    needed,
                    max_connections = settings.max_connections,
                    "RLIMIT_NOFILE is below what --max-connections needs; accepts will back off when fds run out"
                );
            }
        }
        Err(e) => tracing::warn!(error = %format!("{e:#}"), "cannot read the fd limit"),
    }
}

/// The running server, owned by its control task.
struct Control {
    state: State,
    settings: Settings,
    shared: Arc<Shared>,
    tracker: Arc<Tracker>,
    hard_stop: watch::Sender<bool>,
}

/// Applies reloads (asked for, or a settled file change) one at a time until
/// a shutdown, then drains.
async fn control(
    mut c: Control,
    mut commands: mpsc::Receiver<Command>,
    mut file_changes: Option<mpsc::Receiver<()>>,
) {
    let (why, done) = loop {
        tokio::select! {
            cmd = commands.recv() => match cmd {
                Some(Command::Reload(done)) => {
                    c.reload(Trigger::Signal).await;
                    let _ = done.send(());
                }
                Some(Command::Shutdown(why, done)) => break (why, Some(done)),
                // Every handle is gone: nobody can ask for a drain any more.
                None => break ("handle dropped", None),
            },
            Some(()) = async { match &mut file_changes {
                Some(rx) => rx.recv().await,
                None => std::future::pending().await,
            } } => c.reload(Trigger::FileChange).await,
        }
    };
    c.drain(why).await;
    if let Some(done) = done {
        let _ = done.send(());
    }
}

impl Control {
    async fn reload(&mut self, trigger: Trigger) {
        state::closed(&mut self.state).await;
        state::reload(&mut self.state, &self.settings, &self.shared, trigger);
        if let Some(steer) = &mut self.state.steer {
            // The reload is applied by now: ports another program takes are
            // reported, not rolled back (the rest of the change stands).
            if let Err(e) = steer.verify(Duration::ZERO).await {
                tracing::error!(error = %format!("{e:#}"), "sk_lookup: ports added by this reload do not reach this proxy");
            }
        }
    }

    async fn drain(mut self, why: &'static str) {
        let drain_timeout = self.settings.drain_timeout;
        tracing::info!(
            signal = why,
            live = self.tracker.live(),
            drain_timeout_ms = drain_timeout.as_millis() as u64,
            "shutting down: closed listeners, draining live connections"
        );
        // Draining: /readyz turns 503 so load balancers stop sending here.
        self.shared.metrics.set_ready(false);
        state::stop_accepting(&mut self.state).await;
        if self.tracker.wait_idle(drain_timeout).await {
            tracing::info!("drained, all connections finished");
        } else {
            tracing::warn!(
                live = self.tracker.live(),
                "drain timeout reached, closing remaining connections"
            );
            let _ = self.hard_stop.send(true);
            self.tracker.wait_idle(HARD_STOP_GRACE).await;
        }
    }
}
