//! What the code that started a server holds: its addresses and the ways
//! to reload, drain or cut it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use crate::dataplane::Signals;
use crate::edge::tracker::Tracker;
use crate::ops::access_log::AccessLog;

/// What a `Handle` asks of the running server.
pub(super) enum Command {
    Reload(oneshot::Sender<()>),
    Shutdown(&'static str, oneshot::Sender<()>),
}

/// A started server. Dropping it without `shutdown` leaves the server
/// running in its runtime until that runtime ends.
pub struct Handle {
    pub(super) commands: mpsc::Sender<Command>,
    pub(super) cutter: Cutter,
    pub(super) admin: Option<SocketAddr>,
    /// Turns true when the server stopped serving: drained, or handed over
    /// and drained.
    pub(super) finished: watch::Receiver<bool>,
}

impl Handle {
    /// The admin listener's address, when one was asked for.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin
    }

    /// What cuts every live connection (RST both ways), usable while the
    /// control task drains.
    pub fn cutter(&self) -> Cutter {
        self.cutter.clone()
    }

    /// Resolves once the server stopped serving (after a shutdown, or a
    /// handoff to a new process and its drain).
    pub async fn finished(&self) {
        let mut f = self.finished.clone();
        let _ = f.wait_for(|done| *done).await;
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

/// Resets every live connection: the drain deadline, or a second signal.
#[derive(Clone)]
pub struct Cutter {
    pub(super) hard_stop: Arc<watch::Sender<Signals>>,
    pub(super) tracker: Arc<Tracker>,
    /// Flushed once the connections are gone (`flush_log`).
    pub(super) access_log: Option<AccessLog>,
}

impl Cutter {
    /// Tells every connection to reset both its sockets; waits up to `grace`
    /// for them to finish.
    pub async fn cut(&self, grace: Duration) {
        self.hard_stop.send_modify(|s| s.hard_stop = true);
        self.tracker.wait_idle(grace).await;
    }

    /// The process is about to exit: the access log's queued lines (the
    /// close lines of the connections just drained or cut) go to its file
    /// first, within `ACCESS_LOG_FLUSH`.
    pub async fn flush_log(&self) {
        if let Some(log) = &self.access_log {
            log.flush(ACCESS_LOG_FLUSH).await;
        }
    }
}

/// How long the exit waits for the access log's last lines: a disk that
/// takes longer is stuck, and so would the exit be.
const ACCESS_LOG_FLUSH: Duration = Duration::from_secs(2);
