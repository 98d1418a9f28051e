//! A job: one recorded change of one row, as the trigger wrote it to the outbox.

use std::fmt;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

pub use crate::event_type::Operation;

/// Where a job is in its life: `pending → processing → sent → completed`, or `failed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum JobStatus {
    /// Written by the trigger (or given back), waiting to be claimed.
    Pending,
    /// Claimed by a bridge under a lease.
    Processing,
    /// Confirmed by the broker.
    Sent,
    /// Applied to the search index.
    Completed,
    /// Failed; retried after its backoff unless its attempts are used up.
    Failed,
}

impl JobStatus {
    /// Every status, in life-cycle order.
    #[cfg(test)]
    pub(crate) const ALL: [JobStatus; 5] = [
        JobStatus::Pending,
        JobStatus::Processing,
        JobStatus::Sent,
        JobStatus::Completed,
        JobStatus::Failed,
    ];

    /// The spelling used in the queue table.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            JobStatus::Pending => "pending",
            JobStatus::Processing => "processing",
            JobStatus::Sent => "sent",
            JobStatus::Completed => "completed",
            JobStatus::Failed => "failed",
        }
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One claimed job.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Job {
    /// The queue row's id. Later changes of one record always have larger ids, which is what
    /// makes it usable as the search document's version.
    pub id: i64,
    /// The table that changed (the trigger's `TG_TABLE_NAME`).
    pub table_name: String,
    /// What happened.
    pub operation: Operation,
    /// The changed row's key, as text.
    pub record_id: String,
    /// The row (INSERT), `{old, new}` (UPDATE) or the old row (DELETE).
    pub change_data: serde_json::Value,
    /// Failed attempts so far.
    pub retry_count: i32,
    /// When the change was committed (the trigger's `now()`, the transaction's start).
    pub created_at: SystemTime,
    /// The writer's W3C `traceparent`, when it set one.
    pub traceparent: Option<String>,
    /// How this claim came about.
    pub(crate) claim: ClaimKind,
}

/// Why a job was handed out this time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum ClaimKind {
    /// Its first claim, or its first after being given back.
    Fresh,
    /// A retry of a failed job whose backoff elapsed.
    Retry,
}

impl Job {
    /// Whether this claim is a retry of a failed job whose backoff elapsed (rather than its
    /// first claim, or its first after being given back).
    pub fn is_retry(&self) -> bool {
        self.claim == ClaimKind::Retry
    }

    /// The RabbitMQ `message_id` of this job: the same on every publish of it.
    pub fn message_id(&self) -> String {
        format!("job_{}", self.id)
    }
}
