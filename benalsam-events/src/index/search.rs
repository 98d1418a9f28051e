//! The search side: a client for Elasticsearch (or OpenSearch), and the listings index,
//! created behind an alias with an explicit mapping.
//!
//! The index is created as `<alias>_v1` with the alias pointing at it, so a later mapping
//! change can be rolled out by building `<alias>_v2` and moving the alias. An existing index
//! is never closed or reopened; its mapping is checked against ours, missing fields are
//! added, and a field of another type stops start-up with a conflict ([`Error::is_conflict`]).

use std::time::Duration;

use elasticsearch::Elasticsearch;
use elasticsearch::auth::Credentials;
use elasticsearch::http::headers::{CONTENT_TYPE, HeaderMap, HeaderValue};
use elasticsearch::http::transport::{SingleNodeConnectionPool, TransportBuilder};
use elasticsearch::http::{Method, StatusCode};
use serde_json::{Value, json};

use crate::config::SearchUrl;
use crate::error::Kind;
use crate::{Error, Result};

/// A search client with a request timeout. Credentials in the URL become Basic
/// authentication (and stay out of every log line).
pub fn client(url: &SearchUrl, timeout: Duration) -> Result<Elasticsearch> {
    let mut bare = url.url().clone();
    let credentials = (!bare.username().is_empty()).then(|| {
        Credentials::Basic(
            bare.username().to_owned(),
            bare.password().unwrap_or_default().to_owned(),
        )
    });
    // Both calls only fail for URLs that cannot carry credentials, which have none.
    let _ = bare.set_username("");
    let _ = bare.set_password(None);
    let mut builder = TransportBuilder::new(SingleNodeConnectionPool::new(bare)).timeout(timeout);
    if let Some(credentials) = credentials {
        builder = builder.auth(credentials);
    }
    let transport = builder.build().map_err(|e| {
        Error::config(
            SearchUrl::SETTING,
            format!("cannot build a client for {url}: {e}"),
        )
    })?;
    Ok(Elasticsearch::new(transport))
}

/// Sends one request and reads its JSON answer (`Null` for an empty body).
pub(crate) async fn request(
    client: &Elasticsearch,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
    content_type: &'static str,
) -> Result<(StatusCode, Value)> {
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    let response = client
        .send(method, path, headers, Option::<&()>::None, body, None)
        .await
        .map_err(|e| Error::search(format!("{method:?} {path}"), e.to_string()))?;
    let status = response.status_code();
    let bytes = response.bytes().await.map_err(|e| {
        Error::search(
            format!("reading the answer to {method:?} {path}"),
            e.to_string(),
        )
    })?;
    let value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).map_err(|e| {
            Error::search(
                format!("{method:?} {path}"),
                format!(
                    "answer is not JSON ({e}): {}",
                    String::from_utf8_lossy(&bytes)
                ),
            )
        })?
    };
    Ok((status, value))
}

/// Sends a JSON request.
pub(crate) async fn json_request(
    client: &Elasticsearch,
    method: Method,
    path: &str,
    body: Option<&Value>,
) -> Result<(StatusCode, Value)> {
    let body = body.map(|b| serde_json::to_vec(b).unwrap_or_default());
    request(client, method, path, body, "application/json").await
}

/// Settings of the listings index.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct IndexConfig {
    /// The alias everything reads and writes through (`BENALSAM_INDEX`).
    pub alias: String,
    /// Replicas per shard; 0 on a single node keeps the cluster green.
    pub replicas: u32,
    /// How soon a write becomes searchable.
    pub refresh_interval: String,
    /// How long a delete's tombstone (and its version) is kept. An index operation older than
    /// the delete arriving within this time is refused as stale; after it, it would bring the
    /// document back. One hour outlasts every retry and resend of the pipeline.
    pub gc_deletes: String,
}

impl Default for IndexConfig {
    fn default() -> Self {
        Self {
            alias: "benalsam_listings".to_owned(),
            replicas: 0,
            refresh_interval: "1s".to_owned(),
            gc_deletes: "1h".to_owned(),
        }
    }
}

/// Settings and mappings of the listings index: Turkish analysis (apostrophe, Turkish
/// lowercase, stop words, stemmer) on title, description and a combined `search_text`;
/// keywords for ids, category, status, condition and location parts; a `geo_point`.
pub fn listings_index_body(config: &IndexConfig) -> Value {
    let turkish =
        json!({ "type": "text", "analyzer": "benalsam_turkish", "copy_to": "search_text" });
    json!({
        "settings": {
            "number_of_shards": 1,
            "number_of_replicas": config.replicas,
            "refresh_interval": config.refresh_interval,
            "gc_deletes": config.gc_deletes,
            "analysis": {
                "filter": {
                    "benalsam_turkish_lowercase": { "type": "lowercase", "language": "turkish" },
                    "benalsam_turkish_stop": { "type": "stop", "stopwords": "_turkish_" },
                    "benalsam_turkish_stemmer": { "type": "stemmer", "language": "turkish" }
                },
                "analyzer": {
                    "benalsam_turkish": {
                        "type": "custom",
                        "tokenizer": "standard",
                        "filter": ["apostrophe", "benalsam_turkish_lowercase",
                                   "benalsam_turkish_stop", "benalsam_turkish_stemmer"]
                    }
                },
                "normalizer": {
                    "benalsam_lowercase": { "type": "custom", "filter": ["lowercase"] }
                }
            }
        },
        "mappings": {
            // A field the document builder does not know is a bug, not a new field.
            "dynamic": "strict",
            "properties": listings_properties(&turkish)
        }
    })
}

