//! Kernel fastpath: the client socket and its upstream socket go into BPF
//! socket maps, and the `splice` stream verdict (proxy-ebpf) redirects every
//! skb either receives out of the other. Userspace reads no payload once a
//! pair is installed; it steps in only where the kernel alone would be wrong:
//!
//! - **Install order.** Userspace first forwards whatever both sockets already
//!   hold, then puts both in `PEERS` (redirect targets), then each in
//!   `SOCKETS` (where the verdict is attached) and sweeps its receive queue
//!   through the verdict (SO_RCVLOWAT runs data_ready). Bytes that arrived in
//!   between are the oldest in the queue, so the sweep forwards them first.
//!   Userspace reads a linked socket only after the verdict was told to pass
//!   its bytes (demotion, below), never while it redirects them.
//! - **Backpressure.** Redirected skbs leave the source's receive accounting,
//!   so TCP's window never closes by itself: a fast sender into a slow
//!   receiver would queue without bound inside the kernel (the prototype held
//!   360 MB for one connection). So the verdict redirects a direction's
//!   skbs only while they stay within its `CONTROL.limit`: the bytes the
//!   receiver acknowledged plus the in-flight bound, which userspace moves
//!   along every quarter of the bound (the verdict wakes it). The first skb
//!   that would cross the limit, and every one after it, gets `SK_PASS`:
//!   they queue on the source's own receive queue (charged to its rmem, so
//!   the window closes as behind a copy proxy), and userspace reads and
//!   forwards them once the kernel has handed every redirected byte to the
//!   peer. The kernel enforces the bound, so a starved userspace cannot
//!   let it overshoot (see `inflight_bound` for why it must not). The
//!   socket never leaves `SOCKETS` while the pair lives: removal clears the
//!   verdict before `data_ready` is restored and the kernel drops an skb
//!   arriving in between (lost 212 to 65,483 bytes per demotion before).
//!   Reads after `SK_PASS` are exact on 6.18.44 (tests/kernel_contract.rs;
//!   older 6.18 kernels replayed stale bytes, before the copied_seq fixes).
//!   A direction is never re-armed: it changes plane at most once.
//! - **Half-close.** A FIN still reaches userspace as EOF. The peer gets its
//!   FIN only after every byte redirected before it was handed to the peer's
//!   TCP: `tcpi_bytes_acked + SIOCOUTQ - baseline - userspace writes`.
//! - **Failure to install** (socket already half-closed, map full): that
//!   direction, or the whole pair, is copied in userspace; no byte is dropped.
//! - **Upgrades.** A pair stays in the maps it was installed in for its
//!   whole life; on an upgrade the maps move to the new process (`mapset`)
//!   and the pair follows at a safe point with its ledger (`moving`, `run`).
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use aya::{programs::SkSkb, Ebpf, EbpfLoader};
use proxy_common::FlowControl;
use tokio::net::TcpStream;

use super::userspace::{arm_reset, cut_if_owed, cut_short};
use super::{ConnInfo, CopyPlane, EndReason, Plane, Transfer};
use crate::bpf;
use direction::IdleWatch;
use install::{forward_ready, EarlyEnd, Quiet};
use mapset::{MapSet, Sets};
use moving::DirLedger;

mod direction;
mod events;
mod install;
mod mapset;
mod moving;
mod run;

pub use mapset::{GivenSets, PairHold, FDS_PER_SET};
pub use moving::Ledger;

/// Bound on one direction's bytes inside the kernel (redirected but not yet
/// acknowledged by the receiver) with kernel autotuning (`--socket-buffer 0`):
/// below the 4 MiB the send buffer grows to at most (`tcp_wmem`), as with
/// fixed buffers (`inflight_bound`).
pub const AUTOTUNED_INFLIGHT_BOUND: u64 = 3 << 20;

/// When a promoted direction counts as busy: more than `skbs` skbs within
/// one `window_ns` window (fixed windows, each begun by the first skb after
/// the last one ended, so a burst that straddles two may reach twice that
/// unnoticed). A pair moved by an upgrade takes the new process's rule at
/// its next limit update. The promotion's own rule, per direction: a connection moves
/// in with at most `--promote-segments-below` per second on both sockets
/// together, and a direction leaves with more than that on its own, so a
/// connection near the line does not move in and straight back out (and a
/// direction changes plane at most once).
#[derive(Debug, Clone, Copy, Default)]
struct Busy {
    skbs: u64,
    window_ns: u64,
}

