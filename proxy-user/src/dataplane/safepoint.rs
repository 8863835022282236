//! The one way a userspace connection stops with nothing in hand: both
//! directions' pumps are dropped between polls at a moment when neither
//! holds a byte (`Tally`: buffers written out, pipes empty), so the two
//! sockets hold everything not yet forwarded and whoever carries on from
//! them loses nothing. Two owners ask for it:
//! - an upgrade (`Parking`, set by the connection's owner): the sockets and
//!   counters go to the new process;
//! - `--mode auto`'s promotion: the sockets go to the kernel fastpath.
//!
//! The fastpath's directions stop the same way (`fastpath::run`), with
//! their own "busy" counts in place of `Tally`.
//!
//! Pumps are only ever dropped between polls, so "holds nothing" checked
//! between polls stays true until they are gone. A direction that already
//! passed its FIN is harmless to restart (it reads EOF again and passes it
//! again).

use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::watch;

use super::parking::{Parked, Parking, PARKING};
use super::userspace::{arm_reset, supervise_pumps, Pump};
use super::{ConnInfo, EndReason, Signals, Transfer};
use crate::gate::Gate;

/// How a userspace carry that may be promoted stopped. Its owner holds the
/// sockets and does the rest.
pub(super) enum Carried {
    /// Closed here.
    Done(Transfer),
    /// Stopped for an upgrade: the owner parks the sockets with `parking`
    /// (`park`); `transfer` is its end here.
    Park {
        parking: Arc<Parking>,
        transfer: Transfer,
    },
    /// Stopped for the kernel, with the bytes moved each way.
    Promote([u64; 2]),
}

/// Carries a connection in userspace, one `pump` per direction. Under an
/// upgrade's `Parking` it may instead stop at a safe point and hand its
/// sockets to the owner. `before`: bytes each way this process moved on
/// another plane first (a fastpath pair that fell back to the copy pump):
/// counted as moved, in the transfer and in the park's record alike.
///
/// An async block over its arguments, not an async fn, which would keep
/// both sockets twice for the connection's life.
pub(super) fn carry<'a, P: Pump>(
    pump: &'a P,
    client: TcpStream,
    upstream: TcpStream,
    conn: &'a ConnInfo,
    before: [u64; 2],
) -> impl Future<Output = Transfer> + 'a {
    async move {
        let moved = [AtomicU64::new(before[0]), AtomicU64::new(before[1])];
        match carry_or_promote(pump, &client, &upstream, conn, None, &moved).await {
            Carried::Done(t) => t,
            Carried::Park { parking, transfer } => park(&parking, client, upstream, transfer),
            // Without a promotion request nothing asks for one; were it to
            // happen, the sockets would close cleanly here.
            Carried::Promote(moved) => transfer::<P>(EndReason::Closed, moved),
        }
    }
}

/// Hands a carry's sockets to the upgrade's `parking`, with the bytes its
/// `transfer` moved each way; its end here is that transfer.
pub(super) fn park(
    parking: &Parking,
    client: TcpStream,
    upstream: TcpStream,
    transfer: Transfer,
) -> Transfer {
    parking.park(Parked {
        client,
        upstream,
        client_to_target: transfer.client_to_target,
        target_to_client: transfer.target_to_client,
        fastpath: None,
        in_ledger: [0, 0],
    });
    transfer
}

/// Like `carry`, over sockets its owner keeps, and the connection also
/// stops at a safe point once `promote` (the promotion policy's verdict)
/// resolves. `moved` counts the bytes written each way (client→target,
/// target→client) as they go: the caller's, so a caller that reads them
/// meanwhile (auto's promotion watch) keeps the only copy.
///
/// The sockets are borrowed: an owner that moves them on (into the kernel)
/// would otherwise keep room for them, moved out, beside what comes next.
pub(super) fn carry_or_promote<'a, P: Pump>(
    pump: &'a P,
    client: &'a TcpStream,
    upstream: &'a TcpStream,
    conn: &'a ConnInfo,
    promote: Option<Promote<'a>>,
    moved: &'a [AtomicU64; 2],
) -> impl Future<Output = Carried> + 'a {
    async move {
        let held = [AtomicU64::new(0), AtomicU64::new(0)];
        let mut asks = Asks {
            may_park: PARKING.try_with(|_| ()).is_ok(),
            promote,
            signals: conn.rules.signals.clone(),
        };
        let supervised = supervise_pumps(pump, client, upstream, conn, moved, &held);
        // Gated: the signals' receiver and the promotion watch are polled
        // when they fire, not at every socket's wake.
        let reached = pin!(asks.reached(&held));
        let stopped = tokio::select! {
            biased;
            end = supervised => Err(end),
            stop = Gate::new(reached) => Ok(stop),
        };
        let moved = [
            moved[0].load(Ordering::Relaxed),
            moved[1].load(Ordering::Relaxed),
        ];
        match stopped {
            Err(end) => Carried::Done(transfer::<P>(end, moved)),
            Ok(Stop::Deadline) => {
                arm_reset(client);
                arm_reset(upstream);
                Carried::Done(transfer::<P>(EndReason::DrainTimeout, moved))
            }
            Ok(Stop::Promote) => Carried::Promote(moved),
            // Only asked with a `Parking` to honour it.
            Ok(Stop::Park) => match PARKING.try_with(Arc::clone) {
                Ok(parking) => Carried::Park {
                    parking,
                    transfer: transfer::<P>(EndReason::Closed, moved),
                },
                Err(_) => Carried::Done(transfer::<P>(EndReason::Closed, moved)),
            },
        }
    }
}

