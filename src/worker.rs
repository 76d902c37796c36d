//! The index of the worker thread a piece of code runs on: 0 on the accepting runtime, 1 and up
//! on the extra workers, so that per-worker state (upstream pools) is found without a lock.

use std::cell::Cell;

thread_local! {
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// The index of the worker whose thread calls this: 0 outside the extra worker threads.
pub fn index() -> usize {
    WORKER.with(Cell::get)
}

/// Marks the calling thread as worker `index` (done once, when the thread starts).
pub fn set_index(index: usize) {
    WORKER.with(|w| w.set(index));
}
