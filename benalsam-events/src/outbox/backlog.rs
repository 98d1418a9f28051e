//! The live work in the queue, counted for health checks and metrics, and stale sent jobs
//! sent again.

use std::time::Duration;

use super::Outbox;
use super::queue::sorted_ids;
use crate::{error::Error, error::Result};

/// Live work in the queue, for health checks and metrics: the pending work of the outbox's
/// own tables (see [`OutboxConfig::tables`](super::OutboxConfig::tables)), and the rest in all. Counted on the partial
/// indexes of the live states only, so it stays cheap with millions of completed rows.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
#[non_exhaustive]
pub struct Backlog {
    /// Jobs waiting to be claimed.
    pub pending: i64,
    /// Age of the oldest of them.
    pub oldest_pending_age: Option<Duration>,
    /// Failed jobs that will be retried.
    pub retrying: i64,
    /// Jobs claimed, not yet confirmed.
    pub processing: i64,
    /// Jobs confirmed by the broker, not yet completed.
    pub sent: i64,
    /// Age of the oldest of those, by when it was sent.
    pub oldest_sent_age: Option<Duration>,
}

impl Outbox {
    /// Counts the live backlog: pending jobs and the age of the oldest, failed jobs that will
    /// be retried, processing jobs, sent jobs and the age of the oldest.
    pub async fn backlog(&self) -> Result<Backlog> {
        let conn = self.conn().await?;
        let row = conn
            .client
            .query_one(&conn.stmts.backlog, &[&self.config().tables])
            .await
            .map_err(|e| Error::postgres("counting the backlog", e))?;
        let age = |i: usize| {
            row.get::<_, Option<f64>>(i)
                .map(|s| Duration::from_secs_f64(s.max(0.0)))
        };
        Ok(Backlog {
            pending: row.get(0),
            oldest_pending_age: age(1),
            retrying: row.get(2),
            processing: row.get(3),
            sent: row.get(4),
            oldest_sent_age: age(5),
        })
    }

    /// Pending jobs of every table (claimed by this outbox or not), for the operator.
    pub(crate) async fn pending_by_table(&self) -> Result<Vec<(String, i64)>> {
        let conn = self.conn().await?;
        let rows = conn
            .client
            .query(&conn.stmts.pending_by_table, &[])
            .await
            .map_err(|e| Error::postgres("counting pending jobs by table", e))?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Sends again jobs that were confirmed by the broker more than `older_than` ago and
    /// never completed (a message lost on the broker's side, a queue purged by hand): they
    /// go back to `pending`, at most `limit` at a time. Returns their ids.
    pub async fn resend_stale_sent(&self, older_than: Duration, limit: usize) -> Result<Vec<i64>> {
        let conn = self.conn().await?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = conn
            .client
            .query(
                &conn.stmts.resend_stale,
                &[&older_than.as_secs_f64(), &limit],
            )
            .await
            .map_err(|e| Error::postgres("resending stale sent jobs", e))?;
        Ok(sorted_ids(&rows))
    }
}