fn listings_properties(turkish: &Value) -> Value {
    let keyword = json!({ "type": "keyword" });
    let mut title = turkish.clone();
    title["fields"] = json!({ "raw": { "type": "keyword", "ignore_above": 256 } });
    json!({
        "id": keyword,
        "user_id": keyword,
        "title": title,
        "description": turkish,
        "search_text": { "type": "text", "analyzer": "benalsam_turkish" },
        "category": keyword,
        "subcategory": keyword,
        "condition": keyword,
        "status": keyword,
        "urgency": keyword,
        "budget": { "type": "double" },
        "currency": keyword,
        "location": {
            "type": "text", "analyzer": "benalsam_turkish", "copy_to": "search_text",
            "fields": { "raw": { "type": "keyword", "ignore_above": 256 } }
        },
        "location_city": { "type": "keyword", "normalizer": "benalsam_lowercase" },
        "location_district": { "type": "keyword", "normalizer": "benalsam_lowercase" },
        "location_neighborhood": { "type": "keyword", "normalizer": "benalsam_lowercase" },
        "geo_location": { "type": "geo_point" },
        // Free-form attributes are searchable as exact values; a value of another type than
        // the first one seen under the same key is a mapping error (dead-lettered).
        "attributes": { "type": "object", "dynamic": true },
        "images": { "type": "keyword", "index": false },
        "expires_at": { "type": "date" },
        "created_at": { "type": "date" },
        "updated_at": { "type": "date" },
        "job_id": { "type": "long" },
        "indexed_at": { "type": "date" }
    })
}

/// What [`ensure_index`] found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bootstrap {
    /// The index and alias were created.
    Created {
        /// The concrete index.
        index: String,
    },
    /// They existed; fields missing from the existing mapping were added.
    Existing {
        /// The concrete indices behind the alias.
        indices: Vec<String>,
        /// Fields that were added.
        added: Vec<String>,
    },
}

/// Makes sure the index behind `config.alias` exists with a mapping compatible with `body`.
pub async fn ensure_index(
    client: &Elasticsearch,
    config: &IndexConfig,
    body: &Value,
) -> Result<Bootstrap> {
    let alias = &config.alias;
    let (status, _) = json_request(client, Method::Head, &format!("/{alias}"), None).await?;
    if status == StatusCode::NOT_FOUND {
        let index = format!("{alias}_v1");
        let mut create = body.clone();
        create["aliases"] = json!({ alias.as_str(): { "is_write_index": true } });
        let (status, answer) =
            json_request(client, Method::Put, &format!("/{index}"), Some(&create)).await?;
        if status.is_success() {
            tracing::info!(%index, %alias, "created the search index");
            return Ok(Bootstrap::Created { index });
        }
        // Another consumer created it first: fall through to checking it.
        if answer["error"]["type"] != "resource_already_exists_exception" {
            return Err(Error::search_response(
                format!("creating index {index}"),
                status.as_u16(),
                answer.to_string(),
            ));
        }
    }
    check_mapping(client, alias, &body["mappings"]["properties"]).await
}

async fn check_mapping(client: &Elasticsearch, alias: &str, expected: &Value) -> Result<Bootstrap> {
    let (status, mappings) =
        json_request(client, Method::Get, &format!("/{alias}/_mapping"), None).await?;
    if !status.is_success() {
        return Err(Error::search_response(
            format!("reading the mapping of {alias}"),
            status.as_u16(),
            mappings.to_string(),
        ));
    }
    let Some(indices) = mappings.as_object() else {
        return Err(Error::search_response(
            format!("reading the mapping of {alias}"),
            status.as_u16(),
            mappings.to_string(),
        ));
    };
    let expected = expected.as_object().cloned().unwrap_or_default();
    let mut missing = serde_json::Map::new();
    for (index, mapping) in indices {
        let existing = &mapping["mappings"]["properties"];
        for (field, want) in &expected {
            match existing.get(field) {
                None => {
                    missing.insert(field.clone(), want.clone());
                }
                Some(have) => {
                    let want_type = want["type"].as_str().unwrap_or("object");
                    let have_type = have["type"].as_str().unwrap_or("object");
                    if want_type != have_type {
                        return Err(Error::from(Kind::MappingConflict {
                            index: index.clone(),
                            field: field.clone(),
                            expected: want_type.to_owned(),
                            found: have_type.to_owned(),
                        }));
                    }
                }
            }
        }
    }
    let added: Vec<String> = missing.keys().cloned().collect();
    if !missing.is_empty() {
        let body = json!({ "properties": missing });
        let (status, answer) = json_request(
            client,
            Method::Put,
            &format!("/{alias}/_mapping"),
            Some(&body),
        )
        .await?;
        if !status.is_success() {
            return Err(Error::search_response(
                format!("adding fields {added:?} to the mapping of {alias}"),
                status.as_u16(),
                answer.to_string(),
            ));
        }
        tracing::info!(alias, ?added, "added fields to the search index mapping");
    }
    Ok(Bootstrap::Existing {
        indices: indices.keys().cloned().collect(),
        added,
    })
}
