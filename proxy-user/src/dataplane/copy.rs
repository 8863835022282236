//! Userspace copy data plane.
//!
//! Each direction is an independent pump: read from one socket, write all of
//! it to the other. EOF on one side becomes `shutdown(Write)` on the other
//! only after every byte read was written (half-close propagates per
//! direction); a reset becomes a reset (SO_LINGER 0 then close), so the peer
//! learns the stream was cut rather than seeing a clean end.
//!
//! Both directions borrow the sockets (`readable`/`try_read` on `&TcpStream`)
//! instead of splitting them, so either can be aborted with RST by fd.

use std::future::Future;
use std::io;
use std::net::Shutdown;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use socket2::SockRef;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::{ConnInfo, EndReason, Transfer};

/// Default per-direction buffer. Measured on this 2-vCPU VM (release build,
/// loopback, 2 GB one way through the proxy, interleaved runs, noisy host):
/// proxy CPU per GB was ~0.90 s at 16 KiB, ~0.68 s at 64 KiB, ~0.65 s at
/// 128 KiB, ~0.62 s at 256 KiB; throughput medians 0.65 / 0.85 / 0.7 / 0.75
/// GB/s for one stream. 64 KiB gets most of the gain at a quarter of the
/// memory of 256 KiB (128 KiB vs 512 KiB per busy connection).
pub const DEFAULT_BUFFER: usize = 64 * 1024;

#[derive(Debug, Clone)]
pub struct CopyPlane {
    /// Bytes per direction; allocated only once that direction has data (or
    /// its FIN), so idle connections cost no buffer memory until they speak.
    pub buffer_size: usize,
}

impl Default for CopyPlane {
    fn default() -> Self {
        CopyPlane {
            buffer_size: DEFAULT_BUFFER,
        }
    }
}

#[derive(Debug)]
pub(super) enum DirEnd {
    /// Source sent FIN and it was passed on.
    Eof,
    /// Reading the source failed (usually ECONNRESET).
    ReadFailed(io::Error),
    /// Writing the destination failed (usually EPIPE/ECONNRESET).
    WriteFailed(io::Error),
}

/// Last time any byte moved, in ms since the transfer started.
pub(super) struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    pub(super) fn new() -> Self {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    pub(super) fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    pub(super) async fn idle(&self, limit: Option<Duration>) {
        let Some(limit) = limit else {
            return std::future::pending().await;
        };
        loop {
            let due =
                self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed)) + limit;
            if Instant::now() >= due {
                return;
            }
            tokio::time::sleep_until(due).await;
        }
    }
}

