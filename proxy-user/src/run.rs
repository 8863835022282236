//! Wiring: config → listeners, balancers, probes → accept loops → drain.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{watch, Semaphore};

use crate::balancer::Balancer;
use crate::cli::Cli;
use crate::config::Config;
use crate::connect::{self, ConnectPolicy};
use crate::dataplane::copy::CopyPlane;
use crate::dataplane::DataPlane;
use crate::health::{self, HealthConfig};
use crate::lifecycle::{self, Signals, Tracker};
use crate::listener::{self, AppRuntime, RateLimit, Shared};

/// Time connections get to write their log line after a hard stop.
const HARD_STOP_GRACE: Duration = Duration::from_secs(2);

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    // Before anything can fail slowly: a SIGTERM during startup must not
    // hit the default action.
    let mut signals = Signals::register()?;
    let config = Config::load(&cli.config)?;
    match lifecycle::raise_fd_limit() {
        Ok(nofile) => {
            // Each proxied connection holds two fds (client + upstream).
            let needed = 2 * u64::from(cli.max_connections);
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
    )?;

    // Bind everything before serving anything: a port clash fails startup
    // as a whole rather than leaving a half-working proxy.
    let mut bound = Vec::new();
    for (app_idx, port) in config.listeners() {
        let addr = connect::listen_addr(&cli.listen_address, port)?;
        let l = listener::bind(addr)
            .with_context(|| format!("app {:?} port {port}", config.apps[app_idx].name))?;
        bound.push((app_idx, port, l));
    }

    let (stop_tx, stop_rx) = watch::channel(false);
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
    });
    let health_cfg = HealthConfig {
        interval: cli.health_interval.max(Duration::from_millis(10)),
        rise: cli.health_rise,
        fall: cli.health_fall,
        // A probe slower than the interval would overlap the next one.
        timeout: cli.connect_timeout.min(cli.health_interval),
    };
    let apps: Vec<Arc<AppRuntime>> = config
        .apps
        .iter()
        .map(|a| {
            let balancer = Arc::new(Balancer::new(&a.name, a.balance, &a.targets));
            health::spawn_probes(balancer.clone(), health_cfg, stop_rx.clone());
            Arc::new(AppRuntime {
                balancer,
                permits: Arc::new(Semaphore::new(cli.max_connections_per_app as usize)),
            })
        })
        .collect();

    let mut loops = Vec::new();
    let mut names = Vec::new();
    for (app_idx, port, l) in bound {
        let local = l.local_addr().map(|a| a.to_string()).unwrap_or_default();
        names.push(format!("{}={}", config.apps[app_idx].name, local));
        loops.push(tokio::spawn(listener::accept_loop(
            l,
            port,
            apps[app_idx].clone(),
            shared.clone(),
            stop_rx.clone(),
        )));
    }
    tracing::info!(
        plane = shared.plane.name(),
        listeners = names.len(),
        apps = config.apps.len(),
        listening = %names.join(" "),
        "proxy ready"
    );

    let sig = signals.next().await;
    tracing::info!(
        signal = sig,
        live = tracker.live(),
        drain_timeout_ms = cli.drain_timeout.as_millis() as u64,
        "shutting down: closed listeners, draining live connections"
    );
    let _ = stop_tx.send(true);
    for l in loops {
        let _ = l.await;
    }
    // A second signal means "now": do not wait for the drain.
    tokio::spawn(async move {
        let sig = signals.next().await;
        tracing::warn!(signal = sig, "second signal, exiting immediately");
        std::process::exit(1);
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
