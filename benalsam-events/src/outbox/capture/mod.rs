//! WAL capture: the jobs written from PostgreSQL's logical decoding instead of triggers, so
//! the application's writers pay nothing for the outbox (issue 29; docs/database.md, "WAL
//! capture").
//!
//! With [`OutboxConfig::capture_slot`](super::OutboxConfig::capture_slot) set, `migrate`
//! gives each event type's table `REPLICA IDENTITY FULL`, lists it in a publication named
//! after the slot, creates the slot (plugin `pgoutput`) and drops the table's sync triggers
//! ([`setup`]). The bridge then runs a [`Capture`] beside its job stream:
//!
//! ```text
//!   peek the slot up to the flushed WAL ──► decode (pgoutput) ──► job rows per event type
//!        ▲                                                              │
//!        │                                  one transaction: the jobs, the position, NOTIFY
//!        │                                                              │
//!        └──── advance the slot to the position ◄───────────── commit ──┘
//! ```
//!
//! The jobs are the trigger's jobs (same operations, `change_data` built by the same
//! `to_jsonb` from a record literal of the table's type), so every guarantee downstream
//! (states, verification, dead letters, versions) is unchanged; their ids follow commit
//! order. Exactly once: the position (the end of the last captured commit, or the flushed
//! WAL a complete peek covered) is written in the jobs' transaction, and a transaction that
//! ends at or before it is skipped, so a capture stopped between its commit and the slot's
//! advance writes nothing twice; the slot is advanced only after the commit, so nothing is
//! skipped that was not written. One bridge captures a slot at a time (a session advisory
//! lock); others stand by.
//!
//! What stays with triggers: relation triggers (related tables are few columns of small
//! rows), and writers' trace ids (`benalsam.traceparent` is a session setting the WAL does
//! not carry).

mod changes;
mod pgoutput;
mod setup;

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::config::DatabaseUrl;
use crate::error::{Error, Result};
use crate::event_type::EventType;
use crate::ops::events::{Event, Recorder, count_error};
use crate::ops::{CountsErrors, Live, Metrics};
use changes::Rows;
use pgoutput::{lsn_of, lsn_text};

pub(crate) use setup::{check, ensure_not_captured, prepare, switch_over, validate_slot};

/// How long an idle capture waits before it looks at the slot again: the most a change
/// waits before it becomes a job, 25 ms on average.
const POLL: Duration = Duration::from_millis(50);
/// Rows of the plugin's answer per peek (a transaction is never split: a peek ends after the
/// commit that crosses it).
const PEEK_ROWS: i64 = 20_000;
/// How long a standby bridge waits before it asks for the slot again, and a failed capture
/// before it reconnects.
const RETRY: Duration = Duration::from_secs(1);

/// What the capture has done.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct CaptureStatus {
    /// Whether this bridge holds the slot (another bridge may, while this one stands by).
    pub(crate) capturing: bool,
    /// Jobs written from the WAL.
    pub(crate) jobs: u64,
    /// Changes left out because their key was NULL.
    pub(crate) keyless: u64,
    /// Bytes of WAL between the position and the flushed WAL at the last look.
    pub(crate) behind: u64,
    /// When it last looked at the slot without an error.
    pub(crate) last_look: Option<SystemTime>,
    pub(crate) errors: u64,
    pub(crate) last_error: Option<(SystemTime, String)>,
}

impl CountsErrors for CaptureStatus {
    fn error_fields(&mut self) -> (&mut u64, &mut Option<(SystemTime, String)>) {
        (&mut self.errors, &mut self.last_error)
    }
}

enum Captured {
    Holding(bool),
    Looked {
        jobs: usize,
        keyless: usize,
        behind: u64,
    },
    Failed(Error),
}

impl Event for Captured {
    type Status = CaptureStatus;
    type Metrics = Counter;

    fn apply(self, s: &mut CaptureStatus, jobs: &Counter) {
        match self {
            Captured::Holding(capturing) => s.capturing = capturing,
            Captured::Looked {
                jobs: n,
                keyless,
                behind,
            } => {
                jobs.inc_by(n as u64);
                s.jobs += n as u64;
                s.keyless += keyless as u64;
                s.behind = behind;
                s.last_look = Some(SystemTime::now());
            }
            Captured::Failed(error) => {
                s.capturing = false;
                count_error(s, error);
            }
        }
    }
}

