//! Carrying the bytes, for a new connection and for one moved here alike:
//! when an upgrade asks, the connection parks at a safe point and offers
//! itself to the new process (`handover`); if nobody takes it, it carries
//! on here with nothing lost.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;

use super::{Conn, Ends, Upstream};
use crate::dataplane::{ConnInfo, DataPlane, FastLedger, PairHold, Parking, Transfer};
use crate::edge::handover::{MovedMeta, Moving};
use crate::edge::live::{self, Sampler};
use crate::edge::Shared;
use crate::ops::metrics::ByteTally;

/// Bytes moved so far, each way and by userspace, by the processes that
/// carried a connection before this one (zero for a new connection).
#[derive(Clone, Copy, Default)]
pub(super) struct Prior {
    pub(super) client_to_target: u64,
    pub(super) target_to_client: u64,
    pub(super) userspace_bytes: u64,
}

/// A fastpath pair moved here: its ledger and its map set's hold. Boxed
/// where it waits, since most connections have none.
pub(super) type PairResume = Box<(FastLedger, PairHold)>;

impl Conn {
    /// Carries on a connection moved here, to its close line.
    ///
    /// An async block over what the carry needs, made from the move's
    /// record first: as an async fn over the record (`Moving`, 424 bytes)
    /// and this `Conn`, it kept both twice for the connection's whole life,
    /// and its task was 1,792 bytes where a new connection's is 640. After
    /// an upgrade every connection is one of these.
    pub(super) fn carry_resumed(
        self,
        m: Moving,
        shared: Arc<Shared>,
    ) -> impl Future<Output = ()> + Send {
        let Moving {
            meta,
            client,
            upstream: to_target,
            hold,
            ..
        } = m;
        let info = self.info(&shared);
        let upstream = Upstream {
            target: Some(meta.target.as_str().into()),
            attempts: meta.attempts,
            connect: Duration::from_micros(meta.connect_us),
        };
        // Its bytes show while it lives here too, as they did before the
        // move (the sockets' counters run from their start, in any process).
        let sampler = (shared.flush_clock.is_some())
            .then(|| Sampler::new(&client, &to_target, u64::from(meta.target_header)));
        let prior = Prior {
            client_to_target: meta.client_to_target,
            target_to_client: meta.target_to_client,
            userspace_bytes: meta.userspace_bytes,
        };
        let [c2t, t2c] = meta.counted();
        let resume = meta.fastpath.zip(hold).map(Box::new);
        let ends = Ends {
            // From the first process when its client's PROXY header said it:
            // this socket's own address is the proxy's.
            local: meta.local.or_else(|| client.local_addr().ok()),
            upstream,
        };
        // Counted against its target (least-connections, the active gauge)
        // as one connected here; none when a reload dropped the target.
        let target = (self.app.balancer.backends.iter())
            .find(|b| *b.label == *meta.target)
            .map(|b| b.acquire());
        async move {
            let _target = target;
            // Each process counts in `proxy_bytes_total` the bytes it
            // carried: those before the move were counted where they went.
            let mut tally = ByteTally::counted(c2t, t2c);
            let mut sampler = sampler;
            let carry =
                Box::pin(self.carry(&shared, client, to_target, &info, &ends, prior, resume));
            let carried = match (&mut sampler, &shared.flush_clock) {
                (Some(sampler), Some(clock)) => {
                    live::carry_counting(carry, sampler, clock, &self.app.metrics, &mut tally).await
                }
                _ => carry.await,
            };
            match carried {
                Ok(t) => self.close(&shared, ends, &t, tally),
                Err([c2t, t2c]) => tally.advance(&self.app.metrics, c2t, t2c),
            }
        }
    }

