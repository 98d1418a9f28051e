//! [`Outbox`]: the queue table `elasticsearch_sync_queue`, claimed with leases and settled
//! with reports, one statement per batch.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::Mutex;
use tokio_postgres::{Client, Statement};

use crate::backoff::Backoff;
use crate::config::{DatabaseUrl, validate_identifier, validate_schema};
use crate::outbox::job::{ClaimKind, Job, Operation};
use crate::outbox::state::Move;
use crate::{Error, Result};

/// Settings of an [`Outbox`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct OutboxConfig {
    /// Schema holding `elasticsearch_sync_queue` (`BENALSAM_SCHEMA`).
    pub schema: String,
    /// How long a claim is exclusive. A bridge that dies holding jobs loses them to others
    /// after this long; one that is alive finishes a batch in well under a second.
    pub lease: Duration,
    /// Attempts per job in all, the first included: a job that has failed this many times
    /// stays `failed` with its last error (`BENALSAM_MAX_ATTEMPTS`).
    pub max_attempts: u32,
    /// The delay before retry `n` is drawn from this backoff (computed by PostgreSQL, so
    /// every bridge agrees on it).
    pub retry_backoff: Backoff,
    /// Written to `locked_by` on claim; reports that need the lease must come from the same
    /// id. Unique per process by default.
    pub worker_id: String,
    /// The NOTIFY channel that wakes bridges after operator commands (the trigger's
    /// `channel=` option).
    pub notify_channel: String,
    /// The tables whose jobs this outbox claims (a bridge claims only the tables it routes;
    /// the jobs of others wait as `pending` for a bridge that routes them). `None`: every
    /// table.
    pub tables: Option<Vec<String>>,
}

impl OutboxConfig {
    /// The defaults, in `schema`.
    pub fn in_schema(schema: &str) -> Self {
        Self {
            schema: schema.to_owned(),
            ..Self::default()
        }
    }

    /// Checks the settings as [`Outbox::new`] does: names that go into SQL text, a lease and
    /// retry waits longer than zero, at least one attempt.
    pub fn validate(&self) -> Result<()> {
        validate_schema(&self.schema)?;
        validate_identifier("OutboxConfig::notify_channel", &self.notify_channel)?;
        if self.max_attempts == 0 {
            return Err(Error::config(
                "OutboxConfig::max_attempts",
                "must be at least 1",
            ));
        }
        crate::config::require_positive("OutboxConfig::lease", self.lease)?;
        let backoff = self.retry_backoff;
        crate::config::require_positive("OutboxConfig::retry_backoff.initial", backoff.initial)?;
        if backoff.initial > backoff.max {
            return Err(Error::config(
                "OutboxConfig::retry_backoff.initial",
                format!(
                    "{:?} is longer than OutboxConfig::retry_backoff.max ({:?})",
                    backoff.initial, backoff.max
                ),
            ));
        }
        Ok(())
    }
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            schema: "public".to_owned(),
            lease: Duration::from_secs(60),
            // About an hour of retries before a job is left `failed` for someone to look at.
            max_attempts: 10,
            retry_backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(600)),
            worker_id: format!(
                "pid {} on {}",
                std::process::id(),
                std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".to_owned())
            ),
            notify_channel: crate::outbox::DEFAULT_CHANNEL.to_owned(),
            tables: None,
        }
    }
}

/// What became of a job, as the part that handled it reports it to [`Settle::settle`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// The broker confirmed its message (from the bridge that claimed it).
    Sent,
    /// Given back unhandled, without counting an attempt (from the claimer, at shutdown).
    Released,
    /// The claimer could not deliver it. A retryable failure is claimed again after its
    /// backoff while attempts remain; otherwise the job stays `failed` with `error`.
    Failed {
        /// What went wrong, stored in `error_message`.
        error: String,
        /// Whether another attempt may succeed (a refused publish: yes; a row too large to
        /// be a message: no).
        retry: bool,
    },
    /// The change reached its destination (from a consumer): final. The job's
    /// `change_data` is emptied (`{}`): nothing needs it again.
    Completed,
    /// A consumer refused the message and dead-lettered it; the job stays `failed` with
    /// `error` until its dead letter is replayed or an operator retries it.
    DeadLettered {
        /// Why, stored in `error_message`.
        error: String,
    },
}

