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
//! The cookies are taken at the first sample, not at the start: it comes
//! somewhere in the first interval (see below), and a connection shorter
//! than that (most of them, on churn) usually ends before it, saving two
//! getsockopts.
//! The first sample comes while the plane's future is still running, and
//! that future owns both sockets until it ends, so the fds are still ours.
//!
//! The samples are paced by one clock for the process (`FlushClock`), not
//! a timer per connection: a tokio interval keeps its `Sleep` in a box of
//! its own (112 bytes) beside every connection for its whole life, and
//! puts every connection, however short, into the timer wheel and takes it
//! out again. A connection waits on the clock from a slot in a slab,
//! registered once. The connections are spread over `BUCKETS` slabs, and
//! each tick wakes one, so a connection samples once per interval and the
//! four getsockopts each costs come in slices, not in one burst.

use std::future::Future;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use slab::Slab;
use tokio::net::TcpStream;
use tokio::time::{Instant, MissedTickBehavior};

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

/// How many slices the connections are spread over (see the head of this
/// file).
const BUCKETS: usize = 8;

/// The byte flush's clock: every `every` it wakes each connection that
/// waits on it (`carry_counting`), a bucket at a time.
pub struct FlushClock {
    buckets: [Bucket; BUCKETS],
}

/// Connections woken at the same tick.
#[derive(Default)]
struct Bucket {
    /// Bumped each time this bucket's turn comes.
    ticks: AtomicU64,
    /// The waiting connections' wakers.
    waiting: Mutex<Slab<Waker>>,
}

impl FlushClock {
    /// A clock that wakes each bucket every `every` until the last `Arc` to
    /// it is gone. Within a tokio runtime.
    pub fn start(every: Duration) -> Arc<FlushClock> {
        let clock = Arc::new(FlushClock {
            buckets: Default::default(),
        });
        let weak = Arc::downgrade(&clock);
        tokio::spawn(async move {
            let slice = every / BUCKETS as u32;
            let mut interval = tokio::time::interval_at(Instant::now() + slice, slice);
            interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
            for turn in (0..BUCKETS).cycle() {
                interval.tick().await;
                let Some(clock) = weak.upgrade() else {
                    return;
                };
                clock.buckets[turn].tick();
            }
        });
        clock
    }

    /// Resolves at each turn of a bucket picked at random, the first within
    /// `every`, however often it is polled in between.
    fn ticks(&self) -> Ticks<'_> {
        let bucket = &self.buckets[fastrand::usize(..BUCKETS)];
        Ticks {
            bucket,
            seen: bucket.ticks.load(Ordering::SeqCst),
            slot: None,
        }
    }
}

impl Bucket {
    fn tick(&self) {
        self.ticks.fetch_add(1, Ordering::SeqCst);
        // Woken outside the lock: connections that end meanwhile take it
        // to leave the slab.
        let wakers: Vec<Waker> = self.waiting().iter().map(|(_, w)| w.clone()).collect();
        for waker in wakers {
            waker.wake();
        }
    }

    fn waiting(&self) -> MutexGuard<'_, Slab<Waker>> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One connection's wait on the clock: registered at its first poll, left
/// at its drop.
struct Ticks<'a> {
    bucket: &'a Bucket,
    /// The bucket's last turn this resolved for.
    seen: u64,
    /// Its place in `waiting`, and the waker stored there: a poll with the
    /// same waker (every poll, in one task) takes no lock.
    slot: Option<(usize, Waker)>,
}

impl Ticks<'_> {
    fn ticked(&mut self) -> bool {
        let now = self.bucket.ticks.load(Ordering::SeqCst);
        let ticked = now != self.seen;
        self.seen = now;
        ticked
    }
}

impl Future for Ticks<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        // Registered before the look, whatever it finds: a turn that came
        // before the first poll (the carry's first poll can take long) must
        // not leave the connection out of the slab, where only the carry
        // would ever wake it again.
        let current = matches!(&this.slot, Some((_, w)) if w.will_wake(cx.waker()));
        if !current {
            let waker = cx.waker().clone();
            let mut waiting = this.bucket.waiting();
            match &mut this.slot {
                Some((key, stored)) => {
                    waiting[*key] = waker.clone();
                    *stored = waker;
                }
                None => this.slot = Some((waiting.insert(waker.clone()), waker)),
            }
        }
        // A turn after the registration wakes the stored waker; one before
        // it shows here.
        if this.ticked() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

impl Drop for Ticks<'_> {
    fn drop(&mut self) {
        if let Some((key, _)) = self.slot.take() {
            self.bucket.waiting().remove(key);
        }
    }
}

/// Runs `carry` to its end, adding the bytes moved so far to the metrics
/// at each tick of `clock` meanwhile.
///
/// A poll function, not an async block, which kept its arguments beside
/// the locals it moved them to (136 bytes where this is 72), in every
/// connection's task.
pub(super) fn carry_counting<'a, T>(
    mut carry: impl Future<Output = T> + Unpin + 'a,
    sampler: &'a mut Sampler,
    clock: &'a FlushClock,
    metrics: &'a AppMetrics,
    tally: &'a mut ByteTally,
) -> impl Future<Output = T> + 'a {
    let mut ticks = clock.ticks();
    std::future::poll_fn(move |cx| {
        if let Poll::Ready(t) = Pin::new(&mut carry).poll(cx) {
            return Poll::Ready(t);
        }
        // Still registered after it resolved: the next tick wakes the task.
        if Pin::new(&mut ticks).poll(cx).is_ready() {
            if let Some((c2t, t2c)) = sampler.sample() {
                tally.advance(metrics, c2t, t2c);
            }
        }
        Poll::Pending
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ticks_resolve_once_per_interval_and_leave_at_drop() {
        let every = Duration::from_millis(40);
        let clock = FlushClock::start(every);
        let mut ticks = clock.ticks();
        (&mut ticks).await;
        assert_eq!(
            ticks.bucket.waiting().len(),
            1,
            "registered once, kept between turns"
        );
        let seen = ticks.seen;
        let turn = Instant::now();
        (&mut ticks).await;
        assert_eq!(ticks.seen, seen + 1, "one turn per resolve");
        // A lower bound only: a loaded machine may delay a turn, never
        // bring it forward (the ticks are spaced from the last one).
        let gap = turn.elapsed();
        assert!(
            gap >= every / 2,
            "a bucket's turns are an interval apart: {gap:?}"
        );
        let bucket = ticks.bucket;
        drop(ticks);
        assert!(
            bucket.waiting().is_empty(),
            "a dropped wait leaves the slab"
        );
    }

    #[tokio::test]
    async fn a_turn_before_the_first_poll_still_registers() {
        let clock = FlushClock::start(Duration::from_secs(3600));
        let mut ticks = clock.ticks();
        ticks.bucket.tick();
        (&mut ticks).await;
        assert_eq!(
            ticks.bucket.waiting().len(),
            1,
            "resolved at its first poll, and registered for the next turn"
        );
    }
}
