//! Wake-ups from the verdict (the `EVENTS` ring: a direction crossed its
//! checkpoint) and the BPF log records.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{self, Poll};

use anyhow::{Context, Result};
use aya::maps::{MapData, RingBuf};
use futures_util::task::AtomicWaker;
use proxy_common::FlowEvent;
use tokio::io::unix::AsyncFd;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::lock;

/// Wake-ups by source cookie: the direction the verdict reported.
pub(super) type Waiters = Arc<Mutex<HashMap<u64, Arc<Wakeup>>>>;

/// One direction's wake-up from the verdict. Like a `Notify` with one
/// waiter, a wake-up with nobody waiting is kept for the next wait; unlike
/// one, waiting stores nothing in the waiter's future (a `Notified` is 64
/// bytes, in every idle pair twice).
#[derive(Default)]
pub(super) struct Wakeup {
    woken: AtomicBool,
    waker: AtomicWaker,
}

impl Wakeup {
    fn wake(&self) {
        self.woken.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Ready once woken since it was last ready. One waiter at a time: the
    /// direction whose source this is.
    pub(super) fn poll_woken(&self, cx: &mut task::Context<'_>) -> Poll<()> {
        if self.woken.swap(false, Ordering::AcqRel) {
            return Poll::Ready(());
        }
        self.waker.register(cx.waker());
        // A wake between the look above and the register found no waker.
        if self.woken.swap(false, Ordering::AcqRel) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

/// The task that reads one map set's `EVENTS` ring. The ring has one
/// consumer position (in the ring's shared page, cached by each reader), so
/// exactly one process reads it at a time: an upgrade stops this task, and
/// waits for it to end, before the new process builds its reader.
pub(super) struct Dispatcher {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Dispatcher {
    /// Starts the task that wakes each reported direction.
    pub(super) fn start(ring: RingBuf<MapData>, waiters: Waiters) -> Result<Dispatcher> {
        let ring = register(ring).context("polling the flow event ring")?;
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(dispatch_events(ring, waiters, stopped));
        Ok(Dispatcher { stop, task })
    }

    /// Ends the task; once this returns it reads no more records.
    pub(super) async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

async fn dispatch_events(
    mut ring: AsyncFd<RingBuf<MapData>>,
    waiters: Waiters,
    mut stopped: oneshot::Receiver<()>,
) {
    loop {
        let mut guard = tokio::select! {
            biased;
            // A dropped sender (the map set is gone) stops it too.
            _ = &mut stopped => return,
            r = ring.readable_mut() => match r {
                Ok(guard) => guard,
                Err(e) => {
                    tracing::error!(error = %e, "flow event ring failed; linked directions keep their current in-flight limit and are demoted (losslessly) when they reach it");
                    return;
                }
            },
        };
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            if item.len() < std::mem::size_of::<FlowEvent>() {
                continue;
            }
            // SAFETY: the verdict writes whole FlowEvent records; read_unaligned
            // makes no assumption about the ring's alignment.
            let event: FlowEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            if let Some(waiter) = lock(&waiters).get(&event.cookie) {
                waiter.wake();
            }
        }
        guard.clear_ready();
    }
}

pub(super) fn spawn_bpf_logger(logger: aya_log::EbpfLogger<&'static dyn log::Log>) -> Result<()> {
    let mut logger = register(logger).context("polling the BPF log ring")?;
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = logger.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
    Ok(())
}

fn register<T: std::os::fd::AsRawFd>(inner: T) -> io::Result<AsyncFd<T>> {
    // SAFETY: `inner` owns its fd, and the AsyncFd owns `inner`, so the fd
    // stays open for as long as it is registered.
    unsafe { AsyncFd::register(inner) }.map_err(|e| e.into_parts().1)
}
