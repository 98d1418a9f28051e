//! One row as the index would have it: the quickest way to debug an event-type file.
//!
//! [`Outbox::document`] reads the row (with its relations, as the consumer reads a joined
//! document) and builds what the consumer would write for it now: the document and the alias
//! it goes to, or the reason the index would not hold it (no such row, a status the policy
//! does not keep), or the reason it cannot become a document (its job would be
//! dead-lettered). It reads only: no job, no lock, no sequence value is taken.

use std::borrow::Cow;
use std::time::SystemTime;

use serde_json::{Map, Value};

use super::sql::ReadSql;
use crate::event_type::{Action, BuildError, Envelope, Operation, SCHEMA_VERSION};
use crate::outbox::Outbox;
use crate::{error::Error, error::Result, event_type::EventType};

/// What one row becomes in the index ([`Outbox::document`]).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct DocumentPreview {
    /// The index alias the document is written through.
    pub alias: String,
    /// The document id: the row's key, as text.
    pub id: String,
    /// The `job_id` it carries: the row's latest job in the outbox (0 without one).
    pub version: i64,
    /// What the consumer would do.
    pub verdict: Verdict,
}

/// What the consumer would do with a row.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Verdict {
    /// Write this document: the status policy keeps it (`why`).
    Kept {
        /// The document, with its relations.
        document: Value,
        /// Why it is kept (`every row is searchable`, `state = "open" is searchable`).
        why: String,
    },
    /// Delete it from the index (or keep it out): why.
    Deleted(String),
    /// The row cannot become a document (a value that does not fit its field): its job
    /// would be dead-lettered with this reason.
    Refused(String),
}

impl Outbox {
    /// What the row of `event_type` whose key is `key` becomes in the index now.
    pub async fn document(&self, event_type: &EventType, key: &str) -> Result<DocumentPreview> {
        let client = crate::connect::postgres_as(self.database_url(), "benalsam-document").await?;
        let schema = self.config().schema.as_str();
        let fail = |e| Error::postgres(format!("reading {} {key:?}", event_type.name), e);
        let recorded = event_type
            .clone()
            .recorded_in(schema)
            .job_table()
            .to_owned();
        let version: i64 = client
            .query_one(
                &format!(
                    "SELECT coalesce(max(id), 0) FROM \"{schema}\".elasticsearch_sync_queue
                      WHERE table_name = $1 AND record_id = $2"
                ),
                &[&recorded, &key],
            )
            .await
            .map_err(fail)?
            .get(0);
        let sql = ReadSql::new(schema, event_type);
        let found = client
            .query_opt(&sql.select, &[&vec![key.to_owned()]])
            .await
            .map_err(fail)?;
        let verdict = match found {
            None => Verdict::Deleted(format!(
                "table {} has no row with {} = {key:?}",
                event_type.table, event_type.key
            )),
            Some(row) => {
                let columns: Value = row.get(1);
                let related = match row.get::<_, Value>(2) {
                    Value::Object(map) => map,
                    _ => Map::new(),
                };
                let built = build(event_type, key, version, &columns, &related);
                verdict(event_type, &columns, built)
            }
        };
        Ok(DocumentPreview {
            alias: event_type.index.alias.clone(),
            id: key.to_owned(),
            version,
            verdict,
        })
    }
}

/// The action the consumer builds for the row `columns`: from the spec and the relations,
/// or by the event type's own builder from an INSERT of the row.
fn build(
    event_type: &EventType,
    key: &str,
    version: i64,
    columns: &Value,
    related: &Map<String, Value>,
) -> std::result::Result<Action, BuildError> {
    if event_type.builder.is_none() {
        return event_type.joined_action(key.to_owned(), Some(columns), related, version);
    }
    let envelope = Envelope {
        message_id: Cow::Owned(format!("job_{version}")),
        job_id: version,
        schema_version: SCHEMA_VERSION,
        routing_key: Cow::Owned(format!("{}.insert", event_type.routing_prefix)),
        table: Cow::Borrowed(event_type.job_table()),
        operation: Operation::Insert,
        record_id: Cow::Borrowed(key),
        change_data: Cow::Borrowed(columns),
        status: None,
        previous_status: None,
        occurred_at: SystemTime::now(),
        trace_id: None,
    };
    event_type.action(&envelope)
}

/// The verdict on a built action, with the status policy's reason.
fn verdict(
    event_type: &EventType,
    columns: &Value,
    built: std::result::Result<Action, BuildError>,
) -> Verdict {
    let policy = match (
        &event_type.document.searchable_statuses,
        &event_type.status_column,
    ) {
        (Some(statuses), Some(column)) => {
            let value = match &columns[column] {
                Value::String(s) => format!("{s:?}"),
                Value::Null => "NULL".to_owned(),
                other => other.to_string(),
            };
            let listed = statuses.join(", ");
            Some((column, value, listed))
        }
        _ => None,
    };
    match built {
        Err(why) => Verdict::Refused(why.0),
        Ok(Action::Index { document, .. }) => Verdict::Kept {
            document,
            why: policy.map_or_else(
                || "every row is searchable (no searchable_statuses)".to_owned(),
                |(column, value, listed)| {
                    format!("{column} = {value} is a searchable status ({listed})")
                },
            ),
        },
        Ok(Action::Delete { .. }) => Verdict::Deleted(policy.map_or_else(
            || "its builder deletes it".to_owned(),
            |(column, value, listed)| {
                format!("{column} = {value} is not a searchable status (searchable: {listed})")
            },
        )),
    }
}
