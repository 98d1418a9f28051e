//! Reading a `_bulk` answer: typed, and decided once per item. Pure, so every decision of the
//! consumer is tested without a cluster.
//!
//! `_bulk` answers 200 even when items fail, so every item is read. Per item:
//!
//! | answer | decision |
//! |---|---|
//! | 2xx | done: applied |
//! | 409 `version_conflict_engine_exception` | done: superseded (the index has this change or a newer one) |
//! | 404 on a delete (not a missing index) | done: already gone |
//! | 429, 5xx, another 409, 403 `cluster_block_exception`, 404 `index_not_found_exception` | retry: the cluster's state, not the document's |
//! | any other 4xx (a mapping error) | dead: trying again cannot help |

use serde::Deserialize;

/// The answer to a `_bulk` request.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub(crate) struct BulkResponse {
    /// One result per action, in request order.
    pub(crate) items: Vec<Item>,
}

/// One item of the answer, keyed by its action.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Item {
    Index(ItemResult),
    Delete(ItemResult),
    Create(ItemResult),
    Update(ItemResult),
}

impl Item {
    pub(crate) fn result(&self) -> &ItemResult {
        match self {
            Item::Index(r) | Item::Delete(r) | Item::Create(r) | Item::Update(r) => r,
        }
    }
}

/// The status and error of one item.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub(crate) struct ItemResult {
    pub(crate) status: u16,
    #[serde(default)]
    pub(crate) error: Option<ItemError>,
}

/// An item's error: usually an object with a type, a reason and a cause; some proxies send
/// a plain string.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub(crate) enum ItemError {
    Detailed {
        #[serde(rename = "type")]
        kind: String,
        #[serde(default)]
        reason: Option<String>,
        #[serde(default)]
        caused_by: Option<Box<ItemError>>,
    },
    Text(String),
}

impl ItemError {
    fn kind(&self) -> Option<&str> {
        match self {
            ItemError::Detailed { kind, .. } => Some(kind),
            ItemError::Text(_) => None,
        }
    }

    /// `type: reason (caused by type: reason)`, as one line.
    fn describe(&self) -> String {
        match self {
            ItemError::Text(text) => truncate(text),
            ItemError::Detailed {
                kind,
                reason,
                caused_by,
            } => {
                let mut text = format!("{kind}: {}", reason.as_deref().unwrap_or(""));
                if let Some(cause) = caused_by {
                    text.push_str(&format!(" (caused by {})", cause.describe()));
                }
                truncate(&text)
            }
        }
    }
}

impl ItemResult {
    /// A result for an action the cluster refused in a request of its own (4xx).
    pub(crate) fn refused(reason: &str) -> Self {
        Self {
            status: 400,
            error: Some(ItemError::Detailed {
                kind: "request_refused".to_owned(),
                reason: Some(truncate(reason)),
                caused_by: None,
            }),
        }
    }

    /// A result for an action that met an unavailable cluster.
    pub(crate) fn unavailable(reason: &str) -> Self {
        Self {
            status: 503,
            error: Some(ItemError::Detailed {
                kind: "unavailable".to_owned(),
                reason: Some(truncate(reason)),
                caused_by: None,
            }),
        }
    }

    fn reason(&self) -> String {
        self.error
            .as_ref()
            .map_or_else(|| format!("status {}", self.status), ItemError::describe)
    }
}

/// Why an item counts as done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Done {
    /// Written or deleted now.
    Applied,
    /// Refused as older than what the index has (409 under external versioning).
    Superseded,
    /// A delete of a document that is not there.
    AlreadyGone,
}

/// What to do with one message after its item's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Decision {
    /// The index holds this change or a newer one: complete the job, ack the message.
    Done(Done),
    /// Try again later: the cluster is busy or briefly unable.
    Retry(String),
    /// Trying again cannot help: dead-letter it and fail the job.
    Dead(String),
}

impl Decision {
    /// The `bulk_items` metric label.
    pub(crate) fn label(&self) -> &'static str {
        match self {
            Decision::Done(Done::Applied) => "applied",
            Decision::Done(Done::Superseded) => "superseded",
            Decision::Done(Done::AlreadyGone) => "already_gone",
            Decision::Retry(_) => "retry",
            Decision::Dead(_) => "permanent",
        }
    }
}

/// Decides one item: see the table of the module documentation.
pub(crate) fn decide(is_delete: bool, item: &ItemResult) -> Decision {
    let kind = item.error.as_ref().and_then(ItemError::kind);
    match (item.status, kind) {
        (200..=299, _) => Decision::Done(Done::Applied),
        (409, Some("version_conflict_engine_exception")) => Decision::Done(Done::Superseded),
        (404, kind) if is_delete && kind != Some("index_not_found_exception") => {
            Decision::Done(Done::AlreadyGone)
        }
        // A write block (a reindex, a full disk) or a missing index is the cluster's state,
        // not the document's: retried, and when a whole batch meets it, the circuit opens.
        (403, Some("cluster_block_exception")) | (404, Some("index_not_found_exception")) => {
            Decision::Retry(item.reason())
        }
        // A 409 of another kind is a concurrent write to the same document: try again.
        (429 | 409 | 500..=599, _) => Decision::Retry(item.reason()),
        (status, _) => Decision::Dead(format!(
            "Elasticsearch refused the document ({status}): {}",
            item.reason()
        )),
    }
}

