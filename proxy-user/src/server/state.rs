//! The running config: apps, listeners and steering, and how a new config
//! replaces them (validate, bind new ports, then switch) without dropping
//! live connections.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::Context;
use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

use super::settings::Settings;
use super::steer::SteerState;
use crate::config::{self, App, Config};
use crate::edge::listener::{self, listen_addr};
use crate::edge::{AppRuntime, AppSlot, Shared};
use crate::ops::admin::{AdminState, ConfigText};
use crate::upstream::balancer::Balancer;
use crate::upstream::probe::ProbeSpec;
use crate::upstream::stats::TargetMetrics;

pub(super) struct AppHandle {
    pub(super) spec: App,
    pub(super) runtime: Arc<AppRuntime>,
    /// Stops this runtime's probe tasks.
    pub(super) probes: watch::Sender<bool>,
}

pub(super) struct ListenerHandle {
    pub(super) app: String,
    /// The socket's fd, open while `task` runs: what a handoff sends.
    pub(super) fd: std::os::fd::RawFd,
    pub(super) slot: AppSlot,
    pub(super) stop: watch::Sender<bool>,
    pub(super) task: JoinHandle<()>,
}

/// Everything a reload may change. Connections are not in here: they hold
/// their own `Arc<AppRuntime>` and finish on the config they started with.
pub(super) struct State {
    pub(super) apps: HashMap<String, AppHandle>,
    pub(super) listeners: BTreeMap<u16, ListenerHandle>,
    /// `--steering sk_lookup`: the one socket and the program feeding it;
    /// `listeners` stays empty.
    pub(super) steer: Option<SteerState>,
    /// The config text last tried (applied or rejected): a file change that
    /// leaves the content as it was is no reload, and a bad file is
    /// reported once, not on every touch.
    pub(super) last_text: Option<String>,
    /// The config text in force: a SIGHUP that finds the file as it is
    /// (logrotate's) reloads nothing.
    pub(super) applied_text: Option<String>,
    /// Accept loops of removed ports, told to stop: awaited before the next
    /// reload, so a port removed and added back is free to bind again.
    pub(super) closing: Vec<JoinHandle<()>>,
    /// Where `apply` publishes the config in force and its balancers, for
    /// `/config` and `/targets`; readiness too.
    pub(super) published: Arc<AdminState>,
    /// The per-target series: new targets get theirs, removed ones lose
    /// theirs.
    pub(super) target_metrics: TargetMetrics,
}

/// What asked for a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Trigger {
    Signal,
    FileChange,
    /// A new revision from the etcd watch.
    Etcd,
    /// Again, after a port could not be bound (`Outcome::Retry`).
    Retry,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Trigger::Signal => "SIGHUP",
            Trigger::FileChange => "file change",
            Trigger::Etcd => "etcd watch",
            Trigger::Retry => "retry",
        }
    }
}

/// Shutdown: every listener and probe stops, the steering program is
/// detached; returns once every listening socket is closed.
pub(super) async fn stop_accepting(state: &mut State) {
    for l in state.listeners.values() {
        let _ = l.stop.send(true);
    }
    for a in state.apps.values() {
        let _ = a.probes.send(true);
    }
    for (_, l) in std::mem::take(&mut state.listeners) {
        let _ = l.task.await;
    }
    if let Some(steer) = state.steer.take() {
        steer.stop().await;
    }
}

/// Waits for the accept loops of removed ports to close their sockets.
pub(super) async fn closed(state: &mut State) {
    for task in state.closing.drain(..) {
        let _ = task.await;
    }
}

/// Binds every port of `config` that is not already listening. All or
/// nothing: on any failure the sockets bound so far are closed again.
pub(super) fn bind_new(
    state: &State,
    config: &Config,
    settings: &Settings,
    mut inherited: Option<&mut HashMap<u16, TcpListener>>,
) -> anyhow::Result<Vec<(u16, TcpListener)>> {
    let mut bound = Vec::new();
    if let Some(steer) = &state.steer {
        let ports: Vec<u16> = config.listeners().map(|(_, port)| port).collect();
        steer.check_new_ports(&ports)?;
        return Ok(bound);
    }
    for (app_idx, port) in config.listeners() {
        if state.listeners.contains_key(&port) {
            continue;
        }
        let addr = listen_addr(&settings.listen_address, port)?;
        // A socket handed over from the old process, if it is this one.
        let handed = inherited.as_mut().and_then(|h| h.remove(&port));
        if let Some(l) = handed.filter(|l| l.local_addr().ok() == Some(addr)) {
            bound.push((port, l));
            continue;
        }
        let l = listener::bind(addr, settings.socket_buffers)
            .with_context(|| format!("app {:?} port {port}", config.apps[app_idx].name))?;
        bound.push((port, l));
    }
    Ok(bound)
}

