//! Search documents, built from change messages.
//!
//! A [`DocumentBuilder`] turns an envelope into one [`Action`] on the index: write this
//! document, or delete that one. The listings builder keeps only searchable listings in the
//! index: a DELETE, or a change to any status outside the searchable set (default `active`),
//! deletes the document. Documents are built, not dumped: only known columns are copied,
//! coordinates become a `geo_point`, internal columns (counters, vectors, geometry) stay out.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use serde_json::{Map, Value, json};

use crate::outbox::Operation;
use crate::publish::Envelope;

/// One operation on the index.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Action {
    /// Write (create or replace) this document.
    Index {
        /// Index or alias.
        index: String,
        /// Document id.
        id: String,
        /// The document.
        document: Value,
    },
    /// Delete this document (absent already is fine).
    Delete {
        /// Index or alias.
        index: String,
        /// Document id.
        id: String,
    },
}

impl Action {
    /// The document id.
    pub fn id(&self) -> &str {
        match self {
            Action::Index { id, .. } | Action::Delete { id, .. } => id,
        }
    }

    /// Whether this deletes.
    pub fn is_delete(&self) -> bool {
        matches!(self, Action::Delete { .. })
    }
}

/// Why no action could be built: the message is valid, but its row is not a document.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot build a search document: {0}")]
pub struct BuildError(pub String);

/// Turns the envelopes of one table into index actions.
pub trait DocumentBuilder: Send + Sync + std::fmt::Debug {
    /// The action for this change.
    fn build(&self, envelope: &Envelope<'_>) -> Result<Action, BuildError>;
}

/// Document builders by table.
#[derive(Debug, Clone, Default)]
pub struct Documents {
    builders: HashMap<String, Arc<dyn DocumentBuilder>>,
}

impl Documents {
    /// No builders yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds the documents of `table` with `builder`.
    pub fn with(mut self, table: &str, builder: impl DocumentBuilder + 'static) -> Self {
        self.builders.insert(table.to_owned(), Arc::new(builder));
        self
    }