/// Decides every item of `answer` for actions whose kinds (`true` for a delete) are
/// `deletes`; an answer that does not match the actions one to one is an error.
pub(crate) fn plan(deletes: &[bool], answer: &BulkResponse) -> Result<Vec<Decision>, String> {
    if answer.items.len() != deletes.len() {
        return Err(format!(
            "the bulk answer has {} items for {} actions",
            answer.items.len(),
            deletes.len()
        ));
    }
    Ok(deletes
        .iter()
        .zip(&answer.items)
        .map(|(delete, item)| decide(*delete, item.result()))
        .collect())
}

/// Whether every decision is a retry: the cluster, not the documents, is the problem.
pub(crate) fn all_retry(decisions: &[Decision]) -> bool {
    !decisions.is_empty() && decisions.iter().all(|d| matches!(d, Decision::Retry(_)))
}

fn truncate(text: &str) -> String {
    const LIMIT: usize = 2000;
    if text.len() <= LIMIT {
        return text.to_owned();
    }
    let mut end = LIMIT;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    fn item(status: u16, kind: Option<&str>) -> ItemResult {
        ItemResult {
            status,
            error: kind.map(|k| ItemError::Detailed {
                kind: k.to_owned(),
                reason: Some("because".to_owned()),
                caused_by: None,
            }),
        }
    }

    #[test]
    fn every_item_is_read_and_typed() {
        let answer: BulkResponse = serde_json::from_value(json!({"took": 3, "errors": true, "items": [
            {"index": {"_id": "a", "status": 201}},
            {"index": {"_id": "b", "status": 409, "error": {"type": "version_conflict_engine_exception", "reason": "current version [9] is higher"}}},
            {"delete": {"_id": "c", "status": 404, "result": "not_found"}},
            {"index": {"_id": "d", "status": 400, "error": {"type": "mapper_parsing_exception", "reason": "failed to parse",
                        "caused_by": {"type": "illegal_argument_exception", "reason": "bad value"}}}},
            {"index": {"_id": "e", "status": 429, "error": "too many requests"}}
        ]}))
        .expect("typed");
        let decisions = plan(&[false, false, true, false, false], &answer).expect("planned");
        assert_eq!(decisions[0], Decision::Done(Done::Applied));
        assert_eq!(decisions[1], Decision::Done(Done::Superseded));
        assert_eq!(decisions[2], Decision::Done(Done::AlreadyGone));
        assert_eq!(
            decisions[3],
            Decision::Dead(
                "Elasticsearch refused the document (400): mapper_parsing_exception: failed to parse (caused by illegal_argument_exception: bad value)".to_owned()
            )
        );
        assert_eq!(
            decisions[4],
            Decision::Retry("too many requests".to_owned())
        );
        assert!(
            plan(&[false], &answer).is_err(),
            "a count mismatch is an error"
        );
        assert!(serde_json::from_value::<BulkResponse>(json!({"error": "x"})).is_err());
    }

    #[test]
    fn the_cluster_s_state_is_retried() {
        for (delete, status, kind) in [
            (false, 404, "index_not_found_exception"),
            (true, 404, "index_not_found_exception"),
            (false, 403, "cluster_block_exception"),
            (false, 503, "unavailable_shards_exception"),
        ] {
            assert!(
                matches!(
                    decide(delete, &item(status, Some(kind))),
                    Decision::Retry(_)
                ),
                "{status} {kind}"
            );
        }
        assert!(matches!(
            decide(false, &item(403, Some("security_exception"))),
            Decision::Dead(_)
        ));
        assert!(all_retry(&[
            decide(false, &item(429, None)),
            decide(false, &item(503, None))
        ]));
        assert!(!all_retry(&[]));
    }

    proptest! {
        #[test]
        fn every_status_has_exactly_the_class_of_its_range(status in 100u16..600, delete: bool, conflict: bool) {
            let kind = if conflict { "version_conflict_engine_exception" } else { "other" };
            let decision = decide(delete, &item(status, Some(kind)));
            let done = (200..300).contains(&status)
                || (status == 409 && conflict)
                || (status == 404 && delete);
            let retry = !done && (status == 429 || status >= 500 || status == 409);
            prop_assert_eq!(matches!(decision, Decision::Done(_)), done);
            prop_assert_eq!(matches!(decision, Decision::Retry(_)), retry);
            prop_assert_eq!(matches!(decision, Decision::Dead(_)), !done && !retry);
        }

        #[test]
        fn reading_any_answer_never_panics(answer in any::<String>()) {
            let _ = serde_json::from_str::<BulkResponse>(&answer);
            let _ = serde_json::from_value::<BulkResponse>(json!({"items": [answer]}));
        }
    }
}