impl Busy {
    fn of(promotion: super::Promotion) -> Busy {
        let period = promotion.after;
        Busy {
            skbs: ((promotion.segments_below as f64 * period.as_secs_f64()) as u64).max(1),
            window_ns: period.as_nanos().min(u128::from(u64::MAX)) as u64,
        }
    }
}

/// Fastpath knobs from the command line.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Most bytes one direction may have inside the kernel (redirected, not
    /// yet acknowledged by the receiver) before it moves to userspace; None:
    /// derived from the socket buffers (`inflight_bound`).
    pub inflight: Option<u64>,
    /// The fixed SO_RCVBUF/SO_SNDBUF asked for (None: autotuning).
    pub socket_buffer: Option<u32>,
    /// `--mode auto`: when a connection moves into the kernel (None: never),
    /// and so when a promoted direction that turned busy leaves it again.
    pub promotion: Option<super::Promotion>,
    /// Tests only: see `FlowControl::fault_drop_at` (0: off).
    pub fault_drop_at: u64,
    /// Tests only: a wait before each pre-install copy (None: none).
    pub pre_install_delay: Option<std::time::Duration>,
}

/// The socket buffers a fixed `--socket-buffer` gets on a socket the
/// fastpath carries, at least. The verdict takes skbs off TCP's receive
/// queue, so TCP's window no longer follows what the socket holds: after a
/// demotion, passed bytes reached 1.5 MB on a socket with a 256 KiB setting
/// (64 MiB bidirectional echo, `tester-go check`), the kernel then dropped
/// what arrived as beyond the window (`TCP_INVALID_SEQUENCE`), the peer's
/// ACKs with it, both ends backed off to multi-second retransmission
/// timeouts and the stream stalled: 2 of 3 runs, then 1 of 12 with the bound
/// enforced by the verdict; 4 of 16 with only the receive buffer raised to
/// 2 MiB; 0 of 32 with both raised (`/tmp`-style loop of `tester-go check`
/// against `--mode fastpath`, NOTES §2).
pub const FASTPATH_SOCKET_BUFFER: u32 = 2 << 20;

/// The in-flight bound to use. Bytes the verdict redirected stay charged to
/// the source socket's rmem until the peer's TCP takes them, and bytes it
/// passed stay there until userspace reads them. Past the backlog's limit
/// (twice the doubled SO_RCVBUF plus half the doubled SO_SNDBUF plus 64 KiB)
/// the kernel drops every segment that arrives while the socket is busy,
/// ACKs included. So with fixed buffers of B bytes (doubled by the kernel)
/// the bound may be at most 3B.
///
/// The default is 1.5B, below the 2B the peer's send buffer holds: the
/// redirects of a direction and the bytes passed to the same socket share
/// its psock's one queue, so a redirect that waits there for send room
/// holds up the other direction's passed bytes behind it. At 2B that
/// happened behind a target that reads only between its writes and a slow
/// client: 0.7–3.5 s stalls after the client sped up, none at 1.5B
/// (NOTES §2, session 24).
pub fn inflight_bound(options: &Options) -> Result<u64> {
    let Some(asked) = options.socket_buffer else {
        return Ok(options.inflight.unwrap_or(AUTOTUNED_INFLIGHT_BOUND));
    };
    let buffer = u64::from(asked.max(FASTPATH_SOCKET_BUFFER));
    match options.inflight {
        None => Ok(default_bound(buffer)),
        Some(bound) if bound <= 3 * buffer => Ok(bound),
        Some(bound) => anyhow::bail!(
            "--fastpath-inflight {bound} is more than the fastpath's socket buffers \
             ({buffer} bytes each) can hold: it may be at most {}; raise --socket-buffer, \
             lower --fastpath-inflight, or leave it out (default: {})",
            3 * buffer,
            default_bound(buffer)
        ),
    }
}

