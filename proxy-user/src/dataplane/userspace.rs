//! What the userspace planes share: a direction's outcome, the activity
//! clock behind the idle timeout, passing FIN and RST on, and the supervisor
//! that runs both directions of a connection to their end. The copy and
//! splice planes differ only in the per-direction pump they plug in here;
//! the fastpath uses the same supervisor for the directions it hands back.
//!
//! Both directions borrow the sockets (`readable`/`try_read` on `&TcpStream`)
//! instead of splitting them, so either can be aborted with RST by fd.
//! Where a connection may stop with nothing in hand (an upgrade, a move
//! into the kernel) is `safepoint`'s job; the pumps only count what they
//! hold (`Tally`).

use std::future::Future;
use std::io;
use std::net::Shutdown;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::time::Duration;

use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::{fin, tcpinfo, ConnInfo, EndReason, Plane};
use crate::gate::Gate;

#[derive(Debug)]
pub(super) enum DirEnd {
    /// Source sent FIN and it was passed on.
    Eof,
    /// Reading the source failed (usually ECONNRESET).
    ReadFailed(io::Error),
    /// Writing the destination failed (usually EPIPE/ECONNRESET).
    WriteFailed(io::Error),
    /// Bytes of this direction were lost or duplicated on the way: both
    /// sides get a reset, as neither stream can be trusted to be whole (the
    /// sender of a lost upload would otherwise see a clean close).
    Lost(io::Error),
}

/// Last time any byte moved, in ms on `CLOCK_MONOTONIC_COARSE`.
pub(super) struct Activity {
    last_ms: AtomicU64,
}

/// The coarse monotonic clock, in ms: the kernel tick's resolution (1–4
/// ms), which an idle timeout does not notice. Every read and write stamps
/// the activity, four times per round trip, and this clock's vDSO read
/// costs a few ns where `Instant::now` cost 21 (NOTES §2, "Polling only
/// what woke").
fn coarse_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec to write, and the clock id is one
    // Linux has had since 2.6.32, so the call cannot fail.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

impl Activity {
    pub(super) fn new() -> Self {
        Activity {
            last_ms: AtomicU64::new(coarse_ms()),
        }
    }

    pub(super) fn touch(&self) {
        self.last_ms.store(coarse_ms(), Ordering::Relaxed);
    }

    /// Resolves once no byte moved for `limit`, counted from `since` at the
    /// earliest (a half-close starts the fin timers afresh).
    ///
    /// An async block over its arguments, not an async fn, which would keep
    /// a second copy of them in every connection for as long as it waits.
    pub(super) fn idle(
        &self,
        limit: Option<Duration>,
        since: Instant,
    ) -> impl Future<Output = ()> + Send + '_ {
        async move {
            while let Some(due) = self.due(limit, since) {
                if Instant::now() >= due {
                    return;
                }
                tokio::time::sleep_until(due).await;
            }
            std::future::pending().await
        }
    }

    /// When the connection turns idle if nothing moves meanwhile. (The
    /// stamp is on the coarse clock and the timers on tokio's: the time
    /// since the stamp carries over from one to the other.)
    fn due(&self, limit: Option<Duration>, since: Instant) -> Option<Instant> {
        let limit = limit?;
        let quiet_for = coarse_ms().saturating_sub(self.last_ms.load(Ordering::Relaxed));
        let last = Instant::now()
            .checked_sub(Duration::from_millis(quiet_for))
            .unwrap_or(since);
        Some(last.max(since) + limit)
    }
}

/// The source's FIN, passed on once everything before it was written.
fn pass_fin(dst: &TcpStream) -> DirEnd {
    match SockRef::from(dst).shutdown(Shutdown::Write) {
        Ok(()) => DirEnd::Eof,
        Err(e) if e.kind() == io::ErrorKind::NotConnected => DirEnd::Eof,
        Err(e) => DirEnd::WriteFailed(e),
    }
}

/// Makes the next close of this socket send RST instead of FIN: how a
/// stream that was cut says so, rather than look finished.
pub fn arm_reset(sock: &TcpStream) {
    if let Err(e) = SockRef::from(sock).set_linger(Some(Duration::ZERO)) {
        tracing::debug!(error = %e, "SO_LINGER 0 failed; peer will see FIN instead of RST");
    }
}

