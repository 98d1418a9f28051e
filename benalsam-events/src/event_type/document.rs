//! Documents described as data: which columns become which fields, and the mapping that goes
//! with them. [`DocumentSpec`] builds every document of an event type that has no builder of
//! its own.

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde_json::{Map, Value, json};

use crate::event_type::{Action, BuildError};
use crate::event_type::{Envelope, Operation};

/// The analyzer the library defines for Turkish text (standard tokenizer, apostrophe,
/// Turkish lowercase, Turkish stop words, Turkish stemmer).
pub(crate) const TURKISH: &str = "benalsam_turkish";
/// The normalizer the library defines for case-insensitive keywords.
pub(crate) const LOWERCASE: &str = "benalsam_lowercase";

/// What a field of the document holds, and how it is mapped.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FieldType {
    /// Full text, analyzed with `analyzer` (`benalsam_turkish`, or any analyzer the search
    /// engine knows: `standard`, `english`, …); `raw` adds an exact `<field>.raw` keyword;
    /// `copy_to` also feeds a combined full-text field.
    Text {
        /// The analyzer.
        analyzer: String,
        /// Whether to add the `raw` keyword sub-field.
        raw: bool,
        /// A combined full-text field this one is copied into.
        copy_to: Option<String>,
    },
    /// An exact value (arrays of them too); `normalizer` (`benalsam_lowercase`) makes it
    /// case-insensitive; `indexed: false` stores it without making it searchable.
    Keyword {
        /// The normalizer.
        normalizer: Option<String>,
        /// Whether it is searchable.
        indexed: bool,
    },
    /// A whole number (64 bits); numeric text is converted.
    Long,
    /// A floating-point number; numeric text (a `numeric` column) is converted.
    Double,
    /// True or false.
    Boolean,
    /// A date or timestamp, as PostgreSQL writes it.
    Date,
    /// A JSON object whose keys become fields of their own.
    Object,
    /// A geo point made of two number columns (both NULL: no point).
    GeoPoint {
        /// The latitude column.
        lat: String,
        /// The longitude column.
        lon: String,
    },
}

/// One field of the document, from one column (or two, for a geo point).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Field {
    /// The column it comes from; empty: the column of the field's name (for a geo point,
    /// unused).
    pub(crate) column: String,
    /// What it holds.
    pub(crate) kind: FieldType,
}

impl Field {
    /// Whether it uses the analyzer or normalizer `name`.
    pub(crate) fn uses(&self, name: &str) -> bool {
        match &self.kind {
            FieldType::Text { analyzer, .. } => analyzer == name,
            FieldType::Keyword { normalizer, .. } => normalizer.as_deref() == Some(name),
            _ => false,
        }
    }

    /// The field, read from `column` (a rename).
    pub(crate) fn from_column(column: &str, kind: FieldType) -> Self {
        Self {
            column: column.to_owned(),
            kind,
        }
    }
}

/// One row to build a document from.
pub(crate) struct Row<'a> {
    /// The record's key, the document id.
    pub(crate) id: String,
    /// Whether the row is gone (the document is deleted).
    pub(crate) deleted: bool,
    /// The row's columns.
    pub(crate) columns: &'a Value,
    /// The version the document is written with (its `job_id` field).
    pub(crate) version: i64,
}

/// How the rows of an event type become documents: fields by name, and which statuses are
/// searchable. Every document also gets `id` (the record's key), `job_id` (the change that
/// wrote it) and `indexed_at`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DocumentSpec {
    /// The fields, by name.
    pub(crate) fields: BTreeMap<String, Field>,
    /// With a status column: the statuses whose rows are in the index; a row with another
    /// status (and a deleted one) is removed from it. `None`: every row is searchable.
    pub searchable_statuses: Option<Vec<String>>,
}

impl DocumentSpec {
    /// Adds a field named like its column.
    pub fn field(self, name: &str, kind: FieldType) -> Self {
        self.field_from(name, "", kind)
    }

    /// Adds a field `name` read from `column` (a rename).
    pub fn field_from(mut self, name: &str, column: &str, kind: FieldType) -> Self {
        self.fields
            .insert(name.to_owned(), Field::from_column(column, kind));
        self
    }

    /// The names of its fields.
    pub fn field_names(&self) -> impl Iterator<Item = &str> {
        self.fields.keys().map(String::as_str)
    }

    /// The combined fields its text fields are copied into (`copy_to`).
    pub(crate) fn copy_targets(&self) -> impl Iterator<Item = &str> {
        self.fields.values().filter_map(|f| match &f.kind {
            FieldType::Text {
                copy_to: Some(target),
                ..
            } => Some(target.as_str()),
            _ => None,
        })
    }

