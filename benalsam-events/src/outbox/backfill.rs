//! Backfilling a table whose rows predate the trigger (or whose documents must be written
//! again): a job per row, in key order, one short transaction per batch, resumable.

use crate::config::validate_identifier;
use crate::event_type::EventType;
use crate::outbox::Outbox;
use crate::{error::Error, error::Result};

/// Progress of a backfill, after each batch.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BackfillProgress {
    /// The table.
    pub table: String,
    /// Rows enqueued so far, over all runs of this backfill (an interrupted run and the run
    /// that continued it).
    pub rows: i64,
    /// Rows enqueued by this call: what it really added to the job table.
    pub this_run: i64,
    /// Rows to enqueue in all (the table's rows when this run started).
    pub total: i64,
    /// The key of the last row enqueued.
    pub last_key: Option<String>,
    /// Whether every row has been enqueued.
    pub finished: bool,
}

impl Outbox {
    /// Enqueues an INSERT job for every row of `table` (key column `key`) in key order, `batch`
    /// rows per short transaction, recording progress so an interrupted backfill continues where
    /// it stopped (`restart` starts over); a finished one asked again is a new run over every
    /// row. Jobs of rows changed meanwhile are harmless: the index keeps the highest job id.
    /// Calls `progress` after each batch; returning `false` from it stops the backfill there
    /// (to be continued by the next call).
    ///
    /// `condition` (`company_id = 42`) keeps only the rows it holds for. It is SQL from the
    /// operator, put into the backfill's statements as it is, and runs with the backfill's
    /// database role: pass only what the operator wrote, never a value from the outside. A
    /// backfill with a condition keeps its own progress, apart from the table's unfiltered
    /// one: the same condition continues it.
    pub async fn backfill(
        &self,
        table: &str,
        key: &str,
        batch: i64,
        restart: bool,
        condition: Option<&str>,
        mut progress: impl FnMut(&BackfillProgress) -> bool,
    ) -> Result<BackfillProgress> {
        let mut run = Backfill::start(self, (table, key, condition), None, batch, restart).await?;
        loop {
            let now = run.step().await?;
            if !progress(&now) || now.finished {
                return Ok(now);
            }
        }
    }

    /// [`Outbox::backfill`] of the table of `event_type` by its key, its jobs recorded under
    /// its job name (`jobs_as`, when several event types take the table), with a progress of
    /// its own: what a backfill of one event type must be.
    pub async fn backfill_type(
        &self,
        event_type: &EventType,
        batch: i64,
        restart: bool,
        condition: Option<&str>,
        mut progress: impl FnMut(&BackfillProgress) -> bool,
    ) -> Result<BackfillProgress> {
        let target = (
            event_type.table.as_str(),
            event_type.key.as_str(),
            condition,
        );
        let jobs = event_type.jobs_as.as_deref();
        let mut run = Backfill::start(self, target, jobs, batch, restart).await?;
        loop {
            let now = run.step().await?;
            if !progress(&now) || now.finished {
                return Ok(now);
            }
        }
    }
}

/// One backfill under way: its connection and its statements.
struct Backfill {
    /// Its own connection: batches are transactions.
    client: tokio_postgres::Client,
    /// The table as the trigger records it (the jobs' table).
    table: String,
    /// Its progress row: the table, with the condition when there is one.
    progress: String,
    batch: i64,
    /// Rows enqueued by this run.
    this_run: i64,
    /// Rows of the table in all, counted at the start.
    total: i64,
    sql: BackfillSql,
    notify_channel: String,
}

/// `bare`, qualified with `rows_schema` unless it is the outbox's `schema`: the table's name
/// as the trigger records it.
fn qualified_unless(schema: &str, rows_schema: &str, bare: &str) -> String {
    if rows_schema == schema {
        bare.to_owned()
    } else {
        format!("{rows_schema}.{bare}")
    }
}

/// The statements of one backfill.
struct BackfillSql {
    forget: String,
    forget_finished: String,
    begin: String,
    count: String,
    read_progress: String,
    last_of_batch: String,
    enqueue: String,
    record_progress: String,
}