/// Runs both directions of a connection to their end and says how it ended.
/// A failed read or write pins the failure on one socket, and the other gets
/// a reset; idle and fin deadlines cut both. The drain deadline is not
/// here: it comes with the process's other signals, which the caller
/// watches (`safepoint::Asks`). Every data plane uses this.
///
/// No plane needs an error watch of its own beside its directions: a
/// direction waiting to read wakes for an error on its source, one blocked
/// writing watches its source meanwhile (`writable`), a fastpath direction
/// waiting for the kernel's drain looks at its source's error as it polls,
/// and once a direction passed its FIN its source is watched here. So an
/// error on either socket still ends the connection at once, with two
/// waiters fewer for every connection to register and to keep (320 bytes
/// on the userspace planes, 392 on an installed pair, while idle).
///
/// Idle means no byte moved either way for the idle timeout, whatever the
/// reason: a reader that stopped reading is idle too. If bytes were still
/// owed to either side then, the stream was cut, and both sides get a reset
/// rather than a FIN that would pass for the end of the stream. The fin
/// timeouts (`fin`) cut a half-closed connection the same way.
///
/// `idle` resolves once no byte moved either way for the idle timeout;
/// `quiet(limit)` once none moved for `limit`, counted from the call.
///
/// An async block over its arguments, not an async fn, which would keep a
/// second copy of them for the connection's life.
pub(super) fn supervise<'a, Q: Future<Output = ()> + 'a>(
    // Pinned by the caller: a future taken by value is stored twice in this
    // one (the argument and the pinned local), which was 4.2 of the 4.9 KB
    // every connection's plane future took.
    mut up: Pin<&'a mut impl Future<Output = DirEnd>>,
    mut down: Pin<&'a mut impl Future<Output = DirEnd>>,
    idle: Pin<&'a mut impl Future<Output = ()>>,
    quiet: impl Fn(Option<Duration>) -> Q + 'a,
    client: &'a TcpStream,
    upstream: &'a TcpStream,
    conn: &'a ConnInfo,
) -> impl Future<Output = EndReason> + 'a {
    async move {
        // Gated: polled when its timer fires, not at every socket's wake.
        let mut idle = Gate::new(idle);
        let mut fin = fin::Armed::new();
        let (mut up_done, mut down_done) = (false, false);
        // The source of a direction that passed its FIN is read no more, so an
        // error on it (its peer's reset after the FIN) would go unseen while the
        // other direction waits: it is watched from then on. Boxed: only a
        // half-closed connection pays for it.
        let mut ended: Option<Pin<Box<dyn Future<Output = io::Error> + Send + '_>>> = None;
        loop {
            let (result, from_client) = tokio::select! {
                r = up.as_mut(), if !up_done => { up_done = true; (r, true) }
                r = down.as_mut(), if !down_done => { down_done = true; (r, false) }
                e = async { ended.as_mut()?.await.into() }, if ended.is_some() => {
                    match e {
                        Some(e) => (DirEnd::ReadFailed(e), up_done),
                        None => continue,
                    }
                }
                _ = &mut idle => {
                    cut_if_owed(client, upstream, conn);
                    return EndReason::IdleTimeout;
                }
                end = fin.fired() => {
                    cut_if_owed(client, upstream, conn);
                    return end;
                }
            };
            if matches!(result, DirEnd::Eof) && !(up_done && down_done) {
                fin.arm(from_client, conn, &quiet);
                let src = if from_client { client } else { upstream };
                ended = Some(Box::pin(failed(src)));
            }
            let client_failed = match result {
                DirEnd::Eof if up_done && down_done => return EndReason::Closed,
                DirEnd::Eof => continue,
                DirEnd::ReadFailed(e) => {
                    tracing::debug!(conn = conn.id, error = %e, from_client, "read failed");
                    from_client
                }
                DirEnd::WriteFailed(e) => {
                    tracing::debug!(conn = conn.id, error = %e, to_client = !from_client, "write failed");
                    !from_client
                }
                DirEnd::Lost(e) => {
                    tracing::debug!(conn = conn.id, error = %e, from_client, "bytes lost: resetting both sides");
                    arm_reset(client);
                    arm_reset(upstream);
                    return if from_client {
                        EndReason::ClientReset
                    } else {
                        EndReason::TargetReset
                    };
                }
            };
            if client_failed {
                arm_reset(upstream);
                return EndReason::ClientReset;
            }
            arm_reset(client);
            return EndReason::TargetReset;
        }
    }
}

