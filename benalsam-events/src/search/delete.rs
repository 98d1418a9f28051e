//! Applying a `TRUNCATE` to an index: every document written by a job older than the
//! truncation leaves it.
//!
//! The documents are found with a search and deleted in bulk with the truncation's job id as
//! their external version (the search API and `_bulk` only: no `_delete_by_query`, which
//! needs a module some nodes lack, and which could race with a newer write). So:
//! - a document written by a newer job meanwhile is kept: its delete is refused with 409;
//! - the delete leaves a tombstone at the truncation's version, so an older write still on
//!   its way is refused as stale (for `gc_deletes`, which outlasts every retry).

use elasticsearch::http::Method;
use serde_json::json;

use crate::event_type::Action;
use crate::search::{SearchNodes, bulk as writer};

/// Documents looked up and deleted per round.
const PAGE: usize = 1000;

/// Deletes the documents of `alias` written by jobs older than `job`; returns how many. An
/// error says what failed, for the operator; the caller tries again later.
pub(crate) async fn delete_older(
    search: &SearchNodes,
    alias: &str,
    job: i64,
) -> Result<u64, String> {
    let mut deleted = 0;
    loop {
        let older = find_older(search, alias, job).await?;
        if older.is_empty() {
            return Ok(deleted);
        }
        let actions: Vec<Action> = older
            .into_iter()
            .map(|(index, id)| Action::Delete { index, id })
            .collect();
        let body = writer::encode(actions.iter().map(|a| (a, job)));
        let (answer, _) = writer::write(search, &body).await.map_err(|e| match e {
            writer::WriteError::Unavailable(why) | writer::WriteError::Refused(why) => why,
        })?;
        for item in &answer.items {
            let result = item.result();
            match result.status {
                200 => deleted += 1,
                // Gone already, or written by a newer job meanwhile: both are right.
                404 | 409 => {}
                status => {
                    return Err(format!(
                        "deleting the documents older than job {job} from {alias}: {status} {:?}",
                        result.error
                    ));
                }
            }
        }
    }
}

/// The (index, id) of up to a page of documents written before `job`, after a refresh so
/// the deletes of the previous round are not found again.
async fn find_older(
    search: &SearchNodes,
    alias: &str,
    job: i64,
) -> Result<Vec<(String, String)>, String> {
    let failed = |what: &str, detail: String| format!("{what} {alias}: {detail}");
    let (status, answer) = search
        .json_request(Method::Post, &format!("/{alias}/_refresh"), None)
        .await
        .map_err(|e| failed("refreshing", e.to_string()))?;
    if !status.is_success() {
        return Err(failed("refreshing", format!("{status} {answer}")));
    }
    let query = json!({
        "query": { "range": { "job_id": { "lt": job } } },
        "size": PAGE,
        "_source": false
    });
    let (status, answer) = search
        .json_request(Method::Post, &format!("/{alias}/_search"), Some(&query))
        .await
        .map_err(|e| failed("searching", e.to_string()))?;
    if !status.is_success() {
        return Err(failed("searching", format!("{status} {answer}")));
    }
    let hits = answer["hits"]["hits"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    Ok(hits
        .iter()
        .filter_map(|hit| {
            let index = hit["_index"].as_str()?;
            let id = hit["_id"].as_str()?;
            Some((index.to_owned(), id.to_owned()))
        })
        .collect())
}
