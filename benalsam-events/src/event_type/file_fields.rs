//! The fields and relations of the event-type file: what each TOML table holds, turned into
//! [`Field`]s and [`Relation`]s, with the line of every key that names a column.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

use super::origin::{Origin, line_of};
use super::{Field, FieldType, Relation};
use crate::{error::Error, error::Result};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
enum RelationKindToml {
    Parent,
    Children,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RelationToml {
    table: Spanned<String>,
    kind: RelationKindToml,
    foreign_key: Vec<Spanned<String>>,
    references: Option<Vec<Spanned<String>>>,
    key: Option<Spanned<String>>,
    order_by: Option<Spanned<String>>,
    #[serde(default)]
    descending: bool,
    limit: Option<u32>,
    #[serde(default)]
    nested: bool,
    #[serde(default)]
    fields: BTreeMap<String, Spanned<FieldToml>>,
    /// Children of a join table, each replaced by its one relation's object.
    #[serde(default)]
    through: bool,
    /// Relations of its rows (`[…relations.seller.relations.city]`).
    #[serde(default)]
    pub(super) relations: BTreeMap<String, Spanned<RelationToml>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
enum Kind {
    Text,
    Keyword,
    Long,
    Double,
    Boolean,
    Date,
    Object,
    GeoPoint,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FieldToml {
    #[serde(rename = "type")]
    kind: Kind,
    column: Option<Spanned<String>>,
    analyzer: Option<String>,
    #[serde(default)]
    raw: bool,
    copy_to: Option<String>,
    normalizer: Option<String>,
    index: Option<bool>,
    lat: Option<Spanned<String>>,
    lon: Option<Spanned<String>>,
}

impl FieldToml {
    /// Notes the lines of its column keys under `path` (`document.fields.geo`).
    pub(super) fn note_lines(&self, text: &str, path: &str, origin: &mut Origin) {
        for (key, value) in [
            ("column", &self.column),
            ("lat", &self.lat),
            ("lon", &self.lon),
        ] {
            if let Some(value) = value {
                origin.note(format!("{path}.{key}"), line_of(text, value.span().start));
            }
        }
    }
}

impl RelationToml {
    /// Notes the lines of its keys, relative to the relation (`order_by`, `fields.x.column`).
    pub(super) fn note_lines(&self, text: &str, origin: &mut Origin) {
        let line = |s: std::ops::Range<usize>| line_of(text, s.start);
        origin.note("table", line(self.table.span()));
        for (key, value) in [("key", &self.key), ("order_by", &self.order_by)] {
            if let Some(value) = value {
                origin.note(key, line(value.span()));
            }
        }
        let references = self.references.iter().flatten();
        for (key, column) in self
            .foreign_key
            .iter()
            .map(|c| ("foreign_key", c))
            .chain(references.map(|c| ("references", c)))
        {
            origin.note(format!("{key}.{}", column.get_ref()), line(column.span()));
        }
        for (name, field) in &self.fields {
            let path = format!("fields.{name}");
            field.get_ref().note_lines(text, &path, origin);
            origin.note(path, line(field.span()));
        }
    }
}

/// The relation `name` (at `path` below `relations.`: `seller.relations.city`) of a table
/// whose key is `owner_key`, without its own relations.
pub(super) fn relation_of(
    (name, path): (&str, &str),
    raw: &RelationToml,
    owner_key: &str,
    at: &dyn Fn(&str) -> String,
) -> Result<Relation> {
    let key = raw
        .key
        .as_ref()
        .map_or_else(|| "id".to_owned(), |k| k.get_ref().clone());
    let columns = |list: &[Spanned<String>]| -> Vec<String> {
        list.iter().map(|c| c.get_ref().clone()).collect()
    };
    let foreign_key = columns(&raw.foreign_key);
    let references = match &raw.references {
        Some(list) => columns(list),
        None => vec![match raw.kind {
            RelationKindToml::Parent => key.clone(),
            RelationKindToml::Children => owner_key.to_owned(),
        }],
    };
    let foreign_key: Vec<&str> = foreign_key.iter().map(String::as_str).collect();
    let references: Vec<&str> = references.iter().map(String::as_str).collect();
    let refuse = |key: &str, why: &str| {
        Error::config(
            "BENALSAM_CONFIG",
            format!("{}: {why}", at(&format!("relations.{path}.{key}"))),
        )
    };
    let table = raw.table.get_ref();
    let mut relation = match raw.kind {
        RelationKindToml::Parent => {
            for (key, given) in [
                ("order_by", raw.order_by.is_some()),
                ("descending", raw.descending),
                ("limit", raw.limit.is_some()),
                ("nested", raw.nested),
                ("through", raw.through),
            ] {
                if given {
                    return Err(refuse(key, "applies to kind = \"children\" only"));
                }
            }
            Relation::parent(name, table, &foreign_key, &references)
        }
        RelationKindToml::Children => {
            let mut children =
                Relation::children(name, table, &foreign_key, &references).nested(raw.nested);
            if let Some(order) = &raw.order_by {
                children = children.order_by(order.get_ref(), raw.descending);
            }
            if let Some(limit) = raw.limit {
                children = children.limit(limit);
            }
            children
        }
    };
    relation.key = key;
    relation.through = raw.through;
    for (field_name, field) in &raw.fields {
        let field = field_of(
            field_name,
            field.get_ref(),
            &format!("relations.{path}.fields.{field_name}"),
            at,
        )?;
        relation.fields.insert(field_name.clone(), field);
    }
    Ok(relation)
}

/// One field of a document or of a relation's rows; `key` names it in errors.
pub(super) fn field_of(
    name: &str,
    field: &FieldToml,
    key: &str,
    at: &dyn Fn(&str) -> String,
) -> Result<Field> {
    let refuse = |why: &str| Error::config("BENALSAM_CONFIG", format!("{}: {why}", at(key)));
    let only = |allowed: &[&str]| -> Result<()> {
        let given = [
            ("analyzer", field.analyzer.is_some()),
            ("raw", field.raw),
            ("copy_to", field.copy_to.is_some()),
            ("normalizer", field.normalizer.is_some()),
            ("index", field.index.is_some()),
            ("lat", field.lat.is_some()),
            ("lon", field.lon.is_some()),
        ];
        match given.iter().find(|(k, set)| *set && !allowed.contains(k)) {
            Some((k, _)) => Err(refuse(&format!("{k} does not apply to this type"))),
            None => Ok(()),
        }
    };
    let kind = match field.kind {
        Kind::Text => {
            only(&["analyzer", "raw", "copy_to"])?;
            FieldType::Text {
                analyzer: field
                    .analyzer
                    .clone()
                    .unwrap_or_else(|| "standard".to_owned()),
                raw: field.raw,
                copy_to: field.copy_to.clone(),
            }
        }
        Kind::Keyword => {
            only(&["normalizer", "index"])?;
            FieldType::Keyword {
                normalizer: field.normalizer.clone(),
                indexed: field.index.unwrap_or(true),
            }
        }
        Kind::Long => plain(&only, FieldType::Long)?,
        Kind::Double => plain(&only, FieldType::Double)?,
        Kind::Boolean => plain(&only, FieldType::Boolean)?,
        Kind::Date => plain(&only, FieldType::Date)?,
        Kind::Object => plain(&only, FieldType::Object)?,
        Kind::GeoPoint => {
            only(&["lat", "lon"])?;
            let (Some(lat), Some(lon)) = (&field.lat, &field.lon) else {
                return Err(refuse("a geo_point needs lat and lon (the two columns)"));
            };
            FieldType::GeoPoint {
                lat: lat.get_ref().clone(),
                lon: lon.get_ref().clone(),
            }
        }
    };
    let column = field
        .column
        .as_ref()
        .map(|c| c.get_ref().clone())
        .unwrap_or_default();
    if matches!(kind, FieldType::GeoPoint { .. }) && !column.is_empty() {
        return Err(refuse("a geo_point takes lat and lon, not column"));
    }
    if ["id", "job_id", "indexed_at"].contains(&name) {
        return Err(refuse(
            "id, job_id and indexed_at are written by the library",
        ));
    }
    Ok(Field::from_column(&column, kind))
}

fn plain(only: &dyn Fn(&[&str]) -> Result<()>, kind: FieldType) -> Result<FieldType> {
    only(&[])?;
    Ok(kind)
}
