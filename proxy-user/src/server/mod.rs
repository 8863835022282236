//! Wiring: config → listeners, balancers, probes → accept loops → drain,
//! and reloads (SIGHUP or a config file change) that change all of that
//! without dropping connections. With `--steering sk_lookup` one socket and
//! the BPF `PORTS` map stand in for the per-port listeners.
//!
//! `start` brings a server up in the calling runtime and hands back a
//! `Handle` (its addresses, reload, shutdown): the binary drives it from
//! signals (`run`), the tests drive it directly.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, watch, Semaphore};

use crate::config::{self, watch as config_watch, Config};
use crate::dataplane::DataPlane;
use crate::edge::steering::Steering;
use crate::edge::tracker::Tracker;
use crate::edge::{RateLimit, Shared};
use crate::ops::access_log::AccessLog;
use crate::ops::admin::{self, AdminState};
use crate::ops::metrics::Metrics;
use crate::ops::readiness::Readiness;
use crate::upstream::loop_guard::LoopGuard;
use crate::upstream::stats::TargetMetrics;
use handle::Command;
pub use handle::{Cutter, Handle};
use lifecycle::{Request, Signals};
use state::{State, Trigger};

mod budget;
mod handle;
pub(crate) mod lifecycle;
mod settings;
mod state;
mod steer;

pub use settings::{check, Settings};

/// Time connections get to write their log line after a hard stop.
const HARD_STOP_GRACE: Duration = Duration::from_secs(2);

/// After a second stop signal: time live connections get to send their
/// resets before the process exits.
const SECOND_SIGNAL_GRACE: Duration = Duration::from_millis(500);

/// Runs a server until SIGTERM or SIGINT, then drains it; SIGHUP reloads.
/// A second stop signal during the drain exits the process at once.
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    // Before anything can fail slowly: a SIGTERM during startup must not
    // hit the default action.
    let mut signals = Signals::register()?;
    let Some(server) = start_unless_stopped(settings, &mut signals).await? else {
        return Ok(());
    };
    let sig = loop {
        match signals.next().await {
            Request::Shutdown(sig) => break sig,
            Request::Reload => server.reload().await,
        }
    };
    // A second signal means "now": do not wait for the drain. Live streams
    // are reset first (a FIN from exit would pass for their end), with a
    // short grace for their tasks to do it and log.
    let cut = server.cutter();
    let forced = Arc::new(AtomicBool::new(false));
    let second = forced.clone();
    tokio::spawn(async move {
        loop {
            if let Request::Shutdown(sig) = signals.next().await {
                tracing::warn!(
                    signal = sig,
                    "second signal, resetting live connections and exiting"
                );
                second.store(true, Ordering::SeqCst);
                cut.cut(SECOND_SIGNAL_GRACE).await;
                std::process::exit(1);
            }
        }
    });
    server.shutdown(sig).await;
    // The resets can finish the drain before the task above exits: a forced
    // stop still ends with a failure status.
    anyhow::ensure!(
        !forced.load(Ordering::SeqCst),
        "stopped by a second signal: live connections were reset"
    );
    Ok(())
}

/// `start`, raced against the signals: a stop signal while starting (an
/// access log FIFO waiting for its reader, a slow config read) ends the
/// process now rather than once started; a SIGHUP reloads once started.
/// None: stopped before serving.
async fn start_unless_stopped(
    settings: Settings,
    signals: &mut Signals,
) -> anyhow::Result<Option<Handle>> {
    let starting = start(settings);
    tokio::pin!(starting);
    let mut reload = false;
    loop {
        tokio::select! {
            started = &mut starting => {
                let server = started?;
                if reload {
                    server.reload().await;
                }
                return Ok(Some(server));
            }
            request = signals.next() => match request {
                Request::Shutdown(sig) => {
                    tracing::warn!(signal = sig, "stop signal during start-up; exiting without serving");
                    return Ok(None);
                }
                Request::Reload => reload = true,
            },
        }
    }
}

