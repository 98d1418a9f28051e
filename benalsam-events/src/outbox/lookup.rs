//! What the outbox knows of jobs, for the consumer to check deliveries against: each job as
//! recorded, and the jobs a truncation waits for.

use std::time::SystemTime;

use super::Outbox;
use crate::outbox::job::{ClaimKind, Job, Operation};
use crate::{error::Error, error::Result};

/// A job as the outbox has it, to check a delivery against and to build its document from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Recorded {
    pub(crate) id: i64,
    /// `None` when no such job exists.
    pub(crate) table: Option<String>,
    pub(crate) operation: Option<Operation>,
    pub(crate) record_id: Option<String>,
    pub(crate) status: Option<String>,
    /// Whether its table was truncated by a later job (the change is superseded).
    pub(crate) truncated_after: bool,
    /// The job's row, while the job expects a delivery (`processing`, `sent`, `failed`):
    /// the document is built from it, never from the message's copy. `None` otherwise
    /// (nothing is indexed then, and a completed job's row is emptied anyway).
    pub(crate) change_data: Option<serde_json::Value>,
    /// When the change was committed.
    pub(crate) created_at: Option<SystemTime>,
    /// The writer's trace context.
    pub(crate) traceparent: Option<String>,
}

impl Recorded {
    /// The job as the outbox has it, when it exists and its row was read.
    pub(crate) fn job(&self) -> Option<Job> {
        Some(Job {
            id: self.id,
            table_name: self.table.clone()?,
            operation: self.operation?,
            record_id: self.record_id.clone()?,
            change_data: self.change_data.clone()?,
            retry_count: 0,
            created_at: self.created_at?,
            traceparent: self.traceparent.clone(),
            claim: ClaimKind::Fresh,
        })
    }
}

impl Outbox {
    /// What the outbox knows of `jobs`, for checking deliveries against it (one query).
    pub(crate) async fn lookup(&self, jobs: &[i64]) -> Result<Vec<Recorded>> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let conn = self.conn().await?;
        let rows = conn
            .client
            .query(&conn.stmts.verify, &[&jobs])
            .await
            .map_err(|e| Error::postgres("checking deliveries against the outbox", e))?;
        Ok(rows
            .iter()
            .map(|r| {
                let operation: Option<String> = r.get(2);
                Recorded {
                    id: r.get(0),
                    table: r.get(1),
                    operation: operation.as_deref().and_then(Operation::parse),
                    record_id: r.get(3),
                    status: r.get(4),
                    truncated_after: r.get(5),
                    change_data: r.get(6),
                    created_at: r.get(7),
                    traceparent: r.get(8),
                }
            })
            .collect())
    }

    /// Jobs of `table` older than the truncation `job` that are still on their way (claimed
    /// or sent, not settled): the truncation waits for them.
    pub(crate) async fn unsettled_before(&self, table: &str, job: i64) -> Result<i64> {
        let conn = self.conn().await?;
        let row = conn
            .client
            .query_one(&conn.stmts.truncate_pending, &[&table, &job])
            .await
            .map_err(|e| Error::postgres("looking for jobs older than a truncation", e))?;
        Ok(row.get(0))
    }
}
