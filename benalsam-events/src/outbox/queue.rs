//! [`Outbox`]: the queue table `elasticsearch_sync_queue`, claimed with leases and settled
//! with reports, one statement per batch.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::Mutex;
use tokio_postgres::Client;

use super::config::OutboxConfig;
use super::settle::Outcome;
use super::sql::{Sql, Statements};
use crate::config::DatabaseUrl;
use crate::outbox::job::{ClaimKind, Job, Operation};
use crate::outbox::state::Move;
use crate::{error::Error, error::Result};

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
    /// The statements of [`Outbox::mark_busy`] and [`Outbox::mark_idle`], kept out of [`Sql`]
    /// (whose statements are all prepared on connect).
    sql_busy: String,
    sql_idle: String,
    /// The reindexes under way ([`Outbox::reindexing`]): read in one round trip with every
    /// batch, without preparing (the table may not exist before migration 8).
    sql_reindexing: String,
    conn: Mutex<Option<Conn>>,
    /// A connection of its own for transactions (reading joined documents), which the
    /// shared, pipelined connection cannot hold.
    joined: Mutex<Option<Client>>,
}

#[derive(Debug, Clone)]
pub(super) struct Conn {
    pub(super) client: Arc<Client>,
    pub(super) stmts: Arc<Statements>,
}

impl Outbox {
    /// An outbox over `url`. Nothing is opened until the first call.
    pub fn new(url: DatabaseUrl, config: OutboxConfig) -> Result<Self> {
        config.validate()?;
        let sql = Sql::for_schema(&config.schema);
        let listeners = format!("\"{}\".benalsam_listeners", config.schema);
        Ok(Self {
            inner: Arc::new(Inner {
                url,
                sql,
                sql_busy: format!(
                    "INSERT INTO {listeners} (listener, tables, busy_until)
                     VALUES ($1, $2, now() + make_interval(secs => $3))
                     ON CONFLICT (listener) DO UPDATE
                     SET tables = EXCLUDED.tables, busy_until = EXCLUDED.busy_until"
                ),
                sql_idle: format!(
                    "DELETE FROM {listeners} WHERE listener = $1 OR busy_until < now()"
                ),
                sql_reindexing: format!(
                    "SELECT table_name, new_index FROM \"{}\".benalsam_reindex WHERE phase <> 'swapped'",
                    config.schema
                ),
                config,
                conn: Mutex::new(None),
                joined: Mutex::new(None),
            }),
        })
    }

    /// The settings this outbox was made with.
    pub fn config(&self) -> &OutboxConfig {
        &self.inner.config
    }

