//! Wiring: config → listeners, balancers, probes → accept loops → drain,
//! and reloads (SIGHUP or a config file change) that change all of that
//! without dropping connections. With `--steering sk_lookup` one socket and
//! the BPF `PORTS` map stand in for the per-port listeners.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

use crate::access_log::AccessLog;
use crate::admin;
use crate::balancer::Balancer;
use crate::cli::Cli;
use crate::config::{self, App, Config};
use crate::config_watch;
use crate::connect::{self, ConnectPolicy};
use crate::dataplane::copy::CopyPlane;
use crate::dataplane::sockmap::Options as FastpathOptions;
use crate::dataplane::{DataPlane, Mode};
use crate::health::{self, HealthConfig};
use crate::lifecycle::{self, Request, Signals, Tracker};
use crate::listener::{self, AppRuntime, AppSlot, RateLimit, Shared};
use crate::metrics::Metrics;
use crate::steering::{self, PortTable, SkLookupSteering, Steering};

/// Time connections get to write their log line after a hard stop.
const HARD_STOP_GRACE: Duration = Duration::from_secs(2);

struct AppHandle {
    spec: App,
    runtime: Arc<AppRuntime>,
    /// Stops this runtime's probe tasks.
    probes: watch::Sender<bool>,
}

struct ListenerHandle {
    app: String,
    slot: AppSlot,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// Everything a reload may change. Connections are not in here: they hold
/// their own `Arc<AppRuntime>` and finish on the config they started with.
struct State {
    apps: HashMap<String, AppHandle>,
    listeners: BTreeMap<u16, ListenerHandle>,
    /// `--steering sk_lookup`: the one socket and the program feeding it;
    /// `listeners` stays empty.
    steer: Option<SteerState>,
    /// The config text last tried (applied or rejected): a file change that
    /// leaves the content as it was is no reload, and a bad file is
    /// reported once, not on every touch.
    last_text: Option<String>,
    /// Accept loops of removed ports, told to stop: awaited before the next
    /// reload, so a port removed and added back is free to bind again.
    closing: Vec<JoinHandle<()>>,
}

struct SteerState {
    bpf: SkLookupSteering,
    table: PortTable,
    addr: std::net::SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

struct Settings {
    listen_address: String,
    health: HealthConfig,
    max_per_app: usize,
    steering: Steering,
    /// Largest port range one `Ports` entry may cover.
    max_range: u32,
}

/// What asked for a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    Signal,
    FileChange,
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    // Before anything can fail slowly: a SIGTERM during startup must not
    // hit the default action.
    let mut signals = Signals::register()?;
    // The admin listener comes up first, so /healthz answers and /readyz
    // says 503 while the config loads and the listeners bind.
    let metrics = Arc::new(Metrics::default());
    if let Some(addr) = cli.admin_address {
        let l = admin::bind(addr).await?;
        let local = l.local_addr().context("admin listener address")?;
        tracing::info!(address = %local, "admin listening on /metrics /healthz /readyz /config /targets");
        tokio::spawn(admin::serve(l, metrics.clone()));
    }
    let access_log = match &cli.access_log {
        Some(path) => Some(AccessLog::open(path, metrics.clone())?),
        None => None,
    };
    // Stamp before reading: a change in between is seen as a change.
    let stamp = config_watch::stamp(&cli.config);
    let max_range = match cli.steering {
        Steering::Listeners => config::MAX_RANGE_PORTS,
        Steering::SkLookup => config::ANY_RANGE,
    };
    let text = read_config(&cli.config)?;
    let config = Config::parse_with(&text, &cli.config.display().to_string(), max_range)?;
    match lifecycle::raise_fd_limit() {
        Ok(nofile) => {
            // Each proxied connection holds two fds (client + upstream), and
            // on the splice plane up to two pipes (two fds each) more.
            let per_conn = if cli.mode == Mode::Splice { 6 } else { 2 };
            let needed = per_conn * u64::from(cli.max_connections);
            if nofile < needed {
                tracing::warn!(
                    nofile,
                    needed,
                    max_connections = cli.max_connections,
                    "RLIMIT_NOFILE is below what --max-connections needs; accepts will back off when fds run out"
                );
            }
        }
        Err(e) => tracing::warn!(error = %format!("{e:#}"), "cannot read the fd limit"),
    }
    let plane = DataPlane::select(
        cli.mode,
        CopyPlane {
            buffer_size: cli.copy_buffer,
        },
        FastpathOptions {
            inflight: cli.fastpath_inflight,
            parser: cli.fastpath_parser || std::env::var_os("PARSER").is_some(),
        },
    )?;
    let settings = Settings {
        listen_address: cli.listen_address.clone(),
        health: HealthConfig {
            interval: cli.health_interval.max(Duration::from_millis(10)),
            rise: cli.health_rise,
            fall: cli.health_fall,
            // A probe slower than the interval would overlap the next one.
            timeout: cli.connect_timeout.min(cli.health_interval),
        },
        max_per_app: cli.max_connections_per_app as usize,
        steering: cli.steering,
        max_range,
    };

