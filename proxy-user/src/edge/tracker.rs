//! Counts live connections, so a shutdown can wait for them to finish.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

/// Counts live connections so shutdown can wait for them.
#[derive(Debug, Default)]
pub struct Tracker {
    live: AtomicUsize,
    idle: Notify,
}

pub struct Tracked(Arc<Tracker>);

impl Drop for Tracked {
    fn drop(&mut self) {
        if self.0.live.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Tracker {
    pub fn track(self: &Arc<Self>) -> Tracked {
        self.live.fetch_add(1, Ordering::AcqRel);
        Tracked(self.clone())
    }

    pub fn live(&self) -> usize {
        self.live.load(Ordering::Acquire)
    }

    /// Waits until no connection is live, or `limit` passed; true if idle.
    pub async fn wait_idle(&self, limit: Duration) -> bool {
        let wait = async {
            loop {
                let notified = self.idle.notified();
                let mut notified = std::pin::pin!(notified);
                // Register before checking, or a drop in between is missed.
                notified.as_mut().enable();
                if self.live() == 0 {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(limit, wait).await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wait_idle_sees_last_drop() {
        let t = Arc::new(Tracker::default());
        assert!(t.wait_idle(Duration::from_millis(10)).await);
        let a = t.track();
        let b = t.track();
        assert!(!t.wait_idle(Duration::from_millis(20)).await);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            drop(a);
            tokio::time::sleep(Duration::from_millis(20)).await;
            drop(b);
        });
        assert!(t.wait_idle(Duration::from_secs(5)).await);
        assert_eq!(t.live(), 0);
    }
}
