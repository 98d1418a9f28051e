//! Relations: rows of other tables that are part of an event type's documents.
//!
//! A listing's document may carry its seller (a *parent*: `listings.user_id → users.id`,
//! many listings to one user) and its first images (*children*: `listing_images.listing_id →
//! listings.id`, one listing to many images, ordered and limited). A relation names the
//! related table, the columns that join it, and the fields taken from its rows, which are
//! described exactly like the document's own fields.
//!
//! How a change of a related row reaches the documents:
//!
//! ```text
//! UPDATE users SET display_name = … ──► trigger (only=<taken columns>, as=listings#seller)
//!        one job `listings#seller`, never published
//!                          │
//! bridge fan-out ──────────┘ pages through listings WHERE user_id = <the user>,
//!        one REBUILD job per listing, in batches (one transaction per page)
//!                          │
//! publisher ──► queue ──► consumer: reads each listing with its seller and images from
//!        the database (joined), and writes it with a version taken under a lock
//! ```
//!
//! Why the consumer reads the rows rather than the message: a document made of several rows
//! has no single change whose job id orders it. Every write of a joined document is instead a
//! fresh read of the committed rows, versioned by a number drawn from the outbox's id
//! sequence *after* taking a lock on the document and *before* the read (see
//! `outbox/rebuild.rs` for the argument).

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use super::Origin;
use super::document::{Field, FieldType, field_value};
use super::relation_aggregate::{Aggregate, Filter};

/// How the related rows belong to a document.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RelationKind {
    /// Many documents to one related row (a listing's seller): the field is an object, or
    /// absent when no row matches.
    Parent,
    /// One document to many related rows (a listing's images): the field is an array of
    /// objects, in `order_by` order, at most `limit` of them.
    Children {
        /// The column that orders the rows (then the related table's key); `None`: the key.
        order_by: Option<String>,
        /// Whether the order is descending.
        descending: bool,
        /// The most rows a document takes.
        limit: u32,
        /// Mapped as `nested` (each object matched on its own) rather than `object`.
        nested: bool,
    },
    /// One document to many related rows reduced to one value (the number of a post's open
    /// applications): the field is a scalar of type `kind` ([`Relation::aggregate`]).
    Aggregate {
        /// What is computed.
        function: Aggregate,
        /// The field's type.
        kind: FieldType,
    },
}

/// The most child rows a document may take: the document is read and written whole at every
/// change, so this bounds its size.
pub(crate) const MAX_CHILDREN: u32 = 1000;

/// Rows of another table that are part of an event type's documents: a *parent* (many
/// documents to one related row, an object field), *children* (one document to many related
/// rows, an array of objects, ordered and limited) or an *aggregate* over children (one
/// value, [`Relation::aggregate`]). A relation may hold relations of its own
/// ([`Relation::relation`], up to 4 levels), and children may be the links of a many-to-many
/// relation ([`Relation::through`]).
///
/// A change of a taken column of a related row records one job, which a bridge fans out to
/// one `REBUILD` job per document that contains the row; the consumer then reads each
/// document with its related rows from the database, versioned so that the index converges
/// whatever the order of commits and deliveries (README, "Documents joined from related
/// tables").
///
/// ```
/// use benalsam_events::EventType;
/// use benalsam_events::event_type::{FieldType, Relation};
///
/// let text = || FieldType::Text { analyzer: "standard".into(), raw: false, copy_to: None };
/// let listings = EventType::listings()
///     .with_relation(
///         Relation::parent("seller", "users", &["user_id"], &["id"])
///             .field("display_name", text())
///             .field("rating", FieldType::Double),
///     )
///     .with_relation(
///         Relation::children("images", "listing_images", &["listing_id"], &["id"])
///             .field("url", FieldType::Keyword { normalizer: None, indexed: false })
///             .order_by("position", false)
///             .limit(5),
///     );
/// assert_eq!(listings.relations.len(), 2);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Relation {
    /// The document field that holds the related rows.
    pub name: String,
    /// The related table: bare when it lives in the outbox's schema, `schema.table`
    /// otherwise.
    pub table: String,
    /// Parent or children.
    pub kind: RelationKind,
    /// The columns of the event type's table...
    pub local_columns: Vec<String>,
    /// ...equal to these columns of the related table, pairwise.
    pub related_columns: Vec<String>,
    /// The related table's key (its jobs' record id); default `id`.
    pub key: String,
    /// The fields taken from each related row, by name.
    pub(crate) fields: BTreeMap<String, Field>,
    /// Where its file declared each key (empty when built in code), for errors found later
    /// in the catalog.
    pub(crate) origin: Origin,
    /// Relations of its rows, joined to this relation's table ([`Relation::relation`]).
    pub relations: Vec<Relation>,
    /// The names of the relations above it (empty at the top level), set when it is added.
    pub(crate) above: Vec<String>,
    /// Each row is replaced by its one relation's object ([`Relation::through`]).
    pub(crate) through: bool,
    /// An aggregate's condition on the rows it takes ([`Relation::filter`]).
    pub(crate) filter: Option<Filter>,
}