/// Starts a server: admin first (so `/readyz` says 503 while the rest comes
/// up), then the config is read and every listener bound before anything is
/// served. Any error before "proxy ready" is returned, nothing left running.
pub async fn start(settings: Settings) -> anyhow::Result<Handle> {
    let token = match (&settings.admin_token_file, settings.admin_address) {
        (Some(path), Some(_)) => Some(admin::Token::read(path)?),
        (Some(_), None) => anyhow::bail!(
            "--admin-token-file turns on the admin write API, which needs --admin-address"
        ),
        (None, _) => None,
    };
    let (metrics, target_metrics, published) = register_metrics(token);
    let admin = match settings.admin_address {
        Some(addr) => {
            let l = admin::bind(addr).await?;
            let local = l.local_addr().context("admin listener address")?;
            tracing::info!(address = %local, "admin listening on /metrics /healthz /readyz /config /targets");
            tokio::spawn(admin::serve(l, published.clone()));
            Some(local)
        }
        None => None,
    };
    let access_log = match &settings.access_log {
        Some(path) => Some(AccessLog::open(path, metrics.access_log_dropped.clone()).await?),
        None => None,
    };
    // Stamp before reading: a change in between is seen as a change.
    let stamp = config_watch::stamp(&settings.config);
    let text = config::file::read(&settings.config).await?;
    let (config, listen) = settings.parse_config(&text)?;
    let plane = DataPlane::select(settings.mode, settings.copy.clone(), settings.fastpath)?;
    let nofile = match lifecycle::raise_fd_limit() {
        Ok(nofile) => nofile,
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "cannot read the fd limit; assuming 1024");
            1024
        }
    };
    let listeners = match settings.steering {
        Steering::SkLookup => 1,
        Steering::Listeners => config.listeners().count(),
    };
    let max_connections =
        budget::max_connections(settings.max_connections, plane.plane(), nofile, listeners);

    let (hard_tx, hard_rx) = watch::channel(false);
    let hard_tx = Arc::new(hard_tx);
    let tracker = Arc::new(Tracker::default());
    let shared = Arc::new(Shared {
        plane,
        policy: settings.connect,
        loop_guard: Arc::new(LoopGuard::new(listen)),
        idle_timeout: settings.idle_timeout,
        socket_buffers: settings.socket_buffers,
        tracker: tracker.clone(),
        global: Arc::new(Semaphore::new(max_connections as usize)),
        global_cap: max_connections as usize,
        per_app_cap: settings.max_per_app,
        apps: AtomicUsize::new(config.apps.len()),
        hard_stop: hard_rx,
        next_id: AtomicU64::new(1),
        limit_log: RateLimit::default(),
        metrics,
        access_log,
        log_connections: settings.log_connections,
        bytes_flush: settings.bytes_flush,
        per_client_cap: settings.max_per_client,
        per_client: Arc::default(),
    });

    let mut state = State {
        apps: HashMap::new(),
        listeners: BTreeMap::new(),
        steer: None,
        last_text: Some(text.clone()),
        applied_text: None,
        closing: Vec::new(),
        published,
        target_metrics,
    };
    if settings.steering == Steering::SkLookup {
        let ports: Vec<u16> = config.listeners().map(|(_, port)| port).collect();
        state.steer = Some(steer::start(&settings, &ports, &shared)?);
    }
    // Bind everything before serving anything: a port clash fails startup
    // as a whole rather than leaving a half-working proxy.
    let bound = state::bind_new(&state, &config, &settings)?;
    state::apply(&mut state, &config, bound, &shared, &settings);
    state::applied_text(&mut state, &shared, text);
    if let Some(steer) = &mut state.steer {
        // Ready means every port reaches us, not just that PORTS says so.
        steer
            .verify(steer::START_WAIT)
            .await
            .context("--steering sk_lookup: not every configured port reaches this proxy")?;
    }
    state.published.readiness().set(true);
    log_ready(&state, &config, &shared, &settings);

    let (commands, rx) = mpsc::channel(4);
    let file_changes = (!settings.watch_config.is_zero())
        .then(|| config_watch::spawn(settings.config.clone(), stamp, settings.watch_config));
    tokio::spawn(control(
        Control {
            state,
            settings,
            shared,
            cutter: Cutter {
                hard_stop: hard_tx.clone(),
                tracker: tracker.clone(),
            },
        },
        rx,
        file_changes,
    ));
    Ok(Handle {
        commands,
        cutter: Cutter {
            hard_stop: hard_tx,
            tracker,
        },
        admin,
    })
}

