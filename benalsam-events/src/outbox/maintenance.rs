//! Operating the outbox: a status summary, retrying failed jobs, purging the failed jobs of
//! a table no longer configured (backfills: `backfill.rs`).

use std::time::Duration;

use crate::outbox::Outbox;
use crate::outbox::state::Move;
use crate::{error::Error, error::Result};

/// Jobs by status, as the architecture document's monitoring queries count them.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Summary {
    /// One line per status present: status, jobs, average seconds from creation to
    /// `processed_at` (completed and failed jobs only).
    pub by_status: Vec<StatusLine>,
    /// Age of the oldest pending job.
    pub oldest_pending: Option<Duration>,
    /// Pending jobs by table (as the trigger names it), so the jobs of a table no bridge
    /// routes show up.
    pub pending_by_table: Vec<(String, i64)>,
}

/// One status of a [`Summary`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct StatusLine {
    /// The status.
    pub status: String,
    /// How many jobs have it.
    pub jobs: i64,
    /// Average processing time in seconds, where `processed_at` is set.
    pub avg_processing_seconds: Option<f64>,
}

/// Which jobs an operator command applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum JobSelection {
    /// Every one it can apply to.
    All,
    /// These jobs.
    Jobs(Vec<i64>),
}

impl JobSelection {
    /// Whether `job` is selected.
    pub fn contains(&self, job: i64) -> bool {
        match self {
            JobSelection::All => true,
            JobSelection::Jobs(ids) => ids.contains(&job),
        }
    }
}

impl Outbox {
    /// Counts jobs by status with their average processing time (a full scan: for operators,
    /// not for health checks).
    pub async fn summary(&self) -> Result<Summary> {
        let client = crate::connect::postgres_as(self.database_url(), "benalsam-admin").await?;
        let schema = &self.config().schema;
        let rows = client
            .query(
                &format!(
                    "SELECT status, count(*),
                        avg(EXTRACT(EPOCH FROM (processed_at - created_at)))::float8
                 FROM \"{schema}\".elasticsearch_sync_queue GROUP BY status ORDER BY status"
                ),
                &[],
            )
            .await
            .map_err(|e| Error::postgres("summarising the queue", e))?;
        let oldest: Option<f64> = client
            .query_one(
                &format!(
                    "SELECT extract(epoch FROM now() - min(created_at))::float8
                 FROM \"{schema}\".elasticsearch_sync_queue WHERE status = 'pending'"
                ),
                &[],
            )
            .await
            .map_err(|e| Error::postgres("finding the oldest pending job", e))?
            .get(0);
        let pending = client
            .query(
                &format!(
                    "SELECT table_name, count(*) FROM \"{schema}\".elasticsearch_sync_queue
                     WHERE status = 'pending' GROUP BY table_name ORDER BY table_name"
                ),
                &[],
            )
            .await
            .map_err(|e| Error::postgres("counting pending jobs by table", e))?;
        Ok(Summary {
            pending_by_table: pending.iter().map(|r| (r.get(0), r.get(1))).collect(),
            by_status: rows
                .iter()
                .map(|r| StatusLine {
                    status: r.get(0),
                    jobs: r.get(1),
                    avg_processing_seconds: r.get(2),
                })
                .collect(),
            oldest_pending: oldest.map(|s| Duration::from_secs_f64(s.max(0.0))),
        })
    }

    /// Puts failed jobs back to `pending` with their attempts reset, so the bridge publishes
    /// them again, and wakes the bridges. Returns their ids.
    pub async fn retry_failed(&self, selection: &JobSelection) -> Result<Vec<i64>> {
        let client = crate::connect::postgres_as(self.database_url(), "benalsam-admin").await?;
        let schema = &self.config().schema;
        let (all, ids) = match selection {
            JobSelection::All => (true, Vec::new()),
            JobSelection::Jobs(ids) => (false, ids.clone()),
        };
        let rows = client
            .query(
                &format!(
                    "UPDATE \"{schema}\".elasticsearch_sync_queue q
                 SET status = 'pending', retry_count = 0, next_attempt_at = NULL,
                     locked_until = NULL, locked_by = NULL
                 WHERE {} AND ($1 OR id = ANY($2))
                 RETURNING id",
                    Move::RetryFailed.guard(None)
                ),
                &[&all, &ids],
            )
            .await
            .map_err(|e| Error::postgres("retrying failed jobs", e))?;
        let mut ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
        ids.sort_unstable();
        if !ids.is_empty() {
            client
                .execute("SELECT pg_notify($1, '')", &[&self.config().notify_channel])
                .await
                .map_err(|e| Error::postgres("waking the bridges", e))?;
        }
        Ok(ids)
    }

    /// Deletes the failed jobs recorded for `table` (as the trigger names it: `listings`,
    /// `shop.orders`, a relation's `listings#seller`), for a table whose event type is no
    /// longer configured: nothing will ever retry them. Returns how many were deleted. The
    /// caller checks that no configured event type still routes `table`.
    pub async fn purge_failed(&self, table: &str) -> Result<u64> {
        let client = crate::connect::postgres_as(self.database_url(), "benalsam-admin").await?;
        let schema = &self.config().schema;
        client
            .execute(
                &format!(
                    "DELETE FROM \"{schema}\".elasticsearch_sync_queue
                      WHERE table_name = $1 AND status = 'failed'"
                ),
                &[&table],
            )
            .await
            .map_err(|e| Error::postgres(format!("purging the failed jobs of {table}"), e))
    }
}
