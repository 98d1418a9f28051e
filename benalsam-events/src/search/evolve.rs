//! Schema evolution: what separates the index an event type wants from the live one, each
//! difference classified once as something the engine applies in place ([`Change::Add`]) or
//! something only a new index can carry ([`Change::NeedsReindex`]). Pure, so it is tested
//! (property tests included) without an engine.
//!
//! | difference | class |
//! |---|---|
//! | a field missing, at any depth (inside an object or nested relation too), or a new multi-field (`fields.raw`) | add |
//! | an object's `dynamic`, a keyword's `ignore_above` | add (updatable in place) |
//! | a field's type, `analyzer`, `search_analyzer`, `normalizer`, `format`, `index`, `copy_to` or any other parameter | reindex |
//! | an analyzer, normalizer, filter, tokenizer or char filter of the analysis settings missing or different | reindex (the engine changes analysis only on a closed index, and we never close one) |
//! | `number_of_shards` | reindex |
//! | a field or analysis entry the live index has and the file no longer names | nothing: it stays, unused |

use serde_json::{Map, Value};

/// How a difference can be applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// In place, with `PUT _mapping`.
    Add,
    /// Only by building a new index (`reindex --type <name>`); says what changed.
    NeedsReindex(String),
    /// The field's type changed (also only by a reindex): kept apart because
    /// [`EventType::ensure_index`](crate::event_type::EventType::ensure_index) refuses it as a mapping
    /// conflict.
    Retype {
        /// The live index's type.
        found: String,
        /// The type the event type wants.
        wanted: String,
    },
}

/// One difference, at a dotted path (`company.verified`, `analysis.analyzer.benalsam_turkish`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    /// Where: a dotted field path, or `analysis.<section>.<name>`.
    pub path: String,
    /// How it can be applied.
    pub change: Change,
}

/// Every difference, and the `properties` of the `PUT _mapping` body that applies the
/// additions (empty when there are none).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Diff {
    /// Every difference, mapping first (in field order), then analysis.
    pub differences: Vec<Difference>,
    /// The `properties` of the `PUT _mapping` that applies the additions.
    pub additions: Map<String, Value>,
}

impl Diff {
    /// The paths added in place.
    pub fn added(&self) -> Vec<String> {
        self.differences
            .iter()
            .filter(|d| d.change == Change::Add)
            .map(|d| d.path.clone())
            .collect()
    }

    /// What needs a reindex, one line each (`title: analyzer "a" → "b"`).
    pub fn needs_reindex(&self) -> Vec<String> {
        self.differences
            .iter()
            .filter_map(|d| match &d.change {
                Change::NeedsReindex(why) => Some(format!("{}: {why}", d.path)),
                Change::Retype { found, wanted } => {
                    Some(format!("{}: type {found} → {wanted}", d.path))
                }
                Change::Add => None,
            })
            .collect()
    }

    /// The fields whose type changed: (path, live type, wanted type).
    pub fn retyped(&self) -> impl Iterator<Item = (&str, &str, &str)> {
        self.differences.iter().filter_map(|d| match &d.change {
            Change::Retype { found, wanted } => {
                Some((d.path.as_str(), found.as_str(), wanted.as_str()))
            }
            _ => None,
        })
    }
}

/// Parameters the engine updates on a live field.
const IN_PLACE: &[&str] = &["ignore_above", "dynamic"];

/// Compares the wanted index body (`{settings, mappings}`, as `EventType::index_body` makes
/// it) with the live index's mapping
/// (`mappings` of `GET _mapping`) and settings (`settings.index` of `GET _settings`).
pub fn diff(want: &Value, live_mappings: &Value, live_settings: &Value) -> Diff {
    let mut out = Diff::default();
    let none = Map::new();
    if let Some(wanted) = want["mappings"]["properties"].as_object() {
        let live = live_mappings["properties"].as_object().unwrap_or(&none);
        out.additions = properties("", wanted, live, &mut out.differences);
    }
    analysis(
        &want["settings"]["analysis"],
        &live_settings["analysis"],
        &mut out.differences,
    );
    // Fixed when an index is created (replicas and the refresh interval are not, and are the
    // operator's to tune on the live index).
    let shards = &want["settings"]["number_of_shards"];
    let live_shards = &live_settings["number_of_shards"];
    if !shards.is_null() && !live_shards.is_null() && normalized(shards) != normalized(live_shards)
    {
        out.differences.push(reindex(
            "settings.number_of_shards",
            format!("{} → {}", shown(live_shards), shown(shards)),
        ));
    }
    out
}

