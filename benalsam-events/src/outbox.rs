//! The outbox table `elasticsearch_sync_queue`: claiming jobs and moving them through their
//! states, one statement per batch.
//!
//! Legal moves (anything else is refused and reported as unchanged):
//!
//! ```text
//! pending ──claim──► processing ──mark_sent──► sent ──mark_completed──► completed
//!    ▲                   │  │                   │                          ▲
//!    └── release / ──────┘  └──mark_failed──► failed ◄──mark_failed──┘     │
//!        lease expiry                          │  └──backoff elapsed: claim │
//!                                              └────mark_completed──────────┘
//! ```
//!
//! `completed` is final: no call moves a job out of it. `mark_sent` also accepts jobs that
//! were given back (`pending`) or failed meanwhile, because the broker's confirm proves the
//! message exists; `mark_completed` accepts any job that is not completed, because an indexed
//! document proves the work was done.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::Mutex;
use tokio_postgres::{Client, Statement};

use crate::backoff::Backoff;
use crate::config::{DatabaseUrl, validate_schema};
use crate::job::{ClaimKind, Job, Operation};
use crate::{Error, Result};

/// How failed jobs are retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included. A job that has failed this many times stays
    /// `failed` with its last error.
    pub max_attempts: u32,
    /// Delay before retry `n` is drawn from this backoff (computed by PostgreSQL, so every
    /// bridge agrees on it).
    pub backoff: Backoff,
}

impl Default for RetryPolicy {
    /// Ten attempts, 1 s doubling to 10 min: about an hour of retries before a job is left
    /// `failed` for someone to look at.
    fn default() -> Self {
        Self {
            max_attempts: 10,
            backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(600)),
        }
    }
}

/// Settings of an [`Outbox`].
#[derive(Debug, Clone)]
pub struct OutboxConfig {
    /// Schema holding `elasticsearch_sync_queue` (`BENALSAM_SCHEMA`).
    pub schema: String,
    /// How long a claim is exclusive. A bridge that dies holding jobs loses them to others
    /// after this long; one that is alive finishes a batch in well under a second.
    pub lease: Duration,
    /// Retries of failed jobs.
    pub retry: RetryPolicy,
    /// Written to `locked_by` on claim, to tell bridges apart when inspecting the table.
    pub worker_id: String,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            schema: "public".to_owned(),
            lease: Duration::from_secs(60),
            retry: RetryPolicy::default(),
            worker_id: format!("pid-{}", std::process::id()),
        }
    }
}

/// A failed job, for [`Outbox::mark_failed`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The job.
    pub id: i64,
    /// What went wrong, stored in `error_message`.
    pub error: String,
    /// Whether another attempt may succeed (a broker outage: yes; a document the index
    /// rejects: no). A retryable failure is claimed again after its backoff, until the
    /// policy's attempts are used up.
    pub retry: bool,
}

/// Which of the ids given to a state change moved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Marked {
    /// Jobs that made the move, ascending.
    pub changed: Vec<i64>,
    /// Jobs that did not: unknown ids, or a move that is not allowed (out of `completed`).
    pub unchanged: Vec<i64>,
}

/// Live work in the queue, for health checks and metrics. Counted on the partial indexes of
/// the live states only, so it stays cheap with millions of completed rows.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
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

/// The outbox of one schema, over one PostgreSQL connection that is opened on first use and
/// again after it breaks. Cheap to clone; clones share the connection, whose requests
/// pipeline.
#[derive(Debug, Clone)]
pub struct Outbox {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    url: DatabaseUrl,
    config: OutboxConfig,
    sql: Sql,
    conn: Mutex<Option<Conn>>,
}

#[derive(Debug, Clone)]
struct Conn {
    client: Arc<Client>,
    stmts: Arc<Statements>,
}

#[derive(Debug)]
struct Statements {
    claim: Statement,
    reclaim_expired: Statement,
    release: Statement,
    mark_sent: Statement,
    mark_completed: Statement,
    mark_failed: Statement,
    backlog: Statement,
    purge_completed: Statement,
    resend_stale: Statement,
}

impl Outbox {
    /// An outbox over `url`. Nothing is opened until the first call.
    pub fn new(url: DatabaseUrl, config: OutboxConfig) -> Result<Self> {
        validate_schema(&config.schema)?;
        if config.retry.max_attempts == 0 {
            return Err(Error::Config {
                setting: "max attempts",
                reason: "must be at least 1".to_owned(),
            });
        }
        let sql = Sql::for_schema(&config.schema);
        Ok(Self {
            inner: Arc::new(Inner {
                url,
                config,
                sql,
                conn: Mutex::new(None),
            }),
        })
    }

