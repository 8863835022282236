//! Half-closed connections: `--client-fin-timeout` and `--server-fin-timeout`,
//! HAProxy's `timeout client-fin` / `timeout server-fin`. Once one side's
//! FIN was passed on, the connection waits only for the other side: to send
//! the rest, read what it was sent, and close. A peer that vanished (or a
//! NAT that forgot the flow after the first FIN) would otherwise hold the
//! pair for the whole idle timeout. The timer is the idle timer's rule
//! (nothing moved either way for this long), counted from the half-close at
//! the earliest, and it ends the connection the same way: a reset to both
//! sides if bytes were still owed, else a clean close.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use super::{ConnInfo, EndReason};

/// The two half-closed limits; None = only the idle timeout applies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FinTimeouts {
    /// After the target's FIN reached the client: how long the client may
    /// stay quiet (send nothing, read nothing) before the pair is closed.
    pub client: Option<Duration>,
    /// After the client's FIN reached the target: how long the target may
    /// stay quiet (answer nothing) before the pair is closed.
    pub server: Option<Duration>,
}

/// The half-close timer of one connection, armed by the first FIN passed on.
pub(super) struct Armed<Q> {
    timer: Option<(EndReason, Pin<Box<Q>>)>,
}

impl<Q: Future<Output = ()>> Armed<Q> {
    pub(super) fn new() -> Self {
        Armed { timer: None }
    }

    /// One direction passed its FIN on (`from_client`: the client's, to the
    /// target). `quiet(limit)` resolves once nothing moved for `limit`,
    /// counted from now. Only the first FIN arms: after the second one the
    /// connection is over.
    pub(super) fn arm(
        &mut self,
        from_client: bool,
        conn: &ConnInfo,
        quiet: impl Fn(Option<Duration>) -> Q,
    ) {
        if self.timer.is_some() {
            return;
        }
        let (end, limit) = if from_client {
            (EndReason::ServerFinTimeout, conn.rules.fin_timeouts.server)
        } else {
            (EndReason::ClientFinTimeout, conn.rules.fin_timeouts.client)
        };
        if limit.is_some() {
            self.timer = Some((end, Box::pin(quiet(limit))));
        }
    }

    /// Resolves with the end reason once the armed timer fires; never if
    /// none is armed.
    pub(super) async fn fired(&mut self) -> EndReason {
        match &mut self.timer {
            Some((end, quiet)) => {
                quiet.await;
                *end
            }
            None => std::future::pending().await,
        }
    }
}
