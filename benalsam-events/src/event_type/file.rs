//! The event-type file of the binaries (TOML), read into [`EventType`]s.
//!
//! Every key is checked: an unknown one (a typo) or a value of the wrong type is a parse
//! error with its line and column; a value that cannot work (a name used twice, a geo point
//! without its columns, searchable statuses without a status column) names the event type,
//! its line and the key. The line of every key that names a column is kept (an [`Origin`]),
//! so that the catalog check at `migrate` and at start points at it too.
//! `examples/config/benalsam.toml` documents every key.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use toml::Spanned;

use super::file_fields::{FieldToml, RelationToml, field_of, relation_of};
use super::origin::{Origin, line_of};
use super::{DocumentSpec, EventType, IndexSpec, Relation};
use crate::{error::Error, error::Result};

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
    table: Option<Spanned<String>>,
    jobs_as: Option<String>,
    key: Option<Spanned<String>>,
    #[serde(default)]
    ignore: Vec<Spanned<String>>,
    notify: Option<bool>,
    exchange: Option<String>,
    routing_prefix: Option<String>,
    status_column: Option<Spanned<String>>,
    queue: Option<String>,
    dead_letter_exchange: Option<String>,
    dead_letter_queue: Option<String>,
    status_queue: Option<String>,
    index: Option<IndexToml>,
    document: Option<DocumentToml>,
    #[serde(default)]
    relations: BTreeMap<String, Spanned<RelationToml>>,
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
    fields: BTreeMap<String, Spanned<FieldToml>>,
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
        let origin = origin_of(text, name, &spanned);
        let raw = spanned.into_inner();
        let at = |key: &str| format!("{}event type {:?}, {key}", origin.prefix(key), raw.name);
        let mut event_type = convert((text, name), &raw, &at)?;
        event_type.origin = origin.clone();
        // An error that names the file already (a relation's) stays as it is.
        event_type.validate().map_err(|e| {
            if e.setting() == Some("BENALSAM_CONFIG") {
                e
            } else {
                Error::config("BENALSAM_CONFIG", format!("{}: {e}", at("settings")))
            }
        })?;
        refuse_clashes(&types, &event_type, &at)?;
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

/// The lines of the keys of one `[[event_type]]` that name columns.
fn origin_of(text: &str, name: &str, spanned: &Spanned<EventTypeToml>) -> Origin {
    let line = |s: std::ops::Range<usize>| line_of(text, s.start);
    let raw = spanned.get_ref();
    let mut origin = Origin::in_file(name, line(spanned.span()));
    for (key, value) in [
        ("table", &raw.table),
        ("key", &raw.key),
        ("status_column", &raw.status_column),
    ] {
        if let Some(value) = value {
            origin.note(key, line(value.span()));
        }
    }
    for column in &raw.ignore {
        origin.note(format!("ignore.{}", column.get_ref()), line(column.span()));
    }
    if let Some(document) = &raw.document {
        for (field, spanned) in &document.fields {
            let path = format!("document.fields.{field}");
            spanned.get_ref().note_lines(text, &path, &mut origin);
            origin.note(path, line(spanned.span()));
        }
    }
    for (relation, spanned) in &raw.relations {
        origin.note(format!("relations.{relation}"), line(spanned.span()));
    }
    origin
}

/// Refuses an event type that takes the name, the index or the table of an earlier one.
fn refuse_clashes(
    types: &[EventType],
    event_type: &EventType,
    at: &dyn Fn(&str) -> String,
) -> Result<()> {
    let refuse = |key: &str, why: String| {
        Err(Error::config(
            "BENALSAM_CONFIG",
            format!("{}: {why}", at(key)),
        ))
    };
    if let Some(other) = types.iter().find(|t| t.name == event_type.name) {
        return refuse(
            "name",
            format!("the name is used twice (also table {})", other.table),
        );
    }
    if let Some(other) = types
        .iter()
        .find(|t| super::aliases_collide(&t.index.alias, &event_type.index.alias))
    {
        return refuse(
            "index.alias",
            format!(
                "{:?} would write the index of event type {} (alias {:?}); give each event type its own alias",
                event_type.index.alias, other.name, other.index.alias
            ),
        );
    }
    // Several event types may take one table, each recording its jobs under a name of its
    // own (`jobs_as`); two under one name would share the table's one trigger.
    if let Some(other) = types
        .iter()
        .find(|t| t.job_table() == event_type.job_table())
    {
        return refuse(
            "jobs_as",
            format!(
                "event type {} records the jobs of table {} as {:?} already; give this one \
                 jobs_as = \"{}@{}\" (a job name of its own)",
                other.name,
                event_type.table,
                event_type.job_table(),
                event_type.split_table().1,
                event_type.name
            ),
        );
    }
    Ok(())
}

