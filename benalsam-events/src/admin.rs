//! Operating the outbox: a status summary, retrying failed jobs, and backfilling a table
//! whose rows predate the trigger.

use std::time::Duration;

use tokio_postgres::Client;

use crate::config::validate_identifier;
use crate::{Error, Result};

/// Jobs by status, as the architecture document's monitoring queries count them.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// One line per status present: status, jobs, average seconds from creation to
    /// `processed_at` (completed and failed jobs only).
    pub by_status: Vec<StatusLine>,
    /// Age of the oldest pending job.
    pub oldest_pending: Option<Duration>,
}

/// One status of a [`Summary`].
#[derive(Debug, Clone, PartialEq)]
pub struct StatusLine {
    /// The status.
    pub status: String,
    /// How many jobs have it.
    pub jobs: i64,
    /// Average processing time in seconds, where `processed_at` is set.
    pub avg_processing_seconds: Option<f64>,
}

/// Counts jobs by status with their average processing time (a full scan: for operators,
/// not for health checks).
pub async fn summary(client: &Client, schema: &str) -> Result<Summary> {
    let schema = validate_identifier("BENALSAM_SCHEMA", schema)?;
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
    Ok(Summary {
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

/// Which failed jobs to retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// Every failed job.
    All,
    /// These jobs (those that are failed).
    Ids(Vec<i64>),
}

/// Puts failed jobs back to `pending` with their attempts reset, so the bridge publishes
/// them again. Returns their ids.
pub async fn retry_failed(
    client: &Client,
    schema: &str,
    selection: &Selection,
) -> Result<Vec<i64>> {
    let schema = validate_identifier("BENALSAM_SCHEMA", schema)?;
    let (all, ids) = match selection {
        Selection::All => (true, Vec::new()),
        Selection::Ids(ids) => (false, ids.clone()),
    };
    let rows = client
        .query(
            &format!(
                "UPDATE \"{schema}\".elasticsearch_sync_queue
                 SET status = 'pending', retry_count = 0, next_attempt_at = NULL,
                     locked_until = NULL, locked_by = NULL
                 WHERE status = 'failed' AND ($1 OR id = ANY($2))
                 RETURNING id"
            ),
            &[&all, &ids],
        )
        .await
        .map_err(|e| Error::postgres("retrying failed jobs", e))?;
    let mut ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    ids.sort_unstable();
    if !ids.is_empty() {
        client
            .execute(
                "SELECT pg_notify($1, '')",
                &[&crate::job_stream::DEFAULT_CHANNEL],
            )
            .await
            .map_err(|e| Error::postgres("waking the bridges", e))?;
    }
    Ok(ids)
}

/// Progress of a backfill, after each batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackfillProgress {
    /// The table.
    pub table: String,
    /// Rows enqueued so far, over all runs of this backfill.
    pub rows: i64,
    /// The key of the last row enqueued.
    pub last_key: Option<String>,
    /// Whether every row has been enqueued.
    pub finished: bool,
}

/// Enqueues an INSERT job for every row of `table` (key column `key`) in key order, `batch`
/// rows per short transaction, recording progress so an interrupted backfill continues where
/// it stopped (`restart` starts over). Jobs of rows changed meanwhile are harmless: the index
/// keeps the highest job id. Calls `progress` after each batch; returning `false` from it
/// stops the backfill there (to be continued by the next call).
pub async fn backfill(
    client: &mut Client,
    schema: &str,
    table: &str,
    key: &str,
    batch: i64,
    restart: bool,
    mut progress: impl FnMut(&BackfillProgress) -> bool,
) -> Result<BackfillProgress> {
    let schema = validate_identifier("BENALSAM_SCHEMA", schema)?;
    let table = validate_identifier("table", table)?;
    let key = validate_identifier("key column", key)?;
    // Rows are read FOR SHARE: a concurrent UPDATE of a row in the batch is waited for and
    // its committed version enqueued, so the backfill's job (a higher id) never carries a
    // row older than the update's own job.
    if batch < 1 {
        return Err(Error::Config {
            setting: "batch",
            reason: "must be at least 1".to_owned(),
        });
    }
    // The key's type, so batches are ranges on its index rather than sorts of text.
    let key_type: String = client
        .query_opt(
            "SELECT format_type(a.atttypid, a.atttypmod)
             FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
             JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = $1 AND c.relname = $2 AND a.attname = $3 AND NOT a.attisdropped",
            &[&schema, &table, &key],
        )
        .await
        .map_err(|e| Error::postgres("looking up the key column", e))?
        .ok_or_else(|| Error::Config {
            setting: "table",
            reason: format!("{schema}.{table} has no column {key}"),
        })?
        .get(0);
    let q = format!("\"{schema}\".elasticsearch_sync_queue");
    let progress_table = format!("\"{schema}\".benalsam_backfill");
    if restart {
        client
            .execute(
                &format!("DELETE FROM {progress_table} WHERE table_name = $1"),
                &[&table],
            )
            .await
            .map_err(|e| Error::postgres("restarting the backfill", e))?;
    }
    client
        .execute(
            &format!(
                "INSERT INTO {progress_table} (table_name, key_column) VALUES ($1, $2)
                 ON CONFLICT (table_name) DO NOTHING"
            ),
            &[&table, &key],
        )
        .await
        .map_err(|e| Error::postgres("recording the backfill", e))?;
    // The key that ends the next batch: the batch-th row after the last one enqueued. None
    // means fewer rows than a batch remain, and this batch is the last.
    let last_of_batch = format!(
        "SELECT t.\"{key}\"::text FROM \"{schema}\".\"{table}\" t
         WHERE $1::text IS NULL OR t.\"{key}\" > $1::text::{key_type}
         ORDER BY t.\"{key}\" OFFSET $2::bigint - 1 LIMIT 1"
    );
    loop {
        let tx = client
            .transaction()
            .await
            .map_err(|e| Error::postgres("starting a backfill batch", e))?;
        let state = tx
            .query_one(
                &format!(
                    "SELECT last_key, rows_queued, finished_at IS NOT NULL
                     FROM {progress_table} WHERE table_name = $1 FOR UPDATE"
                ),
                &[&table],
            )
            .await
            .map_err(|e| Error::postgres("reading backfill progress", e))?;
        let (last_key, rows, finished): (Option<String>, i64, bool) =
            (state.get(0), state.get(1), state.get(2));
        if finished {
            let done = BackfillProgress {
                table: table.to_owned(),
                rows,
                last_key,
                finished: true,
            };
            progress(&done);
            return Ok(done);
        }
        let boundary: Option<String> = tx
            .query_opt(&last_of_batch, &[&last_key, &batch])
            .await
            .map_err(|e| Error::postgres("finding the next backfill batch", e))?
            .map(|r| r.get(0));
        let queued = tx
            .execute(
                &format!(
                    "INSERT INTO {q} (table_name, operation, record_id, change_data)
                     SELECT $1, 'INSERT', t.\"{key}\"::text, to_jsonb(t)
                     FROM \"{schema}\".\"{table}\" t
                     WHERE ($2::text IS NULL OR t.\"{key}\" > $2::text::{key_type})
                       AND ($3::text IS NULL OR t.\"{key}\" <= $3::text::{key_type})
                     ORDER BY t.\"{key}\"
                     FOR SHARE OF t"
                ),
                &[&table, &last_key, &boundary],
            )
            .await
            .map_err(|e| Error::postgres("enqueueing a backfill batch", e))?;
        let queued = i64::try_from(queued).unwrap_or(i64::MAX);
        let finished = boundary.is_none();
        let new_last = if finished {
            last_key.clone()
        } else {
            boundary.clone()
        };
        tx.execute(
            &format!(
                "UPDATE {progress_table}
                 SET last_key = $2, rows_queued = rows_queued + $3, updated_at = now(),
                     finished_at = CASE WHEN $4 THEN now() END
                 WHERE table_name = $1"
            ),
            &[&table, &new_last, &queued, &finished],
        )
        .await
        .map_err(|e| Error::postgres("recording backfill progress", e))?;
        tx.execute(
            "SELECT pg_notify($1, '')",
            &[&crate::job_stream::DEFAULT_CHANNEL],
        )
        .await
        .map_err(|e| Error::postgres("waking the bridges", e))?;
        tx.commit()
            .await
            .map_err(|e| Error::postgres("committing a backfill batch", e))?;
        let now = BackfillProgress {
            table: table.to_owned(),
            rows: rows + queued,
            last_key: new_last,
            finished,
        };
        if !progress(&now) || finished {
            return Ok(now);
        }
    }
}
