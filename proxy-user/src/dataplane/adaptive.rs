//! `--mode auto` where BPF loads: one adaptive plane. Every connection
//! starts in userspace (splice, else copy): cheap to set up, and the best
//! plane for bulk transfers and for short connections, which never pay for
//! an install. A watch period of `--promote-after` is light when the
//! connection moved some bytes over it, but no more than `--promote-below`
//! per second, and received no more than `--promote-segments-below` data
//! segments per second (interactive or mostly idle: where the kernel's
//! per-skb hop beats two syscalls per message). After `--promote-periods`
//! light periods with no busy one between them (a period that moved no
//! bytes and received few segments neither counts nor breaks the run) the
//! connection moves into the kernel fastpath. Both signals are
//! needed: busy small-message connections (50 kept connections of
//! request/response, `rr50` in the bench) move few bytes but many skbs, and
//! in the kernel each skb crosses a kworker: measured 0.82x the best peer's
//! req/s with a 4.5x worse p99 when bytes alone decided (NOTES §2). Its userspace
//! pumps stop where everything they read was written, so nothing is in
//! flight in userspace at the move; the fastpath forwards whatever arrived
//! since and installs the pair. From then on the fastpath's own rules hold:
//! a direction whose receiver falls the in-flight bound behind, or that
//! turns busy (more skbs per period than `--promote-segments-below` allows,
//! `FlowControl::busy_skbs`), is handed back to userspace by the verdict
//! itself, losslessly, and the FIN ledger
//! checks every byte each way, counting the ones userspace moved first.
//! The userspace phase stops at the same safe point as an upgrade's
//! (`safepoint`), so under `Parking` it moves to a new process too.

use std::future::Future;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::future::Either;
use futures_util::FutureExt;

use tokio::net::TcpStream;
use tokio::time::Instant;

use super::copy::CopyPlane;
use super::fastpath::FastpathPlane;
use super::safepoint::{carry_or_promote, park, Carried, Promote};
use super::splice::SplicePlane;
use super::{tcpinfo, ConnInfo, Plane, Transfer};

/// When a connection moves into the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Promotion {
    /// How long a connection is watched (and re-watched) in userspace.
    pub after: Duration,
    /// Most bytes per second, both ways together, over `after` for a move.
    pub below: u64,
    /// Most data segments per second received on both sockets together.
    pub segments_below: u64,
    /// Light periods needed, with no busy one between them.
    pub periods: u32,
}

impl Promotion {
    /// Resolves once the connection had `periods` light watch periods with
    /// no busy one between them: each moved some bytes, but no more than the
    /// allowed bytes and segments. A silent period (no bytes moved, few
    /// segments received) neither counts nor breaks the run; one that moved
    /// nothing while receiving many segments (a receiver that stopped
    /// draining) is busy. `moved`:
    /// the carry's counters, zero at its start. `fds` are the pair's
    /// sockets, open for as long as this is polled (the carry that owns
    /// them runs in the same `select!`); a socket whose counters cannot be
    /// read counts as busy. `fresh`: this process accepted the connection,
    /// so its sockets' segment counters started at the handshake and the
    /// first period counts from zero, not from a TCP_INFO read per socket
    /// that a short connection (most of them, on churn) would pay for and
    /// never use. A connection handed over by an upgrade reads them.
    ///
    /// An async block over its arguments, not an async fn, which would keep
    /// them twice beside every connection's userspace stage.
    fn quiet<'a>(
        &'a self,
        moved: &'a [AtomicU64; 2],
        fds: [RawFd; 2],
        fresh: bool,
    ) -> impl Future<Output = ()> + Send + 'a {
        async move {
            // `moved` starts at zero with the carry, and the pumps may have
            // moved the first bytes before this is first polled: they count.
            // No segment count: NO_COUNT (a socket's counters could not be
            // read). Plain values and calls, not closures over the
            // arguments, which kept copies of them in every connection.
            let mut last = (0, if fresh { 0 } else { segments_in(fds) });
            let mut light = 0;
            loop {
                tokio::time::sleep(self.after).await;
                let now = (bytes_moved(moved), segments_in(fds));
                let quiet_segments = last.1 != NO_COUNT
                    && now.1 != NO_COUNT
                    && now.1.saturating_sub(last.1) <= self.allowed(self.segments_below);
                let carried = now.0 - last.0;
                last = now;
                // Silence says nothing of what the connection will carry:
                // sockperf connects and is silent for its first second, then
                // ping-pongs flat out. One light period is little evidence
                // either: sockperf's warm-up is a few small messages, and with
                // one period it was promoted there, turned busy the moment its
                // test began, and ran it demoted, slower than splice (a demoted
                // direction still reads through the psock's queue; NOTES §2).
                if carried == 0 && quiet_segments {
                    continue;
                }
                if carried <= self.allowed(self.below) && quiet_segments {
                    light += 1;
                    if light >= self.periods {
                        return;
                    }
                } else {
                    light = 0;
                }
            }
        }
    }

    /// A rate limit's allowance over one watch period.
    fn allowed(&self, per_second: u64) -> u64 {
        (per_second as f64 * self.after.as_secs_f64()) as u64
    }
}