/// One event type's table as the WAL names it, and how its jobs are written.
#[derive(Debug, Clone)]
struct Target {
    schema: String,
    table: String,
    jobs: String,
    key: String,
    ignore: Vec<String>,
}

/// Reads the slot and writes its changes as jobs, until shutdown.
#[derive(Debug)]
pub(crate) struct Capture {
    url: DatabaseUrl,
    schema: String,
    slot: String,
    channel: String,
    targets: Vec<Target>,
    recorder: Recorder<CaptureStatus, Counter>,
}

impl Capture {
    /// A capture of `slot` for `event_types`, writing into the outbox in `schema`.
    pub(crate) fn new(
        url: &DatabaseUrl,
        schema: &str,
        slot: &str,
        channel: &str,
        event_types: &[EventType],
    ) -> Self {
        let targets = event_types
            .iter()
            .map(|t| {
                let (table_schema, table) = t.split_table();
                Target {
                    schema: table_schema.unwrap_or(schema).to_owned(),
                    table: table.to_owned(),
                    jobs: t.job_table().to_owned(),
                    key: t.key.clone(),
                    ignore: t.ignore.clone(),
                }
            })
            .collect();
        Self {
            url: url.clone(),
            schema: schema.to_owned(),
            slot: slot.to_owned(),
            channel: channel.to_owned(),
            targets,
            recorder: Recorder::default(),
        }
    }

    /// Counts captured jobs in `metrics` (`benalsam_capture_jobs_total`).
    pub(crate) fn with_metrics(self, metrics: &Metrics) -> Self {
        metrics.register(
            "capture_jobs",
            "Jobs written from the WAL",
            None,
            self.recorder.metrics().clone(),
        );
        self
    }

    /// The live status, for health checks.
    pub(crate) fn status(&self) -> Live<CaptureStatus> {
        self.recorder.status().clone()
    }

