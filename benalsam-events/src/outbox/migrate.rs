//! Versioned SQL migrations, applied once each, and the sync trigger on each event type's
//! table.
//!
//! The SQL lives in the repository's `db/` folder (the crate's `db/` links there, so the
//! published crate carries it) and is compiled into the library, so a
//! binary always carries the schema it was built for. It holds only what the library owns:
//! the job table, the trigger function, the progress of backfills, the busy marks of bridges
//! (adaptive NOTIFY). [`migrate`] applies the
//! missing migrations in order, in one transaction, under an advisory lock (several processes
//! starting at once migrate once), and records each in `benalsam_schema_migrations` with a
//! checksum: editing a migration that a database already has is refused. In the same
//! transaction it checks every table and column the event types name, then attaches the
//! trigger to every event type's table with the event type's options (idempotent: `CREATE OR
//! REPLACE TRIGGER`). All or nothing: one mistake commits nothing.

use tokio_postgres::{Client, GenericClient, Transaction};

use crate::config::validate_schema;
use crate::error::Kind;
use crate::event_type::{relation_trigger_name, relation_truncate_trigger_name};
use crate::outbox::OutboxConfig;
use crate::{error::Error, error::Result, event_type::EventType};

/// One migration: a version, the file it came from and its SQL.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Migration {
    /// Increasing version number.
    pub(crate) version: i32,
    /// File name in `db/`.
    pub(crate) name: &'static str,
    /// The SQL, run as one batch.
    pub(crate) sql: &'static str,
}

macro_rules! migration {
    ($version:literal, $file:literal) => {
        Migration {
            version: $version,
            name: $file,
            sql: include_str!(concat!("../../db/", $file)),
        }
    };
}

/// Every migration of this build, in order.
pub(crate) const MIGRATIONS: &[Migration] = &[
    migration!(1, "0001_sync_queue.sql"),
    migration!(2, "0002_sync_trigger.sql"),
    migration!(3, "0003_backfill_progress.sql"),
    migration!(4, "0004_adaptive_notify.sql"),
    migration!(5, "0005_queue_fillfactor.sql"),
    migration!(6, "0006_relations.sql"),
    migration!(7, "0007_trigger_security_definer.sql"),
    migration!(8, "0008_reindex.sql"),
    migration!(9, "0009_statement_sync_trigger.sql"),
    migration!(10, "0010_wal_capture.sql"),
];

/// What [`OutboxConfig::migrate`](super::OutboxConfig::migrate) did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct MigrationReport {
    /// Versions applied by this call, in order.
    pub applied: Vec<i32>,
    /// Versions that were already there.
    pub already_applied: Vec<i32>,
    /// Tables that have the sync trigger now (with WAL capture, the related tables only:
    /// the event types' own tables are captured).
    pub triggers: Vec<String>,
    /// Relation triggers dropped because the configuration no longer declares them
    /// (`schema.table.trigger`), with the jobs of removed relations that waited.
    pub removed_triggers: Vec<String>,
    /// Sync triggers on the event types' tables that none of them declares (another
    /// deployment's, or left behind when an event type left a shared table or got a job
    /// name of its own), with the jobs of each still waiting: left in place, see
    /// docs/relations.md ("One table, several event types").
    pub undeclared_triggers: Vec<String>,
}

/// Applies the missing migrations to the outbox's schema (created if missing) and attaches
/// the sync trigger to the table of each of `event_types`.
///
/// All or nothing, in one transaction: every table and column the event types name is
/// checked against the catalog before anything is attached, and any mistake (a missing
/// table, a column that does not exist, naming the file, the line and the key) rolls back
/// the migrations and every trigger with it. An operator who fixes the file and runs it
/// again starts from where the database was, never from half a migration.
///
/// The tables and the trigger function are created in the schema; the function keeps writing
/// to it whatever `search_path` the application uses. The triggers wake bridges on the
/// outbox's `notify_channel`.
pub(crate) async fn migrate(
    client: &mut Client,
    outbox: &OutboxConfig,
    event_types: &[EventType],
) -> Result<MigrationReport> {
    let schema = validate_schema(&outbox.schema)?;
    crate::config::validate_identifier("OutboxConfig::notify_channel", &outbox.notify_channel)?;
    for event_type in event_types {
        event_type.validate()?;
    }
    crate::event_type::validate_all(event_types)?;
    let tx = client
        .transaction()
        .await
        .map_err(|e| Error::postgres("starting the migration transaction", e))?;
    prepare(&tx, schema).await?;
    let already_applied = already_applied(&tx, schema).await?;
    let mut report = MigrationReport {
        applied: apply(&tx, &already_applied).await?,
        already_applied,
        triggers: Vec::new(),
        removed_triggers: Vec::new(),
        undeclared_triggers: Vec::new(),
    };
    // Every name is checked before anything is attached; an error drops `tx`, which rolls
    // back the migrations too.
    check_names(&tx, schema, event_types).await?;
    report.undeclared_triggers = super::sync_triggers::undeclared(&tx, schema, event_types).await?;
    match &outbox.capture_slot {
        Some(slot) => super::capture::prepare(&tx, schema, slot, event_types).await?,
        None => super::capture::ensure_not_captured(&tx, schema).await?,
    }
    for event_type in event_types {
        if outbox.capture_slot.is_none() {
            super::sync_triggers::attach(&tx, schema, &outbox.notify_channel, event_type).await?;
            report.triggers.push(event_type.table.clone());
        }
        // Every relation of the tree has its trigger, relations of relations too.
        for chain in crate::event_type::chains(&event_type.relations) {
            let Some(relation) = chain.last() else {
                continue;
            };
            attach_relation(&tx, schema, &outbox.notify_channel, event_type, relation).await?;
            report.triggers.push(relation.table.clone());
        }
        report
            .removed_triggers
            .extend(drop_removed_relations(&tx, schema, event_type).await?);
    }
    tx.commit()
        .await
        .map_err(|e| Error::postgres("committing migrations", e))?;
    if let Some(slot) = &outbox.capture_slot {
        super::capture::switch_over(client, schema, slot, event_types).await?;
    }
    if !report.applied.is_empty() {
        tracing::info!(schema, applied = ?report.applied, "migrations applied");
    }
    Ok(report)
}