    /// Carries the bytes. On any plane the connection may park for an
    /// upgrade and move to the new process: then `Err` with the bytes moved
    /// each way until then (by every process), and the new process writes
    /// the close line. The record that goes with it (`MovedMeta`) is
    /// made only then: an idle connection's task holds this future, and
    /// two copies of the record were 672 of its 1,048 bytes (plus two
    /// strings allocated for every new connection).
    ///
    /// An async block over its arguments, not an async fn, which would keep
    /// a second copy of them in every connection for its whole life. The
    /// sockets go into the plane's future before the block: as the block's
    /// own, they kept 64 bytes of room in it for the connection's life
    /// after they had moved on.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn carry<'a>(
        &'a self,
        shared: &'a Arc<Shared>,
        client: TcpStream,
        upstream: TcpStream,
        info: &'a ConnInfo,
        ends: &'a Ends,
        mut prior: Prior,
        resume: Option<PairResume>,
    ) -> impl Future<Output = Result<Transfer, [u64; 2]>> + Send + 'a {
        // The plane's future comes boxed: each layer that takes a future by
        // value (scope, carry_counting) would otherwise hold it twice (rustc
        // keeps the moved-from argument), and every idle connection's task
        // carried those copies: 21.7 KB per connection before.
        let mut carry = start(
            &shared.plane,
            (client, upstream),
            info,
            resume.map(|p| *p),
            prior,
            self.client_header,
        );
        // Every plane can park at a safe point (a fastpath pair with its map
        // set), so every carry runs under a `Parking`, except one a
        // successor already refused (`parks` false: it stays here).
        async move {
            loop {
                let parking = Parking::new();
                let t = if self.parks {
                    parking.scope(carry).await
                } else {
                    carry.await
                };
                let Some(p) = parking.take() else {
                    return Ok(Transfer {
                        client_to_target: prior.client_to_target + t.client_to_target,
                        target_to_client: prior.target_to_client + t.target_to_client,
                        userspace_bytes: prior.userspace_bytes + t.userspace_bytes,
                        ..t
                    });
                };
                prior.client_to_target += p.client_to_target;
                prior.target_to_client += p.target_to_client;
                prior.userspace_bytes += p.client_to_target + p.target_to_client;
                // Everything moved so far, a fastpath pair's ledger included:
                // what the byte meter counted here, and what the log says.
                let so_far = [
                    prior.client_to_target + p.in_ledger[0],
                    prior.target_to_client + p.in_ledger[1],
                ];
                let (ledger, hold) = p.fastpath.unzip();
                let moving = Moving {
                    meta: self.moved_meta(ends, &p.upstream, prior, ledger, so_far),
                    app: self.app.clone(),
                    client: p.client,
                    upstream: p.upstream,
                    hold,
                };
                match shared.handover.offer(Box::new(moving)) {
                    // The handoff logs it once the successor took it.
                    Ok(()) => return Err(so_far),
                    // Nobody takes it (any more): carry on here.
                    Err(back) => {
                        let back = *back;
                        let resume = back.meta.fastpath.zip(back.hold);
                        let socks = (back.client, back.upstream);
                        let header = self.client_header;
                        carry = start(&shared.plane, socks, info, resume, prior, header);
                    }
                }
            }
        }
    }

    /// The record a parked connection moves with. The upstream's address is
    /// read from its socket here, not kept by every connection for this.
    fn moved_meta(
        &self,
        ends: &Ends,
        upstream: &TcpStream,
        prior: Prior,
        fastpath: Option<FastLedger>,
        metered: [u64; 2],
    ) -> MovedMeta {
        let record = &ends.upstream;
        MovedMeta {
            id: self.id,
            app: self.app.balancer.app.to_string(),
            port: self.port,
            client: self.client,
            target: record.target.as_deref().unwrap_or_default().to_string(),
            // Unspecified when the target already reset the socket: the
            // record names it, and the new process reads nothing from it.
            upstream: upstream
                .peer_addr()
                .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0))),
            attempts: record.attempts,
            client_to_target: prior.client_to_target,
            target_to_client: prior.target_to_client,
            userspace_bytes: prior.userspace_bytes,
            age_ms: self.started.elapsed().as_millis() as u64,
            carried_by: (self.carried_by.iter().copied())
                .chain([crate::ops::pid()])
                .collect(),
            client_header: self.client_header,
            fastpath,
            metered: Some(metered),
            target_header: u16::from(self.target_header),
            connect_us: u64::try_from(record.connect.as_micros()).unwrap_or(u64::MAX),
            local: ends.local,
        }
    }
}

/// The plane's future for a connection's sockets: a fastpath pair moved
/// here (`resume`) resumes from its ledger (which counts the header
/// already), anything else starts after the bytes `prior` counts, and
/// after the client's PROXY header (`client_header`), which the client
/// socket's TCP counted as received and nobody forwarded.
fn start<'a>(
    plane: &'a DataPlane,
    (client, upstream): (TcpStream, TcpStream),
    info: &'a ConnInfo,
    resume: Option<(FastLedger, PairHold)>,
    prior: Prior,
    client_header: u32,
) -> Pin<Box<dyn Future<Output = Transfer> + Send + 'a>> {
    match resume {
        Some((ledger, hold)) => plane.resume(client, upstream, info, ledger, hold),
        None => {
            let received = prior.client_to_target + u64::from(client_header);
            plane.carry(client, upstream, info, [received, prior.target_to_client])
        }
    }
}
