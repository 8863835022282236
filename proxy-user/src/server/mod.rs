//! Wiring: config → listeners, balancers, probes → accept loops → drain,
//! and reloads (SIGHUP or a config file change) that change all of that
//! without dropping connections. With `--steering sk_lookup` one socket and
//! the BPF `PORTS` map stand in for the per-port listeners.
//!
//! `start` brings a server up in the calling runtime and hands back a
//! `Handle` (its addresses, reload, shutdown): the binary drives it from
//! signals (`run`), the tests drive it directly.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, watch, Semaphore};

use crate::config::etcd::EtcdMetrics;
use crate::config::{watch as config_watch, Config};
use crate::dataplane::{DataPlane, Rules, Signals};
use crate::edge::handover::Handover;
use crate::edge::steering::Steering;
use crate::edge::tracker::Tracker;
use crate::edge::{AppRuntime, FlushClock, RateLimit, Shared};
use crate::ops::access_log::AccessLog;
use crate::ops::admin::{self, AdminState};
use crate::ops::metrics::Metrics;
use crate::ops::readiness::Readiness;
use crate::upstream::loop_guard::LoopGuard;
use crate::upstream::stats::TargetMetrics;
use control::Control;
pub use handle::{Cutter, Handle};
use handoff::{HandoffSocket, Takeover};
use source::EtcdSource;
use state::State;

mod budget;
mod control;
mod handle;
mod handoff;
pub(crate) mod lifecycle;
mod run;
mod settings;
mod source;
mod state;
mod steer;

pub use run::run;
pub use settings::{check, Settings};

/// Time connections get to write their log line after a hard stop.
const HARD_STOP_GRACE: Duration = Duration::from_secs(2);

/// After a second stop signal: time live connections get to send their
/// resets before the process exits.
const SECOND_SIGNAL_GRACE: Duration = Duration::from_millis(500);

/// Starts a server: admin first (so `/readyz` says 503 while the rest comes
/// up), then the config is read and every listener bound before anything is
/// served. Any error before "proxy ready" is returned, nothing left running.
/// With `takeover`, the listening sockets come from the running proxy,
/// which serves until this one is ready (`handoff`).
pub async fn start(settings: Settings) -> anyhow::Result<Handle> {
    let token = match (&settings.admin_token_file, settings.admin_address) {
        (Some(path), Some(_)) => Some(admin::Token::read(path)?),
        (Some(_), None) => anyhow::bail!(
            "--admin-token-file turns on the admin write API, which needs --admin-address"
        ),
        (None, _) => None,
    };
    // First: the old process's sockets include the admin listener.
    let mut takeover = match &settings.takeover {
        Some(path) => Some(Takeover::connect(path).await?),
        None => None,
    };
    let (metrics, target_metrics, etcd_metrics, published) = register_metrics(token);
    // Opens once this process serves: the accept loops wait on it.
    let (accepting, accepting_rx) = watch::channel(false);
    // Opens once it is ready: a successor's admin listener waits on it.
    let (admin_open, admin_gate) = watch::channel(false);
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
            // A successor shares the listener with the old process, which
            // still serves: answering before it is ready itself, it would
            // tell every other probe "not ready" (and show a fresh /metrics).
            let gate = takeover.is_some().then(|| admin_gate.clone());
            let task = tokio::spawn(admin::serve(l, published.clone(), gate));
            Some((local, fd, task))
        }
        None => None,
    };
    let access_log = match &settings.access_log {
        Some(path) => Some(AccessLog::open(path, metrics.access_log_dropped.clone()).await?),
        None => None,
    };
    let source::Initial {
        text,
        config,
        listen,
        stamp,
        etcd,
    } = source::initial(&settings).await?;
    let plane = DataPlane::select(
        settings.mode,
        settings.copy.clone(),
        settings.splice_pipe,
        settings.fastpath,
    )?;
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

    let (hard_tx, hard_rx) = watch::channel(Signals::default());
    let hard_tx = Arc::new(hard_tx);
    let (finished_tx, finished) = watch::channel(false);
    let tracker = Arc::new(Tracker::default());
    let shared = Arc::new(Shared {
        plane,
        policy: settings.connect,
        loop_guard: Arc::new(LoopGuard::new(listen)),
        rules: Arc::new(Rules {
            idle_timeout: settings.idle_timeout,
            fin_timeouts: settings.fin_timeouts,
            signals: hard_rx,
        }),
        socket_buffers: settings.socket_buffers,
        tracker: tracker.clone(),
        global: Arc::new(Semaphore::new(max_connections as usize)),
        global_cap: max_connections as usize,
        per_app_cap: settings.max_per_app,
        apps: AtomicUsize::new(config.apps.len()),
        accepting: accepting_rx,
        handover: Handover::new(hard_tx.clone()),
        next_id: AtomicU64::new(1),
        limit_log: RateLimit::default(),
        connect_fail_log: RateLimit::default(),
        metrics,
        access_log: access_log.clone(),
        log_connections: settings.log_connections,
        flush_clock: settings.bytes_flush.map(FlushClock::start),
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
    state::applied_text(&mut state, &shared, text.clone());
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
            let taken = t.commit(shared.plane.takes_fastpath()).await;
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
    let _ = admin_open.send(true);
    log_ready(&state, &config, &shared, &settings);

    let (commands, rx) = mpsc::channel(4);
    let etcd = match (&settings.etcd, etcd) {
        (Some(es), Some(at)) => Some(EtcdSource::start(
            es.clone(),
            etcd_metrics,
            text,
            at,
            state.published.clone(),
        )),
        _ => None,
    };
    let file_changes = (etcd.is_none() && !settings.watch_config.is_zero())
        .then(|| config_watch::spawn(settings.config.clone(), stamp, settings.watch_config));
    tokio::spawn(control::control(
        Control {
            state,
            settings,
            shared,
            cutter: Cutter {
                hard_stop: hard_tx.clone(),
                tracker: tracker.clone(),
                access_log: access_log.clone(),
            },
            handoff,
            admin: admin
                .as_ref()
                .map(|(_, fd, task)| (*fd, task.abort_handle())),
            _accepting: accepting,
            etcd,
            retry: None,
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
            access_log,
        },
        admin: admin.map(|(addr, _, _)| addr),
        finished,
    })
}

/// Each component registers its own series; the admin listener renders
/// them all from the one registry.
fn register_metrics(
    token: Option<admin::Token>,
) -> (Arc<Metrics>, TargetMetrics, EtcdMetrics, Arc<AdminState>) {
    let mut registry = Registry::default();
    let metrics = Arc::new(Metrics::register(&mut registry));
    let targets = TargetMetrics::register(&mut registry);
    let etcd = EtcdMetrics::register(&mut registry);
    let readiness = Readiness::register(&mut registry);
    (
        metrics,
        targets,
        etcd,
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