impl Outcome {
    fn action(&self) -> Move {
        match self {
            Outcome::Sent => Move::Sent,
            Outcome::Released => Move::Release,
            Outcome::Failed { .. } => Move::PublishFailed,
            Outcome::Completed => Move::Completed,
            Outcome::DeadLettered { .. } => Move::DeadLettered,
        }
    }
}

/// Which of the reported jobs changed state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Settled {
    /// Jobs that made the move, ascending.
    pub changed: Vec<i64>,
    /// Jobs that did not: unknown ids, or a move their state does not allow (a late confirm
    /// of a job a consumer already failed, anything reported for a completed job).
    pub unchanged: Vec<i64>,
}

/// Where outcomes are recorded. The [`Outbox`] is the implementation; the publisher, the
/// indexer and custom sinks report through it, and only it changes job states.
pub trait Settle: Send + Sync + 'static {
    /// Records `reports`, each a job id and its outcome.
    fn settle(&self, reports: &[(i64, Outcome)]) -> impl Future<Output = Result<Settled>> + Send;
}

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

/// Live work in the queue, for health checks and metrics: the pending work of the outbox's
/// own tables (see [`OutboxConfig::tables`]), and the rest in all. Counted on the partial
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
    conn: Mutex<Option<Conn>>,
    /// A connection of its own for transactions (reading joined documents), which the
    /// shared, pipelined connection cannot hold.
    joined: Mutex<Option<Client>>,
}

#[derive(Debug, Clone)]
struct Conn {
    client: Arc<Client>,
    stmts: Arc<Statements>,
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

