//! The sync triggers on the event types' own tables that the configuration does not
//! declare, found at `migrate` and reported, never dropped.
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
    let mut tables: Vec<(&str, &str)> = event_types
        .iter()
        .map(|t| {
            let (s, table) = t.split_table();
            (s.unwrap_or(schema), table)
        })
        .collect();
    tables.sort_unstable();
    tables.dedup();
    let mut removed = Vec::new();
    for (table_schema, table) in tables {
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
            // The name its jobs are recorded under: `as=`, else the table as the trigger
            // names it (bare in the outbox's schema).
            let jobs = args
                .split("\\000")
                .find_map(|a| a.strip_prefix("as="))
                .map_or_else(
                    || {
                        if table_schema == schema {
                            table.to_owned()
                        } else {
                            format!("{table_schema}.{table}")
                        }
                    },
                    str::to_owned,
                );
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
