//! Established connections moving to another process during an upgrade
//! (`server::handoff` carries them over the handoff socket; the taker
//! carries each on with `edge::conn::resume`).
//!
//! The old process raises `request`; each connection on any plane parks
//! at its next safe point (a fastpath pair with its ledger; its map set
//! moved first) (`dataplane::Parking`) and offers
//! itself through `offer`. While a successor takes connections the offer is
//! accepted and the connection's task ends; the handoff then sends it, and
//! logs "handed over" for each one the successor took. One it left, and
//! every one when there is no successor (or it stopped taking), carries on
//! here, having lost nothing: it parked with no byte in hand.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

use super::AppRuntime;
use crate::dataplane::{FastLedger, PairHold, Signals};

/// What a connection is, apart from its two sockets: enough for the taker
/// to resume it and write the one close line at its end.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MovedMeta {
    pub id: u64,
    pub app: String,
    pub port: u16,
    pub client: SocketAddr,
    pub target: String,
    pub upstream: SocketAddr,
    pub attempts: u32,
    /// Bytes moved so far, each way, and by userspace.
    pub client_to_target: u64,
    pub target_to_client: u64,
    pub userspace_bytes: u64,
    /// Age at the move, so the close line's duration covers its whole life.
    pub age_ms: u64,
    /// Processes that carried it before, oldest first.
    pub carried_by: Vec<u32>,
    /// Bytes of the client's PROXY header, which the first process read
    /// and forwarded to nobody (`Conn::client_header`). An older giver
    /// does not say: 0, as it counted.
    #[serde(default)]
    pub client_header: u32,
    /// A fastpath pair: where it stands in its map set (which moved first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fastpath: Option<FastLedger>,
    /// Bytes each way that the processes before added to
    /// `proxy_bytes_total`: more than the counts above for a fastpath
    /// pair, whose ledger carries its own. An older giver does not say:
    /// the counts above, as it assumed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metered: Option<[u64; 2]>,
    /// Bytes of the PROXY header the first process sent the target: the
    /// live byte count (`edge::live`) leaves them out.
    #[serde(default)]
    pub target_header: u16,
    /// Accept to an established target connection, in the first process.
    #[serde(default)]
    pub connect_us: u64,
    /// The address the client connected to, where the first process knew
    /// it (its client's PROXY header says it, and the moved socket's own
    /// address is the proxy's). None: the socket's, as an older giver
    /// assumed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<SocketAddr>,
}

impl MovedMeta {
    /// Bytes each way already in `proxy_bytes_total`, counted by the
    /// processes that carried it before.
    pub fn counted(&self) -> [u64; 2] {
        self.metered
            .unwrap_or([self.client_to_target, self.target_to_client])
    }
}

/// A parked connection on its way out.
pub struct Moving {
    pub meta: MovedMeta,
    /// Its app here (the taker looks it up by name).
    pub app: Arc<AppRuntime>,
    pub client: TcpStream,
    pub upstream: TcpStream,
    /// A fastpath pair's map set, kept while the pair lives (with
    /// `meta.fastpath`).
    pub hold: Option<PairHold>,
}

/// The old process's side: asks connections to park and collects them.
pub struct Handover {
    /// Every connection's signals (`Signals::park` is ours).
    signals: Arc<watch::Sender<Signals>>,
    taker: Mutex<Option<mpsc::UnboundedSender<Moving>>>,
}

impl Handover {
    pub fn new(signals: Arc<watch::Sender<Signals>>) -> Handover {
        Handover {
            signals,
            taker: Mutex::new(None),
        }
    }

    /// What a connection watches for a park request.
    #[cfg(test)]
    fn requests(&self) -> watch::Receiver<Signals> {
        self.signals.subscribe()
    }

    /// Starts collecting: every movable connection parks and arrives on
    /// the returned channel until `stop`.
    pub fn start(&self) -> mpsc::UnboundedReceiver<Moving> {
        let (tx, rx) = mpsc::unbounded_channel();
        *self.taker.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
        // Stored even with no connection yet: later ones see the request.
        self.signals.send_modify(|s| s.park = true);
        rx
    }

    /// Stops collecting: connections not parked yet carry on here.
    pub fn stop(&self) {
        *self.taker.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.signals.send_modify(|s| s.park = false);
    }

    /// A parked connection offers itself; `Err` gives it back to carry on.
    pub(super) fn offer(&self, m: Box<Moving>) -> Result<(), Box<Moving>> {
        match &*self.taker.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(tx) => tx.send(*m).map_err(|e| Box::new(e.0)),
            None => Err(m),
        }
    }
}

/// How long the old process waits for connections to reach a safe point:
/// a connection whose reader stopped reading never does, and drains here.
pub const PARK_WAIT: Duration = Duration::from_secs(2);

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn requests_follow_start_and_stop() {
        let h = Handover::new(Arc::new(watch::channel(Signals::default()).0));
        // A connection that arrives after the start (none asked before)
        // still sees the request.
        let _rx = h.start();
        assert!(h.requests().borrow().park);
        h.stop();
        let req = h.requests();
        assert!(!req.borrow().park);
        let _rx = h.start();
        assert!(
            req.borrow().park,
            "an earlier subscriber sees the next start"
        );
        assert!(!req.borrow().hard_stop, "parking is not a stop");
    }
}