impl Relation {
    /// A parent: the rows of `table` whose `references` columns equal the document row's
    /// `foreign_key` columns (`listings.user_id → users.id`).
    pub fn parent(name: &str, table: &str, foreign_key: &[&str], references: &[&str]) -> Self {
        Self::new(name, table, RelationKind::Parent, foreign_key, references)
    }

    /// Children: the rows of `table` whose `foreign_key` columns equal the document row's
    /// `references` columns (`listing_images.listing_id → listings.id`), ordered by the
    /// related table's key and at most 10 until told otherwise.
    pub fn children(name: &str, table: &str, foreign_key: &[&str], references: &[&str]) -> Self {
        let kind = RelationKind::Children {
            order_by: None,
            descending: false,
            limit: 10,
            nested: false,
        };
        Self::new(name, table, kind, references, foreign_key)
    }

    fn new(name: &str, table: &str, kind: RelationKind, local: &[&str], related: &[&str]) -> Self {
        let owned = |columns: &[&str]| columns.iter().map(|c| (*c).to_owned()).collect();
        Self {
            name: name.to_owned(),
            table: table.to_owned(),
            kind,
            local_columns: owned(local),
            related_columns: owned(related),
            key: "id".to_owned(),
            fields: BTreeMap::new(),
            origin: Origin::default(),
            relations: Vec::new(),
            above: Vec::new(),
            through: false,
            filter: None,
        }
    }

    /// Adds a field named like its column of the related table.
    pub fn field(self, name: &str, kind: FieldType) -> Self {
        self.field_from(name, "", kind)
    }

    /// Adds a field `name` read from `column` of the related table.
    pub fn field_from(mut self, name: &str, column: &str, kind: FieldType) -> Self {
        self.fields
            .insert(name.to_owned(), Field::from_column(column, kind));
        self
    }

    /// Children: the column that orders them (ties broken by the key).
    pub fn order_by(mut self, column: &str, descending: bool) -> Self {
        if let RelationKind::Children {
            order_by,
            descending: desc,
            ..
        } = &mut self.kind
        {
            *order_by = Some(column.to_owned());
            *desc = descending;
        }
        self
    }

    /// Children: the most rows a document takes.
    pub fn limit(mut self, most: u32) -> Self {
        if let RelationKind::Children { limit, .. } = &mut self.kind {
            *limit = most;
        }
        self
    }

    /// Children: mapped as `nested`.
    pub fn nested(mut self, yes: bool) -> Self {
        if let RelationKind::Children { nested, .. } = &mut self.kind {
            *nested = yes;
        }
        self
    }

    /// The names of its fields.
    pub fn field_names(&self) -> impl Iterator<Item = &str> {
        self.fields.keys().map(String::as_str)
    }

    /// Where to say a mistake is: the file and line, or the event type.
    pub(crate) fn at(&self, event_type: &str, key: &str) -> String {
        self.at_line(event_type, key, key)
    }

    /// Like [`Self::at`], with the line of `path` (`foreign_key.user_id`, `fields.x.column`).
    pub(crate) fn at_line(&self, event_type: &str, key: &str, path: &str) -> String {
        let mut names = self.above.clone();
        names.push(self.name.clone());
        format!(
            "{}event type {event_type:?}, relations.{}.{key}",
            self.origin.prefix(path),
            names.join(".relations.")
        )
    }

