//! The event-type file of the binaries (TOML), read into [`EventType`]s.
//!
//! Every key is checked: an unknown one (a typo) or a value of the wrong type is a parse
//! error with its line and column; a value that cannot work (a name used twice, a geo point
//! without its columns, searchable statuses without a status column) names the event type,
//! its line and the key. `examples/config/benalsam.toml` documents every key.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use toml::Spanned;

use super::{DocumentSpec, EventType, Field, FieldType, IndexSpec, Relation};
use crate::{Error, Result};

/// The file: a list of `[[event_type]]` tables.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    event_type: Vec<Spanned<EventTypeToml>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventTypeToml {
    name: String,
    table: Option<String>,
    key: Option<String>,
    #[serde(default)]
    ignore: Vec<String>,
    notify: Option<bool>,
    exchange: Option<String>,
    routing_prefix: Option<String>,
    status_column: Option<String>,
    queue: Option<String>,
    dead_letter_exchange: Option<String>,
    dead_letter_queue: Option<String>,
    status_queue: Option<String>,
    index: Option<IndexToml>,
    document: Option<DocumentToml>,
    #[serde(default)]
    relations: BTreeMap<String, RelationToml>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
enum RelationKindToml {
    Parent,
    Children,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RelationToml {
    table: String,
    kind: RelationKindToml,
    foreign_key: Vec<String>,
    references: Option<Vec<String>>,
    key: Option<String>,
    order_by: Option<String>,
    #[serde(default)]
    descending: bool,
    limit: Option<u32>,
    #[serde(default)]
    nested: bool,
    #[serde(default)]
    fields: BTreeMap<String, FieldToml>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct IndexToml {
    alias: Option<String>,
    shards: Option<u32>,
    replicas: Option<u32>,
    refresh_interval: Option<String>,
    gc_deletes: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DocumentToml {
    searchable_statuses: Option<Vec<String>>,
    #[serde(default)]
    fields: BTreeMap<String, FieldToml>,
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
struct FieldToml {
    #[serde(rename = "type")]
    kind: Kind,
    column: Option<String>,
    analyzer: Option<String>,
    #[serde(default)]
    raw: bool,
    copy_to: Option<String>,
    normalizer: Option<String>,
    index: Option<bool>,
    lat: Option<String>,
    lon: Option<String>,
}

/// Reads `path` into event types.
pub(super) fn load(path: &Path) -> Result<Vec<EventType>> {
    let shown = path.display();
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::config("BENALSAM_CONFIG", format!("cannot read {shown}: {e}")))?;
    parse(&text, &shown.to_string())
}

/// Parses the text of a file called `name` (for the errors).
pub(super) fn parse(text: &str, name: &str) -> Result<Vec<EventType>> {
    let file: File = toml::from_str(text)
        .map_err(|e| Error::config("BENALSAM_CONFIG", format!("{name}: {e}")))?;
    let mut types: Vec<EventType> = Vec::new();
    for spanned in file.event_type {
        let line = line_of(text, spanned.span().start);
        let raw = spanned.into_inner();
        let at = |key: &str| format!("{name}:{line}: event type {:?}, {key}", raw.name);
        let event_type = convert(&raw, &at)?;
        // An error that names the file already (a relation's) stays as it is.
        event_type.validate().map_err(|e| {
            if e.setting() == Some("BENALSAM_CONFIG") {
                e
            } else {
                Error::config("BENALSAM_CONFIG", format!("{}: {e}", at("settings")))
            }
        })?;
        if let Some(other) = types.iter().find(|t| t.name == event_type.name) {
            return Err(Error::config(
                "BENALSAM_CONFIG",
                format!(
                    "{}: the name is used twice (also table {})",
                    at("name"),
                    other.table
                ),
            ));
        }
        if let Some(other) = types
            .iter()
            .find(|t| super::aliases_collide(&t.index.alias, &event_type.index.alias))
        {
            return Err(Error::config(
                "BENALSAM_CONFIG",
                format!(
                    "{}: {:?} would write the index of event type {} (alias {:?}); give each event type its own alias",
                    at("index.alias"),
                    event_type.index.alias,
                    other.name,
                    other.index.alias
                ),
            ));
        }
        if let Some(other) = types.iter().find(|t| t.table == event_type.table) {
            return Err(Error::config(
                "BENALSAM_CONFIG",
                format!(
                    "{}: table {} already belongs to event type {}",
                    at("table"),
                    event_type.table,
                    other.name
                ),
            ));
        }
        types.push(event_type);
    }
    if types.is_empty() {
        return Err(Error::config(
            "BENALSAM_CONFIG",
            format!("{name}: no [[event_type]] declared"),
        ));
    }
    Ok(types)
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

fn convert(raw: &EventTypeToml, at: &dyn Fn(&str) -> String) -> Result<EventType> {
    let table = raw.table.clone().unwrap_or_else(|| raw.name.clone());
    let mut t = EventType::new(&raw.name, &table);
    let set = |target: &mut String, value: &Option<String>| {
        if let Some(value) = value {
            target.clone_from(value);
        }
    };
    set(&mut t.key, &raw.key);
    set(&mut t.exchange, &raw.exchange);
    set(&mut t.routing_prefix, &raw.routing_prefix);
    if let Some(queue) = &raw.queue {
        // The dead-letter names follow the queue unless given.
        t.dead_letter_exchange = format!("{queue}.dlx");
        t.dead_letter_queue = format!("{queue}.dlq");
        t.queue.clone_from(queue);
    }
    set(&mut t.dead_letter_exchange, &raw.dead_letter_exchange);
    set(&mut t.dead_letter_queue, &raw.dead_letter_queue);
    t.ignore.clone_from(&raw.ignore);
    t.notify = raw.notify.unwrap_or(true);
    t.status_column.clone_from(&raw.status_column);
    t.status_queue.clone_from(&raw.status_queue);
    if let Some(index) = &raw.index {
        t.index = index_spec(index, &t.index.alias, at)?;
    }
    if let Some(document) = &raw.document {
        t.document = document_spec(document, at)?;
    }
    for (name, relation) in &raw.relations {
        t.relations.push(relation_of(name, relation, &t.key, at)?);
    }
    Ok(t)
}

fn relation_of(
    name: &str,
    raw: &RelationToml,
    owner_key: &str,
    at: &dyn Fn(&str) -> String,
) -> Result<Relation> {
    let key = raw.key.clone().unwrap_or_else(|| "id".to_owned());
    let foreign_key: Vec<&str> = raw.foreign_key.iter().map(String::as_str).collect();
    let default_references = match raw.kind {
        RelationKindToml::Parent => key.clone(),
        RelationKindToml::Children => owner_key.to_owned(),
    };
    let references: Vec<&str> = match &raw.references {
        Some(columns) => columns.iter().map(String::as_str).collect(),
        None => vec![default_references.as_str()],
    };
    let refuse = |key: &str, why: &str| {
        Error::config(
            "BENALSAM_CONFIG",
            format!("{}: {why}", at(&format!("relations.{name}.{key}"))),
        )
    };
    let mut relation = match raw.kind {
        RelationKindToml::Parent => {
            for (key, given) in [
                ("order_by", raw.order_by.is_some()),
                ("descending", raw.descending),
                ("limit", raw.limit.is_some()),
                ("nested", raw.nested),
            ] {
                if given {
                    return Err(refuse(key, "applies to kind = \"children\" only"));
                }
            }
            Relation::parent(name, &raw.table, &foreign_key, &references)
        }
        RelationKindToml::Children => {
            let mut children =
                Relation::children(name, &raw.table, &foreign_key, &references).nested(raw.nested);
            if let Some(order) = &raw.order_by {
                children = children.order_by(order, raw.descending);
            }
            if let Some(limit) = raw.limit {
                children = children.limit(limit);
            }
            children
        }
    };
    relation.key = key;
    for (field_name, field) in &raw.fields {
        let field = field_of(
            field_name,
            field,
            &format!("relations.{name}.fields.{field_name}"),
            at,
        )?;
        relation.fields.insert(field_name.clone(), field);
    }
    // "benalsam.toml:12": where the relation was declared, for the errors the database
    // catalog finds later.
    relation.origin = at("").split(": event type").next().map(str::to_owned);
    Ok(relation)
}

fn index_spec(raw: &IndexToml, alias: &str, at: &dyn Fn(&str) -> String) -> Result<IndexSpec> {
    let mut spec = IndexSpec::new(raw.alias.as_deref().unwrap_or(alias));
    if let Some(why) = super::alias_problem(&spec.alias) {
        return Err(Error::config(
            "BENALSAM_CONFIG",
            format!("{}: {why}", at("index.alias")),
        ));
    }
    spec.shards = raw.shards.unwrap_or(1);
    spec.replicas = raw.replicas.unwrap_or(0);
    if spec.shards == 0 {
        return Err(Error::config(
            "BENALSAM_CONFIG",
            format!("{}: must be at least 1", at("index.shards")),
        ));
    }
    if let Some(refresh) = &raw.refresh_interval {
        refresh.clone_into(&mut spec.refresh_interval);
    }
    if let Some(gc) = &raw.gc_deletes {
        spec.gc_deletes = humantime::parse_duration(gc).map_err(|e| {
            Error::config(
                "BENALSAM_CONFIG",
                format!("{}: {gc:?} is not a duration ({e})", at("index.gc_deletes")),
            )
        })?;
    }
    Ok(spec)
}

fn document_spec(raw: &DocumentToml, at: &dyn Fn(&str) -> String) -> Result<DocumentSpec> {
    let mut spec = DocumentSpec {
        searchable_statuses: raw.searchable_statuses.clone(),
        ..DocumentSpec::default()
    };
    for (name, field) in &raw.fields {
        let field = field_of(name, field, &format!("document.fields.{name}"), at)?;
        spec.fields.insert(name.clone(), field);
    }
    Ok(spec)
}

/// One field of a document or of a relation's rows; `key` names it in errors.
fn field_of(
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
                lat: lat.clone(),
                lon: lon.clone(),
            }
        }
    };
    let column = field.column.clone().unwrap_or_default();
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

#[cfg(test)]
mod tests {
    use super::*;

    const TWO: &str = r#"
[[event_type]]
name = "listings"
status_column = "status"
queue = "elasticsearch.sync"
dead_letter_exchange = "benalsam.dlx"

[event_type.document]
searchable_statuses = ["active"]

[event_type.document.fields]
title = { type = "text", analyzer = "benalsam_turkish", raw = true }
geo = { type = "geo_point", lat = "latitude", lon = "longitude" }

[[event_type]]
name = "inventory"
table = "inventory_items"
key = "sku"
ignore = ["scan_count"]

[event_type.index]
alias = "benalsam_inventory"
replicas = 1

[event_type.document.fields]
name = { type = "text", analyzer = "benalsam_turkish" }
quantity = { type = "long" }
stored_in = { type = "keyword", column = "warehouse" }
"#;

    #[test]
    fn a_file_of_two_event_types() {
        let types = parse(TWO, "benalsam.toml").expect("valid");
        assert_eq!(types.len(), 2);
        let (listings, inventory) = (&types[0], &types[1]);
        assert_eq!(listings.queue, "elasticsearch.sync");
        assert_eq!(listings.dead_letter_exchange, "benalsam.dlx");
        assert_eq!(listings.dead_letter_queue, "elasticsearch.sync.dlq");
        assert_eq!(inventory.table, "inventory_items");
        assert_eq!(inventory.key, "sku");
        assert_eq!(inventory.queue, "inventory.sync");
        assert_eq!(inventory.index.replicas, 1);
        assert_eq!(inventory.document.fields["stored_in"].column, "warehouse");
    }

    #[test]
    fn mistakes_name_the_file_the_line_and_the_key() {
        let typo = TWO
            .replace("routing_prefix", "x")
            .replace("key = \"sku\"", "kye = \"sku\"");
        let err = parse(&typo, "benalsam.toml")
            .expect_err("a typo")
            .to_string();
        assert!(
            err.contains("benalsam.toml") && err.contains("kye") && err.contains("line"),
            "{err}"
        );

        let twice = format!("{TWO}\n[[event_type]]\nname = \"inventory\"\ntable = \"other\"\n");
        let err = parse(&twice, "f.toml")
            .expect_err("a name used twice")
            .to_string();
        assert!(
            err.contains("f.toml:30") && err.contains("used twice"),
            "{err}"
        );

        let no_lon = TWO.replace(", lon = \"longitude\"", "");
        let err = parse(&no_lon, "f.toml")
            .expect_err("half a geo point")
            .to_string();
        assert!(
            err.contains("document.fields.geo") && err.contains("lat and lon"),
            "{err}"
        );

        let wrong = TWO.replace(
            "analyzer = \"benalsam_turkish\", raw = true",
            "normalizer = \"x\"",
        );
        let err = parse(&wrong, "f.toml")
            .expect_err("a keyword setting on text")
            .to_string();
        assert!(err.contains("normalizer does not apply"), "{err}");

        let no_status = TWO.replace("status_column = \"status\"\n", "");
        let err = parse(&no_status, "f.toml")
            .expect_err("statuses need a column")
            .to_string();
        assert!(
            err.contains("f.toml:2") && err.contains("status_column"),
            "{err}"
        );
    }

    const EXAMPLE: &str = include_str!("../../../examples/config/benalsam.toml");
    const SNIPPET: &str = include_str!("../../../examples/new_event_type/inventory_items.toml");

    #[test]
    fn the_shipped_example_runs_the_listings_exactly_as_without_a_file() {
        let types = parse(EXAMPLE, "benalsam.toml").expect("the example is valid");
        let (file, builtin) = (&types[0], EventType::listings());
        let seen = |t: &EventType| {
            (
                (
                    t.name.clone(),
                    t.table.clone(),
                    t.key.clone(),
                    t.ignore.clone(),
                    t.notify,
                ),
                (
                    t.exchange.clone(),
                    t.routing_prefix.clone(),
                    t.status_column.clone(),
                ),
                (
                    t.queue.clone(),
                    t.dead_letter_exchange.clone(),
                    t.dead_letter_queue.clone(),
                ),
                (
                    t.status_queue.clone(),
                    t.index.clone(),
                    t.document.clone(),
                    t.index_body(),
                ),
            )
        };
        assert_eq!(seen(file), seen(&builtin));
    }

    #[test]
    fn the_new_event_type_snippet_is_the_examples_second_entry() {
        assert!(
            EXAMPLE.contains(SNIPPET),
            "examples/config/benalsam.toml ends with the snippet"
        );
        let alone = parse(SNIPPET, "inventory_items.toml").expect("the snippet is valid");
        let inventory = &parse(EXAMPLE, "benalsam.toml").expect("valid")[1];
        assert_eq!(alone[0].index_body(), inventory.index_body());
        assert_eq!(inventory.queue, "inventory.sync");
        assert_eq!(inventory.dead_letter_queue, "inventory.sync.dlq");
        assert_eq!(inventory.document.fields["stored_in"].column, "warehouse");
    }

    const JOINED: &str = include_str!("../../../examples/joined_documents/listings.toml");

    #[test]
    fn the_joined_example_declares_three_relations_and_maps_them() {
        let types = parse(JOINED, "listings.toml").expect("the joined example is valid");
        let listings = &types[0];
        let names: Vec<&str> = listings.relations.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["category_info", "photos", "seller"]);
        let seller = &listings.relations[2];
        assert_eq!(
            (
                seller.local_columns.as_slice(),
                seller.related_columns.as_slice()
            ),
            (&["user_id".to_owned()][..], &["id".to_owned()][..])
        );
        let photos = &listings.relations[1];
        assert_eq!(photos.local_columns, ["id"]);
        assert_eq!(photos.related_columns, ["listing_id"]);
        let body = listings.index_body();
        let p = &body["mappings"]["properties"];
        assert_eq!(p["seller"]["properties"]["rating"]["type"], "double");
        assert_eq!(p["photos"]["properties"]["url"]["index"], false);
        assert_eq!(p["category_info"]["properties"]["name"]["type"], "text");
        assert_eq!(p["search_text"]["type"], "text");
        assert!(listings.is_joined());
    }

    #[test]
    fn relation_mistakes_name_the_file_the_line_and_the_key() {
        let limited = JOINED.replace(
            "references = [\"id\"]              # columns of users (default: its key)",
            "limit = 2",
        );
        let err = parse(&limited, "j.toml")
            .expect_err("a limit on a parent")
            .to_string();
        assert!(
            err.contains("j.toml:") && err.contains("relations.seller.limit"),
            "{err}"
        );
        let typo = JOINED.replace(
            "foreign_key = [\"listing_id\"]",
            "foreign_keys = [\"listing_id\"]",
        );
        let err = parse(&typo, "j.toml").expect_err("a typo").to_string();
        assert!(err.contains("foreign_keys"), "{err}");
        let clash = JOINED.replace(
            "[event_type.relations.photos]",
            "[event_type.relations.title]",
        );
        let err = parse(&clash, "j.toml").expect_err("a clash").to_string();
        assert!(
            err.contains("relations.title.name") && err.contains("already has a field"),
            "{err}"
        );
        let copied = JOINED.replace(
            "[event_type.relations.photos]",
            "[event_type.relations.search_text]",
        );
        let err = parse(&copied, "j.toml")
            .expect_err("a copy_to target")
            .to_string();
        assert!(err.contains("relations.search_text.name"), "{err}");
        assert_eq!(
            err.matches("BENALSAM_CONFIG").count(),
            1,
            "said once: {err}"
        );
        let quoted = JOINED.replace("fields.rating = ", "fields.\"rat'ing\" = ");
        let err = parse(&quoted, "j.toml")
            .expect_err("not an identifier")
            .to_string();
        assert!(
            err.contains("relations.seller.fields.rat'ing") && err.contains("j.toml:9"),
            "{err}"
        );
        let origin = &parse(JOINED, "j.toml").expect("valid")[0].relations[0];
        assert_eq!(
            origin.origin.as_deref(),
            Some("j.toml:9"),
            "the line of [[event_type]]"
        );
    }
}
