//! Bytes of a connection while it is carried, read from the kernel's
//! per-socket counters (`tcpi_bytes_acked`): what the target acknowledged
//! of the client's bytes, and the client of the target's. That works the
//! same whichever plane moves the bytes (copy, splice, or the kernel
//! fastpath, which userspace never sees), and never counts more than was
//! written, so the close record's exact counts only ever add to it.
//!
//! The sockets belong to the data plane's future; they are read by fd
//! between its polls in the same task, and each read first checks the
//! socket cookie, so a closed fd reused for another socket is never read.
//! The cookies are taken at the first sample, not at the start: most
//! connections end before it, and that saves two getsockopts on each.
//! The first sample comes while the plane's future is still running, and
//! that future owns both sockets until it ends, so the fds are still ours.

use std::future::Future;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use tokio::net::TcpStream;

use crate::ops::metrics::{AppMetrics, ByteTally};

/// `tcpi_bytes_acked` in `struct tcp_info` (linux/tcp.h, since 4.1).
const TCPI_BYTES_ACKED: usize = 120;
/// `tcpi_state`: its first byte.
const TCPI_STATE: usize = 0;
/// States in which a socket holds no FIN of ours (include/net/tcp_states.h).
const TCP_ESTABLISHED: u8 = 1;
const TCP_CLOSE_WAIT: u8 = 8;

struct Sock {
    fd: RawFd,
    /// Taken at the first sample (see the head of this file); 0 until then
    /// (the kernel's socket cookies start at 1). Not an Option: every
    /// connection's task holds two of these for its whole life.
    cookie: u64,
    /// Counted bytes that are not the other side's payload (our SYN, the
    /// PROXY header).
    ours: u64,
}

impl Sock {
    fn new(s: &TcpStream, ours: u64) -> Sock {
        Sock {
            fd: s.as_raw_fd(),
            cookie: 0,
            ours,
        }
    }

    /// Payload bytes the peer acknowledged, if this is still our socket.
    fn acked(&mut self) -> Option<u64> {
        let now = cookie(self.fd)?;
        if self.cookie == 0 {
            self.cookie = now;
        }
        if self.cookie != now {
            return None;
        }
        let mut info = [0u8; 232];
        let mut len = info.len() as libc::socklen_t;
        // SAFETY: info and len describe a writable buffer of len bytes.
        let rc = unsafe {
            libc::getsockopt(
                self.fd,
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                info.as_mut_ptr().cast(),
                &mut len,
            )
        };
        if rc != 0 || (len as usize) < TCPI_BYTES_ACKED + 8 {
            return None;
        }
        let mut acked = [0u8; 8];
        acked.copy_from_slice(&info[TCPI_BYTES_ACKED..TCPI_BYTES_ACKED + 8]);
        let mut acked = u64::from_ne_bytes(acked);
        // Our FIN takes a sequence number too: once sent, one byte less
        // (before its ack this undercounts by one, which the close fixes).
        if !matches!(info[TCPI_STATE], TCP_ESTABLISHED | TCP_CLOSE_WAIT) {
            acked = acked.saturating_sub(1);
        }
        Some(acked.saturating_sub(self.ours))
    }
}

fn cookie(fd: RawFd) -> Option<u64> {
    let mut value: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: value and len are valid for the kernel to write a u64 into.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&mut value as *mut u64).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(value)
}

/// Reads a connection's two sockets.
pub(super) struct Sampler {
    client: Sock,
    upstream: Sock,
}

impl Sampler {
    /// `header`: bytes the proxy itself wrote to the upstream first.
    pub(super) fn new(client: &TcpStream, upstream: &TcpStream, header: u64) -> Sampler {
        Sampler {
            client: Sock::new(client, 0),
            // +1: on a socket that connect()ed, the ack of its SYN counts in
            // tcpi_bytes_acked (tcp_ack in SYN-SENT); on an accepted one not.
            upstream: Sock::new(upstream, header + 1),
        }
    }

    /// (client → target, target → client) delivered so far.
    fn sample(&mut self) -> Option<(u64, u64)> {
        Some((self.upstream.acked()?, self.client.acked()?))
    }
}

/// Runs `carry` to its end, adding the bytes moved so far to the metrics
/// every `every` meanwhile.
pub(super) fn carry_counting<'a, T>(
    carry: impl Future<Output = T> + 'a,
    // By reference: a sampler taken by value is kept twice in this future.
    sampler: &'a mut Sampler,
    every: Duration,
    metrics: &'a AppMetrics,
    tally: &'a mut ByteTally,
) -> impl Future<Output = T> + 'a {
    // An async block, not an async fn, which would keep a second copy of
    // its arguments in every connection's task.
    async move {
        tokio::pin!(carry);
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                t = &mut carry => return t,
                _ = tick.tick() => {
                    if let Some((c2t, t2c)) = sampler.sample() {
                        tally.advance(metrics, c2t, t2c);
                    }
                }
            }
        }
    }
}
