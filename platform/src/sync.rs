//! Locking shared state.

use std::sync::{Mutex, MutexGuard};

/// The lock of a mutex whose holder may have panicked (the data is still
/// consistent: every critical section in the platform is a few
/// assignments).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