    let (hard_tx, hard_rx) = watch::channel(false);
    let tracker = Arc::new(Tracker::default());
    let shared = Arc::new(Shared {
        plane,
        policy: ConnectPolicy {
            timeout: cli.connect_timeout,
            attempts: cli.connect_attempts,
            deadline: cli.connect_deadline,
        },
        idle_timeout: (!cli.idle_timeout.is_zero()).then_some(cli.idle_timeout),
        tracker: tracker.clone(),
        global: Arc::new(Semaphore::new(cli.max_connections as usize)),
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
        state.steer = Some(start_steering(&settings, cli.steering_port, &shared).context(
            "--steering sk_lookup: cannot steer ports with sk_lookup (use --steering listeners to run without it)",
        )?);
    }
    // Bind everything before serving anything: a port clash fails startup
    // as a whole rather than leaving a half-working proxy.
    let bound = bind_new(&state, &config, &settings)?;
    apply(&mut state, &config, bound, &shared, &settings);
    shared.metrics.set_ready(true);
    let names: Vec<String> = state
        .listeners
        .iter()
        .map(|(port, l)| {
            format!(
                "{}={}",
                l.app,
                display_addr(&settings.listen_address, *port)
            )
        })
        .collect();
    if let Some(steer) = &state.steer {
        tracing::info!(
            plane = shared.plane.name(),
            steering = "sk_lookup",
            listener = %steer.addr,
            ports = steer.bpf.port_count(),
            apps = config.apps.len(),
            "proxy ready"
        );
    } else {
        tracing::info!(
            plane = shared.plane.name(),
            listeners = names.len(),
            apps = config.apps.len(),
            listening = %names.join(" "),
            "proxy ready"
        );
    }

    let mut file_changes = (!cli.watch_config.is_zero())
        .then(|| config_watch::spawn(cli.config.clone(), stamp, cli.watch_config));
    let sig = loop {
        tokio::select! {
            req = signals.next() => match req {
                Request::Shutdown(sig) => break sig,
                Request::Reload => {
                    closed(&mut state).await;
                    reload(&mut state, &cli, &shared, &settings, Trigger::Signal)
                }
            },
            Some(()) = async { match &mut file_changes {
                Some(rx) => rx.recv().await,
                None => std::future::pending().await,
            } } => {
                closed(&mut state).await;
                reload(&mut state, &cli, &shared, &settings, Trigger::FileChange)
            }
        }
    };
    tracing::info!(
        signal = sig,
        live = tracker.live(),
        drain_timeout_ms = cli.drain_timeout.as_millis() as u64,
        "shutting down: closed listeners, draining live connections"
    );
    // Draining: /readyz turns 503 so load balancers stop sending here.
    shared.metrics.set_ready(false);
    for l in state.listeners.values() {
        let _ = l.stop.send(true);
    }
    for a in state.apps.values() {
        let _ = a.probes.send(true);
    }
    for (_, l) in std::mem::take(&mut state.listeners) {
        let _ = l.task.await;
    }
    if let Some(mut steer) = state.steer.take() {
        // Detach first: new connections to steered ports are refused by the
        // kernel rather than queued on a socket about to close.
        steer.bpf.detach();
        let _ = steer.stop.send(true);
        let _ = steer.task.await;
    }
    // A second signal means "now": do not wait for the drain.
    tokio::spawn(async move {
        loop {
            if let Request::Shutdown(sig) = signals.next().await {
                tracing::warn!(signal = sig, "second signal, exiting immediately");
                std::process::exit(1);
            }
        }
    });

    if tracker.wait_idle(cli.drain_timeout).await {
        tracing::info!("drained, all connections finished");
    } else {
        tracing::warn!(
            live = tracker.live(),
            "drain timeout reached, closing remaining connections"
        );
        let _ = hard_tx.send(true);
        tracker.wait_idle(HARD_STOP_GRACE).await;
    }
    Ok(())
}

/// Waits for the accept loops of removed ports to close their sockets.
async fn closed(state: &mut State) {
    for task in state.closing.drain(..) {
        let _ = task.await;
    }
}

fn read_config(path: &std::path::Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))
}

