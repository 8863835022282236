//! `--steering sk_lookup` in the running server: the one socket, the
//! program feeding it, and the checks that make "proxy ready" true: no
//! listener is robbed of its port, and every port reaches this proxy.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::Settings;
use crate::edge::listener::{self, listen_addr};
use crate::edge::steering::{self, PortTable, Probes, SkLookupSteering};
use crate::edge::{AppRuntime, Shared};

/// How long a starting proxy waits for ports another sk_lookup program
/// still takes. A SIGKILLed predecessor's program goes with its process,
/// a few ms after the signal here; a live other proxy never goes.
pub(super) const START_WAIT: Duration = Duration::from_secs(2);

pub(super) struct SteerState {
    pub(super) bpf: SkLookupSteering,
    pub(super) table: PortTable,
    /// The one socket's address (port `--steering-port`).
    pub(super) addr: SocketAddr,
    /// Its fd, open while `task` runs: what a handoff sends.
    pub(super) fd: std::os::fd::RawFd,
    /// `--listen-address`: what the program steers (unspecified: every
    /// local address).
    steered: IpAddr,
    probes: Arc<Probes>,
    /// Ports put into `PORTS` since the last `verify`.
    unverified: Vec<u16>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// Refuses ports a listener holds, then binds the one socket, loads and
/// attaches the sk_lookup program, and starts accepting; `PORTS` is filled
/// by `apply`, checked by `verify`. `inherited`: the old process's socket
/// on a takeover, used instead of binding one.
pub(super) fn start(
    settings: &Settings,
    ports: &[u16],
    shared: &Arc<Shared>,
    inherited: Option<TcpListener>,
) -> anyhow::Result<SteerState> {
    let steered = listen_addr(&settings.listen_address, 0)?.ip();
    steering::check_listeners(steered, ports, None)
        .context("--steering sk_lookup: a configured port is taken")?;
    let program = || -> anyhow::Result<_> {
        steering::check_support()?;
        let (bind_addr, steer_config) = steering::addresses(steered, settings.steering_port);
        let l = match inherited {
            Some(l) => l,
            None => listener::bind(bind_addr, settings.socket_buffers)?,
        };
        let bpf = SkLookupSteering::load(&l, steer_config)?;
        Ok((l, bpf))
    };
    let (l, bpf) = program().context(
        "--steering sk_lookup: cannot steer ports with sk_lookup (use --steering listeners to run without it)",
    )?;
    let addr = l.local_addr().context("steering listener address")?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&l);
    let table: PortTable = Arc::default();
    let probes = Arc::new(Probes::default());
    let (stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(steering::accept_loop(
        l,
        table.clone(),
        probes.clone(),
        shared.clone(),
        stop_rx,
    ));
    Ok(SteerState {
        bpf,
        table,
        addr,
        fd,
        steered,
        probes,
        unverified: Vec::new(),
        stop,
        task,
    })
}

impl SteerState {
    /// A reload's half of `start`'s listener check: the ports it would add.
    pub(super) fn check_new_ports(&self, ports: &[u16]) -> anyhow::Result<()> {
        let table = self.table.load();
        let new: Vec<u16> = ports
            .iter()
            .filter(|p| !table.contains_key(p))
            .copied()
            .collect();
        steering::check_listeners(self.steered, &new, Some(self.addr))
    }

    /// Steers `wanted` (port -> app index) to `table`'s apps: the port table
    /// first gains the new ports (so nothing steered finds no app), then
    /// `PORTS` changes, then the table drops the removed ports. Live
    /// connections hold their own app.
    pub(super) fn apply(
        &mut self,
        wanted: &HashMap<u16, u32>,
        table: HashMap<u16, Arc<AppRuntime>>,
    ) {
        let mut both = (**self.table.load()).clone();
        both.extend(table.iter().map(|(p, r)| (*p, r.clone())));
        self.table.store(Arc::new(both));
        match self.bpf.update(wanted) {
            Ok(done) => {
                tracing::info!(
                    ports = wanted.len(),
                    added = done.added.len(),
                    moved = done.moved,
                    removed = done.removed,
                    "sk_lookup ports updated"
                );
                self.unverified.extend(done.added);
            }
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "updating the sk_lookup PORTS map failed; the next reload retries")
            }
        }
        self.table.store(Arc::new(table));
    }

    /// Checks that every port added since the last call reaches this
    /// proxy, waiting up to `wait` for other owners to go.
    pub(super) async fn verify(&mut self, wait: Duration) -> anyhow::Result<()> {
        let ports = std::mem::take(&mut self.unverified);
        if ports.is_empty() {
            return Ok(());
        }
        let ours = self.bpf.ours();
        steering::verify(&ours, &self.probes, self.addr.ip(), &ports, wait).await
    }

    /// Detaches the program, then closes the socket once its accept loop
    /// has stopped.
    pub(super) async fn stop(mut self) {
        // Detach first: new connections to steered ports are refused by the
        // kernel rather than queued on a socket about to close.
        self.bpf.detach();
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}