/// The drain deadline passed: both sides get a reset.
pub(super) fn drain_deadline<'a>(
    client: &'a TcpStream,
    upstream: &'a TcpStream,
    conn: &'a ConnInfo,
) -> impl Future<Output = EndReason> + Send + 'a {
    // An async block over a receiver (an async fn would hold its
    // arguments twice).
    let mut signals = conn.rules.signals.clone();
    async move {
        while !signals.borrow_and_update().hard_stop {
            if signals.changed().await.is_err() {
                // The lifecycle owner went away without asking.
                std::future::pending::<()>().await;
            }
        }
        arm_reset(client);
        arm_reset(upstream);
        EndReason::DrainTimeout
    }
}

/// Resolves when a kernel-plane connection must end whatever its
/// directions are doing: an error on either socket (its peer's reset; the
/// other side gets one too), or the drain deadline (both get one). Its
/// directions also wait on the verdict and on the kernel's drain, where
/// they read nothing, and its pre-install copy may be blocked writing to a
/// side that does not read. (An installed pair waits for the drain
/// deadline with its other signals, `safepoint::Asks`, and its directions
/// see the errors: `supervise`.)
pub(super) async fn cut_short(
    client: &TcpStream,
    upstream: &TcpStream,
    conn: &ConnInfo,
) -> EndReason {
    tokio::select! {
        end = socket_failed(client, upstream, conn) => end,
        end = drain_deadline(client, upstream, conn) => end,
    }
}

/// Resolves at an error on either socket (its peer's reset): the other side
/// gets one too.
pub(super) async fn socket_failed(
    client: &TcpStream,
    upstream: &TcpStream,
    conn: &ConnInfo,
) -> EndReason {
    tokio::select! {
        e = failed(client) => {
            tracing::debug!(conn = conn.id, error = %e, "client socket failed");
            arm_reset(upstream);
            EndReason::ClientReset
        }
        e = failed(upstream) => {
            tracing::debug!(conn = conn.id, error = %e, "upstream socket failed");
            arm_reset(client);
            EndReason::TargetReset
        }
    }
}

/// Resolves with `sock`'s pending error as soon as it has one. Never
/// resolves otherwise: if a pump took the error first, the pump reports it.
async fn failed(sock: &TcpStream) -> io::Error {
    match sock.ready(Interest::ERROR).await {
        Ok(_) => match sock.take_error() {
            Ok(Some(e)) => return e,
            Ok(None) => {}
            Err(e) => return e,
        },
        Err(e) => return e,
    }
    std::future::pending().await
}

/// Idle or fin timeout: a reset to both sides when any byte was still owed.
pub(super) fn cut_if_owed(client: &TcpStream, upstream: &TcpStream, conn: &ConnInfo) {
    let owed = |s: &TcpStream| tcpinfo::owed(s).unwrap_or(0);
    let (client_owed, upstream_owed) = (owed(client), owed(upstream));
    if client_owed + upstream_owed > 0 {
        tracing::debug!(
            conn = conn.id,
            client_owed,
            upstream_owed,
            "idle or fin timeout with bytes still owed: resetting both sides"
        );
        arm_reset(client);
        arm_reset(upstream);
    }
}

/// Resolves once `sock` is readable (bytes, a FIN or an error), as
/// `sock.readable()` does, but the waker goes into the socket's own
/// registration instead of a waiter inside this future: 152 of the 320
/// bytes of every pump waiting on an idle connection. That slot holds one
/// waker, which is enough here: each socket is read by one direction, and
/// both directions of a connection run in one task.
pub(super) async fn readable(sock: &TcpStream) -> io::Result<()> {
    std::future::poll_fn(|cx| sock.poll_read_ready(cx)).await
}

/// Waits until `dst` takes more bytes, for a direction that holds bytes
/// read from `src` and reads nothing meanwhile: an error on `src` (its
/// peer's reset while the other side does not read) ends it too, as a
/// failed read, so the other side gets a reset at once rather than at the
/// idle timeout.
pub(super) async fn writable(src: &TcpStream, dst: &TcpStream) -> Result<(), DirEnd> {
    tokio::select! {
        biased;
        r = dst.writable() => r.map_err(DirEnd::WriteFailed),
        e = failed(src) => Err(DirEnd::ReadFailed(e)),
    }
}

