//! The search side: a client for Elasticsearch (or OpenSearch), and the index of an event
//! type, created behind an alias with an explicit mapping.
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

use crate::EventType;
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
    // The client takes the query string apart from the path (a `?` in the path would be
    // sent escaped, as part of it).
    let (route, query) = match path.split_once('?') {
        Some((route, query)) => {
            let pairs: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes())
                .into_owned()
                .collect();
            (route, Some(pairs))
        }
        None => (path, None),
    };
    let response = client
        .send(method, route, headers, query.as_ref(), body, None)
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

/// Makes sure the index of `event_type` exists behind its alias, with a mapping compatible
/// with what its documents need (and the delete protection every index of the library gets).
/// Returns the fields it added to an existing mapping (none for a new index, or one that
/// already had them all); a field of another type is an error naming it.
pub async fn ensure_index(client: &Elasticsearch, event_type: &EventType) -> Result<Vec<String>> {
    let alias = &event_type.index.alias;
    let body = event_type.index_body();
    let (status, _) = json_request(client, Method::Head, &format!("/{alias}"), None).await?;
    if status == StatusCode::NOT_FOUND {
        let index = format!("{alias}_v1");
        let mut create = body.clone();
        create["aliases"] = json!({ alias.as_str(): { "is_write_index": true } });
        let (status, answer) =
            json_request(client, Method::Put, &format!("/{index}"), Some(&create)).await?;
        if status.is_success() {
            tracing::info!(%index, %alias, "created the search index");
            return Ok(Vec::new());
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

async fn check_mapping(
    client: &Elasticsearch,
    alias: &str,
    expected: &Value,
) -> Result<Vec<String>> {
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
    Ok(added)
}