    /// The table name its jobs are recorded under: `<event type table>#<relation>`, with the
    /// path of a relation of a relation (`listings#seller.city`).
    pub(crate) fn job_table(&self, owner_table: &str) -> String {
        format!("{owner_table}#{}", self.path_name())
    }

    /// The columns of the related table it reads: the joined ones, its key, the order,
    /// every field's and those its own relations join on; a change of any other column
    /// enqueues nothing.
    pub(crate) fn columns(&self) -> Vec<String> {
        let mut columns: Vec<String> = self.related_columns.clone();
        columns.push(self.key.clone());
        for below in &self.relations {
            columns.extend(below.local_columns.iter().cloned());
        }
        columns.extend(self.aggregate_columns());
        if let RelationKind::Children {
            order_by: Some(order),
            ..
        } = &self.kind
        {
            columns.push(order.clone());
        }
        for (name, field) in &self.fields {
            match &field.kind {
                FieldType::GeoPoint { lat, lon } => columns.extend([lat.clone(), lon.clone()]),
                _ if field.column.is_empty() => columns.push(name.clone()),
                _ => columns.push(field.column.clone()),
            }
        }
        columns.sort();
        columns.dedup();
        columns
    }

    /// The trigger's arguments on the related table.
    pub(crate) fn trigger_options(
        &self,
        owner_table: &str,
        channel: &str,
        notify: bool,
    ) -> Vec<String> {
        let mut options = vec![
            format!("key={}", self.key),
            format!("only={}", self.columns().join(",")),
            format!("as={}", self.job_table(owner_table)),
            format!("channel={channel}"),
        ];
        if !notify {
            options.push("notify=off".to_owned());
        }
        options
    }

    /// The schema (when qualified) and the table name.
    pub(crate) fn split_table(&self) -> (Option<&str>, &str) {
        match self.table.split_once('.') {
            Some((schema, table)) => (Some(schema), table),
            None => (None, &self.table),
        }
    }

    /// The columns on the referencing side, as declared.
    pub(crate) fn foreign_key(&self) -> &[String] {
        match self.kind {
            RelationKind::Parent => &self.local_columns,
            _ => &self.related_columns,
        }
    }

    /// The columns on the referenced side, as declared.
    pub(crate) fn references(&self) -> &[String] {
        match self.kind {
            RelationKind::Parent => &self.related_columns,
            _ => &self.local_columns,
        }
    }

    /// The copy_to targets of its fields and of its relations' fields, with their analyzers
    /// (root fields of the document).
    pub(crate) fn copy_targets(&self) -> Vec<(&str, &str)> {
        let mut targets: Vec<(&str, &str)> = self
            .fields
            .values()
            .filter_map(|f| match &f.kind {
                FieldType::Text {
                    analyzer,
                    copy_to: Some(target),
                    ..
                } => Some((target.as_str(), analyzer.as_str())),
                _ => None,
            })
            .collect();
        for below in &self.relations {
            targets.extend(below.copy_targets());
        }
        targets
    }

    /// Whether a field (or one of its relations') uses the library's analyzer or
    /// normalizer `name`.
    pub(crate) fn uses(&self, name: &str) -> bool {
        self.fields.values().any(|f| f.uses(name)) || self.relations.iter().any(|r| r.uses(name))
    }

    /// The document's value of this relation from what the database read: an object (or
    /// null) for a parent, an array of objects for children. `None`: no field.
    pub(crate) fn value(&self, read: &Value) -> std::result::Result<Option<Value>, String> {
        match (&self.kind, read) {
            (_, Value::Null) => Ok(None),
            (RelationKind::Aggregate { kind, .. }, scalar) => self.aggregate_value(kind, scalar),
            (RelationKind::Parent, Value::Object(row)) => self.object(row).map(Some),
            (RelationKind::Children { .. }, Value::Array(rows)) => {
                let mut objects = Vec::with_capacity(rows.len());
                for row in rows {
                    let Value::Object(row) = row else {
                        return Err(format!("a related row is not an object: {row}"));
                    };
                    match self.relations.first().filter(|_| self.through) {
                        // A link: its target's object, none when the target row is gone.
                        Some(target) => objects.extend(target.value(&row_of(row, target))?),
                        None => objects.push(self.object(row)?),
                    }
                }
                Ok(Some(Value::Array(objects)))
            }
            (_, other) => Err(format!("unexpected related rows: {other}")),
        }
    }

