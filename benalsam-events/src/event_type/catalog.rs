//! Every column an event type names, checked against the database's catalog at `migrate` and
//! at the start of both binaries, before anything is attached or consumed.
//!
//! A typo must stop start-up rather than run quietly: a `status_column` that does not exist
//! reads every row as "not searchable" and empties the index; an `ignore` entry that does not
//! exist makes every counter update a job; a `key` that does not exist fails every insert of
//! the application. The refusal names the file, the line and the key
//! (`listings.toml:7: event type "listings", status_column = "status": table public.listings
//! has no column "status" (columns: id, state, …)`); an event type built in code is named by
//! its name and the key.

use std::collections::BTreeSet;

use tokio_postgres::GenericClient;

use super::{Aggregate, EventType, FieldType, Relation, RelationKind};
use crate::{error::Error, error::Result};

/// The columns of one table, as the catalog has them.
struct Table {
    /// `schema.table`, for the messages.
    name: String,
    /// Its columns; `None`: the table does not exist.
    columns: Option<BTreeSet<String>>,
}

impl Table {
    /// Why `column` cannot be used (the table lacks it), if it cannot.
    fn lacks(&self, column: &str) -> Option<String> {
        let columns = self.columns.as_ref()?;
        if columns.contains(column) {
            return None;
        }
        // Enough to spot the right name; a wide table is cut short.
        const SHOWN: usize = 30;
        let mut list: Vec<&str> = columns.iter().map(String::as_str).take(SHOWN).collect();
        if columns.len() > SHOWN {
            list.push("…");
        }
        Some(format!(
            "table {} has no column {column:?} (columns: {})",
            self.name,
            list.join(", ")
        ))
    }

    /// What to say when it does not exist.
    fn missing(&self) -> String {
        format!(
            "table {} does not exist; create it (then run migrate again), or fix the name",
            self.name
        )
    }
}

/// Checks that the table of every event type and of each of its relations exists and has
/// every column the event type names (key, status_column, ignore, each field's column, geo
/// lat/lon; a relation's key, joined columns, order_by and fields). Bare table names are in
/// `schema`.
pub(crate) async fn check_columns(
    client: &impl GenericClient,
    schema: &str,
    event_types: &[EventType],
) -> Result<()> {
    for event_type in event_types {
        let (table_schema, table) = event_type.split_table();
        let own = read(client, table_schema.unwrap_or(schema), table).await?;
        let refuse = |key: &str, path: &str, why: String| {
            Error::config(
                "BENALSAM_CONFIG",
                format!("{}: {why}", event_type.at(key, path)),
            )
        };
        if own.columns.is_none() {
            return Err(refuse("table", "table", own.missing()));
        }
        for (key, path, column) in own_columns(event_type) {
            if let Some(why) = own.lacks(&column) {
                return Err(refuse(&format!("{key} = {column:?}"), &path, why));
            }
        }
        // A relation of a relation joins the table of the relation above it.
        for chain in super::chains(&event_type.relations) {
            match chain.as_slice() {
                [relation] => check_relation(client, schema, event_type, &own, relation).await?,
                [.., above, relation] => {
                    let (above_schema, above_table) = above.split_table();
                    let above = read(client, above_schema.unwrap_or(schema), above_table).await?;
                    check_relation(client, schema, event_type, &above, relation).await?;
                }
                [] => {}
            }
        }
    }
    Ok(())
}

/// The columns of its own table an event type names: (key as shown, line path, column).
fn own_columns(event_type: &EventType) -> Vec<(String, String, String)> {
    let mut named = vec![("key".to_owned(), "key".to_owned(), event_type.key.clone())];
    if let Some(status) = &event_type.status_column {
        named.push((
            "status_column".into(),
            "status_column".into(),
            status.clone(),
        ));
    }
    for column in &event_type.ignore {
        named.push(("ignore".into(), format!("ignore.{column}"), column.clone()));
    }
    // A custom builder reads the row itself: the spec's fields are not used.
    if event_type.builder.is_none() {
        for (name, field) in &event_type.document.fields {
            named.extend(field_columns(
                &format!("document.fields.{name}"),
                name,
                field,
            ));
        }
    }
    named
}

