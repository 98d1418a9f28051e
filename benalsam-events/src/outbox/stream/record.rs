//! The job stream's record: its live status ([`JobStreamStatus`], part of the bridge's
//! health answer), the events the claimer, the census and the listener report, and what
//! each does to the status and to the metrics — the only place that writes either.

use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Unit;

use crate::ops::CountsErrors;
use crate::ops::events::{Event, Recorder, count_error};
use crate::ops::metrics::{FloatGauge, Kind, Metrics, Status, Table, precreate};
use crate::outbox::{Backlog, ClaimKind, Job};

/// What a job stream has been doing, for health checks.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct JobStreamStatus {
    /// Whether the LISTEN connection is up; `None` in poll-only mode.
    pub listening: Option<bool>,
    /// Whether the last claim (or reclaim) reached PostgreSQL.
    pub connected: bool,
    /// When a claim last succeeded (whether or not it found jobs).
    pub last_claim_at: Option<SystemTime>,
    /// When a claim last found jobs.
    pub last_job_at: Option<SystemTime>,
    /// The backlog, counted at most once per poll interval.
    pub backlog: Option<Backlog>,
    /// Pending jobs by table, every table (a table nobody routes keeps its jobs here),
    /// counted with the backlog.
    pub pending_by_table: Vec<(String, i64)>,
    /// Whether writers are told to skip their NOTIFY because this stream is draining a
    /// backlog or claiming a steady trickle every linger (adaptive NOTIFY).
    pub draining: bool,
    /// Jobs claimed in all.
    pub claimed: u64,
    /// Of those, retries of failed jobs.
    pub retried: u64,
    /// Jobs given back to `pending` because their lease expired.
    pub reclaimed: u64,
    /// Errors talking to PostgreSQL.
    pub errors: u64,
    /// The last of those errors, and when.
    pub last_error: Option<(SystemTime, String)>,
}

impl CountsErrors for JobStreamStatus {
    fn error_fields(&mut self) -> (&mut u64, &mut Option<(SystemTime, String)>) {
        (&mut self.errors, &mut self.last_error)
    }
}

/// The job stream's recorder: its status and its families.
pub(crate) type StreamRecorder = Recorder<JobStreamStatus, StreamMetrics>;

