//! Per-thread slots for state that every request touches: each I/O thread uses its own slot,
//! on a cache line of its own, so the threads do not pass cache lines back and forth per
//! request (two mutexes or counters side by side in one line cost a cross-core transfer on
//! every lock and unlock).

use std::sync::atomic::{AtomicUsize, Ordering};

/// Slots per sharded value; threads beyond this share slots.
pub(crate) const SHARDS: usize = 8;

/// Aligns its content to a cache-line pair (adjacent-line prefetch pulls lines in twos).
#[repr(align(128))]
#[derive(Default)]
pub(crate) struct Padded<T>(pub(crate) T);

impl<T> std::ops::Deref for Padded<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static SHARD: usize = NEXT_SHARD.fetch_add(1, Ordering::Relaxed) % SHARDS;
}

/// The slot of the calling thread, fixed for its life.
pub(crate) fn current() -> usize {
    SHARD.with(|shard| *shard)
}
