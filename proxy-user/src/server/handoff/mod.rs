//! Upgrades and restarts without a refused connection: the running proxy
//! (the giver, `--handoff-socket PATH`) hands its listening sockets, and
//! then its established connections (fastpath pairs with the BPF maps
//! they live in), to a new process (the
//! taker, `--takeover PATH`) over a Unix seqpacket socket with SCM_RIGHTS.
//!
//! The exchange, one message per line (NOTES.md §"Upgrades" has the full
//! story of who owns which fd when, and what happens if either dies):
//!
//! ```text
//! taker                                  giver (serving all along)
//! Hello{pid}                       ->
//!                                  <-    Listeners{ports, steer, admin, last} + fds
//! (bind what is new, validate, load, attach; accept loops wait on a gate)
//! Ready{takes_conns}               ->
//!                                        stop accepting (close its copies,
//!                                        detach its sk_lookup program),
//!                                        give up the handoff socket path
//!                                  <-    Stopped
//! (open the gate: accept; bind the handoff socket path)
//!                                  <-    Maps{sets} + 5 fds each (fastpath
//!                                        map sets; their rings no longer
//!                                        read by the giver)
//! Adopted{sets}                    ->    (the giver reads the rest again)
//!                                  <-    Conns{conns} + 2 fds each (batches)
//! Took{ids}                        ->    (giver closes its copies; anything
//!                                        not taken carries on in the giver)
//!                                  <-    Confirmed (the taker resumes them),
//!                                        or Withdrawn when Took came too
//!                                        late: the giver carries the batch
//!                                        on, and the taker closes its copies
//!                                  <-    Done{moved}
//!                                        (giver drains the rest, exits)
//! ```
//!
//! Until `Ready` the giver never stopped serving: a taker that fails or
//! dies before it leaves the giver exactly as it was.

use serde::{Deserialize, Serialize};

use crate::edge::handover::MovedMeta;

mod giver;
mod socket;
pub(super) mod successor;
mod taker;
mod wire;

pub(super) use giver::{give, Given};
pub(super) use socket::HandoffSocket;
pub(super) use taker::Takeover;
pub(super) use wire::Link;

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Msg {
    Hello {
        pid: u32,
    },
    /// The fds are the listening sockets of `ports`, in order, then the
    /// sk_lookup socket when `steer`, then the admin listener when `admin`.
    Listeners {
        ports: Vec<u16>,
        steer: bool,
        #[serde(default)]
        admin: bool,
        last: bool,
        /// The giver answers every `Took` with `Confirmed` or `Withdrawn`
        /// (an older one does not say, and does not).
        #[serde(default)]
        confirms: bool,
    },
    /// `takes_conns`: the taker resumes established connections (it runs a
    /// userspace plane).
    Ready {
        takes_conns: bool,
        /// It can adopt fastpath map sets and resume their pairs.
        #[serde(default)]
        takes_fastpath: bool,
        /// It resumes a batch only once the giver confirmed it.
        #[serde(default)]
        awaits_confirm: bool,
    },
    Stopped,
    /// Fastpath map sets, `FDS_PER_SET` fds each (`SOCKETS`, `PEERS`,
    /// `CONTROL`, `STATE`, `EVENTS`); sent before any `Conns`, with their
    /// rings no longer read by the giver.
    Maps {
        sets: Vec<u32>,
    },
    /// The sets the taker adopted (it reads their rings from now on).
    Adopted {
        sets: Vec<u32>,
    },
    /// Two fds per connection: client, then upstream.
    Conns {
        conns: Vec<MovedMeta>,
    },
    /// Which of the last `Conns` the taker resumed (the giver carries on
    /// the others).
    Took {
        ids: Vec<u64>,
        /// Their places in the batch, which the giver goes by. Ids alone
        /// can name two connections: each process numbers its own from 1,
        /// and a moved one keeps its number. (An older taker sends ids
        /// only.)
        #[serde(default, skip_serializing_if = "Option::is_none")]
        at: Option<Vec<u32>>,
    },
    /// The giver heard `Took` and let those connections go: the taker
    /// resumes them. Without it, a `Took` the giver gave up waiting for
    /// would leave both processes pumping one stream.
    Confirmed,
    /// The giver gave up waiting for `Took` and carries the whole batch on:
    /// the taker closes its copies and resumes none.
    Withdrawn,
    Done {
        moved: u64,
    },
}