    /// The settings this outbox was made with.
    pub fn config(&self) -> &OutboxConfig {
        &self.inner.config
    }

    /// The database this outbox uses.
    pub fn database_url(&self) -> &DatabaseUrl {
        &self.inner.url
    }

    /// Opens the connection now (it is otherwise opened on first use); fails when PostgreSQL
    /// cannot be reached or the queue table is missing.
    pub async fn connect(&self) -> Result<()> {
        self.conn().await.map(drop)
    }

    /// Whether the connection is open (it is reopened on the next call if not).
    pub async fn is_connected(&self) -> bool {
        self.inner
            .conn
            .lock()
            .await
            .as_ref()
            .is_some_and(|c| !c.client.is_closed())
    }

    async fn conn(&self) -> Result<Conn> {
        let mut slot = self.inner.conn.lock().await;
        if let Some(conn) = slot.as_ref().filter(|c| !c.client.is_closed()) {
            return Ok(conn.clone());
        }
        *slot = None;
        let client = crate::postgres::connect_as(&self.inner.url, "benalsam-outbox").await?;
        let stmts = self.inner.sql.prepare(&client).await?;
        let conn = Conn {
            client: Arc::new(client),
            stmts: Arc::new(stmts),
        };
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// Claims up to `limit` jobs: failed jobs whose backoff has elapsed first, then pending
    /// ones oldest first. They move to `processing` under this outbox's lease; no other
    /// claimer gets them until the lease runs out. Returned in id order.
    pub async fn claim(&self, limit: usize) -> Result<Vec<Job>> {
        let conn = self.conn().await?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let lease = self.inner.config.lease.as_secs_f64();
        let rows = conn
            .client
            .query(
                &conn.stmts.claim,
                &[&limit, &lease, &self.inner.config.worker_id],
            )
            .await
            .map_err(|e| Error::postgres("claiming jobs", e))?;
        let mut jobs = rows.iter().map(job_from_row).collect::<Result<Vec<_>>>()?;
        jobs.sort_unstable_by_key(|j| j.id);
        Ok(jobs)
    }

    /// Gives jobs whose lease has expired (their bridge died or hung) back to `pending`, at
    /// most `limit` at a time. Returns their ids.
    pub async fn reclaim_expired(&self, limit: usize) -> Result<Vec<i64>> {
        let conn = self.conn().await?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = conn
            .client
            .query(&conn.stmts.reclaim_expired, &[&limit])
            .await
            .map_err(|e| Error::postgres("reclaiming expired leases", e))?;
        Ok(sorted_ids(&rows))
    }

    /// Gives claimed jobs back to `pending` without counting an attempt (a clean shutdown).
    pub async fn release(&self, ids: &[i64]) -> Result<Marked> {
        self.mark(ids, |s| &s.release, "releasing jobs").await
    }

    /// Records that the broker confirmed these jobs.
    pub async fn mark_sent(&self, ids: &[i64]) -> Result<Marked> {
        self.mark(ids, |s| &s.mark_sent, "marking jobs sent").await
    }

    /// Records that these jobs reached the search index.
    pub async fn mark_completed(&self, ids: &[i64]) -> Result<Marked> {
        self.mark(ids, |s| &s.mark_completed, "marking jobs completed")
            .await
    }

    async fn mark(
        &self,
        ids: &[i64],
        stmt: impl Fn(&Statements) -> &Statement,
        what: &'static str,
    ) -> Result<Marked> {
        if ids.is_empty() {
            return Ok(Marked::default());
        }
        let conn = self.conn().await?;
        let rows = conn
            .client
            .query(stmt(&conn.stmts), &[&ids])
            .await
            .map_err(|e| Error::postgres(what, e))?;
        Ok(marked(ids, sorted_ids(&rows)))
    }

    /// Records failures. A retryable one is claimed again after its backoff while attempts
    /// remain; otherwise the job stays `failed` with its error. `processed_at` is set.
    pub async fn mark_failed(&self, failures: &[Failure]) -> Result<Marked> {
        if failures.is_empty() {
            return Ok(Marked::default());
        }
        let ids: Vec<i64> = failures.iter().map(|f| f.id).collect();
        let errors: Vec<&str> = failures.iter().map(|f| f.error.as_str()).collect();
        let retries: Vec<bool> = failures.iter().map(|f| f.retry).collect();
        let policy = &self.inner.config.retry;
        let max_attempts = i32::try_from(policy.max_attempts).unwrap_or(i32::MAX);
        let conn = self.conn().await?;
        let rows = conn
            .client
            .query(
                &conn.stmts.mark_failed,
                &[
                    &ids,
                    &errors,
                    &retries,
                    &max_attempts,
                    &policy.backoff.initial.as_secs_f64(),
                    &policy.backoff.max.as_secs_f64(),
                ],
            )
            .await
            .map_err(|e| Error::postgres("marking jobs failed", e))?;
        Ok(marked(&ids, sorted_ids(&rows)))
    }

    /// Counts the live backlog: pending jobs and the age of the oldest, failed jobs that will
    /// be retried, processing jobs, sent jobs and the age of the oldest.
    pub async fn backlog(&self) -> Result<Backlog> {
        let conn = self.conn().await?;
        let row = conn
            .client
            .query_one(&conn.stmts.backlog, &[])
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

    /// Deletes completed jobs older than `older_than`, `batch` rows per statement so no
    /// statement holds many locks or runs long. Returns how many were deleted.
    pub async fn purge_completed(&self, older_than: Duration, batch: usize) -> Result<u64> {
        let batch = i64::try_from(batch.max(1)).unwrap_or(i64::MAX);
        let age = older_than.as_secs_f64();
        let mut total = 0u64;
        loop {
            let conn = self.conn().await?;
            let deleted = conn
                .client
                .execute(&conn.stmts.purge_completed, &[&age, &batch])
                .await
                .map_err(|e| Error::postgres("purging completed jobs", e))?;
            total += deleted;
            if deleted < batch.unsigned_abs() {
                return Ok(total);
            }
        }
    }
}

fn sorted_ids(rows: &[tokio_postgres::Row]) -> Vec<i64> {
    let mut ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    ids.sort_unstable();
    ids
}

fn marked(requested: &[i64], changed: Vec<i64>) -> Marked {
    let mut unchanged: Vec<i64> = requested
        .iter()
        .copied()
        .filter(|id| changed.binary_search(id).is_err())
        .collect();
    unchanged.sort_unstable();
    unchanged.dedup();
    Marked { changed, unchanged }
}

fn job_from_row(row: &tokio_postgres::Row) -> Result<Job> {
    let id: i64 = row.get("id");
    let operation: String = row.get("operation");
    let retry: bool = row.get("retry");
    Ok(Job {
        id,
        table_name: row.get("table_name"),
        // The table's CHECK constraint makes this unreachable unless the schema was altered.
        operation: operation
            .parse::<Operation>()
            .map_err(|e| Error::InvalidJob {
                id,
                reason: e.to_string(),
            })?,
        record_id: row.get("record_id"),
        change_data: row.get("change_data"),
        retry_count: row.get("retry_count"),
        created_at: row.get::<_, SystemTime>("created_at"),
        traceparent: row.get("traceparent"),
        claim: if retry {
            ClaimKind::Retry
        } else {
            ClaimKind::Fresh
        },
    })
}

/// The SQL of one schema. Table names cannot be parameters, so the (validated) schema is
/// written into the text once, here.
#[derive(Debug)]
struct Sql {
    claim: String,
    reclaim_expired: String,
    release: String,
    mark_sent: String,
    mark_completed: String,
    mark_failed: String,
    backlog: String,
    purge_completed: String,
    resend_stale: String,
}

impl Sql {
    fn for_schema(schema: &str) -> Self {
        let q = format!("\"{schema}\".elasticsearch_sync_queue");
        Sql {
            // Due retries first, then pending jobs oldest first. SKIP LOCKED lets any number
            // of claimers run at once without waiting on or double-claiming each other.
            claim: format!(
                "WITH due AS (
                     SELECT id, true AS retry FROM {q}
                     WHERE status = 'failed' AND next_attempt_at <= now()
                     ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED
                 ), fresh AS (
                     SELECT id, false AS retry FROM {q}
                     WHERE status = 'pending'
                     ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED
                 ), picked AS (
                     SELECT id, retry FROM due UNION ALL SELECT id, retry FROM fresh LIMIT $1
                 )
                 UPDATE {q} q
                 SET status = 'processing',
                     locked_until = now() + make_interval(secs => $2),
                     locked_by = $3,
                     last_retry_at = CASE WHEN picked.retry THEN now() ELSE q.last_retry_at END
                 FROM picked WHERE q.id = picked.id
                 RETURNING q.id, q.table_name, q.operation, q.record_id, q.change_data,
                           q.retry_count, q.created_at, q.traceparent, picked.retry"
            ),
            reclaim_expired: format!(
                "UPDATE {q} SET status = 'pending', locked_until = NULL, locked_by = NULL
                 WHERE id IN (SELECT id FROM {q}
                              WHERE status = 'processing' AND locked_until < now()
                              LIMIT $1 FOR UPDATE SKIP LOCKED)
                 RETURNING id"
            ),
            release: format!(
                "UPDATE {q} SET status = 'pending', locked_until = NULL, locked_by = NULL
                 WHERE id = ANY($1) AND status = 'processing'
                 RETURNING id"
            ),
            mark_sent: format!(
                "UPDATE {q} SET status = 'sent', sent_at = now(), locked_until = NULL,
                                next_attempt_at = NULL
                 WHERE id = ANY($1) AND status IN ('pending', 'processing', 'failed')
                 RETURNING id"
            ),
            mark_completed: format!(
                "UPDATE {q} SET status = 'completed', completed_at = now(), processed_at = now(),
                                locked_until = NULL, next_attempt_at = NULL
                 WHERE id = ANY($1) AND status <> 'completed'
                 RETURNING id"
            ),
            // Backoff: initial × 2^(failures so far), capped, times a jitter in [0.5, 1).
            mark_failed: format!(
                "UPDATE {q} q
                 SET status = 'failed',
                     error_message = f.error,
                     retry_count = q.retry_count + 1,
                     processed_at = now(),
                     locked_until = NULL,
                     locked_by = NULL,
                     next_attempt_at = CASE
                         WHEN f.retry AND q.retry_count + 1 < $4 THEN now() + make_interval(secs =>
                             least($6::float8, $5::float8 * power(2, least(q.retry_count, 40)))
                             * (0.5 + random() * 0.5))
                     END
                 FROM unnest($1::bigint[], $2::text[], $3::bool[]) AS f(id, error, retry)
                 WHERE q.id = f.id AND q.status <> 'completed'
                 RETURNING q.id"
            ),
            backlog: format!(
                "SELECT (SELECT count(*) FROM {q} WHERE status = 'pending'),
                        (SELECT extract(epoch FROM now() - min(created_at))::float8
                         FROM {q} WHERE status = 'pending'),
                        (SELECT count(*) FROM {q}
                         WHERE status = 'failed' AND next_attempt_at IS NOT NULL),
                        (SELECT count(*) FROM {q} WHERE status = 'processing'),
                        (SELECT count(*) FROM {q} WHERE status = 'sent'),
                        (SELECT extract(epoch FROM now() - min(sent_at))::float8
                         FROM {q} WHERE status = 'sent')"
            ),
            purge_completed: format!(
                "DELETE FROM {q} WHERE id IN (
                     SELECT id FROM {q}
                     WHERE status = 'completed' AND completed_at < now() - make_interval(secs => $1)
                     LIMIT $2)"
            ),
            // Back to pending, so the job stream publishes them again (same messageId).
            resend_stale: format!(
                "UPDATE {q} SET status = 'pending', sent_at = NULL
                 WHERE id IN (SELECT id FROM {q}
                              WHERE status = 'sent' AND sent_at < now() - make_interval(secs => $1)
                              ORDER BY sent_at LIMIT $2 FOR UPDATE SKIP LOCKED)
                 RETURNING id"
            ),
        }
    }