/// The differences of the properties `want` against `have` (pushed to `out`); returns the
/// additions, shaped as a `properties` object of a `PUT _mapping`.
fn properties(
    prefix: &str,
    want: &Map<String, Value>,
    have: &Map<String, Value>,
    out: &mut Vec<Difference>,
) -> Map<String, Value> {
    let mut additions = Map::new();
    for (name, wanted) in want {
        let path = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}.{name}")
        };
        match have.get(name) {
            None => {
                out.push(Difference {
                    path,
                    change: Change::Add,
                });
                additions.insert(name.clone(), wanted.clone());
            }
            Some(live) => {
                if let Some(addition) = field(&path, wanted, live, out) {
                    additions.insert(name.clone(), addition);
                }
            }
        }
    }
    additions
}

/// The differences of one existing field; returns what to put for it, if anything changes
/// in place.
fn field(path: &str, want: &Value, have: &Value, out: &mut Vec<Difference>) -> Option<Value> {
    let (want_type, have_type) = (type_of(want), type_of(have));
    if want_type != have_type {
        out.push(Difference {
            path: path.to_owned(),
            change: Change::Retype {
                found: have_type.to_string(),
                wanted: want_type.to_string(),
            },
        });
        return None;
    }
    let before = out.len();
    let mut in_place = false;
    let empty = Map::new();
    let keys = want.as_object().unwrap_or(&empty);
    for (key, wanted) in keys {
        if matches!(key.as_str(), "type" | "properties" | "fields") {
            continue;
        }
        let live = &have[key];
        if normalized(wanted) == normalized(live) {
            continue;
        }
        if IN_PLACE.contains(&key.as_str()) {
            out.push(Difference {
                path: format!("{path} ({key})"),
                change: Change::Add,
            });
            in_place = true;
        } else {
            out.push(reindex(
                path,
                format!("{key} {} → {}", shown(live), shown(wanted)),
            ));
        }
    }
    // Multi-fields: new ones are added with the whole field's definition.
    let subfields = match (want["fields"].as_object(), have["fields"].as_object()) {
        (Some(want), have) => properties(path, want, have.unwrap_or(&empty), out),
        _ => Map::new(),
    };
    let children = match want["properties"].as_object() {
        Some(want) => properties(
            path,
            want,
            have["properties"].as_object().unwrap_or(&empty),
            out,
        ),
        None => Map::new(),
    };
    if out[before..]
        .iter()
        .any(|d| d.path == path && d.change != Change::Add)
    {
        // The field's own definition cannot be put again; its children still can.
        return (!children.is_empty()).then(|| object_addition(want, children));
    }
    if in_place || !subfields.is_empty() {
        let mut whole = want.clone();
        if !children.is_empty() {
            whole["properties"] = Value::Object(children);
        } else if let Some(map) = whole.as_object_mut() {
            map.remove("properties");
        }
        return Some(whole);
    }
    (!children.is_empty()).then(|| object_addition(want, children))
}

/// An object's addition: its type (a nested one must say so) and its new children.
fn object_addition(want: &Value, children: Map<String, Value>) -> Value {
    let mut addition = Map::new();
    if let Some(kind) = want.get("type") {
        addition.insert("type".into(), kind.clone());
    }
    addition.insert("properties".into(), Value::Object(children));
    Value::Object(addition)
}

