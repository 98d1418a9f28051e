//! What the capture reports: one event, its status and its metric change together.

use std::time::SystemTime;

use prometheus_client::metrics::counter::Counter;

use crate::error::Error;
use crate::ops::CountsErrors;
use crate::ops::events::{Event, count_error};

/// What the capture has done.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct CaptureStatus {
    /// Whether this bridge holds the slot (another bridge may, while this one stands by).
    pub(crate) capturing: bool,
    /// Jobs written from the WAL.
    pub(crate) jobs: u64,
    /// Changes left out because their key was NULL.
    pub(crate) keyless: u64,
    /// Bytes of WAL between the position and the flushed WAL at the last look.
    pub(crate) behind: u64,
    /// When it last looked at the slot without an error.
    pub(crate) last_look: Option<SystemTime>,
    pub(crate) errors: u64,
    pub(crate) last_error: Option<(SystemTime, String)>,
}

impl CountsErrors for CaptureStatus {
    fn error_fields(&mut self) -> (&mut u64, &mut Option<(SystemTime, String)>) {
        (&mut self.errors, &mut self.last_error)
    }
}

pub(super) enum Captured {
    Holding(bool),
    Looked {
        jobs: usize,
        keyless: usize,
        behind: u64,
    },
    Failed(Error),
}

impl Event for Captured {
    type Status = CaptureStatus;
    type Metrics = Counter;

    fn apply(self, s: &mut CaptureStatus, jobs: &Counter) {
        match self {
            Captured::Holding(capturing) => s.capturing = capturing,
            Captured::Looked {
                jobs: n,
                keyless,
                behind,
            } => {
                jobs.inc_by(n as u64);
                s.jobs += n as u64;
                s.keyless += keyless as u64;
                s.behind = behind;
                s.last_look = Some(SystemTime::now());
            }
            Captured::Failed(error) => {
                s.capturing = false;
                count_error(s, error);
            }
        }
    }
}
