//! What WAL capture needs of the database, set up by `migrate` (the bridge checks it at start,
//! `check.rs`).
//!
//! The switch from triggers is exactly once. `migrate` first commits the tables' `REPLICA
//! IDENTITY FULL` (an UPDATE's old row and a TOASTed value it kept are in the WAL only
//! then), the publication and the slot's row; then creates the slot; then, in one
//! transaction holding each table against writers, drops its sync triggers and moves the
//! capture's position to the WAL written so far. Every change committed before that
//! transaction took its lock has its trigger's job and ends before the position, so capture
//! skips it; every change after it has no trigger and ends after the position.

use tokio_postgres::{Client, GenericClient, Transaction};

use crate::error::{Error, Result};
use crate::event_type::{EventType, sync_trigger};

/// The setting every refusal names.
pub(super) const SETTING: &str = "OutboxConfig::capture_slot";

/// What to do with a table capture cannot follow.
pub(super) const TRIGGERS: &str = "WAL capture cannot follow it: record this outbox's jobs with triggers \
     (leave the setting unset; an outbox captured already goes back to triggers as \
     docs/database.md (\"WAL capture\") describes)";

/// Checks that `slot` can name a replication slot and a publication.
pub(crate) fn validate_slot(slot: &str) -> Result<()> {
    let valid = !slot.is_empty()
        && slot.len() <= 63
        && slot
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if valid {
        Ok(())
    } else {
        Err(Error::config(
            SETTING,
            format!("{slot:?} is not a replication slot name: 1 to 63 of a-z, 0-9 and _"),
        ))
    }
}

/// Refused: a server without logical WAL, naming the setting to change.
pub(super) async fn require_logical(client: &impl GenericClient) -> Result<()> {
    let level: String = client
        .query_one("SHOW wal_level", &[])
        .await
        .map_err(|e| Error::postgres("reading wal_level", e))?
        .get(0);
    if level == "logical" {
        return Ok(());
    }
    Err(Error::config(
        SETTING,
        format!(
            "PostgreSQL runs with wal_level = {level}; WAL capture needs wal_level = logical \
             (postgresql.conf, then a restart), or leave the setting unset to record jobs with triggers"
        ),
    ))
}

/// In `migrate`'s transaction: each table made capturable (refused when capture cannot
/// follow it exactly), listed in the publication named after `slot`, and the slot's row.
pub(crate) async fn prepare(
    tx: &Transaction<'_>,
    schema: &str,
    slot: &str,
    event_types: &[EventType],
) -> Result<()> {
    validate_slot(slot)?;
    require_logical(tx).await?;
    let fail = |e| Error::postgres("preparing the tables for WAL capture", e);
    refuse_another_slot(tx, schema, slot).await?;
    let mut listed = Vec::new();
    for (table_schema, table) in crate::event_type::tables_of(schema, event_types) {
        let row = tx
            .query_one(
                "SELECT c.relkind = 'r' AND NOT EXISTS (SELECT FROM pg_inherits i
                                                          WHERE c.oid IN (i.inhrelid, i.inhparent)),
                        EXISTS (SELECT FROM pg_attribute a WHERE a.attrelid = c.oid
                                   AND a.attgenerated <> '' AND NOT a.attisdropped)
                   FROM pg_class c WHERE c.oid = to_regclass(format('%I.%I', $1::text, $2::text))",
                &[&table_schema, &table],
            )
            .await
            .map_err(fail)?;
        let (plain, generated): (bool, bool) = (row.get(0), row.get(1));
        if !plain || generated {
            let why = if plain {
                "has generated columns, which pgoutput does not send"
            } else {
                "is partitioned or takes part in inheritance, whose changes the WAL names by partition"
            };
            return Err(Error::config(
                SETTING,
                format!("{table_schema}.{table} {why}; {TRIGGERS}"),
            ));
        }
        let target = format!("\"{table_schema}\".\"{table}\"");
        tx.batch_execute(&format!("ALTER TABLE {target} REPLICA IDENTITY FULL"))
            .await
            .map_err(fail)?;
        listed.push(target);
    }
    let exists = tx
        .query_opt("SELECT FROM pg_publication WHERE pubname = $1", &[&slot])
        .await
        .map_err(fail)?
        .is_some();
    let listed = listed.join(", ");
    let publication = if exists {
        format!("ALTER PUBLICATION \"{slot}\" SET TABLE {listed}")
    } else {
        format!(
            "CREATE PUBLICATION \"{slot}\" FOR TABLE {listed}
                 WITH (publish = 'insert, update, delete, truncate')"
        )
    };
    tx.batch_execute(&publication).await.map_err(fail)?;
    tx.execute(
        &format!(
            "INSERT INTO \"{schema}\".benalsam_capture (slot) VALUES ($1) ON CONFLICT DO NOTHING"
        ),
        &[&slot],
    )
    .await
    .map_err(fail)?;
    Ok(())
}