/// The analysis settings: every entry the file names must be in the live index as it is.
fn analysis(want: &Value, have: &Value, out: &mut Vec<Difference>) {
    let Some(sections) = want.as_object() else {
        return;
    };
    for (section, entries) in sections {
        let Some(entries) = entries.as_object() else {
            continue;
        };
        for (name, wanted) in entries {
            let path = format!("analysis.{section}.{name}");
            let live = &have[section][name];
            if live.is_null() {
                out.push(reindex(&path, "missing from the live index".to_owned()));
            } else if normalized(wanted) != normalized(live) {
                out.push(reindex(
                    &path,
                    format!("{} → {}", shown(live), shown(wanted)),
                ));
            }
        }
    }
}

fn reindex(path: &str, why: String) -> Difference {
    Difference {
        path: path.to_owned(),
        change: Change::NeedsReindex(why),
    }
}

/// A field's type; an object's mapping leaves it out.
fn type_of(field: &Value) -> &str {
    field["type"].as_str().unwrap_or("object")
}

/// A value as the engine gives it back: scalars as strings (settings come back as
/// strings, `dynamic: true` as `"true"`), a one-element list as its element (`copy_to`).
fn normalized(value: &Value) -> Value {
    match value {
        Value::Bool(b) => Value::String(b.to_string()),
        Value::Number(n) => Value::String(n.to_string()),
        Value::Array(items) if items.len() == 1 => normalized(&items[0]),
        Value::Array(items) => Value::Array(items.iter().map(normalized).collect()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), normalized(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

fn shown(value: &Value) -> String {
    if value.is_null() {
        "(unset)".to_owned()
    } else {
        value.to_string()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    fn body(properties: Value) -> Value {
        json!({ "settings": {}, "mappings": { "properties": properties } })
    }

    /// `additions` merged into `live` as the engine merges a `PUT _mapping`.
    fn merge(live: &mut Value, additions: &Map<String, Value>) {
        for (name, addition) in additions {
            let target = &mut live[name];
            if target.is_null() {
                *target = addition.clone();
                continue;
            }
            if let Some(map) = addition.as_object() {
                for (key, value) in map {
                    if key == "properties" || key == "fields" {
                        let children = value.as_object().cloned().unwrap_or_default();
                        if target[key].is_null() {
                            target[key] = json!({});
                        }
                        merge(&mut target[key], &children);
                    } else {
                        target[key] = value.clone();
                    }
                }
            }
        }
    }

    #[test]
    fn a_field_added_to_a_relation_is_added_inside_it() {
        let want = body(json!({
            "title": { "type": "text", "analyzer": "standard" },
            "company": { "type": "object", "properties": {
                "name": { "type": "keyword" }, "verified": { "type": "boolean" } } },
            "images": { "type": "nested", "properties": {
                "url": { "type": "keyword" }, "alt": { "type": "text" } } }
        }));
        // As the engine answers: an object without its type.
        let live = json!({ "properties": {
            "title": { "type": "text", "analyzer": "standard" },
            "company": { "properties": { "name": { "type": "keyword" } } },
            "images": { "type": "nested", "properties": { "url": { "type": "keyword" } } }
        }});
        let diff = diff(&want, &live, &json!({}));
        assert_eq!(diff.added(), vec!["company.verified", "images.alt"]);
        assert!(diff.needs_reindex().is_empty());
        assert_eq!(
            Value::Object(diff.additions),
            json!({
                "company": { "type": "object", "properties": { "verified": { "type": "boolean" } } },
                "images": { "type": "nested", "properties": { "alt": { "type": "text" } } }
            })
        );
    }

    #[test]
    fn type_analyzer_format_and_analysis_changes_need_a_reindex() {
        let want = json!({
            "settings": { "number_of_shards": 2, "analysis": {
                "analyzer": { "a": { "type": "custom", "tokenizer": "standard", "filter": ["lowercase"] } },
                "normalizer": { "n": { "type": "custom", "filter": ["lowercase"] } } } },
            "mappings": { "properties": {
                "price": { "type": "double" },
                "title": { "type": "text", "analyzer": "a" },
                "code": { "type": "keyword", "normalizer": "n" },
                "day": { "type": "date", "format": "yyyy-MM-dd" },
                "seller": { "properties": { "name": { "type": "text", "search_analyzer": "a" } } }
            } }
        });
        let live_mapping = json!({ "properties": {
            "price": { "type": "long" },
            "title": { "type": "text", "analyzer": "standard" },
            "code": { "type": "keyword" },
            "day": { "type": "date" },
            "seller": { "properties": { "name": { "type": "text" } } }
        }});
        let live_settings = json!({ "number_of_shards": "1", "analysis": {
            "analyzer": { "a": { "type": "custom", "tokenizer": "whitespace", "filter": ["lowercase"] } } } });
        let diff = diff(&want, &live_mapping, &live_settings);
        let paths: Vec<&str> = diff.differences.iter().map(|d| d.path.as_str()).collect();
        assert_eq!(
            paths,
            vec![
                "code",
                "day",
                "price",
                "seller.name",
                "title",
                "analysis.analyzer.a",
                "analysis.normalizer.n",
                "settings.number_of_shards"
            ]
        );
        assert!(diff.added().is_empty() && diff.additions.is_empty());
        let lines = diff.needs_reindex();
        assert!(
            lines.contains(&"price: type long → double".to_owned()),
            "{lines:?}"
        );
        assert!(lines.contains(&"title: analyzer \"standard\" → \"a\"".to_owned()));
        assert!(lines.contains(&"analysis.normalizer.n: missing from the live index".to_owned()));
    }

    #[test]
    fn what_the_engine_gives_back_differently_is_no_difference() {
        let want = json!({
            "settings": { "analysis": { "filter": { "s": { "type": "stop", "stopwords": "_turkish_", "ignore_case": true } } } },
            "mappings": { "properties": {
                "all": { "type": "text" },
                "title": { "type": "text", "copy_to": "all", "fields": { "raw": { "type": "keyword", "ignore_above": 256 } } },
                "attrs": { "type": "object", "dynamic": true }
            } }
        });
        let live_mapping = json!({ "properties": {
            "all": { "type": "text" },
            "title": { "type": "text", "copy_to": ["all"], "fields": { "raw": { "type": "keyword", "ignore_above": 256 } } },
            "attrs": { "dynamic": "true", "properties": { "colour": { "type": "keyword" } } },
            "removed": { "type": "long" }
        }});
        let live_settings = json!({ "analysis": { "filter": {
            "s": { "type": "stop", "stopwords": "_turkish_", "ignore_case": "true" } } } });
        assert_eq!(diff(&want, &live_mapping, &live_settings), Diff::default());
    }

    #[test]
    fn a_new_multi_field_and_ignore_above_are_applied_in_place() {
        let want = body(json!({
            "title": { "type": "text", "fields": {
                "raw": { "type": "keyword", "ignore_above": 512 },
                "exact": { "type": "keyword" } } }
        }));
        let live = json!({ "properties": {
            "title": { "type": "text", "fields": { "raw": { "type": "keyword", "ignore_above": 256 } } }
        }});
        let diff = diff(&want, &live, &json!({}));
        assert!(diff.needs_reindex().is_empty(), "{diff:?}");
        assert_eq!(
            diff.added(),
            vec!["title.exact", "title.raw (ignore_above)"]
        );
        assert_eq!(
            diff.additions["title"],
            want["mappings"]["properties"]["title"]
        );
    }

    /// A mapping of a few levels: leaves of a few types, objects and nested objects.
    fn mapping() -> impl Strategy<Value = Map<String, Value>> {
        let leaf = prop_oneof![
            Just(json!({ "type": "keyword" })),
            Just(json!({ "type": "long" })),
            Just(json!({ "type": "boolean" })),
            Just(json!({ "type": "text", "analyzer": "standard" })),
            Just(json!({ "type": "date", "format": "strict_date_optional_time" })),
        ];
        let field = leaf.prop_recursive(3, 24, 4, |inner| {
            (
                proptest::collection::btree_map("[a-e]{1,2}", inner, 1..4),
                any::<bool>(),
            )
                .prop_map(|(children, nested)| {
                    let properties: Map<String, Value> = children.into_iter().collect();
                    if nested {
                        json!({ "type": "nested", "properties": properties })
                    } else {
                        json!({ "type": "object", "properties": properties })
                    }
                })
        });
        proptest::collection::btree_map("[a-e]{1,2}", field, 1..5)
            .prop_map(|m| m.into_iter().collect())
    }

    /// The dotted paths of every field of `properties`, with a pointer into it.
    fn paths(properties: &Map<String, Value>, prefix: &str, out: &mut Vec<(String, Vec<String>)>) {
        for (name, field) in properties {
            let path = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}.{name}")
            };
            let keys: Vec<String> = path.split('.').map(str::to_owned).collect();
            out.push((path.clone(), keys));
            if let Some(children) = field["properties"].as_object() {
                paths(children, &path, out);
            }
        }
    }

    fn at<'a>(properties: &'a mut Map<String, Value>, keys: &[String]) -> &'a mut Value {
        let mut node = properties.get_mut(&keys[0]).expect("a path of the mapping");
        for key in &keys[1..] {
            node = &mut node["properties"][key];
        }
        node
    }

    proptest! {
        #[test]
        fn a_mapping_has_no_difference_with_itself(m in mapping()) {
            let want = body(Value::Object(m.clone()));
            prop_assert_eq!(diff(&want, &json!({ "properties": m }), &json!({})), Diff::default());
        }

        #[test]
        fn a_field_added_at_any_depth_is_one_addition_that_makes_the_mappings_equal(
            m in mapping(), pick in any::<prop::sample::Index>(), leaf in "[x-z]{3}",
        ) {
            let mut all = Vec::new();
            paths(&m, "", &mut all);
            // Under a random object, or at the top.
            let objects: Vec<&(String, Vec<String>)> = all.iter()
                .filter(|(_, keys)| {
                    let mut copy = m.clone();
                    at(&mut copy, keys)["properties"].is_object()
                })
                .collect();
            let mut wanted = m.clone();
            let path = if objects.is_empty() {
                wanted.insert(leaf.clone(), json!({ "type": "keyword" }));
                leaf.clone()
            } else {
                let (path, keys) = objects[pick.index(objects.len())];
                at(&mut wanted, keys)["properties"][&leaf] = json!({ "type": "keyword" });
                format!("{path}.{leaf}")
            };
            let live = json!({ "properties": m });
            let found = diff(&body(Value::Object(wanted.clone())), &live, &json!({}));
            prop_assert_eq!(found.added(), vec![path]);
            prop_assert!(found.needs_reindex().is_empty());
            let mut merged = live["properties"].clone();
            merge(&mut merged, &found.additions);
            prop_assert_eq!(merged, Value::Object(wanted));
        }

        #[test]
        fn a_type_changed_at_any_depth_needs_a_reindex_naming_it(
            m in mapping(), pick in any::<prop::sample::Index>(),
        ) {
            let mut all = Vec::new();
            paths(&m, "", &mut all);
            let (path, keys) = &all[pick.index(all.len())];
            let mut wanted = m.clone();
            let field = at(&mut wanted, keys);
            *field = if field["type"] == "geo_point" {
                json!({ "type": "keyword" })
            } else {
                json!({ "type": "geo_point" })
            };
            let found = diff(&body(Value::Object(wanted)), &json!({ "properties": m }), &json!({}));
            let reindex: Vec<&str> = found.differences.iter()
                .filter(|d| d.change != Change::Add).map(|d| d.path.as_str()).collect();
            prop_assert_eq!(reindex, vec![path.as_str()]);
            prop_assert!(found.additions.is_empty());
        }
    }
}
