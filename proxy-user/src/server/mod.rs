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
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, watch, Semaphore};

use crate::config::{self, watch as config_watch, Config};
use crate::dataplane::DataPlane;
use crate::dataplane::Plane;
use crate::edge::handover::Handover;
use crate::edge::steering::Steering;
use crate::edge::tracker::Tracker;
use crate::edge::{AppRuntime, RateLimit, Shared};
use crate::ops::access_log::AccessLog;
use crate::ops::admin::{self, AdminState};
use crate::ops::metrics::Metrics;
use crate::ops::readiness::Readiness;
use crate::ops::sd_notify;
use crate::upstream::loop_guard::LoopGuard;
use crate::upstream::stats::TargetMetrics;
use handle::Command;
pub use handle::{Cutter, Handle};
use handoff::{HandoffSocket, Takeover};
use lifecycle::{Request, Signals};
use state::{State, Trigger};

mod budget;
mod handle;
mod handoff;
pub(crate) mod lifecycle;
mod settings;
mod state;
mod steer;

pub use settings::Settings;

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
    let handoff_path = settings.handoff_socket.clone();
    let Some(server) = start_unless_stopped(settings, &mut signals).await? else {
        return Ok(());
    };
    // MAINPID too: after a takeover systemd must follow this process.
    sd_notify::notify(&format!("READY=1\nMAINPID={}", std::process::id()));
    let sig = loop {
        let request = tokio::select! {
            r = signals.next() => r,
            // Handed over to a new process and drained.
            () = server.finished() => return Ok(()),
        };
        match request {
            Request::Shutdown(sig) => break sig,
            Request::Reload => {
                sd_notify::reloading();
                server.reload().await;
                sd_notify::notify("READY=1");
            }
            Request::Upgrade => upgrade(handoff_path.as_deref()),
            Request::Ignored(sig) => {
                tracing::info!(signal = sig, "ignored (SIGHUP reloads the config and reopens --access-log; SIGUSR2 upgrades)")
            }
        }
    };
    sd_notify::notify("STOPPING=1");
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

/// `--check`: reads and validates the config file as this proxy would,
/// binding nothing; a summary, or every problem found.
pub async fn check(settings: &Settings) -> anyhow::Result<String> {
    let text = config::file::read(&settings.config).await?;
    let (config, _) = settings.parse_config(&text)?;
    Ok(format!(
        "{} apps, {} ports",
        config.apps.len(),
        config.listeners().count()
    ))
}

/// SIGUSR2: starts the successor, which connects back to our handoff
/// socket; this process serves on until it says it is ready.
fn upgrade(handoff: Option<&std::path::Path>) {
    let Some(path) = handoff else {
        tracing::warn!(
            signal = "SIGUSR2",
            "ignored: upgrades need --handoff-socket PATH"
        );
        return;
    };
    match handoff::successor::spawn(path) {
        Ok(pid) => tracing::info!(
            successor = pid,
            "SIGUSR2: started the new process; serving until it is ready"
        ),
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "SIGUSR2: cannot start the new process; still serving")
        }
    }
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
                Request::Upgrade => tracing::warn!(signal = "SIGUSR2", "ignored during start-up"),
                Request::Ignored(sig) => tracing::info!(signal = sig, "ignored"),
            },
        }
    }
}

