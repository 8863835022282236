//! Carrying the bytes, for a new connection and for one moved here alike:
//! when an upgrade asks, the connection parks at a safe point and offers
//! itself to the new process (`handover`); if nobody takes it, it carries
//! on here with nothing lost.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;

use super::{Conn, Upstream};
use crate::dataplane::{ConnInfo, PairHold, Parking, Transfer};
use crate::edge::handover::{MovedMeta, Moving};
use crate::edge::Shared;
use crate::ops::metrics::ByteTally;

impl Conn {
    /// Carries on a connection moved here, to its close line.
    pub(super) async fn carry_resumed(self, m: Moving, shared: Arc<Shared>) {
        let info = ConnInfo {
            id: self.id,
            app: self.app.balancer.app.clone(),
            listen_port: self.port,
            client: self.client,
            target: m.meta.target.clone(),
            upstream: m.meta.upstream,
            idle_timeout: shared.idle_timeout,
            fin_timeouts: shared.fin_timeouts,
            hard_stop: shared.hard_stop.clone(),
        };
        let upstream = Upstream {
            target: m.meta.target.clone(),
            attempts: m.meta.attempts,
            connect: Duration::ZERO,
        };
        let local = m.client.local_addr().ok();
        if let Some(t) = self
            .carry(&shared, m.client, m.upstream, &info, m.meta, m.hold)
            .await
        {
            self.close(&shared, local, upstream, &t, ByteTally::default());
        }
    }

    /// Carries the bytes. On any plane the connection may park for an
    /// upgrade and move to the new process: then None, and the new process
    /// writes the close line.
    pub(super) async fn carry(
        &self,
        shared: &Arc<Shared>,
        mut client: TcpStream,
        mut upstream: TcpStream,
        info: &ConnInfo,
        mut meta: MovedMeta,
        hold: Option<PairHold>,
    ) -> Option<Transfer> {
        // The plane's future comes boxed: each layer that takes a future by
        // value (scope, carry_counting) would otherwise hold it twice (rustc
        // keeps the moved-from argument), and every idle connection's task
        // carried those copies: 21.7 KB per connection before.
        if !shared.plane.moves() {
            return Some(shared.plane.carry(client, upstream, info, [0, 0]).await);
        }
        // A fastpath pair moved here resumes from its ledger.
        let mut resume = meta.fastpath.take().zip(hold);
        loop {
            let parking = Parking::new(shared.handover.requests());
            let carry = match resume.take() {
                Some((ledger, hold)) => shared.plane.resume(client, upstream, info, ledger, hold),
                None => {
                    let prior = [meta.client_to_target, meta.target_to_client];
                    shared.plane.carry(client, upstream, info, prior)
                }
            };
            let t = parking.scope(carry).await;
            let Some(p) = parking.take() else {
                return Some(Transfer {
                    client_to_target: meta.client_to_target + t.client_to_target,
                    target_to_client: meta.target_to_client + t.target_to_client,
                    userspace_bytes: meta.userspace_bytes + t.userspace_bytes,
                    ..t
                });
            };
            meta.client_to_target += p.client_to_target;
            meta.target_to_client += p.target_to_client;
            meta.userspace_bytes += p.client_to_target + p.target_to_client;
            meta.age_ms = self.started.elapsed().as_millis() as u64;
            let mut out = meta.clone();
            out.carried_by = (self.carried_by.iter().copied())
                .chain([crate::ops::pid()])
                .collect();
            let (ledger, hold) = p.fastpath.unzip();
            out.fastpath = ledger;
            let moving = Moving {
                meta: out,
                app: self.app.clone(),
                client: p.client,
                upstream: p.upstream,
                hold,
            };
            match shared.handover.offer(Box::new(moving)) {
                Ok(()) => {
                    tracing::info!(
                        conn = self.id,
                        app = %self.app.balancer.app,
                        client = %self.client,
                        bytes_in = meta.client_to_target,
                        bytes_out = meta.target_to_client,
                        pid = crate::ops::pid(),
                        "connection handed over to the new process"
                    );
                    return None;
                }
                // Nobody takes it (any more): carry on here.
                Err(back) => {
                    let back = *back;
                    resume = back.meta.fastpath.zip(back.hold);
                    (client, upstream) = (back.client, back.upstream);
                }
            }
        }
    }
}