    async fn prepare(&self, client: &Client) -> Result<Statements> {
        Ok(Statements {
            claim: prepare(client, &self.claim, "claim").await?,
            reclaim_expired: prepare(client, &self.reclaim_expired, "reclaim").await?,
            release: prepare(client, &self.release, "release").await?,
            mark_sent: prepare(client, &self.mark_sent, "mark sent").await?,
            mark_completed: prepare(client, &self.mark_completed, "mark completed").await?,
            mark_failed: prepare(client, &self.mark_failed, "mark failed").await?,
            backlog: prepare(client, &self.backlog, "backlog").await?,
            purge_completed: prepare(client, &self.purge_completed, "purge").await?,
            resend_stale: prepare(client, &self.resend_stale, "resend").await?,
        })
    }
}

async fn prepare(client: &Client, sql: &str, what: &'static str) -> Result<Statement> {
    client
        .prepare(sql)
        .await
        .map_err(|e| Error::postgres(format!("preparing the {what} statement"), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marked_splits_requested_ids() {
        let m = marked(&[5, 3, 9, 3], vec![3, 9]);
        assert_eq!(m.changed, vec![3, 9]);
        assert_eq!(m.unchanged, vec![5]);
    }

    #[test]
    fn zero_attempts_is_a_configuration_error() {
        let url = "postgres://u@localhost/db".parse().expect("url");
        let config = OutboxConfig {
            retry: RetryPolicy {
                max_attempts: 0,
                ..RetryPolicy::default()
            },
            ..OutboxConfig::default()
        };
        assert!(Outbox::new(url, config).is_err());
    }
}