    /// The action for a change of a row of this spec's table. `status_column` is the event
    /// type's.
    pub(crate) fn build(
        &self,
        index: &str,
        status_column: Option<&str>,
        envelope: &Envelope<'_>,
    ) -> Result<Action, BuildError> {
        self.build_row(
            index,
            status_column,
            Row {
                id: envelope.record_id.to_string(),
                deleted: envelope.operation == Operation::Delete,
                columns: envelope.current_row(),
                version: envelope.job_id,
            },
            Map::new(),
        )
    }

    /// The action for `row`, with `extra` fields (the relations of a joined document) added
    /// to the document.
    pub(crate) fn build_row(
        &self,
        index: &str,
        status_column: Option<&str>,
        row: Row<'_>,
        extra: Map<String, Value>,
    ) -> Result<Action, BuildError> {
        let Row {
            id,
            deleted,
            columns: row,
            version,
        } = row;
        let searchable = match (&self.searchable_statuses, status_column) {
            (Some(statuses), Some(column)) => row[column]
                .as_str()
                .is_some_and(|s| statuses.iter().any(|ok| ok == s)),
            _ => true,
        };
        if deleted || !searchable {
            return Ok(Action::Delete {
                index: index.to_owned(),
                id,
            });
        }
        let Some(columns) = row.as_object() else {
            return Err(BuildError(format!("record {id}: the row is not an object")));
        };
        let mut doc = Map::new();
        doc.insert("id".to_owned(), json!(id));
        for (name, field) in &self.fields {
            if let Some(value) = field_value(name, field, columns)
                .map_err(|why| BuildError(format!("record {id}: field {name}: {why}")))?
            {
                doc.insert(name.clone(), value);
            }
        }
        doc.extend(extra);
        doc.insert("job_id".to_owned(), json!(version));
        doc.insert(
            "indexed_at".to_owned(),
            json!(humantime::format_rfc3339_millis(SystemTime::now()).to_string()),
        );
        Ok(Action::Index {
            index: index.to_owned(),
            id,
            document: Value::Object(doc),
        })
    }

    /// Whether a field uses the library's analyzer or normalizer (which the index must then
    /// define).
    pub(crate) fn uses(&self, name: &str) -> bool {
        self.fields.values().any(|f| f.uses(name))
    }
}

/// The value of one field of a row, converted to its type; `None` when the column is NULL
/// or absent.
pub(super) fn field_value(
    name: &str,
    field: &Field,
    columns: &Map<String, Value>,
) -> Result<Option<Value>, String> {
    if let FieldType::GeoPoint { lat, lon } = &field.kind {
        return match (columns.get(lat), columns.get(lon)) {
            (Some(Value::Number(lat)), Some(Value::Number(lon))) => {
                Ok(Some(json!({ "lat": lat, "lon": lon })))
            }
            (None | Some(Value::Null), None | Some(Value::Null)) => Ok(None),
            (lat_value, lon_value) => {
                // Said as the operator sees the row, not as Rust debug text.
                let shown = |value: Option<&Value>| match value {
                    None => "absent".to_owned(),
                    Some(Value::Null) => "NULL".to_owned(),
                    Some(other) => other.to_string(),
                };
                Err(format!(
                    "columns {lat} = {}, {lon} = {} are not a pair of numbers",
                    shown(lat_value),
                    shown(lon_value)
                ))
            }
        };
    }
    let column = if field.column.is_empty() {
        name
    } else {
        &field.column
    };
    let Some(value) = columns.get(column).filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let converted = match &field.kind {
        FieldType::Long => {
            number(value, true).ok_or_else(|| format!("{value} is not a whole number"))
        }
        FieldType::Double => number(value, false).ok_or_else(|| format!("{value} is not a number")),
        FieldType::Boolean => match value {
            Value::Bool(_) => Ok(value.clone()),
            Value::String(s) if s == "true" || s == "false" => Ok(json!(s == "true")),
            other => Err(format!("{other} is not true or false")),
        },
        FieldType::Object if value.is_object() => Ok(value.clone()),
        FieldType::Object => Err(format!("{value} is not an object")),
        FieldType::Text { .. } | FieldType::Keyword { .. } | FieldType::Date => match value {
            Value::Object(_) => Err("an object where a scalar (or a list) belongs".to_owned()),
            _ => Ok(value.clone()),
        },
        FieldType::GeoPoint { .. } => Ok(value.clone()),
    };
    converted.map(Some)
}

/// A number from a JSON number or numeric text (`numeric` columns may arrive as either).
fn number(value: &Value, whole: bool) -> Option<Value> {
    match value {
        Value::Number(n) if !whole || n.is_i64() || n.is_u64() => Some(value.clone()),
        Value::String(s) if whole => s.trim().parse::<i64>().ok().map(|n| json!(n)),
        Value::String(s) => s
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|n| n.is_finite())
            .map(|n| json!(n)),
        _ => None,
    }
}