/// Something the job stream reports once.
#[derive(Debug)]
pub(crate) enum StreamEvent<'a> {
    /// The LISTEN connection is up, or down.
    Listening(bool),
    /// A claim reached PostgreSQL and took `jobs` (maybe none).
    Claimed(&'a [Job]),
    /// Writers are told to skip their NOTIFY (`true`), or to send it again.
    Draining(bool),
    /// Jobs whose lease expired, given back to `pending`.
    Reclaimed(usize),
    /// A failure that changes nothing else (LISTEN, a presence mark).
    Error(&'a crate::error::Error),
    /// PostgreSQL cannot be reached for claims.
    Unreachable(&'a crate::error::Error),
    /// The backlog and the pending jobs by table, as just counted.
    Counted {
        backlog: Backlog,
        by_table: Vec<(String, i64)>,
    },
}

impl Event for StreamEvent<'_> {
    type Status = JobStreamStatus;
    type Metrics = StreamMetrics;

    fn apply(self, s: &mut JobStreamStatus, m: &StreamMetrics) {
        match self {
            StreamEvent::Listening(up) => s.listening = Some(up),
            StreamEvent::Claimed(jobs) => claimed(s, m, jobs),
            StreamEvent::Draining(draining) => s.draining = draining,
            StreamEvent::Reclaimed(n) => {
                s.reclaimed += n as u64;
                m.jobs_reclaimed.inc_by(n as u64);
            }
            StreamEvent::Error(error) => count_error(s, error),
            StreamEvent::Unreachable(error) => {
                s.connected = false;
                count_error(s, error);
            }
            StreamEvent::Counted { backlog, by_table } => counted(s, m, backlog, by_table),
        }
    }
}

fn claimed(s: &mut JobStreamStatus, m: &StreamMetrics, jobs: &[Job]) {
    let now = SystemTime::now();
    let retries = jobs.iter().filter(|j| j.claim == ClaimKind::Retry).count() as u64;
    s.connected = true;
    s.last_claim_at = Some(now);
    if !jobs.is_empty() {
        s.last_job_at = Some(now);
        s.claimed += jobs.len() as u64;
        s.retried += retries;
    }
    m.jobs_claimed
        .get_or_create(&Kind { kind: "fresh" })
        .inc_by(jobs.len() as u64 - retries);
    m.jobs_claimed
        .get_or_create(&Kind { kind: "retry" })
        .inc_by(retries);
}

fn counted(
    s: &mut JobStreamStatus,
    m: &StreamMetrics,
    backlog: Backlog,
    by_table: Vec<(String, i64)>,
) {
    let pending = |table: &str| {
        m.pending_by_table.get_or_create(&Table {
            table: table.to_owned(),
        })
    };
    for (table, jobs) in &by_table {
        pending(table).set(*jobs);
    }
    // A table whose jobs all went is counted at zero, not left at its last count.
    for (table, _) in &s.pending_by_table {
        if !by_table.iter().any(|(t, _)| t == table) {
            pending(table).set(0);
        }
    }
    s.backlog = Some(backlog);
    s.pending_by_table = by_table;
    for (status, jobs) in [
        ("pending", backlog.pending),
        ("processing", backlog.processing),
        ("sent", backlog.sent),
        ("retrying", backlog.retrying),
    ] {
        m.queue_jobs.get_or_create(&Status { status }).set(jobs);
    }
    let seconds = |d: Option<Duration>| d.map_or(0.0, |d| d.as_secs_f64());
    m.oldest_pending_age
        .set(seconds(backlog.oldest_pending_age));
    m.oldest_sent_age.set(seconds(backlog.oldest_sent_age));
}

/// The job stream's families (bridge).
#[derive(Debug, Clone, Default)]
pub(crate) struct StreamMetrics {
    jobs_claimed: Family<Kind, Counter>,
    jobs_reclaimed: Counter,
    queue_jobs: Family<Status, Gauge>,
    pending_by_table: Family<Table, Gauge>,
    oldest_pending_age: FloatGauge,
    oldest_sent_age: FloatGauge,
}

impl StreamMetrics {
    /// Families whose series of `tables` (the tables the stream claims) exist from the
    /// start, at zero.
    pub(crate) fn for_tables<'a>(tables: impl IntoIterator<Item = &'a String>) -> Self {
        let metrics = Self::default();
        for table in tables {
            let _ = metrics.pending_by_table.get_or_create(&Table {
                table: table.clone(),
            });
        }
        metrics
    }

    pub(crate) fn register(&self, metrics: &Metrics) {
        precreate(&self.jobs_claimed, &["fresh", "retry"]);
        for status in ["pending", "processing", "sent", "retrying"] {
            let _ = self.queue_jobs.get_or_create(&Status { status });
        }
        metrics.register(
            "jobs_claimed",
            "Jobs claimed from the outbox, by kind (fresh, retry)",
            None,
            self.jobs_claimed.clone(),
        );
        metrics.register(
            "jobs_reclaimed",
            "Jobs given back to pending after their lease expired",
            None,
            self.jobs_reclaimed.clone(),
        );
        metrics.register(
            "queue_jobs",
            "Jobs in the queue table by live status (sampled)",
            None,
            self.queue_jobs.clone(),
        );
        metrics.register(
            "queue_pending_jobs",
            "Pending jobs by table (sampled); a table no bridge routes keeps its jobs here",
            None,
            self.pending_by_table.clone(),
        );
        metrics.register(
            "queue_oldest_pending_age",
            "Age of the oldest pending job (sampled)",
            Some(Unit::Seconds),
            self.oldest_pending_age.clone(),
        );
        metrics.register(
            "queue_oldest_sent_age",
            "Age of the oldest sent, not completed job (sampled)",
            Some(Unit::Seconds),
            self.oldest_sent_age.clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_whose_jobs_all_went_is_counted_at_zero_in_both_books() {
        let recorder = StreamRecorder::new(StreamMetrics::for_tables(&["listings".to_owned()]));
        let metrics = Metrics::new();
        recorder.metrics().register(&metrics);
        let backlog = Backlog {
            pending: 4,
            oldest_pending_age: Some(Duration::from_secs(2)),
            retrying: 0,
            processing: 0,
            sent: 0,
            oldest_sent_age: None,
        };
        recorder.record(StreamEvent::Counted {
            backlog,
            by_table: vec![("listings".to_owned(), 3), ("users".to_owned(), 1)],
        });
        recorder.record(StreamEvent::Counted {
            backlog,
            by_table: vec![("listings".to_owned(), 4)],
        });
        let s = recorder.status().snapshot();
        assert_eq!(s.pending_by_table, vec![("listings".to_owned(), 4)]);
        let text = metrics.encode();
        for line in [
            "benalsam_queue_pending_jobs{table=\"listings\"} 4\n",
            "benalsam_queue_pending_jobs{table=\"users\"} 0\n",
            "benalsam_queue_jobs{status=\"pending\"} 4\n",
            "benalsam_queue_oldest_pending_age_seconds 2",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
    }
}
