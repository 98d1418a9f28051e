//! A shared, always-readable status: the running part writes it, health checks and metrics
//! read copies of it.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

/// The live status of a running part: plain data behind a shared lock, written by the part,
/// read (as copies) by health checks. Cheap to clone; clones see the same status.
///
/// A panic elsewhere cannot leave plain data half-written, so a poisoned lock is simply
/// taken over.
#[derive(Debug, Default)]
pub struct Live<T>(Arc<Mutex<T>>);

impl<T> Clone for Live<T> {
    fn clone(&self) -> Self {
        Self(Arc::clone(&self.0))
    }
}

impl<T: Clone> Live<T> {
    /// A copy of the current status.
    pub fn snapshot(&self) -> T {
        self.lock().clone()
    }

    /// Only the recorders (`ops::events`) write a status: through an event, status and
    /// metrics change together.
    pub(in crate::ops) fn lock(&self) -> MutexGuard<'_, T> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A status that counts its errors and keeps the last one, with when (see
/// [`count_error`](crate::ops::events::count_error)).
pub trait CountsErrors {
    /// Its error count and its last error.
    fn error_fields(&mut self) -> (&mut u64, &mut Option<(SystemTime, String)>);
}