impl Backfill {
    async fn start(
        outbox: &Outbox,
        (table, key, condition): (&str, &str, Option<&str>),
        jobs: Option<&str>,
        batch: i64,
        restart: bool,
    ) -> Result<Self> {
        let client =
            crate::connect::postgres_as(outbox.database_url(), "benalsam-backfill").await?;
        let schema = outbox.config().schema.as_str();
        // The rows' schema, and the table's name as the trigger records it.
        let (rows_schema, bare) = match table.split_once('.') {
            Some((s, t)) => (
                validate_identifier("table", s)?,
                validate_identifier("table", t)?,
            ),
            None => (schema, validate_identifier("table", table)?),
        };
        // An event type with a job name of its own records its jobs (and progress) under it.
        let recorded = jobs.map_or_else(
            || qualified_unless(schema, rows_schema, bare),
            str::to_owned,
        );
        let key = validate_identifier("key column", key)?;
        if batch < 1 {
            return Err(Error::config("batch", "must be at least 1"));
        }
        let key_type = key_type(&client, (rows_schema, bare), key).await?;
        let condition = condition.map(str::trim).filter(|c| !c.is_empty());
        let sql = BackfillSql::new(
            schema,
            &format!("\"{rows_schema}\".\"{bare}\""),
            (key, &key_type),
            condition,
        );
        // The condition is checked (and the rows counted) before any progress is touched.
        let total: i64 = client
            .query_one(&sql.count, &[])
            .await
            .map_err(|e| match condition {
                Some(condition) => Error::config(
                    "--where",
                    format!(
                        "{condition:?} is not a condition on {rows_schema}.{bare}: {}",
                        crate::error::pg_detail(&e)
                    ),
                ),
                None => Error::postgres("counting the rows to backfill", e),
            })?
            .get(0);
        let progress = match condition {
            Some(condition) => format!("{recorded} WHERE {condition}"),
            None => recorded.clone(),
        };
        // A finished backfill asked again is a new run; an interrupted one continues unless
        // told to restart.
        let forget = if restart {
            &sql.forget
        } else {
            &sql.forget_finished
        };
        client
            .execute(forget, &[&progress])
            .await
            .map_err(|e| Error::postgres("restarting the backfill", e))?;
        client
            .execute(&sql.begin, &[&progress, &key])
            .await
            .map_err(|e| Error::postgres("recording the backfill", e))?;
        Ok(Self {
            client,
            table: recorded,
            progress,
            batch,
            this_run: 0,
            total,
            sql,
            notify_channel: outbox.config().notify_channel.clone(),
        })
    }
}

