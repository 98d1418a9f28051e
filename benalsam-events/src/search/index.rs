//! The index of an event type: created behind its alias with an explicit mapping, and
//! evolved at start.
//!
//! The index is created as `<alias>_v1` with the alias pointing at it, so a change the live
//! index cannot take is rolled out by building `<alias>_v2` and moving the alias
//! ([`reindex`](super::reindex)). An existing index is never closed or reopened; its mapping
//! is compared with ours at every depth (`evolve`, pure): missing fields are
//! added, and what needs a reindex is reported.

use elasticsearch::Elasticsearch;
use elasticsearch::http::{Method, StatusCode};
use serde_json::{Value, json};

use crate::error::Kind;
use crate::event_type::EventType;
use crate::search::SearchNodes;
use crate::{error::Error, error::Result};

/// What [`EventType::prepare_index`] found and did on an existing index.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct IndexReport {
    /// Fields added to the live mapping (dotted paths: `company.verified`).
    pub added: Vec<String>,
    /// What the live index cannot take in place, one line each (`title: analyzer "a" → "b"`):
    /// the event type needs `reindex`. Empty when the index is as the file wants it.
    pub needs_reindex: Vec<String>,
    /// The first field whose type changed (path, live type, wanted type), which
    /// [`EventType::ensure_index`] refuses as a mapping conflict.
    retyped: Option<(String, String, String)>,
}

impl EventType {
    /// Makes sure the index of this event type exists behind its alias, with a mapping
    /// compatible with what its documents need (and the delete protection every index of the
    /// library gets). Returns the fields it added to an existing mapping, at any depth (none
    /// for a new index, or one that already had them all); a field of another type is an
    /// error naming it.
    ///
    /// The requests go to this one client's node; the consumer prepares its indexes on the
    /// first of its nodes that answers, as [`EventType::prepare_index`] does, which reports
    /// what needs a reindex instead of failing.
    pub async fn ensure_index(&self, client: &Elasticsearch) -> Result<Vec<String>> {
        let nodes = SearchNodes::from(client.clone());
        let report = ensure_index_on(&nodes, self).await?;
        if let Some((field, found, expected)) = report.retyped {
            return Err(Error::from(Kind::MappingConflict {
                index: self.index.alias.clone(),
                field,
                expected,
                found,
            }));
        }
        Ok(report.added)
    }

    /// Like [`EventType::ensure_index`], but a change the live index cannot take in place is
    /// reported ([`IndexReport::needs_reindex`]), not an error: the index keeps serving with
    /// its mapping until `reindex` builds the next version.
    pub async fn prepare_index(&self, client: &Elasticsearch) -> Result<IndexReport> {
        ensure_index_on(&SearchNodes::from(client.clone()), self).await
    }
}

/// [`EventType::prepare_index`] through `nodes`: on the node in use, or the next that answers.
pub(crate) async fn ensure_index_on(
    nodes: &SearchNodes,
    event_type: &EventType,
) -> Result<IndexReport> {
    let alias = &event_type.index.alias;
    let body = event_type.index_body();
    let (status, _) = nodes
        .json_request(Method::Head, &format!("/{alias}"), None)
        .await?;
    if status == StatusCode::NOT_FOUND {
        let index = format!("{alias}_v1");
        // Not created: another consumer created it first; fall through to checking it.
        if create_index(nodes, &index, &body, Some(alias)).await? {
            tracing::info!(%index, %alias, "created the search index");
            return Ok(IndexReport::default());
        }
    }
    evolve_live(nodes, alias, &body).await
}

/// Creates `index` with `body` (behind `alias` as its write index, if given); `false` when
/// an index of that name exists already.
pub(crate) async fn create_index(
    nodes: &SearchNodes,
    index: &str,
    body: &Value,
    alias: Option<&str>,
) -> Result<bool> {
    let mut create = body.clone();
    if let Some(alias) = alias {
        create["aliases"] = json!({ alias: { "is_write_index": true } });
    }
    let (status, answer) = nodes
        .json_request(Method::Put, &format!("/{index}"), Some(&create))
        .await?;
    if status.is_success() {
        return Ok(true);
    }
    if answer["error"]["type"] == "resource_already_exists_exception" {
        return Ok(false);
    }
    if let Some(error) = super::analysis::missing_module(index, &create, status.as_u16(), &answer) {
        return Err(error);
    }
    Err(Error::search_response(
        format!("creating index {index}"),
        status.as_u16(),
        answer.to_string(),
    ))
}

/// A GET whose answer must be a success with a JSON object.
async fn read_object(
    nodes: &SearchNodes,
    path: &str,
    what: &str,
) -> Result<serde_json::Map<String, Value>> {
    let (status, answer) = nodes.json_request(Method::Get, path, None).await?;
    match answer {
        Value::Object(map) if status.is_success() => Ok(map),
        other => Err(Error::search_response(
            what.to_owned(),
            status.as_u16(),
            other.to_string(),
        )),
    }
}

/// Compares the live index (every index behind `alias`) with `body` at every depth, adds the
/// missing fields, and reports what needs a reindex.
async fn evolve_live(nodes: &SearchNodes, alias: &str, body: &Value) -> Result<IndexReport> {
    let mappings = read_object(
        nodes,
        &format!("/{alias}/_mapping"),
        &format!("reading the mapping of {alias}"),
    )
    .await?;
    let settings = read_object(
        nodes,
        &format!("/{alias}/_settings"),
        &format!("reading the settings of {alias}"),
    )
    .await?;
    let mut report = IndexReport::default();
    let mut additions = serde_json::Map::new();
    for (index, mapping) in &mappings {
        let live_settings = &settings.get(index).unwrap_or(&Value::Null)["settings"]["index"];
        let found = super::evolve::diff(body, &mapping["mappings"], live_settings);
        for line in found.needs_reindex() {
            if !report.needs_reindex.contains(&line) {
                report.needs_reindex.push(line);
            }
        }
        if report.retyped.is_none() {
            report.retyped = found
                .retyped()
                .next()
                .map(|(p, f, w)| (p.to_owned(), f.to_owned(), w.to_owned()));
        }
        for path in found.added() {
            if !report.added.contains(&path) {
                report.added.push(path);
            }
        }
        additions.extend(found.additions);
    }
    if additions.is_empty() {
        return Ok(report);
    }
    let put = json!({ "properties": additions });
    let (status, answer) = nodes
        .json_request(Method::Put, &format!("/{alias}/_mapping"), Some(&put))
        .await?;
    if !status.is_success() {
        let added = &report.added;
        if !report.needs_reindex.is_empty() {
            // The new fields may need the new analysis: only the reindex can bring them.
            tracing::warn!(alias, ?added, status = status.as_u16(), %answer,
                "cannot add fields to the live mapping before the reindex");
            report.needs_reindex.extend(
                added
                    .iter()
                    .map(|a| format!("{a}: cannot be added in place")),
            );
            report.added.clear();
            return Ok(report);
        }
        return Err(Error::search_response(
            format!("adding fields {added:?} to the mapping of {alias}"),
            status.as_u16(),
            answer.to_string(),
        ));
    }
    tracing::info!(alias, added = ?report.added, "added fields to the search index mapping");
    Ok(report)
}