    /// The action for an envelope, by its table.
    pub fn build(&self, envelope: &Envelope<'_>) -> Result<Action, BuildError> {
        let builder = self.builders.get(envelope.table.as_ref()).ok_or_else(|| {
            BuildError(format!(
                "no document builder for table {:?}; add one to the consumer",
                envelope.table
            ))
        })?;
        builder.build(envelope)
    }
}

/// The listings builder.
#[derive(Debug, Clone)]
pub struct ListingDocuments {
    /// Index or alias to write to.
    pub index: String,
    /// Statuses whose listings are searchable; any other status means "not in the index".
    pub searchable_statuses: Vec<String>,
}

impl ListingDocuments {
    /// Listings in `index`, searchable when `active`.
    pub fn new(index: &str) -> Self {
        Self {
            index: index.to_owned(),
            searchable_statuses: vec!["active".to_owned()],
        }
    }
}

/// Columns copied as they are.
const COPIED: &[&str] = &[
    "user_id",
    "title",
    "description",
    "category",
    "subcategory",
    "condition",
    "status",
    "urgency",
    "currency",
    "location",
    "location_city",
    "location_district",
    "location_neighborhood",
    "expires_at",
    "created_at",
    "updated_at",
];

impl DocumentBuilder for ListingDocuments {
    fn build(&self, envelope: &Envelope<'_>) -> Result<Action, BuildError> {
        let id = envelope.record_id.to_string();
        let row = envelope.current_row();
        let searchable = row["status"]
            .as_str()
            .is_some_and(|s| self.searchable_statuses.iter().any(|ok| ok == s));
        if envelope.operation == Operation::Delete || !searchable {
            return Ok(Action::Delete {
                index: self.index.clone(),
                id,
            });
        }
        let Some(columns) = row.as_object() else {
            return Err(BuildError(format!(
                "listing {id}: the row is not an object"
            )));
        };
        let mut doc = Map::new();
        doc.insert("id".to_owned(), json!(id));
        for column in COPIED {
            if let Some(value) = columns.get(*column).filter(|v| !v.is_null()) {
                doc.insert((*column).to_owned(), value.clone());
            }
        }
        // numeric(14,2) arrives as a JSON number from to_jsonb; keep it a number.
        if let Some(budget) = columns.get("budget").filter(|v| !v.is_null()) {
            let number = match budget {
                Value::Number(_) => budget.clone(),
                Value::String(s) => s.parse::<f64>().map(|n| json!(n)).map_err(|_| {
                    BuildError(format!("listing {id}: budget {s:?} is not a number"))
                })?,
                other => {
                    return Err(BuildError(format!(
                        "listing {id}: budget {other} is not a number"
                    )));
                }
            };
            doc.insert("budget".to_owned(), number);
        }
        match (columns.get("latitude"), columns.get("longitude")) {
            (Some(Value::Number(lat)), Some(Value::Number(lon))) => {
                doc.insert("geo_location".to_owned(), json!({ "lat": lat, "lon": lon }));
            }
            (None | Some(Value::Null), None | Some(Value::Null)) => {}
            (lat, lon) => {
                return Err(BuildError(format!(
                    "listing {id}: coordinates {lat:?}/{lon:?} are not a pair of numbers"
                )));
            }
        }
        if let Some(attributes) = columns.get("attributes").filter(|v| v.is_object()) {
            doc.insert("attributes".to_owned(), attributes.clone());
        }
        if let Some(images) = columns.get("images").filter(|v| v.is_array()) {
            doc.insert("images".to_owned(), images.clone());
        }
        doc.insert("job_id".to_owned(), json!(envelope.job_id));
        doc.insert(
            "indexed_at".to_owned(),
            json!(humantime::format_rfc3339_millis(SystemTime::now()).to_string()),
        );
        Ok(Action::Index {
            index: self.index.clone(),
            id,
            document: Value::Object(doc),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(operation: Operation, change_data: Value) -> Envelope<'static> {
        let body = json!({
            "messageId": "job_9", "jobId": 9, "schemaVersion": crate::publish::SCHEMA_VERSION,
            "routingKey": "listing.update", "table": "listings", "operation": operation,
            "recordId": "L1", "changeData": change_data, "occurredAt": "2026-11-27T12:00:00Z"
        });
        Envelope::decode(body.to_string().as_bytes()).expect("a valid envelope")
    }

    fn row(status: &str) -> Value {
        json!({
            "id": "L1", "user_id": "U1", "title": "Bisiklet", "description": "Az kullanılmış",
            "category": "spor", "status": status, "budget": 1500.5, "latitude": 41.0,
            "longitude": 29.0, "attributes": {"renk": "kırmızı"}, "view_count": 7,
            "search_vector": "'bisiklet':1", "location_city": "İstanbul", "updated_at": null
        })
    }

    #[test]
    fn an_active_listing_becomes_a_built_document() {
        let action = ListingDocuments::new("benalsam_listings")
            .build(&envelope(Operation::Insert, row("active")))
            .expect("builds");
        let Action::Index {
            index,
            id,
            document,
        } = action
        else {
            panic!("an index action");
        };
        assert_eq!((index.as_str(), id.as_str()), ("benalsam_listings", "L1"));
        assert_eq!(document["geo_location"], json!({"lat": 41.0, "lon": 29.0}));
        assert_eq!(document["budget"], json!(1500.5));
        assert_eq!(document["job_id"], json!(9));
        assert_eq!(document["attributes"]["renk"], "kırmızı");
        for internal in [
            "view_count",
            "search_vector",
            "latitude",
            "longitude",
            "updated_at",
        ] {
            assert!(document.get(internal).is_none(), "{internal} stays out");
        }
    }

    #[test]
    fn only_searchable_statuses_live_in_the_index() {
        let builder = ListingDocuments::new("i");
        for status in ["sold", "draft", "pending_approval", "inactive"] {
            let update = envelope(
                Operation::Update,
                json!({"old": row("active"), "new": row(status)}),
            );
            assert!(
                builder.build(&update).expect("builds").is_delete(),
                "{status}"
            );
        }
        let back = envelope(
            Operation::Update,
            json!({"old": row("inactive"), "new": row("active")}),
        );
        assert!(!builder.build(&back).expect("builds").is_delete());
        let delete = envelope(Operation::Delete, row("active"));
        assert!(builder.build(&delete).expect("builds").is_delete());
    }

    #[test]
    fn a_half_coordinate_is_refused_with_the_reason() {
        let mut bad = row("active");
        bad["longitude"] = Value::Null;
        let err = ListingDocuments::new("i")
            .build(&envelope(Operation::Insert, bad))
            .expect_err("one coordinate");
        assert!(err.to_string().contains("coordinates"), "{err}");
    }

    #[test]
    fn unknown_tables_are_named() {
        let mut e = envelope(Operation::Insert, row("active"));
        e.table = "orders".into();
        let err = Documents::new().build(&e).expect_err("no builder");
        assert!(err.to_string().contains("\"orders\""));
    }
}