/// Writes all of `bytes`, read from `src`, to `dst`, and watches `src`
/// meanwhile as `writable` does.
pub(super) async fn write_all_from(
    src: &TcpStream,
    dst: &TcpStream,
    bytes: &[u8],
) -> Result<(), DirEnd> {
    write_all_with(src, dst, bytes, |b| dst.try_write(b)).await
}

/// `write_all_from` with its own `write` (one non-blocking attempt, which
/// returns how many bytes went out): the copy plane's sends with flags and
/// counts each write.
pub(super) async fn write_all_with(
    src: &TcpStream,
    dst: &TcpStream,
    mut bytes: &[u8],
    mut write: impl FnMut(&[u8]) -> io::Result<usize>,
) -> Result<(), DirEnd> {
    while !bytes.is_empty() {
        writable(src, dst).await?;
        match write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(DirEnd::WriteFailed(e)),
        }
    }
    Ok(())
}

/// One direction's bookkeeping: the bytes it wrote, the bytes it holds
/// (read, not yet written: its buffer or pipe), and the activity clock
/// both directions share.
#[derive(Clone, Copy)]
pub(super) struct Tally<'a> {
    moved: &'a AtomicU64,
    held: &'a AtomicU64,
    activity: &'a Activity,
    /// FINs seen, both directions together.
    fins: &'a AtomicU8,
}

impl Tally<'_> {
    /// The source sent FIN and everything before it was written: pass it
    /// on. The second direction to get here skips shutdown(2): `supervise`
    /// then returns at once and both sockets are closed, and close(2) sends
    /// the same FIN (the receive queue is empty, as the other direction
    /// read up to its EOF). One syscall less per connection, as HAProxy
    /// closes. A direction restarted after a park or a demotion counts
    /// afresh, so at worst it passes its FIN twice, which is harmless.
    pub(super) fn pass_fin(&self, dst: &TcpStream) -> DirEnd {
        if self.fins.fetch_add(1, Ordering::Relaxed) == 1 {
            return DirEnd::Eof;
        }
        pass_fin(dst)
    }

    /// `n` bytes arrived from the source.
    pub(super) fn read(&self, n: usize) {
        self.held.fetch_add(n as u64, Ordering::Relaxed);
        self.activity.touch();
    }

    /// `n` bytes went out to the destination.
    pub(super) fn wrote(&self, n: usize) {
        self.moved.fetch_add(n as u64, Ordering::Relaxed);
        self.held.fetch_sub(n as u64, Ordering::Relaxed);
        self.activity.touch();
    }
}

/// How a userspace plane moves one direction's bytes from `src` to `dst`.
/// The copy and splice planes differ only in this.
pub(super) trait Pump {
    /// The plane this pump makes, for the close line and metrics.
    const PLANE: Plane;

    /// The direction's future itself, not an `async fn` around it: a
    /// wrapper would keep its own copy of the arguments (72 bytes per
    /// direction, in every connection's plane future).
    fn pump<'a>(
        &'a self,
        src: &'a TcpStream,
        dst: &'a TcpStream,
        t: Tally<'a>,
        c: &'a ConnInfo,
    ) -> impl Future<Output = DirEnd> + 'a;
}

/// Both directions' pumps under `supervise`. `moved` counts the bytes
/// written each way (client→target, target→client), `held` the bytes read
/// and not yet written, as they go.
///
/// (An async block, as `supervise`.)
pub(super) fn supervise_pumps<'a, P: Pump>(
    pump: &'a P,
    client: &'a TcpStream,
    upstream: &'a TcpStream,
    conn: &'a ConnInfo,
    moved: &'a [AtomicU64; 2],
    held: &'a [AtomicU64; 2],
) -> impl Future<Output = EndReason> + 'a {
    async move {
        let activity = Activity::new();
        let fins = AtomicU8::new(0);
        let tally = |i: usize| Tally {
            moved: &moved[i],
            held: &held[i],
            activity: &activity,
            fins: &fins,
        };
        let end = supervise(
            pin!(pump.pump(client, upstream, tally(0), conn)),
            pin!(pump.pump(upstream, client, tally(1), conn)),
            pin!(activity.idle(conn.rules.idle_timeout, Instant::now())),
            |limit| activity.idle(limit, Instant::now()),
            client,
            upstream,
            conn,
        )
        .await;
        end
    }
}