/// Makes `state` match `config`. Cannot fail: everything fallible (parsing,
/// validation, binding) happened before.
pub(super) fn apply(
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
                let (permits, clients, previous) = match &old {
                    Some(h) => (
                        h.runtime.permits.clone(),
                        h.runtime.clients.clone(),
                        h.runtime.balancer.backends.clone(),
                    ),
                    None => (
                        Arc::new(Semaphore::new(settings.max_per_app)),
                        Arc::default(),
                        Vec::new(),
                    ),
                };
                let balancer = Arc::new(Balancer::reusing(
                    &spec.name,
                    spec.balance,
                    &spec.targets,
                    &previous,
                    &state.target_metrics,
                ));
                if let Some(h) = old {
                    let _ = h.probes.send(true);
                    h.runtime
                        .balancer
                        .retire(Some(&balancer), &state.target_metrics);
                    tracing::info!(app = %spec.name, targets = %targets_str(spec), "app changed");
                }
                let (probes, probes_rx) = watch::channel(false);
                let probes_spec = Arc::new(ProbeSpec::for_app(settings.health, spec));
                balancer.spawn_probes(&probes_spec, &shared.loop_guard, probes_rx);
                AppHandle {
                    spec: spec.clone(),
                    runtime: Arc::new(AppRuntime {
                        balancer,
                        permits,
                        metrics: shared.metrics.app(&spec.name),
                        proxy_protocol: spec.proxy_protocol,
                        accept_proxy: spec.accept_proxy.clone(),
                        max_per_client: spec.max_per_client,
                        clients,
                    }),
                    probes,
                }
            }
        };
        apps.insert(spec.name.clone(), handle);
    }
    for (name, gone) in state.apps.drain() {
        let _ = gone.probes.send(true);
        gone.runtime.balancer.retire(None, &state.target_metrics);
        shared.metrics.remove_app(&name);
        tracing::info!(app = %name, "app removed");
    }
    state.apps = apps;
    shared.apps.store(config.apps.len(), Ordering::Relaxed);
    state.published.publish(
        state
            .apps
            .values()
            .map(|a| a.runtime.balancer.clone())
            .collect(),
    );

    let ports = config.listeners().map(|(_, port)| port);
    if let Some(steer) = &mut state.steer {
        let steered = steer.addr.port();
        shared
            .loop_guard
            .set_ports(ports.chain(std::iter::once(steered)));
        let mut wanted = HashMap::new();
        let mut table = HashMap::new();
        for (app_idx, port) in config.listeners() {
            wanted.insert(port, app_idx as u32);
            table.insert(port, state.apps[&config.apps[app_idx].name].runtime.clone());
        }
        steer.apply(&wanted, table);
        return;
    }
    shared.loop_guard.set_ports(ports);

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
            handle.slot.store(runtime);
            handle.app = name.clone();
            continue;
        }
        let Some(l) = bound.remove(&port) else {
            // bind_new bound every port not already listening.
            tracing::error!(port, "no socket for new port; skipped");
            continue;
        };
        let fd = std::os::fd::AsRawFd::as_raw_fd(&l);
        let slot: AppSlot = Arc::new(ArcSwap::new(runtime));
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
                fd,
                slot,
                stop,
                task,
            },
        );
    }
}

/// `text` is the config in force now: for `/config`, its hash for
/// `proxy_config_info`, and to tell a SIGHUP that changed nothing.
pub(super) fn applied_text(state: &mut State, shared: &Shared, text: String) {
    let published = ConfigText::new(&text);
    shared.metrics.config_applied(&published.sha256);
    state.published.publish_text(published);
    state.applied_text = Some(text);
}

