//! The sync triggers on the event types' own tables: attaching them (per statement on a
//! plain table, per row on a partitioned or inherited one), and those the configuration does
//! not declare, found at `migrate` and reported, never dropped.
//!
//! Each event type on a table has its sync triggers, named after its job name
//! (`benalsam_sync_insert`, or `benalsam_sync_insert:<jobs_as>`, and so on). A trigger that
//! no event type of this configuration declares is either another deployment's (bridges with
//! different event types on one database, each migrating with its own) or left behind (an event type
//! removed from a shared table, a `jobs_as` given to the event type that had none), recording
//! jobs that nothing claims. `migrate` cannot tell the two apart, so it drops nothing: it
//! warns with the trigger, its job name and the jobs of it still waiting, and the report
//! lists them for the operator to drop once those jobs are done.

use tokio_postgres::Transaction;

use crate::event_type::{EventType, sync_trigger};
use crate::{error::Error, error::Result};

/// Attaches the sync triggers and the truncation trigger to the table of `event_type`
/// (checked to exist), named after its job name: each event type on a table has its own,
/// recording its own jobs. A plain table gets the three statement triggers of migration 9
/// (one job insert and at most one NOTIFY per statement) and loses the row trigger an earlier
/// `migrate` attached, in this transaction, so no change is recorded twice or missed. A
/// partitioned or inherited table keeps the row trigger: a statement trigger fires only for
/// statements that name its own table and is not cloned to new partitions.
pub(super) async fn attach(
    tx: &Transaction<'_>,
    schema: &str,
    channel: &str,
    event_type: &EventType,
) -> Result<()> {
    use crate::event_type::sync_trigger::{DELETE, INSERT, ROWS, TRUNCATE, UPDATE};
    let (table_schema, table) = event_type.split_table();
    let table_schema = table_schema.unwrap_or(schema);
    // Every piece was validated as a plain identifier, so quoting cannot go wrong.
    let target = format!("\"{table_schema}\".\"{table}\"");
    let fail = |e| Error::postgres(format!("attaching the sync triggers to {target}"), e);
    let per_row: bool = tx
        .query_one(
            "SELECT c.relkind = 'p' OR EXISTS (SELECT FROM pg_inherits i
                                                WHERE c.oid IN (i.inhrelid, i.inhparent))
               FROM pg_class c WHERE c.oid = to_regclass(format('%I.%I', $1::text, $2::text))",
            &[&table_schema, &table],
        )
        .await
        .map_err(fail)?
        .get(0);
    let mut options = event_type.trigger_options(channel);
    if per_row && event_type.jobs_as.is_none() {
        // A row trigger on a partitioned table fires as the partition the row is in; without
        // `as=` its jobs would be named after the partition, which nothing claims.
        let jobs = if table_schema == schema {
            table.to_owned()
        } else {
            format!("{table_schema}.{table}")
        };
        options.push(format!("as={jobs}"));
    }
    let options = options
        .iter()
        .map(|o| format!("'{o}'"))
        .collect::<Vec<_>>()
        .join(", ");
    let name = |base| event_type.sync_trigger(base);
    let (rows, truncate) = (name(ROWS), name(TRUNCATE));
    let (insert, update, delete) = (name(INSERT), name(UPDATE), name(DELETE));
    let by_row = format!("\"{schema}\".add_to_sync_queue({options})");
    let by_statement = format!("\"{schema}\".add_to_sync_queue_statement({options})");
    let changes = if per_row {
        format!(
            "CREATE OR REPLACE TRIGGER \"{rows}\" AFTER INSERT OR UPDATE OR DELETE ON {target}
                 FOR EACH ROW EXECUTE FUNCTION {by_row};
             DROP TRIGGER IF EXISTS \"{insert}\" ON {target};
             DROP TRIGGER IF EXISTS \"{update}\" ON {target};
             DROP TRIGGER IF EXISTS \"{delete}\" ON {target};"
        )
    } else {
        format!(
            "CREATE OR REPLACE TRIGGER \"{insert}\" AFTER INSERT ON {target}
                 REFERENCING NEW TABLE AS new_rows
                 FOR EACH STATEMENT EXECUTE FUNCTION {by_statement};
             CREATE OR REPLACE TRIGGER \"{update}\" AFTER UPDATE ON {target}
                 REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
                 FOR EACH STATEMENT EXECUTE FUNCTION {by_statement};
             CREATE OR REPLACE TRIGGER \"{delete}\" AFTER DELETE ON {target}
                 REFERENCING OLD TABLE AS old_rows
                 FOR EACH STATEMENT EXECUTE FUNCTION {by_statement};
             DROP TRIGGER IF EXISTS \"{rows}\" ON {target};"
        )
    };
    tx.batch_execute(&format!(
        "{changes}
         CREATE OR REPLACE TRIGGER \"{truncate}\" AFTER TRUNCATE ON {target}
             FOR EACH STATEMENT EXECUTE FUNCTION {by_row};"
    ))
    .await
    .map_err(fail)
}

