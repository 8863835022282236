//! A small per-thread shelf of reusable things (splice pipes, copy buffers)
//! that a pump holds only while its source has bytes. Per thread because a
//! tokio worker runs many pumps one after another: no lock, and a task that
//! moved to another thread just gives back to that thread's shelf. Bounded,
//! so a burst does not leave memory or fds parked for good.

use std::cell::RefCell;

/// Enough for the pumps one worker runs at the same instant in practice;
/// beyond it, things are dropped rather than kept.
pub(super) const PER_THREAD: usize = 16;

pub(super) struct Shelf<T> {
    items: RefCell<Vec<T>>,
}

impl<T> Shelf<T> {
    pub(super) const fn new() -> Self {
        Shelf {
            items: RefCell::new(Vec::new()),
        }
    }

    /// The newest kept item that `fits`, else one from `make`. Sizes
    /// differ between users (splice's first read, a copy buffer, the
    /// fastpath's), so a misfit stays on the shelf for its own kind.
    pub(super) fn take<E>(
        &self,
        fits: impl Fn(&T) -> bool,
        make: impl FnOnce() -> Result<T, E>,
    ) -> Result<T, E> {
        let mut items = self.items.borrow_mut();
        match items.iter().rposition(fits) {
            Some(i) => Ok(items.swap_remove(i)),
            None => {
                drop(items);
                make()
            }
        }
    }

    /// Keeps `item` for the next `take` on this thread, if there is room.
    /// The caller vouches that nothing of its last user's stream can reach
    /// the next user (a pipe: emptied; a buffer: only freshly read bytes
    /// are ever written from it).
    pub(super) fn give(&self, item: T) {
        let mut items = self.items.borrow_mut();
        if items.len() < PER_THREAD {
            items.push(item);
        }
    }
}

thread_local! {
    /// Buffers between uses. A reused buffer's old bytes are never sent:
    /// only the `n` bytes a read just put there are written.
    static BUFFERS: Shelf<Vec<u8>> = const { Shelf::new() };
}

pub(in crate::dataplane) fn take_buffer(size: usize) -> Vec<u8> {
    let fresh = || Ok::<_, std::convert::Infallible>(vec![0u8; size]);
    match BUFFERS.with(|s| s.take(|b| b.len() == size, fresh)) {
        Ok(buf) => buf,
        Err(never) => match never {},
    }
}

/// Keeps a buffer for reuse once its direction is done with it: written in
/// full, or ended (a failed write leaves bytes in it, which no later user
/// can send: see `BUFFERS`).
pub(in crate::dataplane) fn give_back(buf: Vec<u8>) {
    BUFFERS.with(|s| s.give(buf));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn take(shelf: &Shelf<Vec<u8>>, size: usize) -> Vec<u8> {
        let fresh = || Ok::<_, ()>(vec![1u8; size]);
        shelf
            .take(|b| b.len() == size, fresh)
            .expect("make never fails")
    }

    #[test]
    fn a_misfit_stays_for_its_own_kind() {
        let shelf = Shelf::new();
        let mut small = take(&shelf, 16);
        small[0] = 7;
        shelf.give(small);
        shelf.give(vec![0u8; 64]);
        // Asking for the small size passes over the newer big buffer.
        assert_eq!(take(&shelf, 16)[0], 7);
        assert_eq!(take(&shelf, 64)[0], 0);
        // Nothing left of either size: a fresh one.
        assert_eq!(take(&shelf, 16)[0], 1);
    }

    #[test]
    fn keeps_at_most_per_thread() {
        let shelf = Shelf::new();
        for _ in 0..PER_THREAD + 5 {
            shelf.give(vec![0u8; 8]);
        }
        assert_eq!(shelf.items.borrow().len(), PER_THREAD);
    }
}