/// Takes the migration lock of `schema` (one migrator at a time; it ends with the
/// transaction) and creates the schema and the table of applied migrations.
async fn prepare(tx: &Transaction<'_>, schema: &str) -> Result<()> {
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('benalsam_migrate'), hashtext($1))",
        &[&schema],
    )
    .await
    .map_err(|e| Error::postgres("taking the migration lock", e))?;
    tx.batch_execute(&format!(
        "SET LOCAL client_min_messages = warning;
         CREATE SCHEMA IF NOT EXISTS \"{schema}\";
         SET LOCAL search_path TO \"{schema}\";
         CREATE TABLE IF NOT EXISTS benalsam_schema_migrations (
             version    integer PRIMARY KEY,
             name       text NOT NULL,
             checksum   text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now()
         );"
    ))
    .await
    .map_err(|e| Error::postgres(format!("preparing schema {schema}"), e))
}

/// Applies the migrations not in `already_applied`, in order; the versions applied.
async fn apply(tx: &Transaction<'_>, already_applied: &[i32]) -> Result<Vec<i32>> {
    let mut applied = Vec::new();
    for migration in MIGRATIONS
        .iter()
        .filter(|m| !already_applied.contains(&m.version))
    {
        tx.batch_execute(migration.sql)
            .await
            .map_err(|e| Error::postgres(format!("applying migration {}", migration.name), e))?;
        tx.execute(
            "INSERT INTO benalsam_schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
            &[
                &migration.version,
                &migration.name,
                &checksum_of(migration.sql),
            ],
        )
        .await
        .map_err(|e| Error::postgres("recording a migration", e))?;
        applied.push(migration.version);
    }
    Ok(applied)
}

/// Checks every table and column `event_types` name against the catalog (bare tables in
/// `schema`): the columns, then the types of the joined columns.
async fn check_names(
    client: &impl GenericClient,
    schema: &str,
    event_types: &[EventType],
) -> Result<()> {
    crate::event_type::check_columns(client, schema, event_types).await?;
    super::check_catalog(client, schema, event_types).await
}

/// Attaches the relation's triggers to its table (checked to exist): one for its rows, one
/// for a TRUNCATE of it (one `TRUNCATE` job under the relation's job name, which the fan-out
/// turns into a rebuild of every document that could have joined a truncated row). Named
/// after the event type and the relation, so two event types' relations on one table keep
/// their own.
async fn attach_relation(
    tx: &Transaction<'_>,
    schema: &str,
    channel: &str,
    event_type: &EventType,
    relation: &crate::event_type::Relation,
) -> Result<()> {
    let (table_schema, table) = relation.split_table();
    let target = format!("\"{}\".\"{table}\"", table_schema.unwrap_or(schema));
    let options = relation
        .trigger_options(event_type.job_table(), channel, event_type.notify)
        .iter()
        .map(|o| format!("'{o}'"))
        .collect::<Vec<_>>()
        .join(", ");
    let name = relation_trigger_name(event_type, relation);
    let truncate = relation_truncate_trigger_name(event_type, relation);
    tx.batch_execute(&format!(
        "CREATE OR REPLACE TRIGGER \"{name}\"
             AFTER INSERT OR UPDATE OR DELETE ON {target}
             FOR EACH ROW EXECUTE FUNCTION \"{schema}\".add_to_sync_queue({options});
         CREATE OR REPLACE TRIGGER \"{truncate}\"
             AFTER TRUNCATE ON {target}
             FOR EACH STATEMENT EXECUTE FUNCTION \"{schema}\".add_to_sync_queue({options});"
    ))
    .await
    .map_err(|e| Error::postgres(format!("attaching the relation trigger to {target}"), e))
}

