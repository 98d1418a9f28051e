//! A shared, always-readable status: the running part writes it, health checks and metrics
//! read copies of it.

use std::sync::{Mutex, MutexGuard};

/// Plain data behind a mutex. A panic elsewhere cannot leave plain data half-written, so a
/// poisoned lock is simply taken over.
#[derive(Debug, Default)]
pub struct StatusCell<T>(Mutex<T>);

impl<T: Clone> StatusCell<T> {
    /// A copy of the current status.
    pub fn snapshot(&self) -> T {
        self.lock().clone()
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
