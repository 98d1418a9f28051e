//! One record per component: a component reports what happened once, as an event, and its
//! live status (the health answer) and its metrics both follow from that one call.
//!
//! Each component has an event enum beside it (`consume/record.rs`, `publish/record.rs`,
//! `outbox/stream/record.rs`) whose [`Event::apply`] is the only place that writes the
//! component's status and metrics. Before this, every call site wrote both by hand under
//! different names, and one new counter touched five places; now a new counter is a field of
//! the status, a family of the metrics and one arm of `apply`, side by side.

use std::fmt::Display;
use std::time::SystemTime;

use crate::ops::{CountsErrors, Live};

/// Something a component reports once. Applying it updates the component's live status
/// (under its lock, so a health check never sees half of an event) and its metrics.
pub(crate) trait Event {
    /// The live status it updates.
    type Status;
    /// The metric families it updates.
    type Metrics;

    fn apply(self, status: &mut Self::Status, metrics: &Self::Metrics);
}

/// Where a component records its events: its live status and its metric families, written
/// only through [`record`](Self::record). Cheap to clone; clones record into the same status
/// and families.
#[derive(Debug, Default)]
pub(crate) struct Recorder<S, M> {
    status: Live<S>,
    metrics: M,
}

impl<S, M: Clone> Clone for Recorder<S, M> {
    fn clone(&self) -> Self {
        Self {
            status: self.status.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

impl<S: Clone, M> Recorder<S, M> {
    /// A recorder into `metrics`, with a default status.
    pub(crate) fn new(metrics: M) -> Self
    where
        S: Default,
    {
        Self {
            status: Live::default(),
            metrics,
        }
    }

    /// Records one event: its status and its metrics change together.
    pub(crate) fn record<E: Event<Status = S, Metrics = M>>(&self, event: E) {
        let mut status = self.status.lock();
        event.apply(&mut status, &self.metrics);
    }

    /// The live status, for health checks (read-only by convention: writes go through
    /// [`record`](Self::record)).
    pub(crate) fn status(&self) -> &Live<S> {
        &self.status
    }

    /// The metric families, to register them.
    pub(crate) fn metrics(&self) -> &M {
        &self.metrics
    }
}

/// Counts `error` in `status` and keeps it as the last one, with when: the arm every
/// component's error event shares.
pub(crate) fn count_error(status: &mut impl CountsErrors, error: impl Display) {
    let (errors, last_error) = status.error_fields();
    *errors += 1;
    *last_error = Some((SystemTime::now(), error.to_string()));
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;

    #[derive(Debug, Clone, Default)]
    struct Status {
        seen: u64,
        errors: u64,
        last_error: Option<(SystemTime, String)>,
    }

    impl CountsErrors for Status {
        fn error_fields(&mut self) -> (&mut u64, &mut Option<(SystemTime, String)>) {
            (&mut self.errors, &mut self.last_error)
        }
    }

    enum Happened {
        Seen(u64),
        Failed(&'static str),
    }

    impl Event for Happened {
        type Status = Status;
        type Metrics = Counter;

        fn apply(self, status: &mut Status, seen: &Counter) {
            match self {
                Happened::Seen(n) => {
                    status.seen += n;
                    seen.inc_by(n);
                }
                Happened::Failed(why) => count_error(status, why),
            }
        }
    }

    #[test]
    fn one_record_moves_the_status_and_the_metric_together() {
        let recorder = Recorder::<Status, Counter>::new(Counter::default());
        let clone = recorder.clone();
        recorder.record(Happened::Seen(2));
        clone.record(Happened::Seen(3));
        clone.record(Happened::Failed("lost"));
        let status = recorder.status().snapshot();
        assert_eq!(status.seen, 5);
        assert_eq!(recorder.metrics().get(), 5);
        assert_eq!(status.errors, 1);
        assert_eq!(status.last_error.map(|(_, e)| e).as_deref(), Some("lost"));
    }
}