/// Refused: a second slot on an outbox captured through another, which would record every
/// change twice.
async fn refuse_another_slot(tx: &Transaction<'_>, schema: &str, slot: &str) -> Result<()> {
    let fail = |e| Error::postgres("looking for WAL captures", e);
    let others: Vec<String> = tx
        .query(
            &format!("SELECT slot FROM \"{schema}\".benalsam_capture WHERE slot <> $1 ORDER BY 1"),
            &[&slot],
        )
        .await
        .map_err(fail)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if let Some(other) = others.first() {
        return Err(Error::config(
            SETTING,
            format!(
                "the outbox in {schema} is captured through slot {other} already, and a second slot would \
                 record every change twice; keep {other}, or go back to triggers as docs/database.md \
                 (\"WAL capture\") describes before choosing another slot"
            ),
        ));
    }
    Ok(())
}

/// After `prepare` committed: the slot (created when missing), then the sync triggers of
/// the event types dropped and the position moved past the changes they recorded, in one
/// transaction. The triggers dropped, as `schema.table.trigger`.
pub(crate) async fn switch_over(
    client: &mut Client,
    schema: &str,
    slot: &str,
    event_types: &[EventType],
) -> Result<Vec<String>> {
    let fail = |what: &'static str| move |e| Error::postgres(what, e);
    create_slot(client, slot).await?;
    let tx = client
        .transaction()
        .await
        .map_err(fail("starting the switch to WAL capture"))?;
    let mut dropped = Vec::new();
    for event_type in event_types {
        let (table_schema, table) = event_type.split_table();
        let table_schema = table_schema.unwrap_or(schema);
        let target = format!("\"{table_schema}\".\"{table}\"");
        tx.batch_execute(&format!("LOCK TABLE {target} IN SHARE ROW EXCLUSIVE MODE"))
            .await
            .map_err(fail(
                "locking a table against writers to drop its sync triggers",
            ))?;
        let names: Vec<String> = sync_trigger::ALL
            .iter()
            .map(|base| event_type.sync_trigger(base))
            .collect();
        let present = tx
            .query(
                "SELECT tgname::text FROM pg_trigger
                  WHERE tgrelid = to_regclass(format('%I.%I', $1::text, $2::text))
                    AND tgname = ANY ($3::text[])",
                &[&table_schema, &table, &names],
            )
            .await
            .map_err(fail("looking for sync triggers"))?;
        for row in present {
            let name: String = row.get(0);
            tx.batch_execute(&format!("DROP TRIGGER \"{name}\" ON {target}"))
                .await
                .map_err(fail("dropping a sync trigger"))?;
            dropped.push(format!("{table_schema}.{table}.{name}"));
        }
    }
    if !dropped.is_empty() {
        tx.execute(
            &format!(
                "UPDATE \"{schema}\".benalsam_capture
                    SET position = greatest(position, pg_current_wal_lsn()), updated_at = now()
                  WHERE slot = $1"
            ),
            &[&slot],
        )
        .await
        .map_err(fail("recording where capture takes over"))?;
    }
    tx.commit()
        .await
        .map_err(fail("committing the switch to WAL capture"))?;
    if !dropped.is_empty() {
        tracing::info!(slot, triggers = ?dropped, "sync triggers dropped: the WAL records the changes now");
    }
    Ok(dropped)
}

/// The slot, created when missing; one of that name must be a `pgoutput` slot of this
/// database.
async fn create_slot(client: &Client, slot: &str) -> Result<()> {
    let fail = |what: &'static str| move |e| Error::postgres(what, e);
    let found = client
        .query_opt(
            "SELECT plugin::text, database::text = current_database()
               FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(fail("looking for the replication slot"))?;
    match found.map(|row| {
        (
            row.get::<_, Option<String>>(0),
            row.get::<_, Option<bool>>(1),
        )
    }) {
        None => {
            // Waits for the transactions running now to end (the slot's consistent point).
            client
                .execute(
                    "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                    &[&slot],
                )
                .await
                .map_err(fail(
                    "creating the replication slot (the role needs REPLICATION)",
                ))?;
            tracing::info!(slot, "replication slot created");
        }
        Some((Some(plugin), Some(true))) if plugin == "pgoutput" => {}
        Some(_) => {
            return Err(Error::config(
                SETTING,
                format!(
                    "replication slot {slot} exists but is not a pgoutput slot of this database; choose another name"
                ),
            ));
        }
    }
    Ok(())
}

/// In `migrate`'s transaction without a slot: refused while a capture is registered, whose
/// slot would go on capturing beside the triggers.
pub(crate) async fn ensure_not_captured(tx: &Transaction<'_>, schema: &str) -> Result<()> {
    let slots: Vec<String> = tx
        .query(
            &format!("SELECT slot FROM \"{schema}\".benalsam_capture ORDER BY 1"),
            &[],
        )
        .await
        .map_err(|e| Error::postgres("looking for WAL captures", e))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    match slots.first() {
        None => Ok(()),
        Some(slot) => Err(Error::config(
            SETTING,
            format!(
                "the outbox in {schema} is captured from the WAL through slot {slot}, and migrating without \
                 it would attach the triggers beside it (every change recorded twice); set it, or go back to \
                 triggers as docs/database.md (\"WAL capture\") describes"
            ),
        )),
    }
}
