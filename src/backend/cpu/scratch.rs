//! f32 buffers kept per thread between calls, so hot loops neither allocate nor zero them. A
//! buffer is taken out of its slot while in use: a nested call on the same thread simply gets
//! a fresh one.

use std::cell::Cell;
use std::thread::LocalKey;

/// A thread-local slot (`thread_local!` of a `Cell<Vec<f32>>`).
pub(crate) type Slot = LocalKey<Cell<Vec<f32>>>;

/// A buffer of at least `len` floats (stale values included).
pub(crate) fn take(slot: &'static Slot, len: usize) -> Vec<f32> {
    let mut v = slot.with(Cell::take);
    if v.len() < len {
        v.resize(len, 0.0);
    }
    v
}

/// Returns a buffer taken with [`take`], keeping the larger of it and any other.
pub(crate) fn put(slot: &'static Slot, v: Vec<f32>) {
    slot.with(|s| {
        let old = s.take();
        s.set(if old.len() > v.len() { old } else { v });
    });
}

/// `f` over `len` floats of the slot's buffer (stale values included).
pub(crate) fn with<R>(slot: &'static Slot, len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    let mut v = take(slot, len);
    let r = f(&mut v[..len]);
    put(slot, v);
    r
}
