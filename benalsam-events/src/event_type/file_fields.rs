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
    Aggregate,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
enum FunctionToml {
    Count,
    Exists,
    Sum,
    Min,
    Max,
}

/// An aggregate's filter: `column op value`, never SQL.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FilterToml {
    column: Spanned<String>,
    op: String,
    value: Option<toml::Value>,
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
    /// An aggregate's function, column, type and filter.
    function: Option<FunctionToml>,
    column: Option<Spanned<String>>,
    #[serde(rename = "type")]
    kind_of_value: Option<Kind>,
    #[serde(rename = "where")]
    filter: Option<FilterToml>,
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
        if let Some(filter) = &self.filter {
            origin.note("where.column", line(filter.column.span()));
        }
        for (key, value) in [
            ("key", &self.key),
            ("order_by", &self.order_by),
            ("column", &self.column),
        ] {
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
            _ => owner_key.to_owned(),
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
    refuse_misplaced(raw).map_err(|(key, why)| refuse(key, why))?;
    let mut relation = match raw.kind {
        RelationKindToml::Aggregate => {
            let (function, kind) = aggregate_of(raw).map_err(|(key, why)| refuse(key, &why))?;
            Relation::aggregate(name, table, &foreign_key, &references, function, kind)
        }
        RelationKindToml::Parent => Relation::parent(name, table, &foreign_key, &references),
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
    if let Some(filter) = &raw.filter {
        let value =
            filter_value(filter.value.as_ref()).map_err(|why| refuse("where.value", why))?;
        relation = relation.filter(filter.column.get_ref(), &filter.op, value.as_deref());
    }
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

/// Refuses a key the relation's kind does not take: `(key, why)`.
fn refuse_misplaced(raw: &RelationToml) -> std::result::Result<(), (&'static str, &'static str)> {
    let aggregate_keys = [
        ("function", raw.function.is_some()),
        ("column", raw.column.is_some()),
        ("type", raw.kind_of_value.is_some()),
        ("where", raw.filter.is_some()),
    ];
    let children_keys = [
        ("order_by", raw.order_by.is_some()),
        ("descending", raw.descending),
        ("limit", raw.limit.is_some()),
        ("nested", raw.nested),
        ("through", raw.through),
    ];
    let (misplaced, why) = match raw.kind {
        RelationKindToml::Children => (&aggregate_keys[..], "applies to kind = \"aggregate\" only"),
        RelationKindToml::Parent => {
            if let Some((key, _)) = aggregate_keys.iter().find(|(_, given)| *given) {
                return Err((key, "applies to kind = \"aggregate\" only"));
            }
            (&children_keys[..], "applies to kind = \"children\" only")
        }
        RelationKindToml::Aggregate => (&children_keys[..], "applies to kind = \"children\" only"),
    };
    match misplaced.iter().find(|(_, given)| *given) {
        Some((key, _)) => Err((key, why)),
        None => Ok(()),
    }
}

/// A filter's value as the text of its literal: a string, a number or a boolean.
fn filter_value(value: Option<&toml::Value>) -> std::result::Result<Option<String>, &'static str> {
    Ok(match value {
        None => None,
        Some(toml::Value::String(s)) => Some(s.clone()),
        Some(toml::Value::Integer(i)) => Some(i.to_string()),
        Some(toml::Value::Float(f)) => Some(f.to_string()),
        Some(toml::Value::Boolean(b)) => Some(b.to_string()),
        Some(_) => return Err("must be a string, a number or a boolean"),
    })
}

/// An aggregate's function and the type of its value (`count`: long, `exists`: boolean,
/// `sum`: double unless told; `min` and `max` name their type).
fn aggregate_of(
    raw: &RelationToml,
) -> std::result::Result<(super::Aggregate, FieldType), (&'static str, String)> {
    use super::Aggregate;
    let Some(function) = raw.function else {
        return Err((
            "function",
            "an aggregate needs a function: count, exists, sum, min or max".to_owned(),
        ));
    };
    let column = raw.column.as_ref().map(|c| c.get_ref().clone());
    let (aggregate, default) = match (function, column) {
        (FunctionToml::Count, None) => (Aggregate::Count, Some(FieldType::Long)),
        (FunctionToml::Exists, None) => (Aggregate::Exists, Some(FieldType::Boolean)),
        (FunctionToml::Count | FunctionToml::Exists, Some(_)) => {
            return Err(("column", "count and exists take no column".to_owned()));
        }
        (FunctionToml::Sum, Some(c)) => (Aggregate::Sum(c), Some(FieldType::Double)),
        (FunctionToml::Min, Some(c)) => (Aggregate::Min(c), None),
        (FunctionToml::Max, Some(c)) => (Aggregate::Max(c), None),
        (_, None) => return Err(("column", "sum, min and max need a column".to_owned())),
    };
    let kind = match raw.kind_of_value {
        Some(Kind::Long) => FieldType::Long,
        Some(Kind::Double) => FieldType::Double,
        Some(Kind::Boolean) => FieldType::Boolean,
        Some(Kind::Date) => FieldType::Date,
        Some(Kind::Keyword) => FieldType::Keyword {
            normalizer: None,
            indexed: true,
        },
        Some(_) => {
            return Err((
                "type",
                "an aggregate is a long, double, date, keyword or boolean".to_owned(),
            ));
        }
        None => default.ok_or((
            "type",
            "min and max need the type of their value (long, double, date, keyword)".to_owned(),
        ))?,
    };
    Ok((aggregate, kind))
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
