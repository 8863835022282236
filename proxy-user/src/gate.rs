//! A future that is polled only after its own waker fired.
//!
//! A task polls every future it awaits each time it wakes, whichever one
//! woke it: `select!` cannot tell. A busy connection wakes for its sockets
//! twice per round trip, and each wake also polled its idle timer and its
//! signals and promotion watch (a timer, and a receiver that takes a mutex
//! every connection shares). Behind a `Gate`, such a future is polled when
//! its own timer or notification fires, and a socket's wake costs a waker
//! comparison and one load instead: on rr50 the proxy's user time per
//! round trip fell by about a tenth (NOTES §2, "Polling only what woke").
//! The byte-flush tick is not gated: that measured no CPU difference and
//! held 0.15 KiB more per idle connection.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Wake, Waker};

/// `inner`, polled on the first poll and then only after it woke its
/// waker. Its output is the same.
///
/// The contract: `inner` may become ready only through its own waker.
/// One that looks at shared state whenever it is polled (a counter a
/// socket's pump bumps) would wait behind the gate until its next timer
/// or notification. The gated futures here read such state only when
/// their own timer fired.
pub struct Gate<'a, F: ?Sized> {
    inner: Pin<&'a mut F>,
    woken: Arc<Woken>,
    /// The task waker stored in `woken`, to compare against without a lock.
    task: Option<Waker>,
}

/// The waker `inner` sees: it opens the gate and wakes the task.
struct Woken {
    open: AtomicBool,
    /// Written by the gate's poll, only when the task's waker changed
    /// (for a tokio task: at its first poll), and read by a wake.
    task: Mutex<Option<Waker>>,
}

impl Wake for Woken {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.open.store(true, Ordering::SeqCst);
        if let Some(task) = &*self.task.lock().unwrap_or_else(PoisonError::into_inner) {
            task.wake_by_ref();
        }
    }
}

impl<'a, F: Future + ?Sized> Gate<'a, F> {
    pub fn new(inner: Pin<&'a mut F>) -> Self {
        Gate {
            inner,
            woken: Arc::new(Woken {
                open: AtomicBool::new(true),
                task: Mutex::new(None),
            }),
            task: None,
        }
    }
}

impl<F: Future + ?Sized> Future for Gate<'_, F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        // The task's waker is stored before the gate is read: a wake in
        // between either opens the gate this poll reads, or wakes the task
        // through the waker just stored. A closed gate then costs a
        // comparison and a load: no atomic write, no lock, no clone.
        if !this.task.as_ref().is_some_and(|t| t.will_wake(cx.waker())) {
            let task = cx.waker().clone();
            *this
                .woken
                .task
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(task.clone());
            this.task = Some(task);
        }
        if !this.woken.open.load(Ordering::SeqCst) {
            return Poll::Pending;
        }
        // A swap, not a store: reading the wake's write is what makes the
        // wake's event (a timer's expiry...) visible to the poll below.
        this.woken.open.swap(false, Ordering::SeqCst);
        // Made here rather than kept: it is needed only when the gate
        // opens, which is rare.
        let waker = Waker::from(Arc::clone(&this.woken));
        this.inner.as_mut().poll(&mut Context::from_waker(&waker))
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;
    use std::pin::pin;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use futures_util::task::AtomicWaker;

    use super::*;

    /// Counts its polls; ready once `ready` is set, and registers the
    /// waker it was polled with in `waker` each time.
    fn counted<'a>(
        polls: &'a AtomicUsize,
        ready: &'a AtomicBool,
        waker: &'a AtomicWaker,
    ) -> impl Future<Output = ()> + 'a {
        poll_fn(move |cx| {
            polls.fetch_add(1, Ordering::SeqCst);
            waker.register(cx.waker());
            if ready.load(Ordering::SeqCst) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
    }

    #[test]
    fn polls_inner_only_after_its_own_wake() {
        let (polls, ready, inner_waker) = (
            AtomicUsize::new(0),
            AtomicBool::new(false),
            AtomicWaker::new(),
        );
        let mut inner = pin!(counted(&polls, &ready, &inner_waker));
        let mut gate = Gate::new(inner.as_mut());
        let task = Arc::new(Counter::default());
        let task_waker = Waker::from(Arc::clone(&task));
        let mut cx = Context::from_waker(&task_waker);

        // The first poll goes through; later ones without a wake do not.
        assert!(Pin::new(&mut gate).poll(&mut cx).is_pending());
        assert!(Pin::new(&mut gate).poll(&mut cx).is_pending());
        assert!(Pin::new(&mut gate).poll(&mut cx).is_pending());
        assert_eq!(polls.load(Ordering::SeqCst), 1);

        // The inner future's wake reaches the task and opens the gate once.
        ready.store(true, Ordering::SeqCst);
        inner_waker.wake();
        assert_eq!(task.0.load(Ordering::SeqCst), 1);
        assert!(Pin::new(&mut gate).poll(&mut cx).is_ready());
        assert_eq!(polls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_gated_timer_still_fires() {
        let sleep = pin!(tokio::time::sleep(Duration::from_millis(300)));
        let mut gate = pin!(Gate::new(sleep));
        // The task wakes every millisecond meanwhile, as a busy
        // connection's does, and polls the gate each time.
        let mut wakes = 0;
        let fired = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                tokio::select! {
                    () = &mut gate => return,
                    () = tokio::time::sleep(Duration::from_millis(1)) => wakes += 1,
                }
            }
        })
        .await;
        assert!(fired.is_ok(), "the gated sleep never fired");
        // Polls that found the gate closed came first.
        assert!(wakes > 0, "the task never woke before the sleep fired");
    }

    #[derive(Default)]
    struct Counter(AtomicUsize);

    impl Wake for Counter {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}