fn transfer<P: Pump>(end: EndReason, [c2t, t2c]: [u64; 2]) -> Transfer {
    Transfer {
        // Userspace moved these, even when splice(2) never mapped them.
        userspace_bytes: c2t + t2c,
        client_to_target: c2t,
        target_to_client: t2c,
        ..Transfer::none(end).on(P::PLANE)
    }
}

/// Why a connection stopped.
pub(super) enum Stop {
    /// For an upgrade: its sockets go to the connection's `Parking`.
    Park,
    Promote,
    /// The drain deadline passed: at once, whatever is in hand (both sides
    /// get a reset).
    Deadline,
}

/// The promotion policy's verdict: resolves once the connection should
/// move into the kernel. A future rather than a channel: it is polled
/// where the request is awaited, so no connection allocates a channel or
/// keeps a second waiter for it.
pub(super) type Promote<'a> = Pin<&'a mut (dyn Future<Output = ()> + Send + 'a)>;

/// Who may ask this connection to stop.
pub(super) struct Asks<'a> {
    /// The connection's owner can take it at a park (`Parking`).
    pub(super) may_park: bool,
    pub(super) promote: Option<Promote<'a>>,
    /// The process's requests: a park (honoured if `may_park`), the drain
    /// deadline.
    pub(super) signals: watch::Receiver<Signals>,
}

impl<'a> Asks<'a> {
    /// Resolves at the first safe point while a stop is asked, or at once
    /// for the drain deadline. A park request withdrawn before that (an
    /// upgrade that gave up waiting) lets the connection run on; a
    /// promotion, once asked, stays asked. An upgrade comes first: the new
    /// process promotes the connection itself when it is still quiet
    /// there. Awaited once per `Asks` (the verdict future is finished once
    /// it resolved, and this holds that it did).
    ///
    /// An async block over its arguments, not an async fn, which would keep
    /// them twice in every connection.
    pub(super) fn reached<'b>(
        &'b mut self,
        held: &'b [AtomicU64; 2],
    ) -> impl Future<Output = Stop> + Send + use<'a, 'b> {
        async move {
            let mut promoted = false;
            // The signals' sender went away (the server is gone): nothing more
            // will be asked that way.
            let mut closed = false;
            // How long to wait before looking at the pumps again while one
            // holds bytes: from 1 ms, doubling to `HELD_LOOK_MAX`. A pump
            // can hold bytes for as long as its reader stalls (up to the
            // idle timeout): a fixed 1 ms look was a thousand wake-ups a
            // second for each such connection. (The doublings so far, not a
            // Duration: this future is in every connection's userspace
            // stage, and 16 bytes more put auto's box a size class up.)
            let mut doubled: u8 = 0;
            loop {
                let signals = *self.signals.borrow_and_update();
                if signals.hard_stop {
                    return Stop::Deadline;
                }
                let asked = if self.may_park && signals.park {
                    Some(Stop::Park)
                } else if promoted {
                    Some(Stop::Promote)
                } else {
                    None
                };
                match asked {
                    Some(stop) if held.iter().all(|h| h.load(Ordering::Relaxed) == 0) => {
                        return stop
                    }
                    // A pump mid-write: look again shortly.
                    Some(_) => {
                        let look = HELD_LOOK_FIRST * (1 << doubled);
                        // The drain deadline is seen after the look, at most
                        // 100 ms late: racing the look against the signals
                        // put 90 bytes in every connection's userspace stage.
                        tokio::time::sleep(look.min(HELD_LOOK_MAX)).await;
                        doubled = (doubled + 1).min(7);
                    }
                    None => {
                        // A later ask starts again from 1 ms.
                        doubled = 0;
                        tokio::select! {
                            r = self.signals.changed(), if !closed => closed = r.is_err(),
                            () = verdict(&mut self.promote), if !promoted => promoted = true,
                            else => std::future::pending().await,
                        }
                    }
                }
            }
        }
    }
}

/// The first wait for a pump that holds bytes to write them out.
const HELD_LOOK_FIRST: Duration = Duration::from_millis(1);
/// The longest: a park or a move waits at most this much longer than
/// it had to.
const HELD_LOOK_MAX: Duration = Duration::from_millis(100);

/// Resolves with the promotion policy's verdict; never without a policy.
async fn verdict(promote: &mut Option<Promote<'_>>) {
    match promote {
        Some(p) => p.as_mut().await,
        None => std::future::pending().await,
    }
}
