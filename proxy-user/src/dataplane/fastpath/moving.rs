//! Fastpath pairs moving to a new process on an upgrade. The pair's
//! entries stay in its map set, which moves too (`mapset`); what travels
//! per pair is this ledger and the two sockets. The pair stops at a safe
//! point (`run`: both directions waiting at the top of their loop, holding
//! nothing); the kernel keeps carrying linked bytes throughout.

use std::future::Future;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;

use super::install::{Pair, Side};
use super::mapset::{GivenSets, PairHold};
use super::{lock, FastpathPlane};
use crate::dataplane::userspace::arm_reset;
use crate::dataplane::{tcpinfo, ConnInfo, EndReason, Plane, Transfer};

/// Where a pair stands, for the process it moves to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ledger {
    /// The map set its entries are in (the kernel id of its `SOCKETS`).
    pub set: u32,
    pub client: SideLedger,
    pub upstream: SideLedger,
    /// Client→target, then target→client.
    pub dirs: [DirLedger; 2],
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SideLedger {
    pub cookie: u64,
    /// Bytes handed to this socket's TCP before the install.
    pub base: u64,
    pub linked: bool,
}

/// One direction's counters (`Direction`'s fields of the same names).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirLedger {
    pub linked: bool,
    pub demoted: bool,
    pub drained: u64,
    pub early: u64,
    pub read_passed: u64,
    pub user: u64,
    /// Bytes earlier carries forwarded (in processes before this pair was
    /// installed: `--mode auto`'s userspace phase moved, then promoted):
    /// counted by the FIN ledger only, the owner reports them.
    #[serde(default)]
    pub prior: u64,
}

impl SideLedger {
    pub(super) fn of(side: &Side) -> SideLedger {
        SideLedger {
            cookie: side.cookie,
            base: side.base,
            linked: side.linked,
        }
    }

    fn side(&self) -> Side {
        let mut side = Side::new(self.cookie);
        side.base = self.base;
        side.linked = self.linked;
        side
    }
}

impl FastpathPlane {
    /// Every map set this process holds, their rings no longer read here.
    pub async fn give_sets(&self) -> GivenSets {
        self.sets.give().await
    }

    /// Adopts the sets an older process sent; the ids adopted.
    pub fn adopt_sets(&self, ids: &[u32], fds: Vec<OwnedFd>) -> Vec<u32> {
        self.sets.adopt(ids, fds)
    }

    /// The handoff is over: adopted sets no pair came for are dropped.
    pub fn settle(&self) {
        self.sets.settle()
    }

    /// A moved pair of `ledger`'s set lives on here (None: not a set held
    /// here, so the pair cannot be resumed here).
    pub fn hold(&self, ledger: &Ledger) -> Option<PairHold> {
        self.sets.hold(ledger.set)
    }

    /// Carries on a pair another process (or this one, before a handoff
    /// that did not take it) stopped at its safe point: no install, no
    /// sweep (its entries are in the maps), only its directions start again.
    ///
    /// The checks and the pair are made before the future: only what the
    /// run needs is kept in it (as an async fn it kept the ledger, the
    /// sockets and the hold twice each, 568 bytes beside the pair's run,
    /// for as long as the pair lives).
    pub fn resume<'a>(
        &'a self,
        client: TcpStream,
        upstream: TcpStream,
        conn: &'a ConnInfo,
        ledger: Ledger,
        hold: PairHold,
    ) -> impl Future<Output = Transfer> + Send + 'a {
        let matches = [
            (&client, &ledger.client, "client"),
            (&upstream, &ledger.upstream, "upstream"),
        ]
        .into_iter()
        .all(|(sock, side, which)| {
            let cookie = tcpinfo::cookie(sock).ok();
            if cookie == Some(side.cookie) {
                return true;
            }
            // Not the socket the ledger describes: nothing about it can
            // be trusted, and the verdict may own its bytes.
            tracing::error!(
                conn = conn.id,
                which,
                ?cookie,
                expected = side.cookie,
                "moved fastpath pair: socket cookie does not match its ledger; resetting"
            );
            false
        });
        let pair = Pair {
            client: ledger.client.side(),
            upstream: ledger.upstream.side(),
        };
        let dirs = ledger.dirs;
        async move {
            if !matches {
                arm_reset(&client);
                arm_reset(&upstream);
                // The ledger's entries go all the same: nothing else would
                // ever take them out of the set's maps.
                hold.set.uninstall(&pair);
                return Transfer::none(EndReason::ClientReset).on(Plane::Fastpath);
            }
            let set = Arc::clone(&hold.set);
            {
                let mut waiters = lock(&set.waiters);
                for side in [&pair.client, &pair.upstream] {
                    waiters.insert(side.cookie, Arc::clone(&side.wakeup));
                }
            }
            let ran = self
                .run_pair(&set, &pair, (&client, &upstream), &dirs, true, conn)
                .await;
            self.ended(ran, &set, &pair, client, upstream, hold)
        }
    }
}
