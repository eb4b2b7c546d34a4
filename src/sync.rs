//! Small synchronisation helpers shared by the threaded parts.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, carrying on if another thread panicked while holding it.
/// Every mutex here guards state that stays valid between statements (a
/// socket, a map, a bitmap), so a poisoned lock is no reason to stop
/// serving other clients.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
