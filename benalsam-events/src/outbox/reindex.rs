//! The record of reindexes under way (`benalsam_reindex`, migration 8): what consumers read
//! with every batch ([`Outbox::reindexing`]), and the reindex command's own session
//! ([`ReindexRecord`]), which holds an advisory lock for as long as it runs, so a second
//! reindex of the same table is refused while a crashed one (its session gone) is resumed.

use tokio_postgres::Client;

use crate::outbox::Outbox;
use crate::{error::Error, error::Result};

/// Where a reindex is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Phase {
    /// The new index exists; consumers write to it as well.
    Created,
    /// Every row is being enqueued.
    Backfilling,
    /// Every row is enqueued; waiting for the jobs up to `last_job` to settle.
    Waiting,
    /// The alias points at the new index; the old one is to be deleted.
    Swapped,
}

impl Phase {
    fn as_str(self) -> &'static str {
        match self {
            Phase::Created => "created",
            Phase::Backfilling => "backfilling",
            Phase::Waiting => "waiting",
            Phase::Swapped => "swapped",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        [
            Phase::Created,
            Phase::Backfilling,
            Phase::Waiting,
            Phase::Swapped,
        ]
        .into_iter()
        .find(|p| p.as_str() == text)
    }
}

/// One reindex as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ReindexRow {
    pub(crate) alias: String,
    pub(crate) old_index: String,
    pub(crate) new_index: String,
    pub(crate) phase: Phase,
    pub(crate) first_job: i64,
    pub(crate) last_job: Option<i64>,
}

impl Outbox {
    /// The reindexes under way: (table, new index). Read with every batch, never cached: a
    /// consumer that misses a reindex's start would write only to the old index.
    pub(crate) async fn reindexing(&self) -> Result<Vec<(String, String)>> {
        let conn = self.conn().await?;
        let messages = match conn.client.simple_query(self.reindexing_sql()).await {
            Ok(messages) => messages,
            // Before migration 8 there is no table, and so no reindex under way (the reindex
            // command needs it). A refused read (a role without the grant) is an error: it
            // cannot tell.
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => {
                return Ok(Vec::new());
            }
            Err(e) => {
                return Err(Error::postgres(
                    "reading the reindexes under way (the consumer's role needs SELECT on \
                     benalsam_reindex: see `benalsam-bridge grants`)",
                    e,
                ));
            }
        };
        Ok(messages
            .iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(row) => {
                    Some((row.get(0)?.to_owned(), row.get(1)?.to_owned()))
                }
                _ => None,
            })
            .collect())
    }
}

/// The reindex command's session on the outbox, holding the table's reindex lock.
pub(crate) struct ReindexRecord {
    client: Client,
    table: String,
    schema: String,
}

impl ReindexRecord {
    /// Opens a session and takes the reindex lock of `table`; `None` when another session
    /// holds it (a reindex of the same table is running).
    pub(crate) async fn lock(outbox: &Outbox, table: &str) -> Result<Option<Self>> {
        let client = crate::connect::postgres_as(outbox.database_url(), "benalsam-reindex").await?;
        let schema = outbox.config().schema.clone();
        let key = format!("benalsam_reindex:{schema}:{table}");
        let locked: bool = client
            .query_one("SELECT pg_try_advisory_lock(hashtext($1))", &[&key])
            .await
            .map_err(|e| Error::postgres("taking the reindex lock", e))?
            .get(0);
        Ok(locked.then(|| Self {
            client,
            table: table.to_owned(),
            schema,
        }))
    }

    fn q(&self, table: &str) -> String {
        format!("\"{}\".{table}", self.schema)
    }