    /// The read of the reindexes under way (SQL text, unprepared).
    pub(super) fn reindexing_sql(&self) -> &str {
        &self.inner.sql_reindexing
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

    /// Whether PostgreSQL answers on this outbox's connection now (a round trip; a broken
    /// connection is opened again first).
    pub(crate) async fn ping(&self) -> Result<()> {
        let conn = self.conn().await?;
        conn.client
            .simple_query("")
            .await
            .map(drop)
            .map_err(|e| Error::postgres("asking PostgreSQL whether it answers", e))
    }

    pub(super) async fn conn(&self) -> Result<Conn> {
        let mut slot = self.inner.conn.lock().await;
        if let Some(conn) = slot.as_ref().filter(|c| !c.client.is_closed()) {
            return Ok(conn.clone());
        }
        *slot = None;
        let client = crate::connect::postgres_as(&self.inner.url, "benalsam-outbox").await?;
        let stmts = self.inner.sql.prepare(&client).await?;
        let conn = Conn {
            client: Arc::new(client),
            stmts: Arc::new(stmts),
        };
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// The outbox's connection for transactions, opened by the caller on first use (the
    /// joined read of `relations/` uses it): the shared, pipelined connection cannot hold one.
    pub(crate) async fn transaction_client(&self) -> tokio::sync::MutexGuard<'_, Option<Client>> {
        self.inner.joined.lock().await
    }

    /// Gives back every job its worker still holds (`processing` under its lease, whatever
    /// the table), and returns their ids: the last step of a stopping claimer whose parts
    /// could not report everything they held. Only for a worker id no running part uses any
    /// more: a job given back while its publish was on its way is published again (as after
    /// its lease, only sooner).
    pub(crate) async fn release_held(&self) -> Result<Vec<i64>> {
        let conn = self.conn().await?;
        let sql = format!(
            "UPDATE \"{}\".elasticsearch_sync_queue q
             SET status = '{}', locked_until = NULL, locked_by = NULL
             WHERE {} RETURNING q.id",
            self.inner.config.schema,
            Move::Release.to().as_str(),
            Move::Release.guard(Some("$1"))
        );
        let rows = conn
            .client
            .query(&sql, &[&self.inner.config.worker_id])
            .await
            .map_err(|e| Error::postgres(Move::Release.describe(), e))?;
        Ok(sorted_ids(&rows))
    }

    /// Claims up to `limit` jobs of its tables: failed jobs whose backoff has elapsed first,
    /// then pending ones oldest first. They move to `processing` under this outbox's lease;
    /// no other claimer gets them until the lease runs out. Returned in id order.
    pub async fn claim(&self, limit: usize) -> Result<Vec<Job>> {
        let conn = self.conn().await?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let lease = self.inner.config.lease.as_secs_f64();
        let worker = &self.inner.config.worker_id;
        let rows = match &self.inner.config.tables {
            None => {
                conn.client
                    .query(&conn.stmts.claim, &[&limit, &lease, worker])
                    .await
            }
            Some(tables) => {
                conn.client
                    .query(&conn.stmts.claim_tables, &[&limit, &lease, worker, tables])
                    .await
            }
        }
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

    /// Deletes completed jobs older than `older_than`, `batch` rows per statement so no
    /// statement holds many locks or runs long. Returns how many were deleted.
    pub async fn purge_completed(
        &self,
        older_than: Duration,
        batch: usize,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<u64> {
        let batch = i64::try_from(batch.max(1)).unwrap_or(i64::MAX);
        let age = older_than.as_secs_f64();
        let conn = self.conn().await?;
        let to_delete: i64 = conn
            .client
            .query_one(&conn.stmts.purgeable, &[&age])
            .await
            .map_err(|e| Error::postgres("counting the completed jobs to purge", e))?
            .get(0);
        let to_delete = to_delete.unsigned_abs();
        let mut total = 0u64;
        loop {
            let conn = self.conn().await?;
            let deleted = conn
                .client
                .execute(&conn.stmts.purge_completed, &[&age, &batch])
                .await
                .map_err(|e| Error::postgres("purging completed jobs", e))?;
            total += deleted;
            progress(total, to_delete.max(total));
            if deleted < batch.unsigned_abs() {
                return Ok(total);
            }
        }
    }

    /// The second pass of marking jobs sent: the jobs the first pass skipped because another
    /// transaction held them, and that are still this bridge's. Such a lock is short (a
    /// consumer completing the job, after which `sent` no longer applies, or another bridge's
    /// claim that read the row as pending before this bridge's claim committed and keeps it
    /// locked until its own commit). Each is marked alone, waiting for that lock: a
    /// statement holding one row at most cannot deadlock. Left out, such a job would stay
    /// `processing` until its lease ran out and be published again.
    async fn sent_after_wait(
        &self,
        conn: &Conn,
        ids: &[i64],
        marked: &[tokio_postgres::Row],
    ) -> Result<Vec<tokio_postgres::Row>> {
        let marked: std::collections::HashSet<i64> = marked.iter().map(|r| r.get(0)).collect();
        let skipped: Vec<i64> = ids
            .iter()
            .copied()
            .filter(|id| !marked.contains(id))
            .collect();
        let worker = &self.inner.config.worker_id;
        let still_mine = conn
            .client
            .query(&conn.stmts.still_processing, &[&skipped, worker])
            .await
            .map_err(|e| Error::postgres("finding jobs the sent mark skipped", e))?;
        let mut rows = Vec::new();
        for row in still_mine {
            let id: i64 = row.get(0);
            rows.extend(
                conn.client
                    .query(&conn.stmts.sent_one, &[&id, worker])
                    .await
                    .map_err(|e| Error::postgres("marking a held job sent", e))?,
            );
        }
        Ok(rows)
    }

    /// Tells writers that this outbox's claimer is draining its tables for the next `lease`:
    /// their trigger skips the NOTIFY meanwhile (adaptive NOTIFY, migration 4). Renewing it
    /// moves the end of the lease.
    ///
    /// Not a prepared statement of the connection: a schema without migration 4 must still
    /// let the outbox connect and claim, with this one call failing (and writers notifying).
    pub(crate) async fn mark_busy(&self, lease: Duration) -> Result<()> {
        let conn = self.conn().await?;
        let config = &self.inner.config;
        conn.client
            .execute(
                &self.inner.sql_busy,
                &[&config.worker_id, &config.tables, &lease.as_secs_f64()],
            )
            .await
            .map_err(|e| Error::postgres("marking the bridge busy (adaptive NOTIFY)", e))?;
        Ok(())
    }

    /// Tells writers that this outbox's claimer waits for their NOTIFY again. Rows whose
    /// lease ran out (bridges that died busy) go too: writers ignore them anyway.
    pub(crate) async fn mark_idle(&self) -> Result<()> {
        let conn = self.conn().await?;
        conn.client
            .execute(&self.inner.sql_idle, &[&self.inner.config.worker_id])
            .await
            .map_err(|e| Error::postgres("marking the bridge idle (adaptive NOTIFY)", e))?;
        Ok(())
    }
}

impl Outbox {
    /// Applies one kind of move to the jobs of `group`.
    pub(super) async fn apply(&self, action: Move, group: &[&(i64, Outcome)]) -> Result<Vec<i64>> {
        let conn = self.conn().await?;
        let ids: Vec<i64> = group.iter().map(|(id, _)| *id).collect();
        let worker = &self.inner.config.worker_id;
        let rows = match action {
            Move::Sent => {
                let mut rows = conn
                    .client
                    .query(&conn.stmts.sent, &[&ids, worker])
                    .await
                    .map_err(|e| Error::postgres(action.describe(), e))?;
                if rows.len() < ids.len() {
                    rows.extend(self.sent_after_wait(&conn, &ids, &rows).await?);
                }
                Ok(rows)
            }
            Move::Release => {
                conn.client
                    .query(&conn.stmts.release, &[&ids, worker])
                    .await
            }
            Move::Completed => conn.client.query(&conn.stmts.completed, &[&ids]).await,
            Move::PublishFailed | Move::DeadLettered => {
                let (errors, retries): (Vec<&str>, Vec<bool>) = group
                    .iter()
                    .map(|(_, outcome)| match outcome {
                        Outcome::Failed { error, retry } => (error.as_str(), *retry),
                        Outcome::DeadLettered { error } => (error.as_str(), false),
                        _ => ("", false),
                    })
                    .unzip();
                let config = &self.inner.config;
                let max_attempts = i32::try_from(config.max_attempts).unwrap_or(i32::MAX);
                let (initial, max) = (
                    config.retry_backoff.initial.as_secs_f64(),
                    config.retry_backoff.max.as_secs_f64(),
                );
                let params: [&(dyn tokio_postgres::types::ToSql + Sync); 6] =
                    [&ids, &errors, &retries, &max_attempts, &initial, &max];
                if action == Move::PublishFailed {
                    let mut with_worker = params.to_vec();
                    with_worker.push(worker);
                    conn.client
                        .query(&conn.stmts.publish_failed, &with_worker)
                        .await
                } else {
                    conn.client.query(&conn.stmts.dead_lettered, &params).await
                }
            }
            // settle groups reports by the five moves above only.
            _ => return Ok(Vec::new()),
        };
        Ok(sorted_ids(
            &rows.map_err(|e| Error::postgres(action.describe(), e))?,
        ))
    }
}

pub(super) fn sorted_ids(rows: &[tokio_postgres::Row]) -> Vec<i64> {
    let mut ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    ids.sort_unstable();
    ids
}

fn job_from_row(row: &tokio_postgres::Row) -> Result<Job> {
    let id: i64 = row.get("id");
    let operation: String = row.get("operation");
    let retry: bool = row.get("retry");
    Ok(Job {
        id,
        table_name: row.get("table_name"),
        // The table's CHECK constraint makes this unreachable unless the schema was altered.
        operation: Operation::parse(&operation)
            .ok_or_else(|| Error::invalid_job(id, format!("unknown operation {operation:?}")))?,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_attempts_and_a_zero_lease_are_configuration_errors() {
        let url: DatabaseUrl = "postgres://u@localhost/db".parse().expect("url");
        let config = OutboxConfig {
            max_attempts: 0,
            ..OutboxConfig::default()
        };
        assert!(Outbox::new(url.clone(), config).is_err());
        let config = OutboxConfig {
            lease: Duration::ZERO,
            ..OutboxConfig::default()
        };
        let err = Outbox::new(url, config).expect_err("zero lease");
        assert!(err.to_string().contains("OutboxConfig::lease"), "{err}");
    }
}