/// Starts a server: admin first (so `/readyz` says 503 while the rest comes
/// up), then the config is read and every listener bound before anything is
/// served. Any error before "proxy ready" is returned, nothing left running.
/// With `takeover`, the listening sockets come from the running proxy,
/// which serves until this one is ready (`handoff`).
pub async fn start(settings: Settings) -> anyhow::Result<Handle> {
    // First: the old process's sockets include the admin listener.
    let mut takeover = match &settings.takeover {
        Some(path) => Some(Takeover::connect(path).await?),
        None => None,
    };
    let (metrics, target_metrics, published) = register_metrics();
    let admin = match settings.admin_address {
        Some(addr) => {
            let handed = takeover.as_mut().and_then(|t| t.admin.take());
            let l = match handed.filter(|l| l.local_addr().ok() == Some(addr) || addr.port() == 0) {
                Some(l) => l,
                None => admin::bind(addr).await?,
            };
            let local = l.local_addr().context("admin listener address")?;
            let fd = std::os::fd::AsRawFd::as_raw_fd(&l);
            tracing::info!(address = %local, "admin listening on /metrics /healthz /readyz /config /targets");
            let task = tokio::spawn(admin::serve(l, published.clone()));
            Some((local, fd, task))
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
    let (accepting, accepting_rx) = watch::channel(false);
    let (finished_tx, finished) = watch::channel(false);
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
        accepting: accepting_rx,
        handover: Handover::default(),
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
        published,
        target_metrics,
    };
    if settings.steering == Steering::SkLookup {
        let ports: Vec<u16> = config.listeners().map(|(_, port)| port).collect();
        let inherited = takeover.as_mut().and_then(|t| t.steer.take());
        state.steer = Some(steer::start(&settings, &ports, &shared, inherited)?);
    }
    // Bind everything before serving anything: a port clash fails startup
    // as a whole rather than leaving a half-working proxy.
    let bound = state::bind_new(
        &state,
        &config,
        &settings,
        takeover.as_mut().map(|t| &mut t.ports),
    )?;
    // Not on a takeover: the old process still holds the path until it
    // stopped accepting.
    let mut handoff = match (&settings.handoff_socket, &takeover) {
        (Some(path), None) => Some(HandoffSocket::bind(path)?),
        _ => None,
    };
    state::apply(&mut state, &config, bound, &shared, &settings);
    match takeover {
        None => {
            let _ = accepting.send(true);
            if let Some(steer) = &mut state.steer {
                // Ready means every port reaches us, not just that PORTS says so.
                steer.verify(steer::START_WAIT).await.context(
                    "--steering sk_lookup: not every configured port reaches this proxy",
                )?;
            }
        }
        Some(t) => {
            // Nothing can fail from here: the old process stops accepting,
            // and we start (the connections in between wait in the backlog).
            let takes_conns = matches!(shared.plane.plane(), Plane::Copy | Plane::Splice);
            let taken = t.commit(takes_conns).await;
            let _ = accepting.send(true);
            let apps: HashMap<String, Arc<AppRuntime>> = state
                .apps
                .iter()
                .map(|(name, a)| (name.clone(), a.runtime.clone()))
                .collect();
            tokio::spawn(taken.receive_conns(shared.clone(), apps));
            if let Some(path) = &settings.handoff_socket {
                match HandoffSocket::bind(path) {
                    Ok(h) => handoff = Some(h),
                    Err(e) => {
                        tracing::error!(error = %format!("{e:#}"), "no handoff socket: this process cannot be upgraded in place")
                    }
                }
            }
            if let Some(steer) = &mut state.steer {
                // The old program steered to this same socket until now.
                if let Err(e) = steer.verify(steer::START_WAIT).await {
                    tracing::error!(error = %format!("{e:#}"), "--steering sk_lookup: not every configured port reaches this proxy");
                }
            }
        }
    }
    state.published.readiness().set(true);
    let listening: Vec<(String, SocketAddr)> = state
        .listeners
        .values()
        .map(|l| (l.app.clone(), l.addr))
        .collect();
    log_ready(&state, &listening, &config, &shared);

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
            handoff,
            admin: admin
                .as_ref()
                .map(|(_, fd, task)| (*fd, task.abort_handle())),
            _accepting: accepting,
        },
        rx,
        file_changes,
        finished_tx,
    ));
    Ok(Handle {
        commands,
        cutter: Cutter {
            hard_stop: hard_tx,
            tracker,
        },
        admin: admin.map(|(addr, _, _)| addr),
        finished,
    })
}

/// Each component registers its own series; the admin listener renders
/// them all from the one registry.
fn register_metrics() -> (Arc<Metrics>, TargetMetrics, Arc<AdminState>) {
    let mut registry = Registry::default();
    let metrics = Arc::new(Metrics::register(&mut registry));
    let targets = TargetMetrics::register(&mut registry);
    let readiness = Readiness::register(&mut registry);
    (
        metrics,
        targets,
        Arc::new(AdminState::new(registry, readiness)),
    )
}