/// The sync triggers on the tables of `event_types` that none of them declares, each as
/// `schema.table.trigger (jobs <name>, <n> waiting)`.
pub(super) async fn undeclared(
    tx: &Transaction<'_>,
    schema: &str,
    event_types: &[EventType],
) -> Result<Vec<String>> {
    let fail = |e| Error::postgres("looking for sync triggers not declared", e);
    let functions = [
        format!("\"{schema}\".add_to_sync_queue()"),
        format!("\"{schema}\".add_to_sync_queue_statement()"),
    ];
    let bases = sync_trigger::ALL.map(str::to_owned);
    let mut removed = Vec::new();
    for (table_schema, table) in crate::event_type::tables_of(schema, event_types) {
        let declared: Vec<String> = event_types
            .iter()
            .filter(|t| {
                let (s, bare) = t.split_table();
                s.unwrap_or(schema) == table_schema && bare == table
            })
            .flat_map(|t| sync_trigger::ALL.map(|base| t.sync_trigger(base)))
            .collect();
        let rows = tx
            .query(
                "SELECT t.tgname::text, encode(t.tgargs, 'escape')
                   FROM pg_trigger t
                  WHERE NOT t.tgisinternal
                    AND t.tgfoid IN (SELECT to_regprocedure(f) FROM unnest($1::text[]) f)
                    AND t.tgrelid = to_regclass(format('%I.%I', $2::text, $3::text))
                    AND split_part(t.tgname, ':', 1) = ANY ($4::text[])
                  ORDER BY 1",
                &[
                    &functions.as_slice(),
                    &table_schema,
                    &table,
                    &bases.as_slice(),
                ],
            )
            .await
            .map_err(fail)?;
        for row in rows {
            let (name, args): (String, String) = (row.get(0), row.get(1));
            if declared.contains(&name) {
                continue;
            }
            let jobs = jobs_of(&args, schema, table_schema, table);
            let waiting: i64 = tx
                .query_one(
                    "SELECT count(*) FROM elasticsearch_sync_queue
                      WHERE table_name = $1 AND status IN ('pending', 'processing', 'sent', 'failed')",
                    &[&jobs],
                )
                .await
                .map_err(fail)?
                .get(0);
            tracing::warn!(trigger = %name, table = %format!("{table_schema}.{table}"), jobs = %jobs, waiting,
                "a sync trigger that no configured event type declares records jobs nothing here claims; \
                 if no other deployment uses it, drop it once its jobs are done \
                 (DROP TRIGGER \"{name}\" ON \"{table_schema}\".\"{table}\")");
            removed.push(format!(
                "{table_schema}.{table}.{name} (jobs {jobs}, {waiting} waiting)"
            ));
        }
    }
    Ok(removed)
}

/// The name a trigger with arguments `args` (as `encode(tgargs, 'escape')` shows them)
/// records its jobs under: `as=`, else the table as the trigger names it (bare in the
/// outbox's `schema`).
fn jobs_of(args: &str, schema: &str, table_schema: &str, table: &str) -> String {
    match args.split("\\000").find_map(|a| a.strip_prefix("as=")) {
        Some(jobs) => jobs.to_owned(),
        None if table_schema == schema => table.to_owned(),
        None => format!("{table_schema}.{table}"),
    }
}
