//! The control task: owns the running server's state, applies reloads one
//! at a time, gives the server to a successor (`handoff`), and drains.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use super::handle::{Command, Cutter};
use super::handoff::{self, HandoffSocket};
use super::settings::Settings;
use super::source::EtcdSource;
use super::state::{self, Outcome, State, Trigger};
use super::HARD_STOP_GRACE;
use crate::edge::Shared;
use crate::ops::sd_notify;

/// The running server, owned by its control task.
pub(super) struct Control {
    pub(super) state: State,
    pub(super) settings: Settings,
    pub(super) shared: Arc<Shared>,
    pub(super) cutter: Cutter,
    /// `--handoff-socket`: where a successor connects.
    pub(super) handoff: Option<HandoffSocket>,
    /// The admin listener's fd (open while its task runs) and task.
    pub(super) admin: Option<(std::os::fd::RawFd, tokio::task::AbortHandle)>,
    /// Kept open: accept loops end when it closes.
    pub(super) _accepting: watch::Sender<bool>,
    /// Some: the config comes from etcd (and the file is not watched).
    pub(super) etcd: Option<EtcdSource>,
    /// A valid config whose new port could not be bound is tried again
    /// then, with the wait since the last try (doubling, at most
    /// `RETRY_MAX`); None: nothing to retry.
    pub(super) retry: Option<(tokio::time::Instant, Duration)>,
}

/// The first wait before a reload that failed to bind is tried again.
const RETRY_FIRST: Duration = Duration::from_secs(1);
/// The longest wait between such tries.
const RETRY_MAX: Duration = Duration::from_secs(30);

/// Why the control loop ended.
enum Stop {
    Shutdown(&'static str, Option<tokio::sync::oneshot::Sender<()>>),
    HandedOver(handoff::Given),
}

/// Applies reloads (asked for, a settled file change, a new etcd revision)
/// one at a time until a shutdown or a handoff, then drains.
pub(super) async fn control(
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
            Ok(()) = async { match &mut c.etcd {
                Some(src) => src.updates.changed().await,
                None => std::future::pending().await,
            } } => c.etcd_changed(Trigger::Etcd).await,
            () = async { match c.retry {
                Some((at, _)) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            } } => match c.etcd.is_some() {
                true => c.etcd_changed(Trigger::Retry).await,
                false => c.reload(Trigger::Retry).await,
            },
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
        let outcome = match &mut self.etcd {
            // SIGHUP with etcd: the newest table if it is not in force (it
            // was rejected, or could not be bound), else the table in
            // force, validated again.
            Some(src) if src.newest_pending() => {
                // SIGHUP also means "logrotate moved the file", and the
                // newest table may turn out unchanged before any reload
                // would reopen it.
                if let (Trigger::Signal, Some(log)) = (trigger, &self.shared.access_log) {
                    log.reopen();
                }
                (src.apply_newest(&mut self.state, &self.settings, &self.shared, trigger)).await
            }
            Some(src) => {
                let source = "the etcd config in force";
                let text = Ok(src.current());
                let (st, set, sh) = (&mut self.state, &self.settings, &self.shared);
                state::reload_text(st, set, sh, trigger, text, source, &[])
            }
            None => state::reload(&mut self.state, &self.settings, &self.shared, trigger).await,
        };
        self.retry_after(trigger, outcome);
        self.verify_steering().await;
    }

    async fn etcd_changed(&mut self, trigger: Trigger) {
        state::closed(&mut self.state).await;
        if let Some(src) = &mut self.etcd {
            let outcome = src
                .apply_newest(&mut self.state, &self.settings, &self.shared, trigger)
                .await;
            self.retry_after(trigger, outcome);
        }
        self.verify_steering().await;
    }

    /// A reload that could not bind is tried again, sooner the first
    /// times; anything else (applied, or a config that is wrong) ends the
    /// retries, and so does a retry that found nothing new to try. Another
    /// trigger that changed nothing leaves them as they were.
    fn retry_after(&mut self, trigger: Trigger, outcome: Outcome) {
        self.retry = match outcome {
            Outcome::Retry => {
                let wait = self
                    .retry
                    .map_or(RETRY_FIRST, |(_, w)| (w * 2).min(RETRY_MAX));
                Some((tokio::time::Instant::now() + wait, wait))
            }
            Outcome::Unchanged if trigger != Trigger::Retry => self.retry,
            Outcome::Unchanged | Outcome::Applied | Outcome::Rejected => None,
        };
    }

    async fn verify_steering(&mut self) {
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
            pid = crate::ops::pid(),
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
        self.cutter.flush_log().await;
    }
}