/// The in-flight bound with fixed buffers of `buffer` bytes and no
/// `--fastpath-inflight`.
fn default_bound(buffer: u64) -> u64 {
    buffer * 3 / 2
}

/// Raises fixed socket buffers to `FASTPATH_SOCKET_BUFFER` (the FORCE
/// options: past net.core.{r,w}mem_max, with the CAP_NET_ADMIN the fastpath
/// needs anyway). Autotuned sockets are left alone.
fn raise_socket_buffers(sock: &TcpStream, fixed: Option<u32>) -> std::io::Result<()> {
    let Some(size) = fixed else {
        return Ok(());
    };
    let size = size.max(FASTPATH_SOCKET_BUFFER) as libc::c_int;
    for option in [libc::SO_RCVBUFFORCE, libc::SO_SNDBUFFORCE] {
        // SAFETY: a valid socket fd and a c_int option value of the stated size.
        let rc = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(sock),
                libc::SOL_SOCKET,
                option,
                std::ptr::addr_of!(size).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

pub struct FastpathPlane {
    /// This process's map set (new pairs go there) and the adopted ones.
    sets: Arc<Sets>,
    fallback: CopyPlane,
    bound: u64,
    socket_buffer: Option<u32>,
    fault_drop_at: u64,
    pre_install_delay: Option<std::time::Duration>,
    /// `--mode auto`: a direction that turns busy leaves the kernel
    /// (`FlowControl::busy_skbs`); None on `--mode fastpath`.
    busy: Option<Busy>,
    /// Owns the loaded program; dropping it would detach the verdict.
    _ebpf: Mutex<Ebpf>,
}

impl FastpathPlane {
    /// Loads and attaches the verdict program and proves on a loopback pair
    /// that this kernel accepts sockets into the map. Must run inside tokio.
    pub fn load(fallback: CopyPlane, options: Options) -> Result<Self> {
        let bound = inflight_bound(&options)?;
        let mut ebpf = bpf::load(&mut EbpfLoader::new())?;
        match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => events::spawn_bpf_logger(logger)?,
            Err(e) => tracing::debug!(error = %e, "BPF program has no log buffer"),
        }
        let own = MapSet::from_loaded(&mut ebpf)?;
        let program: &mut SkSkb = ebpf
            .program_mut("splice")
            .context("the eBPF object has no `splice` program")?
            .try_into()
            .context("`splice` is not an sk_skb program")?;
        program.load().context(bpf::privilege_hint(
            "loading the stream verdict (verifier output above)",
        ))?;
        {
            let mut maps = lock(&own.maps);
            program
                .attach(maps.sockets.fd())
                .context("attaching the stream verdict to the socket map")?;
            maps.probe_insert()?;
        }
        Ok(FastpathPlane {
            sets: Sets::new(own),
            fallback,
            bound,
            socket_buffer: options.socket_buffer,
            fault_drop_at: options.fault_drop_at,
            pre_install_delay: options.pre_install_delay,
            busy: options.promotion.map(Busy::of),
            _ebpf: Mutex::new(ebpf),
        })
    }

    /// What the verdict is told about one direction: `peer` receives its
    /// bytes while at most `limit` were redirected; wake userspace at
    /// `check_at`.
    fn control(&self, peer: u64, check_at: u64, limit: u64) -> FlowControl {
        let busy = self.busy.unwrap_or_default();
        FlowControl {
            peer,
            check_at,
            limit,
            pass: 0,
            fault_drop_at: self.fault_drop_at,
            busy_skbs: busy.skbs,
            busy_window_ns: busy.window_ns,
        }
    }

    /// `prior`: bytes each way that earlier processes carried (an upgrade
    /// moved the connection here): the FIN ledger counts them, as the
    /// sockets' own counters do, or a moved connection that carried bytes
    /// would look short at its FIN and be reset.
    ///
    /// Not an async fn of its own: a wrapper future would add its own
    /// state to every connection's box.
    pub fn carry<'a>(
        &'a self,
        client: TcpStream,
        upstream: TcpStream,
        conn: &'a ConnInfo,
        prior: [u64; 2],
    ) -> impl Future<Output = Transfer> + Send + 'a {
        self.carry_from(client, upstream, conn, [0, 0], prior)
    }

    /// Carries a connection whose first `before` bytes each way
    /// (client→target, target→client) another plane already forwarded, all
    /// of them written out: the FIN ledger counts them as forwarded. `prior`:
    /// bytes each way that earlier processes forwarded (the FIN ledger counts
    /// them too; the transfer does not, its owner reports them).
    ///
    /// An async block over its arguments, not an async fn, which would keep
    /// a second copy of them (112 bytes) in every installed pair's future.
    pub fn carry_from<'a>(
        &'a self,
        client: TcpStream,
        upstream: TcpStream,
        conn: &'a ConnInfo,
        before: [u64; 2],
        prior: [u64; 2],
    ) -> impl Future<Output = Transfer> + Send + 'a {
        async move {
            for sock in [&client, &upstream] {
                if let Err(e) = raise_socket_buffers(sock, self.socket_buffer) {
                    tracing::warn!(conn = conn.id, error = %e, "cannot raise the socket buffers for the fastpath; a demoted direction may stall");
                }
            }
            // Everything before the run in a block of its own, so that none
            // of it (the copy's state and results, the install's `Result`)
            // stays in the future beside the running pair.
            let (pair, early) = {
                // Whatever arrived before the install goes first, by the copy path.
                let (up, down) = {
                    let quiet = Quiet::default();
                    let moved = [AtomicU64::new(0), AtomicU64::new(0)];
                    let copied = async {
                        tokio::join!(
                            forward_ready(&client, &upstream, 0, &quiet, &moved[0]),
                            forward_ready(&upstream, &client, 1, &quiet, &moved[1])
                        )
                    };
                    // The copy can block writing to a side that does not read: a
                    // reset, the drain deadline or the idle timeout must still end
                    // the connection then (without the last, a target that stopped
                    // reading while a client uploaded held the pair for good).
                    // Boxed: it lives only until the install, yet inline it would
                    // set the size of every pair's future for the pair's life
                    // (1,904 bytes, where run_pair's state is 1,448).
                    let early = Box::pin(async {
                        if let Some(delay) = self.pre_install_delay {
                            tokio::time::sleep(delay).await;
                        }
                        let progress =
                            || moved[0].load(Ordering::Relaxed) + moved[1].load(Ordering::Relaxed);
                        let mut idle = IdleWatch::new(conn.rules.idle_timeout, 0);
                        tokio::select! {
                            r = copied => Ok(r),
                            end = cut_short(&client, &upstream, conn) => Err(end),
                            () = idle.until_idle(&progress) => {
                                cut_if_owed(&client, &upstream, conn);
                                Err(EndReason::IdleTimeout)
                            }
                        }
                    });
                    match early.await {
                        Ok(r) => r,
                        Err(end) => {
                            let c2t = before[0] + moved[0].load(Ordering::Relaxed);
                            let t2c = before[1] + moved[1].load(Ordering::Relaxed);
                            return Transfer {
                                client_to_target: c2t,
                                target_to_client: t2c,
                                userspace_bytes: c2t + t2c,
                                ..Transfer::none(end).on(Plane::CopyFallback)
                            };
                        }
                    }
                };
                let early = [before[0] + up.moved, before[1] + down.moved];
                // A reset seen here must reach the other side as a reset: the error
                // is consumed by the read that saw it, so no later reader would know.
                let reset = match (&up.end, &down.end) {
                    (EarlyEnd::ReadFailed, _) | (_, EarlyEnd::WriteFailed) => {
                        Some(EndReason::ClientReset)
                    }
                    (EarlyEnd::WriteFailed, _) | (_, EarlyEnd::ReadFailed) => {
                        Some(EndReason::TargetReset)
                    }
                    _ => None,
                };
                if let Some(end) = reset {
                    arm_reset(if end == EndReason::ClientReset {
                        &upstream
                    } else {
                        &client
                    });
                    return Transfer {
                        plane: Plane::CopyFallback,
                        ..Transfer::none(end)
                    }
                    .plus(early);
                }
                let installed = match (&up.end, &down.end) {
                    (EarlyEnd::Open, EarlyEnd::Open) => {
                        self.sets.own.install(&client, &upstream, |peer| {
                            self.control(peer, self.bound / 4, self.bound)
                        })
                    }
                    _ => Err(anyhow::anyhow!("a side sent FIN before the install")),
                };
                // Taken out before the pair runs, not matched around its run:
                // the match kept the `Result` beside the pair for the pair's life.
                let pair = match installed {
                    Ok(pair) => pair,
                    Err(e) => {
                        tracing::debug!(conn = conn.id, error = %format!("{e:#}"),
                        "fastpath not installed; this connection stays on the copy plane");
                        // TCP keeps reporting EOF, so the copy plane sees the FIN again.
                        // Boxed: this rare path was the largest await here, and
                        // every installed pair's future kept room for it.
                        // The bytes moved before count as the copy's own,
                        // so a park's record has them too.
                        let carry = self.fallback.carry_after(client, upstream, conn, early);
                        return Box::pin(carry).await.on(Plane::CopyFallback);
                    }
                };
                (pair, early)
            };
            let set = Arc::clone(&self.sets.own);
            let hold = self.sets.hold_own();
            let fresh = |linked, early, prior| DirLedger {
                linked,
                early,
                prior,
                ..DirLedger::default()
            };
            let dirs = [
                fresh(pair.client.linked, early[0], prior[0]),
                fresh(pair.upstream.linked, early[1], prior[1]),
            ];
            let ran = self
                .run_pair(&set, &pair, (&client, &upstream), &dirs, false, conn)
                .await;
            self.ended(ran, &set, &pair, client, upstream, hold)
        }
    }
}