    /// The recorded reindex of the table, if one is under way.
    pub(crate) async fn row(&self) -> Result<Option<ReindexRow>> {
        let sql = format!(
            "SELECT alias, old_index, new_index, phase, first_job, last_job
             FROM {} WHERE table_name = $1",
            self.q("benalsam_reindex")
        );
        let row = self
            .client
            .query_opt(&sql, &[&self.table])
            .await
            .map_err(|e| Error::postgres("reading the reindex record", e))?;
        Ok(row.map(|r| {
            let phase: String = r.get(3);
            ReindexRow {
                alias: r.get(0),
                old_index: r.get(1),
                new_index: r.get(2),
                phase: Phase::parse(&phase).unwrap_or(Phase::Created),
                first_job: r.get(4),
                last_job: r.get(5),
            }
        }))
    }

    /// Records a reindex from `old` to `new` behind `alias` (the new index exists already).
    pub(crate) async fn start(&self, alias: &str, old: &str, new: &str) -> Result<()> {
        let sql = format!(
            "INSERT INTO {} (table_name, alias, old_index, new_index, phase, first_job)
             VALUES ($1, $2, $3, $4, 'created', (SELECT coalesce(max(id), 0) FROM {}))",
            self.q("benalsam_reindex"),
            self.q("elasticsearch_sync_queue")
        );
        self.client
            .execute(&sql, &[&self.table, &alias, &old, &new])
            .await
            .map_err(|e| Error::postgres("recording the reindex", e))?;
        Ok(())
    }

    /// Moves the reindex to `phase`. Entering [`Phase::Backfilling`] forgets the table's
    /// earlier backfill (so every row is enqueued again, and a resumed backfill continues);
    /// entering [`Phase::Waiting`] records the highest job id as `last_job`.
    pub(crate) async fn set_phase(&mut self, phase: Phase) -> Result<()> {
        let sql = format!(
            "UPDATE {} SET phase = $2, updated_at = now(),
                 last_job = CASE WHEN $2 = 'waiting'
                                 THEN (SELECT coalesce(max(id), 0) FROM {}) ELSE last_job END
             WHERE table_name = $1",
            self.q("benalsam_reindex"),
            self.q("elasticsearch_sync_queue")
        );
        let tx = self
            .client
            .transaction()
            .await
            .map_err(|e| Error::postgres("starting a reindex phase", e))?;
        if phase == Phase::Backfilling {
            let forget = format!(
                "DELETE FROM \"{}\".benalsam_backfill WHERE table_name = $1",
                self.schema
            );
            tx.execute(&forget, &[&self.table])
                .await
                .map_err(|e| Error::postgres("starting the reindex's backfill", e))?;
        }
        tx.execute(&sql, &[&self.table, &phase.as_str()])
            .await
            .map_err(|e| Error::postgres("recording the reindex phase", e))?;
        tx.commit()
            .await
            .map_err(|e| Error::postgres("recording the reindex phase", e))
    }

    /// Jobs of the table up to `last` still on their way (and failed jobs that will be
    /// retried); and jobs after `first` that failed for good.
    pub(crate) async fn unsettled(&self, first: i64, last: i64) -> Result<(i64, i64)> {
        let sql = format!(
            "SELECT count(*) FILTER (WHERE status IN ('pending', 'processing', 'sent')
                                        OR (status = 'failed' AND next_attempt_at IS NOT NULL)),
                    count(*) FILTER (WHERE status = 'failed' AND next_attempt_at IS NULL
                                       AND id > $2)
             FROM {} WHERE table_name = $1 AND id <= $3
               AND status NOT IN ('completed')",
            self.q("elasticsearch_sync_queue")
        );
        let row = self
            .client
            .query_one(&sql, &[&self.table, &first, &last])
            .await
            .map_err(|e| Error::postgres("counting the jobs the reindex waits for", e))?;
        Ok((row.get(0), row.get(1)))
    }

    /// Removes the record: consumers stop writing to the new index by its name.
    pub(crate) async fn finish(&self) -> Result<()> {
        let sql = format!(
            "DELETE FROM {} WHERE table_name = $1",
            self.q("benalsam_reindex")
        );
        self.client
            .execute(&sql, &[&self.table])
            .await
            .map_err(|e| Error::postgres("removing the reindex record", e))?;
        Ok(())
    }
}