/// Binds the one socket, loads and attaches the sk_lookup program, and
/// starts accepting; `PORTS` is filled by `apply`.
fn start_steering(
    settings: &Settings,
    port: u16,
    shared: &Arc<Shared>,
) -> anyhow::Result<SteerState> {
    steering::check_support()?;
    let ip = connect::listen_addr(&settings.listen_address, 0)?.ip();
    let (bind_addr, steer_config) = steering::addresses(ip, port);
    let l = listener::bind(bind_addr)?;
    let addr = l.local_addr().context("steering listener address")?;
    let bpf = SkLookupSteering::load(&l, steer_config)?;
    let table: PortTable = Arc::default();
    let (stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(steering::accept_loop(
        l,
        table.clone(),
        shared.clone(),
        stop_rx,
    ));
    Ok(SteerState {
        bpf,
        table,
        addr,
        stop,
        task,
    })
}

/// Steering mode's half of `apply`: the port table first gains the new
/// ports (so nothing steered finds no app), then `PORTS` changes, then the
/// table drops the removed ports. Live connections hold their own app.
fn apply_steering(steer: &mut SteerState, config: &Config, apps: &HashMap<String, AppHandle>) {
    let mut wanted = HashMap::new();
    let mut table = HashMap::new();
    for (app_idx, port) in config.listeners() {
        wanted.insert(port, app_idx as u32);
        table.insert(port, apps[&config.apps[app_idx].name].runtime.clone());
    }
    let mut both = (*steering::table_get(&steer.table)).clone();
    both.extend(table.iter().map(|(p, r)| (*p, r.clone())));
    steering::table_set(&steer.table, both);
    match steer.bpf.update(&wanted) {
        Ok((upserted, removed)) => tracing::info!(
            ports = wanted.len(),
            upserted,
            removed,
            "sk_lookup ports updated"
        ),
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "updating the sk_lookup PORTS map failed; the next reload retries")
        }
    }
    steering::table_set(&steer.table, table);
}

fn display_addr(address: &str, port: u16) -> String {
    connect::listen_addr(address, port)
        .map(|a| a.to_string())
        .unwrap_or_else(|_| format!("{address}:{port}"))
}

/// Binds every port of `config` that is not already listening. All or
/// nothing: on any failure the sockets bound so far are closed again.
fn bind_new(
    state: &State,
    config: &Config,
    settings: &Settings,
) -> anyhow::Result<Vec<(u16, TcpListener)>> {
    let mut bound = Vec::new();
    if state.steer.is_some() {
        return Ok(bound);
    }
    for (app_idx, port) in config.listeners() {
        if state.listeners.contains_key(&port) {
            continue;
        }
        let addr = connect::listen_addr(&settings.listen_address, port)?;
        let l = listener::bind(addr)
            .with_context(|| format!("app {:?} port {port}", config.apps[app_idx].name))?;
        bound.push((port, l));
    }
    Ok(bound)
}