/// Each component registers its own series; the admin listener renders
/// them all from the one registry.
fn register_metrics(token: Option<admin::Token>) -> (Arc<Metrics>, TargetMetrics, Arc<AdminState>) {
    let mut registry = Registry::default();
    let metrics = Arc::new(Metrics::register(&mut registry));
    let targets = TargetMetrics::register(&mut registry);
    let readiness = Readiness::register(&mut registry);
    (
        metrics,
        targets,
        Arc::new(AdminState::new(registry, readiness).with_token(token)),
    )
}

fn log_ready(state: &State, config: &Config, shared: &Shared, settings: &Settings) {
    if let Some(steer) = &state.steer {
        tracing::info!(
            plane = shared.plane.plane().as_str(),
            max_connections = shared.global_cap,
            steering = "sk_lookup",
            listener = %steer.addr,
            ports = steer.bpf.port_count(),
            apps = config.apps.len(),
            "proxy ready"
        );
    } else {
        // A summary, not every port: 1,024 ports made a 20 KB line.
        tracing::info!(
            plane = shared.plane.plane().as_str(),
            max_connections = shared.global_cap,
            listeners = state.listeners.len(),
            apps = config.apps.len(),
            address = %settings.listen_address,
            ports = %port_ranges(state.listeners.keys().copied(), 16),
            "proxy ready"
        );
    }
}

/// Sorted ports as ranges, `5001-5200,6001`, at most `max` of them and a
/// count of the rest.
fn port_ranges(ports: impl Iterator<Item = u16>, max: usize) -> String {
    let mut ranges: Vec<(u16, u16)> = Vec::new();
    for p in ports {
        match ranges.last_mut() {
            Some((_, hi)) if u32::from(*hi) + 1 == u32::from(p) => *hi = p,
            _ => ranges.push((p, p)),
        }
    }
    let shown: Vec<String> = ranges
        .iter()
        .take(max)
        .map(|&(lo, hi)| {
            if lo == hi {
                lo.to_string()
            } else {
                format!("{lo}-{hi}")
            }
        })
        .collect();
    let mut out = shown.join(",");
    if ranges.len() > max {
        out.push_str(&format!(" and {} more ranges", ranges.len() - max));
    }
    out
}

/// The running server, owned by its control task.
struct Control {
    state: State,
    settings: Settings,
    shared: Arc<Shared>,
    cutter: Cutter,
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
        state::reload(&mut self.state, &self.settings, &self.shared, trigger).await;
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
        let tracker = &self.cutter.tracker;
        tracing::info!(
            signal = why,
            live = tracker.live(),
            drain_timeout_ms = drain_timeout.as_millis() as u64,
            "shutting down: closed listeners, draining live connections"
        );
        // Draining: /readyz turns 503 so load balancers stop sending here.
        self.state.published.readiness().set(false);
        state::stop_accepting(&mut self.state).await;
        if tracker.wait_idle(drain_timeout).await {
            tracing::info!("drained, all connections finished");
        } else {
            tracing::warn!(
                live = tracker.live(),
                "drain timeout reached, resetting remaining connections"
            );
            self.cutter.cut(HARD_STOP_GRACE).await;
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn port_ranges() {
        let r = |p: &[u16], max| super::port_ranges(p.iter().copied(), max);
        assert_eq!(r(&[1, 2, 3, 5, 7, 8, 65535], 9), "1-3,5,7-8,65535");
        assert_eq!(r(&[1, 3, 5, 7], 2), "1,3 and 2 more ranges");
        assert_eq!(r(&[], 2), "");
    }
}