fn log_ready(state: &State, listening: &[(String, SocketAddr)], config: &Config, shared: &Shared) {
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
        let names: Vec<String> = listening
            .iter()
            .map(|(app, addr)| format!("{app}={addr}"))
            .collect();
        tracing::info!(
            plane = shared.plane.plane().as_str(),
            max_connections = shared.global_cap,
            listeners = names.len(),
            apps = config.apps.len(),
            listening = %names.join(" "),
            "proxy ready"
        );
    }
}

/// The running server, owned by its control task.
struct Control {
    state: State,
    settings: Settings,
    shared: Arc<Shared>,
    cutter: Cutter,
    /// `--handoff-socket`: where a successor connects.
    handoff: Option<HandoffSocket>,
    /// The admin listener's fd (open while its task runs) and task.
    admin: Option<(std::os::fd::RawFd, tokio::task::AbortHandle)>,
    /// Kept open: accept loops end when it closes.
    _accepting: watch::Sender<bool>,
}

/// Why the control loop ended.
enum Stop {
    Shutdown(&'static str, Option<tokio::sync::oneshot::Sender<()>>),
    HandedOver(handoff::Given),
}

/// Applies reloads (asked for, or a settled file change) one at a time until
/// a shutdown or a handoff, then drains.
async fn control(
    mut c: Control,
    mut commands: mpsc::Receiver<Command>,
    mut file_changes: Option<mpsc::Receiver<()>>,
    finished: watch::Sender<bool>,
) {
    let stop = loop {
        tokio::select! {
            cmd = commands.recv() => match cmd {
                Some(Command::Reload(done)) => {
                    c.reload(Trigger::Signal).await;
                    let _ = done.send(());
                }
                Some(Command::Shutdown(why, done)) => break Stop::Shutdown(why, Some(done)),
                // Every handle is gone: nobody can ask for a drain any more.
                None => break Stop::Shutdown("handle dropped", None),
            },
            Some(()) = async { match &mut file_changes {
                Some(rx) => rx.recv().await,
                None => std::future::pending().await,
            } } => c.reload(Trigger::FileChange).await,
            link = async { match &c.handoff {
                Some(h) => h.accept().await,
                None => std::future::pending().await,
            } } => match link {
                Ok(link) => if let Some(given) = c.give(link).await {
                    break Stop::HandedOver(given);
                },
                Err(e) => tracing::warn!(error = %e, "handoff socket: accept failed"),
            },
        }
    };
    match stop {
        Stop::Shutdown(why, done) => {
            c.drain(why).await;
            if let Some(done) = done {
                let _ = done.send(());
            }
        }
        Stop::HandedOver(given) => c.hand_over(given).await,
    }
    let _ = finished.send(true);
}

impl Control {
    /// Offers this server's listening sockets to a successor; Some once it
    /// is ready to serve. Until then (and on any error) we serve on.
    async fn give(&mut self, link: handoff::Link) -> Option<handoff::Given> {
        let listeners: Vec<_> = self
            .state
            .listeners
            .iter()
            .map(|(port, l)| (*port, l.fd))
            .collect();
        let steer = self.state.steer.as_ref().map(|s| s.fd);
        let admin = self.admin.as_ref().map(|(fd, _)| *fd);
        match handoff::give(link, listeners, steer, admin).await {
            Ok(given) => Some(given),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "handoff: the new process did not get ready; still serving");
                None
            }
        }
    }

    /// The successor is ready: stop accepting, hand it the connections
    /// that can move, drain the rest.
    async fn hand_over(mut self, given: handoff::Given) {
        // Before this process can exit: systemd follows the new one.
        sd_notify::notify(&format!("MAINPID={}", given.pid));
        tracing::info!(
            successor = given.pid,
            "handoff: the new process is ready; stopping accepting"
        );
        self.state.published.readiness().set(false);
        state::stop_accepting(&mut self.state).await;
        if let Some(h) = self.handoff.take() {
            h.close();
        }
        // The new process answers /readyz and /metrics from here on.
        if let Some((_, task)) = self.admin.take() {
            task.abort();
        }
        given.finish(&self.shared).await;
        self.drain("handed over").await;
    }

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
            pid = std::process::id(),
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
