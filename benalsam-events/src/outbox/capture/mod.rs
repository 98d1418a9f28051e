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
mod check;
mod pgoutput;
mod record;
mod setup;
mod write;

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::config::DatabaseUrl;
use crate::error::{Error, Result};
use crate::event_type::EventType;
use crate::ops::events::Recorder;
use crate::ops::{Live, Metrics};
use changes::Rows;
use pgoutput::{lsn_of, lsn_text};
use record::Captured;
use write::columns_of;

pub(crate) use check::{check, warn_if_captured};
pub(crate) use record::CaptureStatus;
pub(crate) use setup::{ensure_not_captured, prepare, switch_over, validate_slot};

/// How long an idle capture waits before it looks at the slot again: the most a change
/// waits before it becomes a job, 25 ms on average.
const POLL: Duration = Duration::from_millis(50);
/// Rows of the plugin's answer per peek (a transaction is never split: a peek ends after the
/// commit that crosses it).
const PEEK_ROWS: i64 = 5_000;
/// How often an idle capture moves its slot.
const ADVANCE_IDLE: Duration = Duration::from_secs(1);
/// How long a standby bridge waits before it asks for the slot again, and a failed capture
/// before it reconnects.
const RETRY: Duration = Duration::from_secs(1);

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
            moved: Instant::now(),
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
        // One round trip: the flushed WAL, and the slot's changes up to it (a row without
        // data when there are none).
        let peeked = client
            .query(
                "SELECT f.lsn::text, c.data
                   FROM (SELECT pg_current_wal_flush_lsn() AS lsn) f
                   LEFT JOIN LATERAL pg_logical_slot_peek_binary_changes($1::text::name, f.lsn,
                             $2::bigint::int4, 'proto_version', '1', 'publication_names', $1::text) c ON true",
                &[&self.slot, &PEEK_ROWS],
            )
            .await
            .map_err(fail("reading the replication slot"))?;
        let flushed: &str = peeked.first().map_or("", |row| row.get(0));
        let flushed = lsn_of(flushed)
            .ok_or_else(|| Error::capture(&self.slot, format!("a WAL position {flushed:?}")))?;
        let data: Vec<&[u8]> = peeked.iter().filter_map(|row| row.get(1)).collect();
        let short = data.len() as i64 >= PEEK_ROWS;
        let transactions = changes::transactions(data.into_iter().map(pgoutput::parse))
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
        // Moving the slot frees WAL and keeps the next peek short; while idle, once a second
        // is enough (the bridge's own writes move the flushed WAL at every look).
        let due = !fresh.is_empty() || short || at.moved.elapsed() >= ADVANCE_IDLE;
        if upto > at.advanced && due {
            client
                .execute(
                    "SELECT pg_replication_slot_advance($1, $2::text::pg_lsn)",
                    &[&self.slot, &lsn_text(upto)],
                )
                .await
                .map_err(fail("advancing the replication slot"))?;
            at.advanced = upto;
            at.moved = Instant::now();
        }
        if keyless > 0 {
            tracing::warn!(slot = %self.slot, keyless, "changes whose key column was NULL were left out (a trigger would have refused them): make the event type's key column NOT NULL, or key it on the primary key");
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
}

/// Where the capture stands: what it wrote (in the jobs' transactions) and how far it moved
/// the slot (after them).
struct Position {
    written: u64,
    advanced: u64,
    moved: Instant,
}