/// The columns a field reads, each with its key and line path under `path`.
fn field_columns(path: &str, name: &str, field: &super::Field) -> Vec<(String, String, String)> {
    match &field.kind {
        FieldType::GeoPoint { lat, lon } => vec![
            (format!("{path}.lat"), format!("{path}.lat"), lat.clone()),
            (format!("{path}.lon"), format!("{path}.lon"), lon.clone()),
        ],
        _ if field.column.is_empty() => {
            vec![(path.to_owned(), path.to_owned(), name.to_owned())]
        }
        _ => vec![(
            format!("{path}.column"),
            format!("{path}.column"),
            field.column.clone(),
        )],
    }
}

/// Checks one relation: its table, and every column it names on either side.
async fn check_relation(
    client: &impl GenericClient,
    schema: &str,
    event_type: &EventType,
    own: &Table,
    relation: &Relation,
) -> Result<()> {
    let refuse = |key: &str, path: &str, why: String| {
        Error::config(
            "BENALSAM_CONFIG",
            format!("{}: {why}", relation.at_line(&event_type.name, key, path)),
        )
    };
    let (table_schema, table) = relation.split_table();
    let theirs = read(client, table_schema.unwrap_or(schema), table).await?;
    if theirs.columns.is_none() {
        return Err(refuse("table", "table", theirs.missing()));
    }
    // foreign_key and references: the referencing side is the event type's table for a
    // parent, the related table for children.
    let (foreign_side, references_side) = match relation.kind {
        RelationKind::Parent => (own, &theirs),
        _ => (&theirs, own),
    };
    let mut named: Vec<(&Table, String, String, String)> = Vec::new();
    for (key, side, columns) in [
        ("foreign_key", foreign_side, relation.foreign_key()),
        ("references", references_side, relation.references()),
    ] {
        for column in columns {
            named.push((side, key.into(), format!("{key}.{column}"), column.clone()));
        }
    }
    named.push((&theirs, "key".into(), "key".into(), relation.key.clone()));
    if let RelationKind::Children {
        order_by: Some(order),
        ..
    } = &relation.kind
    {
        named.push((&theirs, "order_by".into(), "order_by".into(), order.clone()));
    }
    if let Some(filter) = &relation.filter {
        let column = filter.column.clone();
        named.push((
            &theirs,
            "where.column".into(),
            "where.column".into(),
            column,
        ));
    }
    if let RelationKind::Aggregate {
        function: Aggregate::Sum(column) | Aggregate::Min(column) | Aggregate::Max(column),
        ..
    } = &relation.kind
    {
        named.push((&theirs, "column".into(), "column".into(), column.clone()));
    }
    for (name, field) in &relation.fields {
        for (key, path, column) in field_columns(&format!("fields.{name}"), name, field) {
            named.push((&theirs, key, path, column));
        }
    }
    for (side, key, path, column) in named {
        if let Some(why) = side.lacks(&column) {
            return Err(refuse(&format!("{key} = {column:?}"), &path, why));
        }
    }
    Ok(())
}

/// The columns of `schema.table` (a plain table or a partitioned one).
async fn read(client: &impl GenericClient, schema: &str, table: &str) -> Result<Table> {
    let rows = client
        .query(
            "SELECT a.attname::text
               FROM pg_class c
               JOIN pg_namespace n ON n.oid = c.relnamespace
               LEFT JOIN pg_attribute a
                      ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
              WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
            &[&schema, &table],
        )
        .await
        .map_err(|e| Error::postgres(format!("reading the columns of {schema}.{table}"), e))?;
    let columns = (!rows.is_empty()).then(|| {
        rows.iter()
            .filter_map(|row| row.get::<_, Option<String>>(0))
            .collect()
    });
    Ok(Table {
        name: format!("{schema}.{table}"),
        columns,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_column_is_named_with_the_columns_there_are() {
        let table = |n: usize| Table {
            name: "public.listings".to_owned(),
            columns: Some((0..n).map(|i| format!("c{i:02}")).collect()),
        };
        assert_eq!(table(3).lacks("c01"), None);
        assert_eq!(
            table(3).lacks("status").as_deref(),
            Some("table public.listings has no column \"status\" (columns: c00, c01, c02)")
        );
        let wide = table(40).lacks("x").unwrap_or_default();
        assert!(
            wide.ends_with("c29, …)"),
            "a wide table is cut short: {wide}"
        );
        let gone = Table {
            name: "public.x".to_owned(),
            columns: None,
        };
        assert_eq!(gone.lacks("id"), None, "said by missing() instead");
        assert!(gone.missing().contains("does not exist"));
    }
}
