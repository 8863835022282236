//! An installed (or resumed) pair running until it ends, or until an
//! upgrade stops it at a safe point to move it to the new process.

use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;

use tokio::{net::TcpStream, time::Instant};

use super::direction::{Direction, IdleWatch};
use super::install::{Pair, Side};
use super::mapset::{MapSet, PairHold};
use super::moving::{DirLedger, Ledger, SideLedger};
use super::{lock, FastpathPlane};
use crate::dataplane::parking::{Parked, Parking, PARKING};
use crate::dataplane::safepoint::{Asks, Stop};
use crate::dataplane::userspace::{arm_reset, cut_if_owed, supervise};
use crate::dataplane::{ConnInfo, Demotion, EndReason, Plane, Transfer};

/// Why a pair's run stopped at its `Asks`.
enum Halt {
    Park,
    Deadline,
    Close,
}

/// How a pair's run ended.
pub(super) enum Ran {
    /// Closed (or failed): its transfer, with every byte each way counted.
    Ended(Transfer),
    /// Stopped for an upgrade, both directions holding nothing.
    Parked {
        parking: Arc<Parking>,
        dirs: [DirLedger; 2],
    },
}

impl FastpathPlane {
    /// Runs both directions of `pair` from `dirs` (fresh after an install,
    /// or a moved pair's ledger) under the idle, FIN and drain rules.
    ///
    /// An async block over its arguments, not an async fn, which would keep
    /// them twice beside every installed pair for its life.
    pub(super) fn run_pair<'a>(
        &'a self,
        set: &'a MapSet,
        pair: &'a Pair,
        (client, upstream): (&'a TcpStream, &'a TcpStream),
        dirs: &'a [DirLedger; 2],
        resumed: bool,
        conn: &'a ConnInfo,
    ) -> impl Future<Output = Ran> + Send + 'a {
        async move {
            let user = [AtomicU64::new(0), AtomicU64::new(0)];
            let busy = [AtomicU64::new(0), AtomicU64::new(0)];
            let at_top = [AtomicBool::new(false), AtomicBool::new(false)];
            let parking = PARKING.try_with(Arc::clone).ok();
            let mut asks = Asks {
                may_park: parking.is_some(),
                promote: None,
                signals: conn.rules.signals.clone(),
            };
            let mut up = Direction::new(
                self,
                set,
                (client, upstream),
                &pair.client,
                &pair.upstream,
                (&user[0], &busy[0], &at_top[0]),
                &dirs[0],
                resumed,
            );
            let mut down = Direction::new(
                self,
                set,
                (upstream, client),
                &pair.upstream,
                &pair.client,
                (&user[1], &busy[1], &at_top[1]),
                &dirs[1],
                resumed,
            );
            let start = Instant::now();
            // The kernel moves bytes userspace never sees: idle (and a fin
            // timeout) is judged from the verdict's counters plus what
            // userspace copied.
            let moved = || {
                moved_by_kernel(set, pair)
                    + user[0].load(Ordering::Relaxed)
                    + user[1].load(Ordering::Relaxed)
            };
            let quiet =
                |limit| async move { IdleWatch::new(limit, moved()).until_idle(&moved).await };
            let mut watch = IdleWatch::new(conn.rules.idle_timeout, moved());
            // The drain deadline comes with the other signals (`asks`); an error
            // on either socket reaches a direction.
            let mut reached = pin!(asks.reached(&busy));
            let stopped = loop {
                // Running: both directions and their supervision, boxed, for as
                // long as either has something to do (from the start, or from a
                // wake at rest). Once both wait at the top of their loops they
                // hold nothing, as at an upgrade's safe point, and all of it is
                // dropped: an idle pair keeps only the wait below.
                let ended = {
                    let mut running = Box::pin(async {
                        let (up_run, down_run) = (pin!(up.run()), pin!(down.run()));
                        // The same idle clock as at rest.
                        let mut idle = watch;
                        let idle = pin!(idle.until_idle(&moved));
                        supervise(up_run, down_run, idle, &quiet, client, upstream, conn).await
                    });
                    let until_rest = std::future::poll_fn(|cx| match running.as_mut().poll(cx) {
                        Poll::Ready(end) => Poll::Ready(Some(end)),
                        Poll::Pending if at_top.iter().all(|t| t.load(Ordering::Relaxed)) => {
                            Poll::Ready(None)
                        }
                        Poll::Pending => Poll::Pending,
                    });
                    tokio::select! {
                        biased;
                        end = until_rest => end,
                        stop = reached.as_mut() => break Ok(halt(stop)),
                    }
                };
                if let Some(end) = ended {
                    break Err(end);
                }
                // At rest, until a source turns readable: the readiness stays
                // set for the directions' reads. The verdict's checkpoints are
                // handled here.
                let rest = async {
                    tokio::select! {
                        // Whatever woke it (an error too), `run` reads it.
                        _ = up.wait_for_work() => false,
                        _ = down.wait_for_work() => false,
                        () = watch.until_idle(&moved) => true,
                    }
                };
                let idle = tokio::select! {
                    biased;
                    stop = reached.as_mut() => break Ok(halt(stop)),
                    idle = rest => idle,
                };
                if idle {
                    cut_if_owed(client, upstream, conn);
                    break Err(EndReason::IdleTimeout);
                }
            };
            let end = match stopped {
                Ok(Halt::Park) => {
                    if let Some(parking) = parking {
                        return Ran::Parked {
                            parking,
                            dirs: [up.ledger(), down.ledger()],
                        };
                    }
                    EndReason::Closed
                }
                Ok(Halt::Deadline) => {
                    arm_reset(client);
                    arm_reset(upstream);
                    EndReason::DrainTimeout
                }
                Ok(Halt::Close) => EndReason::Closed,
                Err(end) => end,
            };
            let user = [
                user[0].load(Ordering::Relaxed),
                user[1].load(Ordering::Relaxed),
            ];
            let early = [dirs[0].early, dirs[1].early];
            let client_state = set.state(pair.client.cookie).unwrap_or_default();
            let upstream_state = set.state(pair.upstream.cookie).unwrap_or_default();
            tracing::debug!(
                conn = conn.id,
                user_c2t = user[0],
                user_t2c = user[1],
                kernel_c2t = client_state.redirected,
                kernel_t2c = upstream_state.redirected,
                dropped = client_state.dropped + upstream_state.dropped,
                passed_c2t = client_state.passed,
                passed_t2c = upstream_state.passed,
                trimmed_c2t = client_state.trimmed,
                trimmed_t2c = upstream_state.trimmed,
                demoted_c2t = up.demoted,
                demoted_t2c = down.demoted,
                resumed,
                elapsed_ms = start.elapsed().as_millis() as u64,
                "fastpath pair done"
            );
            if client_state.unreadable + upstream_state.unreadable > 0 {
                tracing::warn!(
                    conn = conn.id,
                    skbs = client_state.unreadable + upstream_state.unreadable,
                    "the verdict could not read TCP sequence numbers on this kernel; retransmitted overlaps are not cut (the FIN ledger still checks)"
                );
            }
            Ran::Ended(Transfer {
                client_to_target: client_state.redirected + user[0] + early[0],
                target_to_client: upstream_state.redirected + user[1] + early[1],
                userspace_bytes: user[0] + user[1] + early[0] + early[1],
                end,
                promoted_after: None,
                demoted: demotions([
                    (up.demoted, client_state.busy != 0),
                    (down.demoted, upstream_state.busy != 0),
                ]),
                lost: up.lost || down.lost,
                overlaps_cut: client_state.trimmed + upstream_state.trimmed,
                plane: if pair.client.linked || pair.upstream.linked {
                    Plane::Fastpath
                } else {
                    Plane::CopyFallback
                },
            })
        }
    }

    /// After `run_pair`: a closed pair leaves the maps; a parked one stays
    /// in them and goes, with its ledger and its set's hold, to the owner.
    pub(super) fn ended(
        &self,
        ran: Ran,
        set: &MapSet,
        pair: &Pair,
        client: TcpStream,
        upstream: TcpStream,
        hold: PairHold,
    ) -> Transfer {
        match ran {
            Ran::Ended(transfer) => {
                set.uninstall(pair);
                drop(hold);
                transfer
            }
            Ran::Parked { parking, dirs } => {
                {
                    let mut waiters = lock(&set.waiters);
                    waiters.remove(&pair.client.cookie);
                    waiters.remove(&pair.upstream.cookie);
                }
                let ledger = Ledger {
                    set: set.id,
                    client: SideLedger::of(&pair.client),
                    upstream: SideLedger::of(&pair.upstream),
                    dirs,
                };
                // As `Ran::Ended` counts them: the kernel's redirects, the
                // directions' userspace bytes and the pre-install copy.
                let moved = |from: &Side, dir: &DirLedger| {
                    let state = set.state(from.cookie).unwrap_or_default();
                    state.redirected + dir.user + dir.early
                };
                let in_ledger = [
                    moved(&pair.client, &ledger.dirs[0]),
                    moved(&pair.upstream, &ledger.dirs[1]),
                ];
                parking.park(Parked {
                    client,
                    upstream,
                    // The ledger carries every count on.
                    client_to_target: 0,
                    target_to_client: 0,
                    fastpath: Some((ledger, hold)),
                    in_ledger,
                });
                Transfer::none(EndReason::Closed).on(Plane::Fastpath)
            }
        }
    }
}

/// What a pair does when its run is asked to stop.
fn halt(stop: Stop) -> Halt {
    match stop {
        Stop::Park => Halt::Park,
        Stop::Deadline => Halt::Deadline,
        // Only an upgrade asks (no promotion request here).
        Stop::Promote => Halt::Close,
    }
}

/// Demoted directions by why, from `(demoted, the verdict found it busy)`.
fn demotions(dirs: [(bool, bool); 2]) -> [u8; Demotion::ALL.len()] {
    let mut by = [0; Demotion::ALL.len()];
    for (demoted, busy) in dirs {
        if demoted {
            let why = if busy {
                Demotion::Busy
            } else {
                Demotion::Bound
            };
            by[why as usize] += 1;
        }
    }
    by
}

/// Bytes the kernel moved both ways so far: part of the idle signal.
fn moved_by_kernel(set: &MapSet, pair: &Pair) -> u64 {
    [pair.client.cookie, pair.upstream.cookie]
        .iter()
        .filter_map(|c| set.state(*c).ok())
        .map(|s| s.redirected)
        .sum()
}