/// The document of the seed's listings: the mapping every deployment has had so far.
pub(crate) fn listings() -> DocumentSpec {
    let turkish = |raw: bool| FieldType::Text {
        analyzer: TURKISH.to_owned(),
        raw,
        copy_to: Some("search_text".to_owned()),
    };
    let keyword = || FieldType::Keyword {
        normalizer: None,
        indexed: true,
    };
    let lowercase = || FieldType::Keyword {
        normalizer: Some(LOWERCASE.to_owned()),
        indexed: true,
    };
    let mut spec = DocumentSpec {
        searchable_statuses: Some(vec!["active".to_owned()]),
        ..DocumentSpec::default()
    };
    for name in [
        "user_id",
        "category",
        "subcategory",
        "condition",
        "status",
        "urgency",
        "currency",
    ] {
        spec = spec.field(name, keyword());
    }
    for name in [
        "location_city",
        "location_district",
        "location_neighborhood",
    ] {
        spec = spec.field(name, lowercase());
    }
    for name in ["expires_at", "created_at", "updated_at"] {
        spec = spec.field(name, FieldType::Date);
    }
    spec.field("title", turkish(true))
        .field("description", turkish(false))
        .field("location", turkish(true))
        .field("budget", FieldType::Double)
        .field("attributes", FieldType::Object)
        .field(
            "images",
            FieldType::Keyword {
                normalizer: None,
                indexed: false,
            },
        )
        .field(
            "geo_location",
            FieldType::GeoPoint {
                lat: "latitude".to_owned(),
                lon: "longitude".to_owned(),
            },
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(operation: Operation, change_data: Value) -> Envelope<'static> {
        let body = json!({
            "messageId": "job_9", "jobId": 9, "schemaVersion": crate::event_type::SCHEMA_VERSION,
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

    fn build(change: &Envelope<'_>) -> Result<Action, BuildError> {
        listings().build("benalsam_listings", Some("status"), change)
    }

    #[test]
    fn an_active_listing_becomes_a_built_document() {
        let action = build(&envelope(Operation::Insert, row("active"))).expect("builds");
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
        for status in ["sold", "draft", "pending_approval", "inactive"] {
            let update = envelope(
                Operation::Update,
                json!({"old": row("active"), "new": row(status)}),
            );
            assert!(build(&update).expect("builds").is_delete(), "{status}");
        }
        let back = envelope(
            Operation::Update,
            json!({"old": row("inactive"), "new": row("active")}),
        );
        assert!(!build(&back).expect("builds").is_delete());
        assert!(
            build(&envelope(Operation::Delete, row("active")))
                .expect("builds")
                .is_delete()
        );
    }

    #[test]
    fn values_that_do_not_fit_their_field_are_refused_with_the_reason() {
        let mut bad = row("active");
        bad["longitude"] = Value::Null;
        let lat = bad["latitude"].clone();
        let err = build(&envelope(Operation::Insert, bad)).expect_err("one coordinate");
        assert!(
            err.to_string().contains(&format!(
                "columns latitude = {lat}, longitude = NULL are not a pair of numbers"
            )),
            "said as the row holds it, without Rust debug text: {err}"
        );
        assert!(!err.to_string().contains("Some("), "{err}");
        let mut bad = row("active");
        bad["budget"] = json!("çok");
        let err = build(&envelope(Operation::Insert, bad)).expect_err("not a number");
        assert!(err.to_string().contains("field budget"), "{err}");
        let mut numeric_text = row("active");
        numeric_text["budget"] = json!("1500.50");
        let Ok(Action::Index { document, .. }) = build(&envelope(Operation::Insert, numeric_text))
        else {
            panic!("numeric text converts");
        };
        assert_eq!(document["budget"], json!(1500.5));
    }

    #[test]
    fn renamed_columns_and_the_mapping_follow_the_spec() {
        let spec = DocumentSpec::default()
            .field(
                "name",
                FieldType::Text {
                    analyzer: "standard".into(),
                    raw: false,
                    copy_to: None,
                },
            )
            .field("qty", FieldType::Long);
        let mut spec = spec;
        spec.fields.insert(
            "seller".into(),
            Field::from_column(
                "user_id",
                FieldType::Keyword {
                    normalizer: None,
                    indexed: true,
                },
            ),
        );
        let change = envelope(
            Operation::Insert,
            json!({"name": "Çay", "qty": "12", "user_id": "U7", "secret": 1}),
        );
        let Ok(Action::Index { document, .. }) = spec.build("i", None, &change) else {
            panic!("builds");
        };
        assert_eq!(document["seller"], "U7");
        assert_eq!(document["qty"], 12);
        assert!(document.get("secret").is_none() && document.get("user_id").is_none());
        let properties = spec.properties();
        assert_eq!(properties["seller"]["type"], "keyword");
        assert_eq!(properties["job_id"]["type"], "long");
    }
}
