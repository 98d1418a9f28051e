//! The index's settings and mapping, in the engine's JSON: what [`EventType::ensure_index`](crate::event_type::EventType::ensure_index)
//! creates and checks. The model (`event_type`) says which fields a document has; this file
//! says how the engine stores them.

use serde_json::{Map, Value, json};

use crate::event_type::EventType;
use crate::event_type::{
    DocumentSpec, FieldType, LOWERCASE, MIN_GC_DELETES, Relation, RelationKind, TURKISH,
};

impl EventType {
    /// The settings and mappings of its index.
    pub(crate) fn index_body(&self) -> Value {
        let mut settings = json!({
            "number_of_shards": self.index.shards,
            "number_of_replicas": self.index.replicas,
            "refresh_interval": self.index.refresh_interval,
            "gc_deletes": format!("{}s", self.index.gc_deletes.max(MIN_GC_DELETES).as_secs()),
        });
        let analysis = self.analysis();
        if !analysis.is_empty() {
            settings["analysis"] = Value::Object(analysis);
        }
        json!({
            "settings": settings,
            "mappings": {
                // A field the document builder does not know is a bug, not a new field.
                "dynamic": "strict",
                "properties": self.properties()
            }
        })
    }

    /// The mapping's properties: a builder's own (with the library's fields), or the
    /// document's and every relation's with their combined `copy_to` targets.
    fn properties(&self) -> Value {
        match &self.builder {
            Some((_, properties)) => {
                let mut properties = properties.clone();
                if let Some(map) = properties.as_object_mut() {
                    map.entry("id").or_insert(json!({ "type": "keyword" }));
                    map.entry("job_id").or_insert(json!({ "type": "long" }));
                    map.entry("indexed_at").or_insert(json!({ "type": "date" }));
                }
                properties
            }
            None => {
                let mut properties = self.document.properties();
                if let Some(map) = properties.as_object_mut() {
                    for relation in &self.relations {
                        map.insert(relation.name.clone(), relation.properties());
                        for (target, analyzer) in relation.copy_targets() {
                            map.entry(target.to_owned())
                                .or_insert(json!({ "type": "text", "analyzer": analyzer }));
                        }
                    }
                }
                properties
            }
        }
    }

    /// The library's analysis its fields use. A builder's own mapping gets the library's
    /// analyzer or normalizer only when it names them: the Turkish analysis needs the
    /// analysis-common module, which trimmed engines lack, and an index that does not use it
    /// must not fail for it there.
    fn analysis(&self) -> serde_json::Map<String, Value> {
        let builder_uses = |name: &str| {
            self.builder
                .as_ref()
                .is_some_and(|(_, mapping)| mapping.to_string().contains(&format!("\"{name}\"")))
        };
        let uses = |name: &str| {
            builder_uses(name)
                || self.document.uses(name)
                || self.relations.iter().any(|r| r.uses(name))
        };
        let mut analysis = serde_json::Map::new();
        if uses(TURKISH) {
            analysis.insert(
                "filter".into(),
                json!({
                    "benalsam_turkish_lowercase": { "type": "lowercase", "language": "turkish" },
                    "benalsam_turkish_stop": { "type": "stop", "stopwords": "_turkish_" },
                    "benalsam_turkish_stemmer": { "type": "stemmer", "language": "turkish" }
                }),
            );
            analysis.insert(
                "analyzer".into(),
                json!({ TURKISH: {
                    "type": "custom",
                    "tokenizer": "standard",
                    "filter": ["apostrophe", "benalsam_turkish_lowercase",
                               "benalsam_turkish_stop", "benalsam_turkish_stemmer"]
                }}),
            );
        }
        if uses(LOWERCASE) {
            analysis.insert(
                "normalizer".into(),
                json!({ LOWERCASE: { "type": "custom", "filter": ["lowercase"] } }),
            );
        }
        analysis
    }
}

impl DocumentSpec {
    /// The mapping properties of the documents (with `id`, `job_id`, `indexed_at` and every
    /// combined `copy_to` field).
    pub fn properties(&self) -> Value {
        let mut properties = Map::new();
        for (name, field) in &self.fields {
            properties.insert(name.clone(), mapping(&field.kind));
            if let FieldType::Text {
                analyzer,
                copy_to: Some(target),
                ..
            } = &field.kind
            {
                properties
                    .entry(target.clone())
                    .or_insert_with(|| json!({ "type": "text", "analyzer": analyzer }));
            }
        }
        properties.insert("id".to_owned(), json!({ "type": "keyword" }));
        properties.insert("job_id".to_owned(), json!({ "type": "long" }));
        properties.insert("indexed_at".to_owned(), json!({ "type": "date" }));
        Value::Object(properties)
    }
}

impl Relation {
    /// The mapping of its fields and of its relations (a through relation: its target's
    /// fields, as its own).
    pub(crate) fn properties(&self) -> Value {
        let mut properties = Map::new();
        for (name, field) in &self.fields {
            properties.insert(name.clone(), mapping(&field.kind));
        }
        for below in &self.relations {
            let value = below.properties();
            if self.through {
                if let Some(fields) = value.get("properties").and_then(Value::as_object) {
                    properties.extend(fields.clone());
                }
            } else {
                properties.insert(below.name.clone(), value);
            }
        }
        match &self.kind {
            RelationKind::Aggregate { kind, .. } => mapping(kind),
            RelationKind::Children { nested: true, .. } => {
                json!({ "type": "nested", "properties": properties })
            }
            _ => json!({ "type": "object", "properties": properties }),
        }
    }
}

/// The mapping of one field.
pub(crate) fn mapping(kind: &FieldType) -> Value {
    match kind {
        FieldType::Text {
            analyzer,
            raw,
            copy_to,
        } => {
            let mut text = json!({ "type": "text", "analyzer": analyzer });
            if let Some(target) = copy_to {
                text["copy_to"] = json!(target);
            }
            if *raw {
                text["fields"] = json!({ "raw": { "type": "keyword", "ignore_above": 256 } });
            }
            text
        }
        FieldType::Keyword {
            normalizer,
            indexed,
        } => {
            let mut keyword = json!({ "type": "keyword" });
            if let Some(normalizer) = normalizer {
                keyword["normalizer"] = json!(normalizer);
            }
            if !indexed {
                keyword["index"] = json!(false);
            }
            keyword
        }
        FieldType::Long => json!({ "type": "long" }),
        FieldType::Double => json!({ "type": "double" }),
        FieldType::Boolean => json!({ "type": "boolean" }),
        FieldType::Date => json!({ "type": "date" }),
        // Free-form attributes are searchable as exact values; a value of another type than
        // the first one seen under the same key is a mapping error (dead-lettered).
        FieldType::Object => json!({ "type": "object", "dynamic": true }),
        FieldType::GeoPoint { .. } => json!({ "type": "geo_point" }),
    }
}