pub(super) async fn pump(
    src: &TcpStream,
    dst: &TcpStream,
    buf_size: usize,
    moved: &AtomicU64,
    activity: &Activity,
) -> DirEnd {
    if let Err(e) = first_bytes(src).await {
        return DirEnd::ReadFailed(e);
    }
    let mut buf = vec![0u8; buf_size.max(1)];
    loop {
        if let Err(e) = src.readable().await {
            return DirEnd::ReadFailed(e);
        }
        let n = match src.try_read(&mut buf) {
            Ok(0) => {
                // Everything read so far was written in full (write loop
                // below), so the FIN can follow it now.
                return pass_fin(dst);
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return DirEnd::ReadFailed(e),
        };
        activity.touch();
        let mut off = 0;
        while off < n {
            if let Err(e) = dst.writable().await {
                return DirEnd::WriteFailed(e);
            }
            match dst.try_write(&buf[off..n]) {
                Ok(m) => {
                    off += m;
                    moved.fetch_add(m as u64, Ordering::Relaxed);
                    activity.touch();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return DirEnd::WriteFailed(e),
            }
        }
    }
}

/// Waits until `src` has a byte, its FIN or an error to report, without
/// taking anything. A freshly accepted socket reports readable before the
/// client sent anything, so readiness alone would make every idle connection
/// allocate its per-direction buffer (or pipe) at once.
pub(super) async fn first_bytes(src: &TcpStream) -> io::Result<()> {
    src.peek(&mut [0u8; 1]).await.map(|_| ())
}

/// Both sides: a proxy must not add Nagle delay to small writes.
pub(super) fn set_nodelay(client: &TcpStream, upstream: &TcpStream) {
    for s in [client, upstream] {
        if let Err(e) = s.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY failed");
        }
    }
}

/// The source's FIN, passed on once everything before it was written.
pub(super) fn pass_fin(dst: &TcpStream) -> DirEnd {
    match SockRef::from(dst).shutdown(Shutdown::Write) {
        Ok(()) => DirEnd::Eof,
        Err(e) if e.kind() == io::ErrorKind::NotConnected => DirEnd::Eof,
        Err(e) => DirEnd::WriteFailed(e),
    }
}

/// Makes the next close of this socket send RST instead of FIN.
pub(super) fn arm_reset(sock: &TcpStream) {
    if let Err(e) = SockRef::from(sock).set_linger(Some(Duration::ZERO)) {
        tracing::debug!(error = %e, "SO_LINGER 0 failed; peer will see FIN instead of RST");
    }
}

/// Runs both directions of a connection to their end and says how it ended.
/// A failed read or write pins the failure on one socket, and the other gets
/// a reset; idle and drain deadlines cut both. Both data planes use this.
pub(super) async fn supervise(
    up: impl Future<Output = DirEnd>,
    down: impl Future<Output = DirEnd>,
    idle: impl Future<Output = ()>,
    client: &TcpStream,
    upstream: &TcpStream,
    conn: &ConnInfo,
) -> EndReason {
    let mut up = pin!(up);
    let mut down = pin!(down);
    let mut idle = pin!(idle);
    let (mut up_done, mut down_done) = (false, false);
    loop {
        let (result, from_client) = tokio::select! {
            r = &mut up, if !up_done => { up_done = true; (r, true) }
            r = &mut down, if !down_done => { down_done = true; (r, false) }
            _ = &mut idle => return EndReason::IdleTimeout,
            _ = conn.hard_stopped() => {
                arm_reset(client);
                arm_reset(upstream);
                return EndReason::DrainTimeout;
            }
        };
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
        };
        if client_failed {
            arm_reset(upstream);
            return EndReason::ClientReset;
        }
        arm_reset(client);
        return EndReason::TargetReset;
    }
}

impl CopyPlane {
    pub async fn carry(&self, client: TcpStream, upstream: TcpStream, conn: &ConnInfo) -> Transfer {
        carry_userspace(client, upstream, conn, Engine::ReadWrite, self.buffer_size).await
    }
}

/// How a userspace plane moves one direction's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Engine {
    /// read(2) into a buffer, write(2) out of it.
    ReadWrite,
    /// splice(2) through a pipe (`super::splice`).
    Splice,
}

/// Carries a connection in userspace with `engine`, `size` bytes of buffer
/// or pipe per direction: the copy and splice planes differ only in this.
pub(super) async fn carry_userspace(
    client: TcpStream,
    upstream: TcpStream,
    conn: &ConnInfo,
    engine: Engine,
    size: usize,
) -> Transfer {
    set_nodelay(&client, &upstream);
    let c2t = AtomicU64::new(0);
    let t2c = AtomicU64::new(0);
    let activity = Activity::new();
    let activity = &activity;
    let direction = |src, dst, moved| async move {
        match engine {
            Engine::ReadWrite => pump(src, dst, size, moved, activity).await,
            Engine::Splice => super::splice::pump(src, dst, size, moved, activity, conn.id).await,
        }
    };
    let end = supervise(
        direction(&client, &upstream, &c2t),
        direction(&upstream, &client, &t2c),
        activity.idle(conn.idle_timeout),
        &client,
        &upstream,
        conn,
    )
    .await;
    drop(client);
    drop(upstream);
    let (c2t, t2c) = (c2t.load(Ordering::Relaxed), t2c.load(Ordering::Relaxed));
    Transfer {
        // Userspace moved these, even when splice(2) never mapped them.
        userspace_bytes: c2t + t2c,
        client_to_target: c2t,
        target_to_client: t2c,
        end,
        plane: match engine {
            Engine::ReadWrite => "copy",
            Engine::Splice => "splice",
        },
    }
}
