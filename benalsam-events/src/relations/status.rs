//! What the fan-out tells: its events, each updating its status for the health checks and
//! its metric families in one place ([`FanOutEvent`]), and the periodic info line (the per-change lines are at debug: one line per related-row change
//! was most of an operator's log).

use std::time::{Duration, Instant, SystemTime};

use crate::ops::CountsErrors;
use crate::ops::events::{Event, Recorder, count_error};
use crate::ops::metrics::{Metrics, RelationLabel};

/// How often the summary is logged at info, when there was work.
const SUMMARY_EVERY: Duration = Duration::from_secs(60);

/// What the fan-out has been doing, for health checks.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct FanOutStatus {
    /// Related-row changes fanned out completely.
    pub jobs_done: u64,
    /// REBUILD jobs written.
    pub documents_queued: u64,
    /// Documents skipped because a REBUILD job of theirs was already waiting.
    pub documents_coalesced: u64,
    /// A change being fanned out now (the one that last wrote a page): its job id, relation
    /// and documents so far; `None` when there is none.
    pub current: Option<(i64, String, u64)>,
    /// When a page was last written or a fan-out finished.
    pub last_progress_at: Option<SystemTime>,
    /// Errors, and the last one with its time.
    pub errors: u64,
    /// The last error.
    pub last_error: Option<(SystemTime, String)>,
}

/// The fan-out's metric families.
#[derive(Debug, Clone, Default)]
pub(crate) struct FanOutMetrics {
    pub(super) documents: prometheus_client::metrics::family::Family<
        RelationLabel,
        prometheus_client::metrics::counter::Counter,
    >,
    pub(super) coalesced: prometheus_client::metrics::family::Family<
        RelationLabel,
        prometheus_client::metrics::counter::Counter,
    >,
    pub(super) changes: prometheus_client::metrics::family::Family<
        RelationLabel,
        prometheus_client::metrics::counter::Counter,
    >,
}

/// The fan-out's recorder: its status and its families.
pub(crate) type FanOutRecorder = Recorder<FanOutStatus, FanOutMetrics>;

/// Something the fan-out reports once.
#[derive(Debug)]
pub(crate) enum FanOutEvent<'a> {
    /// A page of `relation`'s change `job` written: `added` REBUILD jobs, `coalesced`
    /// documents whose job was already waiting, `documents` found so far.
    Page {
        relation: &'a str,
        job: i64,
        added: u64,
        coalesced: u64,
        documents: u64,
    },
    /// A change of `relation` fanned out completely.
    Finished { relation: &'a str },
    /// No change is being fanned out.
    Idle,
    /// A failure (of a change, or of the connection).
    Error(&'a str),
}

impl Event for FanOutEvent<'_> {
    type Status = FanOutStatus;
    type Metrics = FanOutMetrics;

    fn apply(self, s: &mut FanOutStatus, m: &FanOutMetrics) {
        let label = |relation: &str| RelationLabel {
            relation: relation.to_owned(),
        };
        match self {
            FanOutEvent::Page {
                relation,
                job,
                added,
                coalesced,
                documents,
            } => {
                m.documents.get_or_create(&label(relation)).inc_by(added);
                m.coalesced
                    .get_or_create(&label(relation))
                    .inc_by(coalesced);
                s.documents_queued += added;
                s.documents_coalesced += coalesced;
                s.last_progress_at = Some(SystemTime::now());
                s.current = Some((job, relation.to_owned(), documents));
            }
            FanOutEvent::Finished { relation } => {
                m.changes.get_or_create(&label(relation)).inc();
                s.jobs_done += 1;
                s.last_progress_at = Some(SystemTime::now());
            }
            FanOutEvent::Idle => s.current = None,
            FanOutEvent::Error(error) => count_error(s, error),
        }
    }
}

impl CountsErrors for FanOutStatus {
    fn error_fields(&mut self) -> (&mut u64, &mut Option<(SystemTime, String)>) {
        (&mut self.errors, &mut self.last_error)
    }
}

impl FanOutMetrics {
    pub(super) fn register(&self, metrics: &Metrics, relations: &[String]) {
        for relation in relations {
            let label = RelationLabel {
                relation: relation.clone(),
            };
            let _ = self.documents.get_or_create(&label);
            let _ = self.coalesced.get_or_create(&label);
            let _ = self.changes.get_or_create(&label);
        }
        metrics.register(
            "fanout_documents",
            "REBUILD jobs written by the fan-out of related-row changes, by relation",
            None,
            self.documents.clone(),
        );
        metrics.register(
            "fanout_coalesced_documents",
            "Documents a fan-out skipped because a REBUILD job of theirs was already waiting",
            None,
            self.coalesced.clone(),
        );
        metrics.register(
            "fanout_changes",
            "Related-row changes fanned out completely, by relation",
            None,
            self.changes.clone(),
        );
    }
}

/// What the fan-out did since the last info line.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Summary {
    since: Instant,
    finished: u64,
    documents: u64,
}

impl Summary {
    pub(super) fn new(now: Instant) -> Self {
        Self {
            since: now,
            finished: 0,
            documents: 0,
        }
    }

    pub(super) fn documents(&mut self, n: u64) {
        self.documents += n;
    }

    pub(super) fn finished(&mut self, last_page: u64) {
        self.documents += last_page;
        self.finished += 1;
    }

    /// The line due at `now`, if any: once per [`SUMMARY_EVERY`], when there was work
    /// (changes finished or in progress, documents queued). Starts the next period.
    fn due(&mut self, now: Instant, active: usize) -> Option<(u64, u64)> {
        if now.duration_since(self.since) < SUMMARY_EVERY {
            return None;
        }
        let line = (self.finished, self.documents);
        *self = Self::new(now);
        (line != (0, 0) || active > 0).then_some(line)
    }

    pub(super) fn log_if_due(&mut self, now: Instant, active: usize) {
        if let Some((finished, documents)) = self.due(now, active) {
            tracing::info!(
                finished,
                documents,
                active,
                every = ?SUMMARY_EVERY,
                "fan-out: related-row changes finished, documents paged and changes in progress"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_comes_once_a_period_and_only_after_work() {
        let start = Instant::now();
        let mut summary = Summary::new(start);
        summary.documents(500);
        summary.finished(20);
        assert_eq!(summary.due(start + Duration::from_secs(1), 0), None);
        let later = start + SUMMARY_EVERY;
        assert_eq!(summary.due(later, 0), Some((1, 520)));
        assert_eq!(summary.due(later + SUMMARY_EVERY, 0), None, "nothing done");
        assert_eq!(
            summary.due(later + SUMMARY_EVERY * 2, 3),
            Some((0, 0)),
            "changes waiting for the index are work"
        );
    }
}
