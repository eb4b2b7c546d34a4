//! An interval lock: holders of overlapping byte ranges exclude each other,
//! disjoint ranges proceed in parallel.
//!
//! The primary holds a write's range from before it is sent to the peer
//! until both copies have completed it, so two overlapping writes are never
//! in flight together and land in the same order on both nodes.

use crate::sync::lock;
use std::sync::{Condvar, Mutex};

/// Held ranges `(start, end, id)`, the last id handed out, and how many
/// threads wait for an overlapping range to be released.
type Held = (Vec<(u64, u64, u64)>, u64, usize);

#[derive(Default)]
pub struct IntervalLock {
    held: Mutex<Held>,
    released: Condvar,
}

/// Holds `[start, end)` until dropped.
pub struct IntervalGuard<'a> {
    lock: &'a IntervalLock,
    id: u64,
}

impl IntervalLock {
    pub fn new() -> Self {
        Self::default()
    }

    /// Blocks until no held range overlaps `[offset, offset + len)`, then
    /// holds it. Zero-length ranges still take a one-byte slot so they are
    /// ordered with writes at the same offset.
    pub fn lock(&self, offset: u64, len: u64) -> IntervalGuard<'_> {
        IntervalGuard {
            lock: self,
            id: self.acquire(offset, len),
        }
    }

    /// Like `lock`, but the range stays held until `release(id)`, which
    /// may come from another thread (a write completed by the peer's
    /// acknowledgement).
    pub fn acquire(&self, offset: u64, len: u64) -> u64 {
        let start = offset;
        let end = offset.saturating_add(len.max(1));
        let mut held = lock(&self.held);
        while held.0.iter().any(|&(s, e, _)| s < end && start < e) {
            held.2 += 1;
            held = self.released.wait(held).unwrap_or_else(|p| p.into_inner());
            held.2 -= 1;
        }
        held.1 += 1;
        let id = held.1;
        held.0.push((start, end, id));
        id
    }

    /// `acquire` if no held range overlaps, without waiting.
    pub fn try_acquire(&self, offset: u64, len: u64) -> Option<u64> {
        let start = offset;
        let end = offset.saturating_add(len.max(1));
        let mut held = lock(&self.held);
        if held.0.iter().any(|&(s, e, _)| s < end && start < e) {
            return None;
        }
        held.1 += 1;
        let id = held.1;
        held.0.push((start, end, id));
        Some(id)
    }

    /// Releases a range taken with `acquire`.
    pub fn release(&self, id: u64) {
        let mut held = lock(&self.held);
        if let Some(i) = held.0.iter().position(|&(_, _, h)| h == id) {
            held.0.swap_remove(i);
        }
        let waiters = held.2;
        drop(held);
        // Waking costs a syscall; most releases have nobody waiting.
        if waiters > 0 {
            self.released.notify_all();
        }
    }

    /// Ranges currently held (for tests and status).
    pub fn held(&self) -> usize {
        lock(&self.held).0.len()
    }

    /// Threads waiting for a range (for tests).
    pub fn waiting(&self) -> usize {
        lock(&self.held).2
    }
}

impl Drop for IntervalGuard<'_> {
    fn drop(&mut self) {
        self.lock.release(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn disjoint_ranges_are_held_together() {
        let l = IntervalLock::new();
        let _a = l.lock(0, 4096);
        let _b = l.lock(4096, 4096);
        assert_eq!(l.held(), 2);
    }

    #[test]
    fn an_overlapping_range_waits_for_the_holder() {
        let l = Arc::new(IntervalLock::new());
        let a = l.lock(0, 8192);
        let got = Arc::new(AtomicBool::new(false));
        let t = {
            let (l, got) = (l.clone(), got.clone());
            std::thread::spawn(move || {
                let _b = l.lock(4095, 2);
                got.store(true, Ordering::SeqCst);
            })
        };
        // Awaited, not slept on: the other thread is blocked on the lock.
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while l.waiting() == 0 {
            assert!(
                std::time::Instant::now() < until,
                "the waiter never blocked"
            );
            std::thread::yield_now();
        }
        assert!(!got.load(Ordering::SeqCst), "overlap acquired while held");
        drop(a);
        t.join().expect("thread");
        assert!(got.load(Ordering::SeqCst));
        assert_eq!(l.held(), 0);
    }
}