    /// Captures until `shutdown`, reconnecting after any error.
    pub(crate) async fn run(self, shutdown: CancellationToken) {
        loop {
            let error = match self.session(&shutdown).await {
                Ok(()) => return,
                Err(error) => error,
            };
            tracing::warn!(%error, slot = %self.slot, "WAL capture failed; trying again");
            self.recorder.record(Captured::Failed(error));
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(RETRY) => {}
            }
        }
    }

    /// One connection's capture: the slot's lock, then looks until shutdown.
    async fn session(&self, shutdown: &CancellationToken) -> Result<()> {
        let mut client = crate::connect::postgres_as(&self.url, "benalsam-bridge capture").await?;
        let fail = |what: &'static str| move |e| Error::postgres(what, e);
        loop {
            let held: bool = client
                .query_one(
                    "SELECT pg_try_advisory_lock(hashtext('benalsam_capture'), hashtext($1))",
                    &[&self.slot],
                )
                .await
                .map_err(fail("asking for the capture's lock"))?
                .get(0);
            if held {
                break;
            }
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(RETRY) => {}
            }
        }
        self.recorder.record(Captured::Holding(true));
        tracing::info!(slot = %self.slot, "capturing changes from the WAL");
        let row = client
            .query_one(
                &format!(
                    "SELECT c.position::text, s.confirmed_flush_lsn::text
                       FROM \"{}\".benalsam_capture c
                       LEFT JOIN pg_replication_slots s ON s.slot_name = c.slot
                      WHERE c.slot = $1",
                    self.schema
                ),
                &[&self.slot],
            )
            .await
            .map_err(fail(
                "reading the capture's position (was migrate run with the slot?)",
            ))?;
        let lsn = |i| -> Result<u64> {
            row.get::<_, Option<&str>>(i)
                .and_then(lsn_of)
                .ok_or_else(|| Error::capture(&self.slot, "the slot does not exist; run migrate"))
        };
        let mut at = Position {
            written: lsn(0)?,
            advanced: lsn(1)?,
        };
        loop {
            let more = self.look(&mut client, &mut at).await?;
            if shutdown.is_cancelled() {
                return Ok(());
            }
            if !more {
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    () = tokio::time::sleep(POLL) => {}
                }
            }
        }
    }

    /// Peeks at the slot up to the flushed WAL, writes the jobs of what committed after the
    /// position, then advances the slot. True when the peek stopped short (more is waiting).
    async fn look(&self, client: &mut Client, at: &mut Position) -> Result<bool> {
        let fail = |what: &'static str| move |e| Error::postgres(what, e);
        let flushed: String = client
            .query_one("SELECT pg_current_wal_flush_lsn()::text", &[])
            .await
            .map_err(fail("reading the flushed WAL position"))?
            .get(0);
        let flushed = lsn_of(&flushed)
            .ok_or_else(|| Error::capture(&self.slot, format!("a WAL position {flushed}")))?;
        let peeked = client
            .query(
                "SELECT data FROM pg_logical_slot_peek_binary_changes($1::text::name, $2::text::pg_lsn, $3::bigint::int4,
                         'proto_version', '1', 'publication_names', $1::text)",
                &[&self.slot, &lsn_text(flushed), &PEEK_ROWS],
            )
            .await
            .map_err(fail("reading the replication slot"))?;
        let short = peeked.len() as i64 >= PEEK_ROWS;
        let transactions = changes::transactions(
            peeked
                .iter()
                .map(|row| pgoutput::parse(row.get::<_, &[u8]>(0))),
        )
        .map_err(|reason| Error::capture(&self.slot, reason))?;
        let upto = match transactions.last() {
            Some(last) if short => last.end_lsn,
            _ => flushed,
        };
        let fresh: Vec<_> = transactions
            .iter()
            .filter(|t| t.end_lsn > at.written)
            .collect();
        let (mut jobs, mut keyless) = (0, 0);
        if !fresh.is_empty() {
            let rows = self.rows(client, &fresh).await?;
            keyless = rows.iter().map(|(_, r)| r.keyless).sum();
            jobs = self.write(client, &rows, upto).await?;
            at.written = upto;
        }
        if upto > at.advanced {
            client
                .execute(
                    "SELECT pg_replication_slot_advance($1, $2::text::pg_lsn)",
                    &[&self.slot, &lsn_text(upto)],
                )
                .await
                .map_err(fail("advancing the replication slot"))?;
            at.advanced = upto;
        }
        if keyless > 0 {
            tracing::warn!(slot = %self.slot, keyless, "changes whose key column was NULL were left out");
        }
        self.recorder.record(Captured::Looked {
            jobs,
            keyless,
            behind: flushed.saturating_sub(upto),
        });
        Ok(short)
    }

    /// The job rows of `transactions`, per target that has any.
    async fn rows(
        &self,
        client: &Client,
        transactions: &[&changes::Transaction],
    ) -> Result<Vec<(&Target, Rows)>> {
        let mut attributes: HashMap<(&str, &str), Vec<String>> = HashMap::new();
        let mut rows: Vec<(&Target, Rows)> = Vec::new();
        for target in &self.targets {
            let mut these = Rows::default();
            for transaction in transactions {
                for change in &transaction.changes {
                    let relation = &change.relation;
                    if relation.schema != target.schema || relation.name != target.table {
                        continue;
                    }
                    let key = (target.schema.as_str(), target.table.as_str());
                    let columns = match attributes.entry(key) {
                        Entry::Occupied(known) => known.into_mut(),
                        Entry::Vacant(new) => {
                            new.insert(columns_of(client, &target.schema, &target.table).await?)
                        }
                    };
                    these
                        .add(change, &target.key, columns, transaction.commit_time)
                        .map_err(|reason| Error::capture(&self.slot, reason))?;
                }
            }
            if !these.is_empty() || these.keyless > 0 {
                rows.push((target, these));
            }
        }
        Ok(rows)
    }

    /// Writes the jobs, the position and a NOTIFY in one transaction; the jobs written.
    async fn write(
        &self,
        client: &mut Client,
        rows: &[(&Target, Rows)],
        upto: u64,
    ) -> Result<usize> {
        let fail = |what: &'static str| move |e| Error::postgres(what, e);
        let schema = &self.schema;
        let tx = client
            .transaction()
            .await
            .map_err(fail("starting the capture's transaction"))?;
        let mut written = 0;
        for (target, rows) in rows.iter().filter(|(_, r)| !r.is_empty()) {
            let sql = insert_sql(schema, &target.schema, &target.table);
            let count: i64 = tx
                .query_one(
                    &sql,
                    &[
                        &rows.operations,
                        &rows.new,
                        &rows.old,
                        &rows.committed,
                        &target.jobs,
                        &target.key,
                        &target.ignore,
                    ],
                )
                .await
                .map_err(|e| Error::postgres(format!("writing the jobs of {}", target.jobs), e))?
                .get(0);
            written += count as usize;
        }
        tx.execute(
            &format!(
                "UPDATE \"{schema}\".benalsam_capture
                    SET position = $2::text::pg_lsn, updated_at = now() WHERE slot = $1"
            ),
            &[&self.slot, &lsn_text(upto)],
        )
        .await
        .map_err(fail("recording the capture's position"))?;
        if written > 0 {
            tx.execute("SELECT pg_notify($1, '')", &[&self.channel])
                .await
                .map_err(fail("waking the bridges"))?;
        }
        tx.commit()
            .await
            .map_err(fail("committing the captured jobs"))?;
        Ok(written)
    }
}