/// The event type `raw` of the file (`text`, `file`) declares.
fn convert(
    (text, file): (&str, &str),
    raw: &EventTypeToml,
    at: &dyn Fn(&str) -> String,
) -> Result<EventType> {
    let owned = |value: &Option<Spanned<String>>| value.as_ref().map(|v| v.get_ref().clone());
    let table = owned(&raw.table).unwrap_or_else(|| raw.name.clone());
    let mut t = EventType::new(&raw.name, &table);
    let set = |target: &mut String, value: &Option<String>| {
        if let Some(value) = value {
            target.clone_from(value);
        }
    };
    t.jobs_as.clone_from(&raw.jobs_as);
    set(&mut t.key, &owned(&raw.key));
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
    t.ignore = raw.ignore.iter().map(|c| c.get_ref().clone()).collect();
    t.notify = raw.notify.unwrap_or(true);
    t.status_column = owned(&raw.status_column);
    t.status_queue.clone_from(&raw.status_queue);
    if let Some(index) = &raw.index {
        t.index = index_spec(index, &t.index.alias, at)?;
    }
    if let Some(document) = &raw.document {
        t.document = document_spec(document, at)?;
    }
    for (name, spanned) in &raw.relations {
        let relation = relation_tree((text, file), (name, name), spanned, &t.key, at)?;
        t.relations.push(relation);
    }
    Ok(t)
}

/// The relation `name` (at `path`) with its own relations, each with the lines of its keys.
fn relation_tree(
    (text, file): (&str, &str),
    (name, path): (&str, &str),
    spanned: &Spanned<RelationToml>,
    owner_key: &str,
    at: &dyn Fn(&str) -> String,
) -> Result<Relation> {
    let raw = spanned.get_ref();
    let mut relation = relation_of((name, path), raw, owner_key, at)?;
    // Where it was declared, for the errors the database catalog finds later.
    relation.origin = relation_origin(text, file, spanned);
    for (below, spanned) in &raw.relations {
        let below_path = format!("{path}.relations.{below}");
        let key = relation.key.clone();
        let below = relation_tree((text, file), (below, &below_path), spanned, &key, at)?;
        relation = relation.relation(below);
    }
    Ok(relation)
}

/// The lines of a relation's keys.
fn relation_origin(text: &str, file: &str, spanned: &Spanned<RelationToml>) -> Origin {
    let line = |s: std::ops::Range<usize>| line_of(text, s.start);
    let mut relation = Origin::in_file(file, line(spanned.span()));
    spanned.get_ref().note_lines(text, &mut relation);
    relation
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
        let field = field_of(
            name,
            field.get_ref(),
            &format!("document.fields.{name}"),
            at,
        )?;
        spec.fields.insert(name.clone(), field);
    }
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event_type::Relation;

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
    fn a_second_event_type_on_a_table_needs_a_job_name_of_its_own() {
        let second = "\n[[event_type]]\nname = \"listings_admin\"\ntable = \"listings\"\n\
                      [event_type.index]\nalias = \"listings_admin\"\n";
        let err = parse(&format!("{TWO}{second}"), "f.toml")
            .expect_err("two event types recording as listings")
            .to_string();
        assert!(
            err.contains("f.toml") && err.contains("jobs_as = \"listings@listings_admin\""),
            "says what to write: {err}"
        );
        let named = second.replace(
            "table = \"listings\"\n",
            "table = \"listings\"\njobs_as = \"listings@listings_admin\"\n",
        );
        let types = parse(&format!("{TWO}{named}"), "f.toml").expect("a job name of its own");
        assert_eq!(types[2].jobs_as.as_deref(), Some("listings@listings_admin"));
        assert_eq!(types[0].jobs_as, None);
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
            err.contains("relations.seller.fields.rat'ing") && err.contains("j.toml:46"),
            "{err}"
        );
        let parsed = &parse(JOINED, "j.toml").expect("valid")[0];
        let (photos, seller) = (&parsed.relations[1], &parsed.relations[2]);
        let at = |relation: &Relation, path: &str| relation.origin.place(path);
        assert_eq!(at(seller, "table").as_deref(), Some("j.toml:41"));
        assert_eq!(
            at(seller, "foreign_key.user_id").as_deref(),
            Some("j.toml:43")
        );
        assert_eq!(at(seller, "fields.rating").as_deref(), Some("j.toml:46"));
        assert_eq!(at(photos, "order_by").as_deref(), Some("j.toml:65"));
        assert_eq!(at(photos, "references.id").as_deref(), Some("j.toml:64"));
        let category = &parsed.relations[0];
        assert_eq!(
            at(category, "fields.name.column").as_deref(),
            Some("j.toml:56")
        );
        assert_eq!(at(category, "key").as_deref(), Some("j.toml:53"));
    }

    #[test]
    fn every_key_that_names_a_column_keeps_its_line() {
        let types = parse(TWO, "f.toml").expect("valid");
        let (listings, inventory) = (&types[0].origin, &types[1].origin);
        assert_eq!(listings.place("status_column").as_deref(), Some("f.toml:4"));
        assert_eq!(
            listings.place("key").as_deref(),
            Some("f.toml:2"),
            "the table's line"
        );
        assert_eq!(
            listings.place("document.fields.geo.lon").as_deref(),
            Some("f.toml:13")
        );
        assert_eq!(
            listings.place("document.fields.title").as_deref(),
            Some("f.toml:12")
        );
        assert_eq!(inventory.place("key").as_deref(), Some("f.toml:18"));
        assert_eq!(
            inventory.place("ignore.scan_count").as_deref(),
            Some("f.toml:19")
        );
        assert_eq!(
            inventory
                .place("document.fields.stored_in.column")
                .as_deref(),
            Some("f.toml:28")
        );
        assert_eq!(
            types[1].at("key", "key"),
            "f.toml:18: event type \"inventory\", key"
        );
        assert_eq!(
            EventType::new("x", "x").at("key", "key"),
            "event type \"x\", key",
            "an event type built in code is named without a place"
        );
    }
}
