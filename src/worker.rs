//! Which worker the running code belongs to. With `runtime.threads = N` (N >= 2) Tether
//! runs N single-threaded runtimes, each on a thread of its own; a worker thread sets its
//! index once when it starts, and state kept per worker (a backend's idle connections of
//! the native path, the count of connections each worker accepted) is indexed by it. Any
//! other thread (the control plane, the one thread of `threads = 1`, unit tests) is
//! worker 0.
//!
//! This module starts no thread and holds no per-worker state itself: `server` starts the
//! workers, and the owners of per-worker state size it with [`count`].

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

thread_local! {
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

/// Workers this process runs; set by `Server::start`, from the worker runtimes it is given,
/// before anything sized by it is built.
static COUNT: AtomicUsize = AtomicUsize::new(1);

/// The index of the worker this thread is, 0 on a thread that is no worker.
pub fn index() -> usize {
    INDEX.with(Cell::get)
}

/// Marks this thread as worker `index`, for as long as the thread lives.
pub fn set_index(index: usize) {
    INDEX.with(|i| i.set(index));
}

/// The number of workers, at least 1.
pub fn count() -> usize {
    COUNT.load(Ordering::Relaxed)
}

/// Sets the number of workers (at least 1).
pub fn set_count(n: usize) {
    COUNT.store(n.max(1), Ordering::Relaxed);
}
