//! What must hold for a relation before the catalog is asked: plain identifiers (every name
//! reaches generated SQL), as many columns on both sides, a field name of its own, a limit.

use super::relation::MAX_CHILDREN;
use super::relation_tree::MAX_DEPTH;
use super::{Aggregate, FieldType, Relation, RelationKind};
use crate::config::validate_identifier;
use crate::{error::Error, error::Result};

impl Relation {
    /// Checks what must hold before the catalog is asked, naming the key that does not.
    pub(crate) fn validate(&self, event_type: &str, document_fields: &[&str]) -> Result<()> {
        self.validate_below(event_type, document_fields, false)
    }

    /// [`Self::validate`] of a relation whose parent has the fields `taken` (the document's
    /// at the top level), inside a `nested` relation or not; then its own relations.
    fn validate_below(&self, event_type: &str, taken: &[&str], in_nested: bool) -> Result<()> {
        let refuse = |key: &str, why: String| {
            Err(Error::config(
                "BENALSAM_CONFIG",
                format!("{}: {why}", self.at(event_type, key)),
            ))
        };
        self.validate_identifiers(event_type)?;
        if self.local_columns.is_empty() || self.local_columns.len() != self.related_columns.len() {
            return refuse(
                "foreign_key",
                format!(
                    "foreign_key and references must name as many columns, at least one (given {} and {})",
                    self.foreign_key().len(),
                    self.references().len()
                ),
            );
        }
        if let Some((key, why)) = self.aggregate_problem() {
            return refuse(key, why);
        }
        if self.fields.is_empty()
            && self.relations.is_empty()
            && !matches!(self.kind, RelationKind::Aggregate { .. })
        {
            return refuse(
                "fields",
                "a relation takes at least one field (or has a relation of its own)".to_owned(),
            );
        }
        if taken.contains(&self.name.as_str())
            || ["id", "job_id", "indexed_at"].contains(&self.name.as_str())
        {
            let whose = if self.above.is_empty() {
                "the document"
            } else {
                "the relation above"
            };
            return refuse(
                "name",
                format!("{whose} already has a field {:?}", self.name),
            );
        }
        if self.depth() > MAX_DEPTH {
            return refuse(
                "relations",
                format!(
                    "is level {}, and relations nest at most {MAX_DEPTH} levels deep (each \
                     level is one more subquery in every read of the document)",
                    self.depth()
                ),
            );
        }
        self.validate_through(event_type)?;
        let in_nested =
            in_nested || matches!(self.kind, RelationKind::Children { nested: true, .. });
        self.validate_fields(event_type, in_nested)?;
        let fields: Vec<&str> = self.fields.keys().map(String::as_str).collect();
        for (i, below) in self.relations.iter().enumerate() {
            if self.relations[..i].iter().any(|r| r.name == below.name) {
                return Err(Error::config(
                    "BENALSAM_CONFIG",
                    format!("{}: the name is used twice", below.at(event_type, "name")),
                ));
            }
            below.validate_below(event_type, &fields, in_nested)?;
        }
        Ok(())
    }

    /// Its fields (no copy_to out of a nested relation) and its limit.
    fn validate_fields(&self, event_type: &str, in_nested: bool) -> Result<()> {
        let refuse = |key: &str, why: String| {
            Err(Error::config(
                "BENALSAM_CONFIG",
                format!("{}: {why}", self.at(event_type, key)),
            ))
        };
        for (name, field) in &self.fields {
            if let FieldType::Text {
                copy_to: Some(_), ..
            } = &field.kind
                && in_nested
            {
                return refuse(
                    &format!("fields.{name}"),
                    "copy_to does not reach the document from a nested relation".to_owned(),
                );
            }
        }
        if let RelationKind::Children { limit, .. } = &self.kind
            && (*limit == 0 || *limit > MAX_CHILDREN)
        {
            return refuse(
                "limit",
                format!(
                    "must be 1 to {MAX_CHILDREN} (the document is rewritten whole at every change)"
                ),
            );
        }
        Ok(())
    }

    /// A through relation: children of a join table with no fields of their own and one
    /// parent relation, whose object replaces each row.
    fn validate_through(&self, event_type: &str) -> Result<()> {
        if !self.through {
            return Ok(());
        }
        let why = if !matches!(self.kind, RelationKind::Children { .. }) {
            Some("through applies to kind = \"children\" (the rows of the join table)")
        } else if !self.fields.is_empty() {
            Some(
                "a through relation takes its fields from its one relation, not from the join table",
            )
        } else if self.relations.len() != 1
            || !matches!(self.relations[0].kind, RelationKind::Parent)
        {
            Some("a through relation has exactly one relation, a parent (the linked table)")
        } else {
            None
        };
        match why {
            Some(why) => Err(Error::config(
                "BENALSAM_CONFIG",
                format!("{}: {why}", self.at(event_type, "through")),
            )),
            None => Ok(()),
        }
    }

    /// Every name of it reaches generated SQL: each must be a plain identifier.
    fn validate_identifiers(&self, event_type: &str) -> Result<()> {
        let identifier = |key: &str, what: &str, name: &str| {
            validate_identifier(what, name).map(drop).map_err(|_| {
                Error::config(
                    "BENALSAM_CONFIG",
                    format!(
                        "{}: {what} {name:?} is not a plain lowercase identifier (a-z, 0-9, _; at most 63 bytes)",
                        self.at(event_type, key)
                    ),
                )
            })
        };
        identifier("name", "relation name", &self.name)?;
        let (schema, table) = self.split_table();
        if let Some(schema) = schema {
            identifier("table", "schema", schema)?;
        }
        identifier("table", "table", table)?;
        identifier("key", "key", &self.key)?;
        for column in self.foreign_key() {
            identifier("foreign_key", "column", column)?;
        }
        for column in self.references() {
            identifier("references", "column", column)?;
        }
        for (name, field) in &self.fields {
            let key = format!("fields.{name}");
            match &field.kind {
                FieldType::GeoPoint { lat, lon } => {
                    identifier(&key, "lat", lat)?;
                    identifier(&key, "lon", lon)?;
                }
                _ if field.column.is_empty() => identifier(&key, "field (its column)", name)?,
                _ => identifier(&key, "column", &field.column)?,
            }
        }
        if let RelationKind::Children {
            order_by: Some(order),
            ..
        } = &self.kind
        {
            identifier("order_by", "order_by", order)?;
        }
        if let RelationKind::Aggregate {
            function: Aggregate::Sum(column) | Aggregate::Min(column) | Aggregate::Max(column),
            ..
        } = &self.kind
        {
            identifier("column", "column", column)?;
        }
        if let Some(filter) = &self.filter {
            identifier("where.column", "column", &filter.column)?;
        }
        Ok(())
    }
}
