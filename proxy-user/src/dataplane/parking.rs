//! Upgrade hook of the userspace planes: a connection whose owner runs it
//! in `Parking::scope` can stop at a safe point (`safepoint`) and hand back
//! its sockets instead of closing them (`edge::handover` moves it to the
//! new process). Nothing else in the planes changes.

use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio::net::TcpStream;

use super::fastpath::{Ledger as FastLedger, PairHold};

tokio::task_local! {
    /// Set by the connection's owner when it may move the connection to
    /// another process (an upgrade): `carry` then parks at a safe point.
    pub(super) static PARKING: Arc<Parking>;
}

/// Upgrade hook: lets a userspace connection stop at a safe point and give
/// its two sockets and counters back instead of closing them.
/// The request itself comes with the other signals (`Rules::signals`).
pub struct Parking {
    /// Boxed: every connection holds a `Parking` for its whole life, and
    /// only a parked one fills this (248 bytes inline).
    parked: Mutex<Option<Box<Parked>>>,
}

/// A connection stopped at a safe point.
pub struct Parked {
    pub client: TcpStream,
    pub upstream: TcpStream,
    /// Bytes moved each way by the `carry` that parked it.
    pub client_to_target: u64,
    pub target_to_client: u64,
    /// A fastpath pair: where it stands, and its map set kept alive (its
    /// counts are all in the ledger, none in the two above).
    pub fastpath: Option<(FastLedger, PairHold)>,
    /// A fastpath pair's bytes each way so far, which its ledger carries
    /// on: for the byte meter (`proxy_bytes_total`) only. The owner's
    /// live count of them must go with it, or the next process counts
    /// them again. 0 on the userspace planes.
    pub in_ledger: [u64; 2],
}

impl Parking {
    /// `Signals::park` turning true asks the connection to park; false
    /// again (the other process is gone, or the wait is over) lets it run on.
    pub fn new() -> Arc<Parking> {
        Arc::new(Parking {
            parked: Mutex::new(None),
        })
    }

    /// Runs `carry` (of a userspace plane) so that it can park.
    pub async fn scope<F: Future>(self: &Arc<Self>, carry: F) -> F::Output {
        PARKING.scope(self.clone(), carry).await
    }

    /// `carry` parked: the sockets and counters for the owner.
    pub(super) fn park(&self, parked: Parked) {
        *self.parked.lock().unwrap_or_else(|p| p.into_inner()) = Some(Box::new(parked));
    }

    /// What `carry` left when it parked, if it did.
    pub fn take(&self) -> Option<Parked> {
        let parked = self.parked.lock().unwrap_or_else(|p| p.into_inner()).take();
        parked.map(|p| *p)
    }
}
