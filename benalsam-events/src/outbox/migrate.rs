//! Versioned SQL migrations, applied once each.
//!
//! The SQL lives in `db/` at the repository root and is compiled into the library, so a
//! binary always carries the schema it was built for. [`migrate`] applies the missing ones
//! in order, in one transaction, under an advisory lock (several processes starting at once
//! migrate once), and records each in `benalsam_schema_migrations` with a checksum: editing
//! a migration that a database already has is refused.

use tokio_postgres::Client;

use crate::config::validate_schema;
use crate::error::Kind;
use crate::{Error, Result};

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
            sql: include_str!(concat!("../../../db/", $file)),
        }
    };
}

/// Every migration of this build, in order.
pub(crate) const MIGRATIONS: &[Migration] = &[
    migration!(1, "0001_listings.sql"),
    migration!(2, "0002_sync_queue.sql"),
    migration!(3, "0003_sync_trigger.sql"),
    migration!(4, "0004_backfill_progress.sql"),
    migration!(5, "0005_trigger_notify_option.sql"),
];

/// What [`migrate`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationReport {
    /// Versions applied by this call, in order.
    pub applied: Vec<i32>,
    /// Versions that were already there.
    pub already_applied: Vec<i32>,
}

/// Applies the missing [`MIGRATIONS`] to `schema` (created if missing).
///
/// Tables, the trigger function and the trigger are created in `schema`; the trigger
/// function keeps writing to that schema whatever `search_path` the application uses.
pub async fn migrate(client: &mut Client, schema: &str) -> Result<MigrationReport> {
    let schema = validate_schema(schema)?;
    let tx = client
        .transaction()
        .await
        .map_err(|e| Error::postgres("starting the migration transaction", e))?;

    // One migrator per schema at a time; the lock ends with the transaction.
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
    .map_err(|e| Error::postgres(format!("preparing schema {schema}"), e))?;

    let mut report = MigrationReport {
        applied: Vec::new(),
        already_applied: already_applied(&tx, schema).await?,
    };
    for migration in MIGRATIONS
        .iter()
        .filter(|m| !report.already_applied.contains(&m.version))
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
        report.applied.push(migration.version);
    }

    tx.commit()
        .await
        .map_err(|e| Error::postgres("committing migrations", e))?;
    if !report.applied.is_empty() {
        tracing::info!(schema, applied = ?report.applied, "migrations applied");
    }
    Ok(report)
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