    async fn conn(&self) -> Result<Conn> {
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

    /// Counts the live backlog: pending jobs and the age of the oldest, failed jobs that will
    /// be retried, processing jobs, sent jobs and the age of the oldest.
    pub async fn backlog(&self) -> Result<Backlog> {
        let conn = self.conn().await?;
        let row = conn
            .client
            .query_one(&conn.stmts.backlog, &[&self.inner.config.tables])
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

    /// Applies one kind of move to the jobs of `group`.
    async fn apply(&self, action: Move, group: &[&(i64, Outcome)]) -> Result<Vec<i64>> {
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

impl Settle for Outbox {
    /// One statement per kind of outcome present; each guarded by the states its move may
    /// leave ([`crate::outbox`]'s state diagram).
    async fn settle(&self, reports: &[(i64, Outcome)]) -> Result<Settled> {
        let mut changed = Vec::new();
        // Completions first: a job reported both completed and failed in one call is done.
        for action in [
            Move::Completed,
            Move::DeadLettered,
            Move::PublishFailed,
            Move::Sent,
            Move::Release,
        ] {
            let group: Vec<&(i64, Outcome)> = reports
                .iter()
                .filter(|(_, o)| o.action() == action)
                .collect();
            if group.is_empty() {
                continue;
            }
            changed.extend(self.apply(action, &group).await?);
        }
        let requested: Vec<i64> = reports.iter().map(|(id, _)| *id).collect();
        Ok(settled(&requested, changed))
    }
}

fn sorted_ids(rows: &[tokio_postgres::Row]) -> Vec<i64> {
    let mut ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    ids.sort_unstable();
    ids
}

fn settled(requested: &[i64], mut changed: Vec<i64>) -> Settled {
    changed.sort_unstable();
    changed.dedup();
    let mut unchanged: Vec<i64> = requested
        .iter()
        .copied()
        .filter(|id| changed.binary_search(id).is_err())
        .collect();
    unchanged.sort_unstable();
    unchanged.dedup();
    Settled { changed, unchanged }
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

macro_rules! statements {
    ($($name:ident: $what:literal),* $(,)?) => {
        /// The SQL of one schema. Table names cannot be parameters, so the (validated) schema
        /// is written into the text once, here.
        #[derive(Debug)]
        struct Sql { $($name: String),* }

        #[derive(Debug)]
        struct Statements { $($name: Statement),* }

        impl Sql {
            async fn prepare(&self, client: &Client) -> Result<Statements> {
                Ok(Statements {
                    $($name: client.prepare(&self.$name).await.map_err(|e| {
                        Error::postgres(concat!("preparing the ", $what, " statement"), e)
                    })?),*
                })
            }
        }
    };
}

statements! {
    claim: "claim",
    claim_tables: "claim by table",
    verify: "verify",
    truncate_pending: "truncation",
    reclaim_expired: "reclaim",
    release: "release",
    sent: "sent",
    still_processing: "still processing",
    sent_one: "sent, one job",
    completed: "completed",
    publish_failed: "publish failed",
    dead_lettered: "dead lettered",
    backlog: "backlog",
    pending_by_table: "pending by table",
    purge_completed: "purge",
    purgeable: "count purgeable",
    resend_stale: "resend",
}

impl Sql {
    fn for_schema(schema: &str) -> Self {
        let q = format!("\"{schema}\".elasticsearch_sync_queue");
        let truncations = format!("\"{schema}\".benalsam_truncations");
        // A failed job: backoff is initial × 2^(failures so far), capped, times a jitter in
        // [0.5, 1), while attempts remain and the failure is retryable.
        let fail = |action: Move| {
            format!(
                "UPDATE {q} q
                 SET status = '{}',
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
                 WHERE q.id = f.id AND {}
                 RETURNING q.id",
                action.to().as_str(),
                action.guard(Some("$7"))
            )
        };
        let (due, fresh) = (Move::ClaimRetry.guard(None), Move::Claim.guard(None));
        // The oldest pending jobs of table `t.name`, locked. A range over the one name and
        // the order (table_name, id) leave the planner one way to read them in order: the
        // pending index. With `table_name = t.name ORDER BY id` it may walk the primary key
        // instead, filtering out every completed job older than the first pending one (it
        // takes pending jobs to be spread evenly over the ids): half a second a claim on a
        // queue of a million completed jobs (benches/claim.rs), once the fillfactor of
        // migration 0005 had made the heap larger and the pending index look dearer.
        let oldest_pending = format!(
            "SELECT id FROM {q} q
             WHERE q.table_name >= t.name AND q.table_name <= t.name AND {fresh}
             ORDER BY q.table_name, q.id LIMIT $1 FOR UPDATE SKIP LOCKED"
        );
        Sql {
            // Due retries first, then pending jobs oldest first. SKIP LOCKED lets any number
            // of claimers run at once without waiting on or double-claiming each other.
            claim: claim(
                &q,
                &format!(
                    "SELECT id, true AS retry FROM {q} q
                     WHERE {due} AND next_attempt_at <= now()
                     ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED"
                ),
                // Per table on the (table_name, id) index, as below, over the tables that
                // have pending jobs: found by skipping through that index (a loose index
                // scan), so no index on id alone is needed for this claim.
                &format!(
                    "SELECT c.id, false AS retry
                     FROM (WITH RECURSIVE t(name) AS (
                               (SELECT table_name FROM {q} WHERE status = 'pending'
                                ORDER BY table_name LIMIT 1)
                               UNION ALL
                               SELECT (SELECT table_name FROM {q}
                                       WHERE status = 'pending' AND table_name > t.name
                                       ORDER BY table_name LIMIT 1)
                               FROM t WHERE t.name IS NOT NULL)
                           SELECT name FROM t WHERE name IS NOT NULL) AS t
                     CROSS JOIN LATERAL ({oldest_pending}) c
                     ORDER BY c.id LIMIT $1"
                ),
            ),
            // The same, for the tables of a bridge: per table, on the (table_name, id) index,
            // so the jobs of tables it does not route are never even read.
            claim_tables: claim(
                &q,
                &format!(
                    "SELECT c.id, true AS retry
                     FROM unnest($4::text[]) AS t(name) CROSS JOIN LATERAL (
                         SELECT id, next_attempt_at FROM {q} q
                         WHERE q.table_name = t.name AND {due} AND next_attempt_at <= now()
                         ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED) c
                     ORDER BY c.next_attempt_at LIMIT $1"
                ),
                &format!(
                    "SELECT c.id, false AS retry
                     FROM unnest($4::text[]) AS t(name)
                     CROSS JOIN LATERAL ({oldest_pending}) c
                     ORDER BY c.id LIMIT $1"
                ),
            ),
            // Each delivered job as the outbox has it, and whether a later TRUNCATE of its
            // table supersedes it. One row per id asked, found or not.
            verify: format!(
                // The row comes with the check (one query per batch): the consumer builds
                // the document from it, so a message's own copy never reaches the index.
                // Only jobs that expect a delivery need it; duplicates cost no row.
                "SELECT c.id, q.table_name, q.operation, q.record_id, q.status,
                        EXISTS (SELECT 1 FROM {truncations} t
                                WHERE t.table_name = q.table_name AND t.job_id > q.id),
                        CASE WHEN q.status IN ('processing', 'sent', 'failed')
                             THEN q.change_data END,
                        q.created_at, q.traceparent
                 FROM unnest($1::bigint[]) AS c(id) LEFT JOIN {q} q ON q.id = c.id"
            ),
            truncate_pending: format!(
                "SELECT count(*) FROM {q}
                 WHERE table_name = $1 AND id < $2 AND status IN ('processing', 'sent')"
            ),
            pending_by_table: format!(
                "SELECT table_name, count(*) FROM {q} WHERE status = 'pending'
                 GROUP BY table_name ORDER BY table_name"
            ),
            reclaim_expired: format!(
                "UPDATE {q} q SET status = '{}', locked_until = NULL, locked_by = NULL
                 WHERE q.id IN (SELECT id FROM {q}
                                WHERE status = 'processing' AND locked_until < now()
                                LIMIT $1 FOR UPDATE SKIP LOCKED)
                   AND {}
                 RETURNING q.id",
                Move::Reclaim.to().as_str(),
                Move::Reclaim.guard(None)
            ),
            release: format!(
                "UPDATE {q} q SET status = '{}', locked_until = NULL, locked_by = NULL
                 WHERE q.id = ANY($1) AND {}
                 RETURNING q.id",
                Move::Release.to().as_str(),
                Move::Release.guard(Some("$2"))
            ),
            // A row another transaction holds is skipped, not waited for: mostly a consumer
            // completing the job (after which `sent` no longer applies), and waiting for
            // each of those would stall the publisher behind a consumer that keeps up with
            // it. The jobs skipped that are still this bridge's are marked one by one after
            // (see `sent_after_wait`).
            sent: format!(
                "UPDATE {q} q SET status = '{}', sent_at = now(), locked_until = NULL,
                                  locked_by = NULL, next_attempt_at = NULL
                 FROM (SELECT id FROM {q} q WHERE q.id = ANY($1) AND {}
                       FOR UPDATE SKIP LOCKED) held
                 WHERE q.id = held.id
                 RETURNING q.id",
                Move::Sent.to().as_str(),
                Move::Sent.guard(Some("$2"))
            ),
            // Jobs of this bridge still processing (read without locks), and one of them
            // marked sent, waiting for its lock: the second pass of `sent` above.
            still_processing: format!(
                "SELECT q.id FROM {q} q WHERE q.id = ANY($1) AND {}",
                Move::Sent.guard(Some("$2"))
            ),
            sent_one: format!(
                "UPDATE {q} q SET status = '{}', sent_at = now(), locked_until = NULL,
                                  locked_by = NULL, next_attempt_at = NULL
                 WHERE q.id = $1 AND {}
                 RETURNING q.id",
                Move::Sent.to().as_str(),
                Move::Sent.guard(Some("$2"))
            ),
            // The payload goes with the mark: nothing reads a completed job's change_data
            // again (completed is final: a delivery of it is a duplicate, whose document is
            // not built). The row that waits for the purge shrinks
            // from the payload's size to ~0.2 KB, and with it the page images that the purge
            // writes after a checkpoint, the biggest part of a job's WAL once the marks
            // stay on their page (benches/wal.rs).
            completed: format!(
                "UPDATE {q} q SET status = '{}', completed_at = now(), processed_at = now(),
                                  change_data = '{{}}', locked_until = NULL, locked_by = NULL,
                                  next_attempt_at = NULL
                 WHERE q.id = ANY($1) AND {}
                 RETURNING q.id",
                Move::Completed.to().as_str(),
                Move::Completed.guard(None)
            ),
            publish_failed: fail(Move::PublishFailed),
            dead_lettered: fail(Move::DeadLettered),
            // Pending work counts the outbox's own tables only ($1, all when NULL): jobs
            // nobody here routes are not work this bridge should move.
            backlog: format!(
                "SELECT (SELECT count(*) FROM {q}
                         WHERE status = 'pending' AND ($1::text[] IS NULL OR table_name = ANY($1))),
                        (SELECT extract(epoch FROM now() - min(created_at))::float8
                         FROM {q}
                         WHERE status = 'pending' AND ($1::text[] IS NULL OR table_name = ANY($1))),
                        (SELECT count(*) FROM {q}
                         WHERE status = 'failed' AND next_attempt_at IS NOT NULL),
                        (SELECT count(*) FROM {q} WHERE status = 'processing'),
                        (SELECT count(*) FROM {q} WHERE status = 'sent'),
                        (SELECT extract(epoch FROM now() - min(sent_at))::float8
                         FROM {q} WHERE status = 'sent')"
            ),
            purgeable: format!(
                "SELECT count(*) FROM {q}
                 WHERE status = 'completed' AND completed_at < now() - make_interval(secs => $1)"
            ),
            purge_completed: format!(
                "DELETE FROM {q} WHERE id IN (
                     SELECT id FROM {q}
                     WHERE status = 'completed' AND completed_at < now() - make_interval(secs => $1)
                     LIMIT $2)"
            ),
            // Back to pending, so the job stream publishes them again (same messageId).
            resend_stale: format!(
                "UPDATE {q} q SET status = '{}', sent_at = NULL
                 WHERE q.id IN (SELECT id FROM {q}
                                WHERE status = 'sent' AND sent_at < now() - make_interval(secs => $1)
                                ORDER BY sent_at LIMIT $2 FOR UPDATE SKIP LOCKED)
                   AND {}
                 RETURNING q.id",
                Move::Resend.to().as_str(),
                Move::Resend.guard(None)
            ),
        }
    }
}

/// The claim statement: `due` (retries whose backoff is over) and `fresh` (pending jobs)
/// select `(id, retry)` rows under `FOR UPDATE SKIP LOCKED`, at most `$1` in all; the picked
/// jobs become `processing` under a lease of `$2` seconds held by `$3`.
fn claim(q: &str, due: &str, fresh: &str) -> String {
    format!(
        "WITH due AS ({due}), fresh AS ({fresh}), picked AS (
             SELECT id, retry FROM due UNION ALL SELECT id, retry FROM fresh LIMIT $1
         )
         UPDATE {q} q
         SET status = '{processing}',
             locked_until = now() + make_interval(secs => $2),
             locked_by = $3,
             last_retry_at = CASE WHEN picked.retry THEN now() ELSE q.last_retry_at END
         FROM picked WHERE q.id = picked.id
         RETURNING q.id, q.table_name, q.operation, q.record_id, q.change_data,
                   q.retry_count, q.created_at, q.traceparent, picked.retry",
        processing = Move::Claim.to().as_str(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settled_splits_requested_ids() {
        let s = settled(&[5, 3, 9, 3], vec![9, 3]);
        assert_eq!(s.changed, vec![3, 9]);
        assert_eq!(s.unchanged, vec![5]);
    }

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

    #[test]
    fn every_settled_move_is_guarded() {
        let sql = Sql::for_schema("s");
        assert!(
            sql.sent
                .contains("q.status IN ('processing') AND q.locked_by = $2")
        );
        assert!(
            sql.publish_failed
                .contains("q.status IN ('processing') AND q.locked_by = $7")
        );
        assert!(
            sql.dead_lettered
                .contains("q.status IN ('processing', 'sent', 'failed')")
        );
        assert!(!sql.completed.contains("'completed')"));
    }
}
