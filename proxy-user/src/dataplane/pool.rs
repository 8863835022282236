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

    /// A kept item that `fits`, else one from `make`. An item that does not
    /// fit (another size) is dropped: sizes come from flags, so a mix only
    /// happens in tests.
    pub(super) fn take<E>(
        &self,
        fits: impl Fn(&T) -> bool,
        make: impl FnOnce() -> Result<T, E>,
    ) -> Result<T, E> {
        match self.items.borrow_mut().pop() {
            Some(item) if fits(&item) => Ok(item),
            _ => make(),
        }
    }

    /// Keeps `item` for the next `take` on this thread, if there is room.
    /// The caller vouches that it holds nothing of its last user's stream.
    pub(super) fn give(&self, item: T) {
        let mut items = self.items.borrow_mut();
        if items.len() < PER_THREAD {
            items.push(item);
        }
    }
}