impl Transfer {
    /// The same, with `early` bytes each way forwarded by userspace first.
    fn plus(mut self, early: [u64; 2]) -> Transfer {
        self.client_to_target += early[0];
        self.target_to_client += early[1];
        self.userspace_bytes += early[0] + early[1];
        self
    }
}

impl Drop for FastpathPlane {
    /// Every pair uninstalls itself; whatever is left here at exit leaked.
    fn drop(&mut self) {
        let left = lock(&self.sets.own.maps).entries();
        if self.sets.given.load(Ordering::Relaxed) {
            tracing::info!(
                entries = left,
                pairs = self.sets.own.pairs(),
                "fastpath maps handed to the new process"
            );
        } else if left == 0 {
            tracing::info!("fastpath maps empty at exit");
        } else {
            tracing::warn!(
                entries = left,
                "fastpath maps not empty at exit: pairs leaked"
            );
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding these locks leaves the maps consistent (each
    // update is one syscall), so a poisoned lock is still safe to use.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bound(inflight: Option<u64>, socket_buffer: Option<u32>) -> Result<u64> {
        inflight_bound(&Options {
            inflight,
            socket_buffer,
            promotion: None,
            fault_drop_at: 0,
            pre_install_delay: None,
        })
    }

    /// The default stays below what the peer's doubled send buffer holds
    /// (2B), with fixed buffers and with autotuning alike.
    #[test]
    fn the_default_bound_stays_below_the_send_buffer() {
        let mib = 1 << 20;
        // The userspace planes' 256 KiB is raised to 2 MiB on fastpath sockets.
        assert_eq!(bound(None, Some(256 << 10)).unwrap(), 3 * mib);
        assert_eq!(bound(None, Some(4 << 20)).unwrap(), 6 * mib);
        assert_eq!(bound(None, None).unwrap(), 3 * mib);
        for buffer in [256 << 10, 2 << 20, 4 << 20] {
            let b = u64::from(u32::max(buffer, FASTPATH_SOCKET_BUFFER));
            assert!(bound(None, Some(buffer)).unwrap() < 2 * b);
        }
        // Asked for: kept up to 3B, refused past it with the default named.
        assert_eq!(bound(Some(6 * mib), Some(256 << 10)).unwrap(), 6 * mib);
        let refused = bound(Some(7 * mib), Some(256 << 10))
            .unwrap_err()
            .to_string();
        assert!(refused.contains("default: 3145728"), "{refused}");
    }
}