/// Where the capture stands: what it wrote (in the jobs' transactions) and how far it moved
/// the slot (after them).
struct Position {
    written: u64,
    advanced: u64,
}

/// The table's columns today, in order.
async fn columns_of(client: &Client, schema: &str, table: &str) -> Result<Vec<String>> {
    let rows = client
        .query(
            "SELECT attname::text FROM pg_attribute
              WHERE attrelid = to_regclass(format('%I.%I', $1::text, $2::text))
                AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            &[&schema, &table],
        )
        .await
        .map_err(|e| Error::postgres(format!("reading the columns of {schema}.{table}"), e))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// The job insert of one event type: the record literals become the table's type and its
/// `to_jsonb`, as the trigger builds `change_data`; an UPDATE that changed only ignored
/// columns writes nothing; a TRUNCATE job also moves the table's truncation mark. Ids follow
/// the rows' order, which is commit order.
fn insert_sql(outbox: &str, schema: &str, table: &str) -> String {
    format!(
        "WITH c AS (
             SELECT u.ord, u.op, u.at,
                    to_jsonb(CAST(u.new_row AS \"{schema}\".\"{table}\")) AS n,
                    to_jsonb(CAST(u.old_row AS \"{schema}\".\"{table}\")) AS o
               FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[])
                    WITH ORDINALITY AS u(op, new_row, old_row, at, ord)),
         ins AS (
             INSERT INTO \"{outbox}\".elasticsearch_sync_queue
                    (table_name, operation, record_id, change_data, created_at)
             SELECT $5, c.op,
                    CASE c.op WHEN 'TRUNCATE' THEN '*' ELSE coalesce(c.n, c.o) ->> $6 END,
                    CASE c.op WHEN 'INSERT' THEN c.n WHEN 'DELETE' THEN c.o
                              WHEN 'UPDATE' THEN jsonb_build_object('old', c.o, 'new', c.n)
                              ELSE '{{}}' END,
                    timestamptz '2000-01-01 00:00:00+00' + c.at * interval '1 microsecond'
               FROM c
              WHERE c.op <> 'UPDATE' OR (c.o - $7::text[]) <> (c.n - $7::text[])
              ORDER BY c.ord
             RETURNING id, operation),
         truncated AS (
             INSERT INTO \"{outbox}\".benalsam_truncations (table_name, job_id)
             SELECT $5, max(id) FROM ins WHERE operation = 'TRUNCATE' HAVING count(*) > 0
             ON CONFLICT (table_name)
             DO UPDATE SET job_id = greatest(benalsam_truncations.job_id, EXCLUDED.job_id))
         SELECT count(*) FROM ins"
    )
}