fn targets_str(app: &App) -> String {
    app.targets
        .iter()
        .map(|t| t.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// What a reload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    Applied,
    /// The same text as last tried: nothing done.
    Unchanged,
    /// The text is wrong: the same text will be wrong again.
    Rejected,
    /// Valid, but a new port could not be bound (held by another process
    /// for now, say): the same text may work later, so it is tried again
    /// (`Trigger::Retry`), not taken as already tried.
    Retry,
}

/// SIGHUP or a file change: load and validate the file, bind new ports,
/// then switch. Any failure leaves the running config untouched.
pub(super) async fn reload(
    state: &mut State,
    settings: &Settings,
    shared: &Arc<Shared>,
    trigger: Trigger,
) -> Outcome {
    let text = config::file::read(&settings.config).await;
    let source = settings.config.display().to_string();
    reload_text(state, settings, shared, trigger, text, &source, &[])
}

/// The reload path every source shares: validate `text`, bind new ports,
/// then switch. `source` names it in errors; `keys[i]` (etcd) says where
/// `Apps[i]` came from.
pub(super) fn reload_text(
    state: &mut State,
    settings: &Settings,
    shared: &Arc<Shared>,
    trigger: Trigger,
    text: anyhow::Result<String>,
    source: &str,
    keys: &[String],
) -> Outcome {
    // SIGHUP also means "logrotate moved the file", whatever the config says.
    if let (Trigger::Signal, Some(log)) = (&trigger, &shared.access_log) {
        log.reopen();
    }
    let trigger_name = trigger.as_str();
    if let (Trigger::Signal | Trigger::Retry, Ok(text)) = (trigger, &text) {
        if state.applied_text.as_deref() == Some(text.as_str()) {
            // A retry that finds the config in force (the file went back
            // to it) has nothing left to do, and says nothing.
            if trigger == Trigger::Signal {
                shared.metrics.reloads_unchanged.inc();
                tracing::info!(
                    trigger = trigger_name,
                    "config unchanged; nothing to reload (the access log, if any, was reopened)"
                );
            }
            return Outcome::Unchanged;
        }
    }
    // A retry that cannot read the file (fds short, the file swapped out
    // for a moment) tries again later rather than giving up.
    let unread_retry = trigger == Trigger::Retry && text.is_err();
    let mut retry = false;
    let result = text.and_then(|text| {
        let again = matches!(trigger, Trigger::Signal | Trigger::Retry);
        if !again && state.last_text.as_deref() == Some(text.as_str()) {
            return Ok(None);
        }
        state.last_text = Some(text.clone());
        let (config, listen) = settings.parse_config(&text, source)?;
        let bound = bind_new(state, &config, settings, None).inspect_err(|e| {
            // Not "tried already": the port may be free by the next try.
            // Only for a port in use (or an address not there yet): a
            // port this process may not bind stays refused, and would
            // only log an error every 30 s.
            if is_transient_bind_error(e) {
                state.last_text = None;
                retry = true;
            }
        })?;
        Ok(Some((config, listen, bound)))
    });
    match result {
        Ok(None) => {
            tracing::debug!(
                trigger = trigger_name,
                "config source changed but the config text did not; nothing to reload"
            );
            Outcome::Unchanged
        }
        Ok(Some((config, listen, bound))) => {
            let added: Vec<u16> = bound.iter().map(|(p, _)| *p).collect();
            shared.loop_guard.set_listen(listen);
            apply(state, &config, bound, shared, settings);
            if let Some(text) = state.last_text.clone() {
                applied_text(state, shared, text);
            }
            shared.metrics.reloads_ok.inc();
            tracing::info!(
                trigger = trigger_name,
                apps = config.apps.len(),
                listeners = state.listeners.len(),
                added_ports = ?added,
                "config reloaded"
            );
            Outcome::Applied
        }
        Err(e) => {
            shared.metrics.reloads_failed.inc();
            let error = crate::config::etcd::table::name_keys(&format!("{e:#}"), keys);
            if retry || unread_retry {
                tracing::error!(trigger = trigger_name, error = %error, "config reload rejected for now (a new port is taken, or the file could not be read); still running the previous config, and trying again");
                return Outcome::Retry;
            }
            tracing::error!(trigger = trigger_name, error = %error, "config reload rejected; still running the previous config");
            Outcome::Rejected
        }
    }
}

/// A bind that may work later: the port is in use, or the address is not
/// on this host yet.
fn is_transient_bind_error(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<std::io::Error>())
        .any(|e| {
            matches!(
                e.raw_os_error(),
                Some(libc::EADDRINUSE | libc::EADDRNOTAVAIL)
            )
        })
}