impl BackfillSql {
    /// The statements of a backfill of `rows` (the quoted, qualified table) by `key` (of
    /// type `key_type`), of the rows where `condition` holds, with its progress kept in
    /// `schema`.
    fn new(
        schema: &str,
        rows: &str,
        (key, key_type): (&str, &str),
        condition: Option<&str>,
    ) -> Self {
        let progress = format!("\"{schema}\".benalsam_backfill");
        // The operator's condition, verbatim (see `Outbox::backfill`), in parentheses so that
        // an OR in it cannot escape the key range.
        let filter = condition.map_or(String::new(), |c| format!(" AND ({c})"));
        Self {
            forget: format!("DELETE FROM {progress} WHERE table_name = $1"),
            forget_finished: format!(
                "DELETE FROM {progress} WHERE table_name = $1 AND finished_at IS NOT NULL"
            ),
            begin: format!(
                "INSERT INTO {progress} (table_name, key_column) VALUES ($1, $2)
                 ON CONFLICT (table_name) DO NOTHING"
            ),
            count: format!("SELECT count(*) FROM {rows} t WHERE true{filter}"),
            read_progress: format!(
                "SELECT last_key, rows_queued, finished_at IS NOT NULL
                 FROM {progress} WHERE table_name = $1 FOR UPDATE"
            ),
            // The key that ends the next batch: the batch-th row after the last one enqueued.
            // None means fewer rows than a batch remain, and this batch is the last.
            last_of_batch: format!(
                "SELECT t.\"{key}\"::text FROM {rows} t
                 WHERE ($1::text IS NULL OR t.\"{key}\" > $1::text::{key_type}){filter}
                 ORDER BY t.\"{key}\" OFFSET $2::bigint - 1 LIMIT 1"
            ),
            // Rows are read FOR SHARE: a concurrent UPDATE of a row in the batch is waited for
            // and its committed version enqueued, so the backfill's job (a higher id) never
            // carries a row older than the update's own job.
            enqueue: format!(
                "INSERT INTO \"{schema}\".elasticsearch_sync_queue
                     (table_name, operation, record_id, change_data)
                 SELECT $1, 'INSERT', t.\"{key}\"::text, to_jsonb(t)
                 FROM {rows} t
                 WHERE ($2::text IS NULL OR t.\"{key}\" > $2::text::{key_type})
                   AND ($3::text IS NULL OR t.\"{key}\" <= $3::text::{key_type}){filter}
                 ORDER BY t.\"{key}\"
                 FOR SHARE OF t"
            ),
            record_progress: format!(
                "UPDATE {progress}
                 SET last_key = $2, rows_queued = rows_queued + $3, updated_at = now(),
                     finished_at = CASE WHEN $4 THEN now() END
                 WHERE table_name = $1"
            ),
        }
    }
}

impl Backfill {
    /// Enqueues the next batch in one transaction (or reports the backfill finished).
    async fn step(&mut self) -> Result<BackfillProgress> {
        let tx = self
            .client
            .transaction()
            .await
            .map_err(|e| Error::postgres("starting a backfill batch", e))?;
        let state = tx
            .query_one(&self.sql.read_progress, &[&self.progress])
            .await
            .map_err(|e| Error::postgres("reading backfill progress", e))?;
        let (last_key, rows, finished): (Option<String>, i64, bool) =
            (state.get(0), state.get(1), state.get(2));
        if finished {
            return Ok(BackfillProgress {
                table: self.table.clone(),
                rows,
                this_run: self.this_run,
                total: rows.max(self.total),
                last_key,
                finished: true,
            });
        }
        let boundary: Option<String> = tx
            .query_opt(&self.sql.last_of_batch, &[&last_key, &self.batch])
            .await
            .map_err(|e| Error::postgres("finding the next backfill batch", e))?
            .map(|r| r.get(0));
        let queued = tx
            .execute(&self.sql.enqueue, &[&self.table, &last_key, &boundary])
            .await
            .map_err(|e| Error::postgres("enqueueing a backfill batch", e))?;
        let queued = i64::try_from(queued).unwrap_or(i64::MAX);
        let finished = boundary.is_none();
        let last_key = if finished { last_key } else { boundary };
        tx.execute(
            &self.sql.record_progress,
            &[&self.progress, &last_key, &queued, &finished],
        )
        .await
        .map_err(|e| Error::postgres("recording backfill progress", e))?;
        tx.execute("SELECT pg_notify($1, '')", &[&self.notify_channel])
            .await
            .map_err(|e| Error::postgres("waking the bridges", e))?;
        tx.commit()
            .await
            .map_err(|e| Error::postgres("committing a backfill batch", e))?;
        self.this_run += queued;
        Ok(BackfillProgress {
            table: self.table.clone(),
            rows: rows + queued,
            this_run: self.this_run,
            total: (rows + queued).max(self.total),
            last_key,
            finished,
        })
    }
}

/// The type of the key column of `schema.table`: batches are then ranges on its index rather
/// than sorts of text.
async fn key_type(
    client: &tokio_postgres::Client,
    (rows_schema, bare): (&str, &str),
    key: &str,
) -> Result<String> {
    Ok(client
        .query_opt(
            "SELECT format_type(a.atttypid, a.atttypmod)
             FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
             JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = $1 AND c.relname = $2 AND a.attname = $3 AND NOT a.attisdropped",
            &[&rows_schema, &bare, &key],
        )
        .await
        .map_err(|e| Error::postgres("looking up the key column", e))?
        .ok_or_else(|| Error::config("table", format!("{rows_schema}.{bare} has no column {key}")))?
        .get(0))
}