/// Makes `state` match `config`. Cannot fail: everything fallible (parsing,
/// validation, binding) happened before.
fn apply(
    state: &mut State,
    config: &Config,
    bound: Vec<(u16, TcpListener)>,
    shared: &Arc<Shared>,
    settings: &Settings,
) {
    // Apps: keep unchanged ones as they are; rebuild changed ones, keeping
    // the per-app limit and the state of targets that stayed.
    let mut apps = HashMap::new();
    for spec in &config.apps {
        let old = state.apps.remove(&spec.name);
        let handle = match old {
            Some(h) if h.spec == *spec => h,
            old => {
                let (permits, previous) = match &old {
                    Some(h) => (
                        h.runtime.permits.clone(),
                        h.runtime.balancer.backends.clone(),
                    ),
                    None => (Arc::new(Semaphore::new(settings.max_per_app)), Vec::new()),
                };
                if let Some(h) = old {
                    let _ = h.probes.send(true);
                    tracing::info!(app = %spec.name, targets = %targets_str(spec), "app changed");
                }
                let balancer = Arc::new(Balancer::reusing(
                    &spec.name,
                    spec.balance,
                    &spec.targets,
                    &previous,
                ));
                let (probes, probes_rx) = watch::channel(false);
                health::spawn_probes(balancer.clone(), settings.health, probes_rx);
                AppHandle {
                    spec: spec.clone(),
                    runtime: Arc::new(AppRuntime {
                        balancer,
                        permits,
                        metrics: shared.metrics.app(&spec.name),
                        proxy_protocol: spec.proxy_protocol,
                    }),
                    probes,
                }
            }
        };
        apps.insert(spec.name.clone(), handle);
    }
    for (name, gone) in state.apps.drain() {
        let _ = gone.probes.send(true);
        tracing::info!(app = %name, "app removed");
    }
    state.apps = apps;
    shared.metrics.set_config(config);
    shared.metrics.set_balancers(
        state
            .apps
            .values()
            .map(|a| a.runtime.balancer.clone())
            .collect(),
    );

    if let Some(steer) = &mut state.steer {
        apply_steering(steer, config, &state.apps);
        return;
    }

    // Listeners: point kept ports at their (possibly new) app, start new
    // ones, stop removed ones. Live connections on a removed port go on.
    let mut bound: HashMap<u16, TcpListener> = bound.into_iter().collect();
    let mut wanted = BTreeMap::new();
    for (app_idx, port) in config.listeners() {
        wanted.insert(port, &config.apps[app_idx].name);
    }
    for (port, handle) in std::mem::take(&mut state.listeners) {
        if !wanted.contains_key(&port) {
            let _ = handle.stop.send(true);
            state.closing.push(handle.task);
            tracing::info!(app = %handle.app, port, "listener closed");
        } else {
            state.listeners.insert(port, handle);
        }
    }
    for (port, name) in wanted {
        let runtime = state.apps[name].runtime.clone();
        if let Some(handle) = state.listeners.get_mut(&port) {
            *handle.slot.write().unwrap_or_else(|p| p.into_inner()) = runtime;
            handle.app = name.clone();
            continue;
        }
        let Some(l) = bound.remove(&port) else {
            // bind_new bound every port not already listening.
            tracing::error!(port, "no socket for new port; skipped");
            continue;
        };
        let slot: AppSlot = Arc::new(RwLock::new(runtime));
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(listener::accept_loop(
            l,
            port,
            slot.clone(),
            shared.clone(),
            stop_rx,
        ));
        state.listeners.insert(
            port,
            ListenerHandle {
                app: name.clone(),
                slot,
                stop,
                task,
            },
        );
    }
}

fn targets_str(app: &App) -> String {
    app.targets
        .iter()
        .map(|t| t.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// SIGHUP or a file change: load and validate the file, bind new ports,
/// then switch. Any failure leaves the running config untouched.
fn reload(
    state: &mut State,
    cli: &Cli,
    shared: &Arc<Shared>,
    settings: &Settings,
    trigger: Trigger,
) {
    // SIGHUP also means "logrotate moved the file", whatever the config says.
    if let (Trigger::Signal, Some(log)) = (&trigger, &shared.access_log) {
        log.reopen();
    }
    let trigger_name = match trigger {
        Trigger::Signal => "SIGHUP",
        Trigger::FileChange => "file change",
    };
    let result = read_config(&cli.config).and_then(|text| {
        if trigger == Trigger::FileChange && state.last_text.as_deref() == Some(text.as_str()) {
            return Ok(None);
        }
        state.last_text = Some(text.clone());
        let config =
            Config::parse_with(&text, &cli.config.display().to_string(), settings.max_range)?;
        let bound = bind_new(state, &config, settings)?;
        Ok(Some((config, bound)))
    });
    let result = match result {
        Ok(None) => {
            tracing::debug!(
                trigger = trigger_name,
                "config file changed on disk but its content did not; nothing to reload"
            );
            return;
        }
        Ok(Some(ok)) => Ok(ok),
        Err(e) => Err(e),
    };
    match result {
        Ok((config, bound)) => {
            let added: Vec<u16> = bound.iter().map(|(p, _)| *p).collect();
            apply(state, &config, bound, shared, settings);
            shared.metrics.reloads_ok.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                trigger = trigger_name,
                apps = config.apps.len(),
                listeners = state.listeners.len(),
                added_ports = ?added,
                "config reloaded"
            );
        }
        Err(e) => {
            shared
                .metrics
                .reloads_failed
                .fetch_add(1, Ordering::Relaxed);
            tracing::error!(trigger = trigger_name, error = %format!("{e:#}"), "config reload rejected; still running the previous config");
        }
    }
}
