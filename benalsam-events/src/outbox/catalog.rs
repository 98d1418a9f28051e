//! Relations against the database's catalog: the tables and columns a relation names exist,
//! and joined columns have the same types. Here, beside the migrations that call it, because
//! `migrate` checks relations before it attaches their triggers.

use std::collections::HashMap;

use tokio_postgres::GenericClient;

use crate::event_type::{EventType, RelationKind};
use crate::{error::Error, error::Result};

/// Checks every relation of `event_types` against the database's catalog: the tables and
/// columns exist and the joined columns have the same types. The error names where the
/// relation was declared and the key.
pub(crate) async fn check_catalog(
    client: &impl GenericClient,
    schema: &str,
    event_types: &[EventType],
) -> Result<()> {
    for event_type in event_types {
        if event_type.relations.is_empty() {
            continue;
        }
        let document = columns_of(client, schema, &event_type.table).await?;
        for chain in crate::event_type::chains(&event_type.relations) {
            // A relation of a relation joins the table of the relation above it.
            let (relation, above_table, own) = match chain.as_slice() {
                [relation] => (*relation, event_type.table.as_str(), document.clone()),
                [.., above, relation] => (
                    *relation,
                    above.table.as_str(),
                    columns_of(client, schema, &above.table).await?,
                ),
                [] => continue,
            };
            let refuse = |key: &str, why: String| {
                Err(Error::config(
                    "BENALSAM_CONFIG",
                    format!("{}: {why}", relation.at(&event_type.name, key)),
                ))
            };
            let theirs = columns_of(client, schema, &relation.table).await?;
            if theirs.is_empty() {
                return refuse("table", format!("table {} does not exist", relation.table));
            }
            let (local_key, related_key) = match relation.kind {
                RelationKind::Parent => ("foreign_key", "references"),
                _ => ("references", "foreign_key"),
            };
            for (local, related) in relation.local_columns.iter().zip(&relation.related_columns) {
                let Some(local_type) = own.get(local) else {
                    return refuse(
                        local_key,
                        format!("table {above_table} has no column {local}"),
                    );
                };
                let Some(related_type) = theirs.get(related) else {
                    return refuse(
                        related_key,
                        format!("table {} has no column {related}", relation.table),
                    );
                };
                if local_type != related_type {
                    return refuse(
                        local_key,
                        format!(
                            "{above_table}.{local} is {local_type} but {}.{related} is {related_type}; joined columns must have the same type",
                            relation.table
                        ),
                    );
                }
            }
            for column in relation.columns() {
                if !theirs.contains_key(&column) {
                    return refuse(
                        "fields",
                        format!("table {} has no column {column}", relation.table),
                    );
                }
            }
        }
    }
    Ok(())
}

/// The columns of `table` with their types, without modifiers (`varchar(20)` joins
/// `varchar(10)` as PostgreSQL allows); empty when it does not exist.
async fn columns_of(
    client: &impl GenericClient,
    schema: &str,
    table: &str,
) -> Result<HashMap<String, String>> {
    let (table_schema, name) = table.split_once('.').unwrap_or((schema, table));
    let rows = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, NULL)
               FROM pg_attribute a
               JOIN pg_class c ON c.oid = a.attrelid
               JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')
                AND a.attnum > 0 AND NOT a.attisdropped",
            &[&table_schema, &name],
        )
        .await
        .map_err(|e| Error::postgres(format!("reading the columns of {table}"), e))?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}