/// Drops the relation triggers of `event_type` that its relations no longer declare (a
/// relation removed, renamed or moved to another table): left in place, each would record
/// jobs that nothing claims. The waiting jobs of a relation that is gone are deleted with it.
async fn drop_removed_relations(
    tx: &Transaction<'_>,
    schema: &str,
    event_type: &EventType,
) -> Result<Vec<String>> {
    let fail = |e| Error::postgres("looking for relation triggers no longer declared", e);
    let function = format!("\"{schema}\".add_to_sync_queue()");
    let marker = format!("as={}#", event_type.job_table());
    let rows = tx
        .query(
            "SELECT t.tgname::text, n.nspname::text, c.relname::text, encode(t.tgargs, 'escape')
               FROM pg_trigger t
               JOIN pg_class c ON c.oid = t.tgrelid
               JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE NOT t.tgisinternal AND t.tgfoid = to_regprocedure($1)
                AND position($2 in encode(t.tgargs, 'escape')) > 0",
            &[&function, &marker],
        )
        .await
        .map_err(fail)?;
    let all: Vec<&crate::event_type::Relation> = crate::event_type::chains(&event_type.relations)
        .into_iter()
        .filter_map(|chain| chain.last().copied())
        .collect();
    let declared = |name: &str, table_schema: &str, table: &str| {
        all.iter().any(|r| {
            let (s, t) = r.split_table();
            (relation_trigger_name(event_type, r) == name
                || relation_truncate_trigger_name(event_type, r) == name)
                && s.unwrap_or(schema) == table_schema
                && t == table
        })
    };
    let mut removed = Vec::new();
    for row in rows {
        let (name, table_schema, table, args): (String, String, String, String) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        if declared(&name, &table_schema, &table) {
            continue;
        }
        tx.batch_execute(&format!(
            "DROP TRIGGER \"{name}\" ON \"{table_schema}\".\"{table}\""
        ))
        .await
        .map_err(fail)?;
        // Its jobs are `<table>#<relation>`: gone with the relation, unless the relation
        // only moved to another table.
        let job_table = args
            .split("\\000")
            .find_map(|a| a.strip_prefix("as="))
            .unwrap_or_default()
            .to_owned();
        let still = all
            .iter()
            .any(|r| r.job_table(event_type.job_table()) == job_table);
        if !job_table.is_empty() && !still {
            tx.execute(
                "DELETE FROM elasticsearch_sync_queue
                  WHERE table_name = $1 AND status IN ('pending', 'processing', 'failed')",
                &[&job_table],
            )
            .await
            .map_err(fail)?;
        }
        tracing::info!(trigger = %name, table = %format!("{table_schema}.{table}"), "relation trigger dropped: the configuration no longer declares it");
        removed.push(format!("{table_schema}.{table}.{name}"));
    }
    Ok(removed)
}

/// Checks, at the start of a binary, every table and column `event_types` name against the
/// catalog (bare tables in `schema`); the error names the file, the line and the key.
pub(crate) async fn check_tables(
    url: &crate::config::DatabaseUrl,
    schema: &str,
    event_types: &[EventType],
) -> Result<()> {
    let client = crate::connect::postgres_as(url, "benalsam-check").await?;
    check_names(&client, schema, event_types).await
}

/// The versions applied to `schema` before, each checked against this build's migrations.
async fn already_applied(tx: &tokio_postgres::Transaction<'_>, schema: &str) -> Result<Vec<i32>> {
    let rows = tx
        .query(
            "SELECT version, checksum FROM benalsam_schema_migrations ORDER BY version",
            &[],
        )
        .await
        .map_err(|e| Error::postgres("reading applied migrations", e))?;
    let mut versions = Vec::with_capacity(rows.len());
    for row in rows {
        let (version, checksum): (i32, String) = (row.get(0), row.get(1));
        let Some(known) = MIGRATIONS.iter().find(|m| m.version == version) else {
            return Err(Error::from(Kind::UnknownMigration {
                schema: schema.to_owned(),
                version,
            }));
        };
        if checksum != checksum_of(known.sql) {
            return Err(Error::from(Kind::MigrationChanged {
                version: known.version,
                name: known.name,
            }));
        }
        versions.push(version);
    }
    Ok(versions)
}

/// FNV-1a over the SQL text, as 16 hex digits: enough to notice an edited migration, and
/// computed the same way on every platform.
fn checksum_of(sql: &str) -> String {
    let hash = sql.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_increase_and_files_are_named_after_them() {
        for pair in MIGRATIONS.windows(2) {
            assert!(pair[0].version < pair[1].version);
        }
        for m in MIGRATIONS {
            assert!(
                m.name.starts_with(&format!("{:04}_", m.version)),
                "{}",
                m.name
            );
            assert!(!m.sql.trim().is_empty(), "{}", m.name);
        }
    }

    #[test]
    fn checksum_notices_an_edit() {
        assert_eq!(checksum_of("SELECT 1"), checksum_of("SELECT 1"));
        assert_ne!(checksum_of("SELECT 1"), checksum_of("SELECT 2"));
        assert_eq!(checksum_of("").len(), 16);
    }
}