    fn object(&self, row: &Map<String, Value>) -> std::result::Result<Value, String> {
        let mut object = Map::new();
        for (name, field) in &self.fields {
            if let Some(value) =
                field_value(name, field, row).map_err(|why| format!("{name}: {why}"))?
            {
                object.insert(name.clone(), value);
            }
        }
        for below in &self.relations {
            if let Some(value) = below
                .value(&row_of(row, below))
                .map_err(|why| format!("{}: {why}", below.name))?
            {
                object.insert(below.name.clone(), value);
            }
        }
        Ok(Value::Object(object))
    }
}

/// What the read put in `row` for its relation `below` (under `#<name>`, see `relations/sql.rs`).
fn row_of(row: &Map<String, Value>, below: &Relation) -> Value {
    row.get(&format!("#{}", below.name))
        .cloned()
        .unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn seller() -> Relation {
        Relation::parent("seller", "users", &["user_id"], &["id"])
            .field(
                "display_name",
                FieldType::Text {
                    analyzer: "standard".into(),
                    raw: false,
                    copy_to: Some("search_text".into()),
                },
            )
            .field_from("stars", "rating", FieldType::Double)
    }

    #[test]
    fn a_relation_reads_only_its_columns_and_records_its_jobs_apart() {
        let seller = seller();
        assert_eq!(seller.columns(), ["display_name", "id", "rating"]);
        assert_eq!(
            seller.trigger_options("listings", "ch", true),
            [
                "key=id",
                "only=display_name,id,rating",
                "as=listings#seller",
                "channel=ch"
            ]
        );
        let images = Relation::children("images", "listing_images", &["listing_id"], &["id"])
            .field(
                "url",
                FieldType::Keyword {
                    normalizer: None,
                    indexed: false,
                },
            )
            .order_by("position", true)
            .limit(3);
        assert_eq!(images.local_columns, ["id"]);
        assert_eq!(images.related_columns, ["listing_id"]);
        assert_eq!(images.columns(), ["id", "listing_id", "position", "url"]);
    }

    #[test]
    fn values_take_the_declared_fields() {
        let seller = seller();
        let read = json!({"display_name": "Ayşe", "rating": "4.5", "id": 7, "email": "x"});
        assert_eq!(
            seller.value(&read).expect("valid"),
            Some(json!({"display_name": "Ayşe", "stars": 4.5}))
        );
        assert_eq!(seller.value(&Value::Null).expect("valid"), None);
        let images = Relation::children("images", "listing_images", &["listing_id"], &["id"])
            .field(
                "url",
                FieldType::Keyword {
                    normalizer: None,
                    indexed: false,
                },
            );
        assert_eq!(
            images
                .value(&json!([{"url": "a"}, {"url": null}]))
                .expect("valid"),
            Some(json!([{"url": "a"}, {}]))
        );
        assert!(seller.value(&json!({"rating": "many"})).is_err());
    }

    #[test]
    fn mistakes_are_named() {
        let mut bad = seller();
        bad.related_columns.push("other".into());
        let err = bad
            .validate("listings", &[])
            .expect_err("uneven")
            .to_string();
        assert!(err.contains("relations.seller.foreign_key"), "{err}");
        let err = seller()
            .validate("listings", &["seller"])
            .expect_err("a clash")
            .to_string();
        assert!(err.contains("already has a field"), "{err}");
        let none = Relation::parent("seller", "users", &["user_id"], &["id"]);
        assert!(none.validate("listings", &[]).is_err());
        let many = Relation::children("images", "i", &["listing_id"], &["id"])
            .field("url", FieldType::Long)
            .limit(MAX_CHILDREN + 1);
        let err = many
            .validate("listings", &[])
            .expect_err("too many")
            .to_string();
        assert!(err.contains("relations.images.limit"), "{err}");
        assert!(seller().validate("listings", &["title"]).is_ok());
    }
}