/// `segments_in`'s "cannot tell".
const NO_COUNT: u64 = u64::MAX;

/// Data segments received on both sockets so far (each a 32-bit count, so
/// the sum never reaches NO_COUNT); NO_COUNT when either socket's counters
/// cannot be read, or either saw a FIN (it counts as busy). A half-closed
/// connection is ending: moved, it would only fall back to the copy plane
/// (an install needs both sides open) with fastpath buffers, and count as
/// a promotion and a failed install.
fn segments_in(fds: [RawFd; 2]) -> u64 {
    let mut sum = 0;
    for fd in fds {
        match tcpinfo::data_segs_in(fd) {
            Ok(Some(n)) => sum += n,
            Ok(None) | Err(_) => return NO_COUNT,
        }
    }
    sum
}

fn bytes_moved(moved: &[AtomicU64; 2]) -> u64 {
    moved[0].load(Ordering::Relaxed) + moved[1].load(Ordering::Relaxed)
}

/// A connection the userspace stage hands to the kernel: its sockets, the
/// bytes moved each way, and after how long.
struct Promoted {
    client: TcpStream,
    upstream: TcpStream,
    moved: [u64; 2],
    after: Duration,
}

/// The userspace plane connections start on.
pub enum Start {
    Splice(SplicePlane),
    Copy(CopyPlane),
}

impl Start {
    pub fn plane(&self) -> Plane {
        match self {
            Start::Splice(_) => Plane::Splice,
            Start::Copy(_) => Plane::Copy,
        }
    }
}

pub struct AdaptivePlane {
    pub start: Start,
    pub fastpath: FastpathPlane,
    pub promotion: Promotion,
}

impl AdaptivePlane {
    /// `prior`: bytes each way earlier processes carried (an upgrade moved
    /// the connection here); the fastpath's FIN ledger counts them.
    ///
    /// Both stages in this one future (the caller boxes it), not each
    /// boxed at its own size: the two are within a few hundred bytes of
    /// each other, and a promotion that freed one box and allocated the
    /// other left the freed one unused whenever the second was even one
    /// heap size class larger (it sits between live allocations): 10.5 KiB
    /// per promoted idle connection where the fastpath alone held 7.0
    /// (NOTES §2). The stages are chained (`then`), not awaited in one
    /// async block: the block kept room for the sockets it handed on, and
    /// for its own locals, beside the running fastpath stage.
    pub fn carry<'a>(
        &'a self,
        client: TcpStream,
        upstream: TcpStream,
        conn: &'a ConnInfo,
        prior: [u64; 2],
    ) -> impl Future<Output = Transfer> + Send + 'a {
        self.in_userspace(client, upstream, conn, prior)
            .then(move |carried| match carried {
                Err(transfer) => Either::Left(std::future::ready(transfer)),
                Ok(Promoted {
                    client,
                    upstream,
                    moved,
                    after,
                }) => {
                    tracing::debug!(
                        conn = conn.id,
                        after_ms = after.as_millis() as u64,
                        c2t = moved[0],
                        t2c = moved[1],
                        "quiet connection moves into the kernel fastpath"
                    );
                    let fastpath = self
                        .fastpath
                        .carry_from(client, upstream, conn, moved, prior);
                    Either::Right(fastpath.map(move |mut transfer| {
                        transfer.promoted_after = Some(after);
                        transfer
                    }))
                }
            })
    }

    /// The first stage: userspace, until the connection ends (Err) or the
    /// policy moves it into the kernel.
    ///
    /// An async block over its arguments, not an async fn, which would keep
    /// the sockets twice.
    fn in_userspace<'a>(
        &'a self,
        client: TcpStream,
        upstream: TcpStream,
        conn: &'a ConnInfo,
        prior: [u64; 2],
    ) -> impl Future<Output = Result<Promoted, Transfer>> + Send + 'a {
        // Before the block: `prior` itself would stay in it.
        let fresh = prior == [0, 0];
        async move {
            let began = Instant::now();
            let moved = [AtomicU64::new(0), AtomicU64::new(0)];
            let fds = [client.as_raw_fd(), upstream.as_raw_fd()];
            let quiet = pin!(self.promotion.quiet(&moved, fds, fresh));
            let promote: Promote<'_> = quiet;
            // The same call for either pump type (a generic parameter, so
            // one arm each).
            let (c, u, counts) = (&client, &upstream, &moved);
            let carried = match &self.start {
                Start::Splice(p) => carry_or_promote(p, c, u, conn, Some(promote), counts).await,
                Start::Copy(p) => carry_or_promote(p, c, u, conn, Some(promote), counts).await,
            };
            match carried {
                Carried::Done(transfer) => Err(transfer),
                Carried::Park { parking, transfer } => {
                    Err(park(&parking, client, upstream, transfer))
                }
                Carried::Promote(moved) => Ok(Promoted {
                    client,
                    upstream,
                    moved,
                    after: began.elapsed(),
                }),
            }
        }
    }
}
