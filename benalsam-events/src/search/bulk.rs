//! The bulk writer: encodes actions as a `_bulk` body and sends it. HTTP only; what the answer
//! means is [`plan`](super::plan)'s business.
//!
//! Every action carries `version_type=external` and `version` = the job id. Job ids grow with
//! every change of a record, so the index keeps the newest change whatever order or how many
//! times messages arrive: an older or repeated one is refused with 409, which means "already
//! superseded", not "failed".

use std::time::Instant;

use elasticsearch::http::Method;
use serde::Serialize;

use crate::event_type::Action;
use crate::search::SearchNodes;
use crate::search::plan::BulkResponse;

/// Why a bulk request as a whole failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum WriteError {
    /// No answer from any node, or busy / unavailable (429, 5xx): the circuit breaker's
    /// business.
    Unavailable(String),
    /// The cluster answered and refused the request itself (another 4xx, or an answer that
    /// is not a bulk answer): something in the batch is wrong, not the cluster.
    Refused(String),
}

/// The `_bulk` NDJSON body of `actions`, each with its version; the documents are written
/// from where they are, not copied.
pub(crate) fn encode<'a>(actions: impl IntoIterator<Item = (&'a Action, i64)>) -> Vec<u8> {
    encode_to(actions.into_iter().map(|(a, v)| (a, v, None)))
}

/// [`encode`], each action to the index given beside it instead of its own when there is
/// one (a reindex's new index).
pub(crate) fn encode_to<'a>(
    actions: impl IntoIterator<Item = (&'a Action, i64, Option<&'a str>)>,
) -> Vec<u8> {
    #[derive(Serialize)]
    struct Meta<'a> {
        _index: &'a str,
        _id: &'a str,
        version: i64,
        version_type: &'static str,
    }
    let mut body = Vec::with_capacity(4096);
    for (action, version, target) in actions {
        let (verb, index, id, document) = match action {
            Action::Index {
                index,
                id,
                document,
            } => ("index", index, id, Some(document)),
            Action::Delete { index, id } => ("delete", index, id, None),
        };
        let meta = Meta {
            _index: target.unwrap_or(index),
            _id: id,
            version,
            version_type: "external",
        };
        // Serialising plain data into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut body, &std::collections::BTreeMap::from([(verb, meta)]));
        body.push(b'\n');
        if let Some(document) = document {
            let _ = serde_json::to_writer(&mut body, document);
            body.push(b'\n');
        }
    }
    body
}

/// Sends one `_bulk` request, to the node in use or, when nodes fail it, the next that
/// answers (see [`SearchNodes`]); `took` includes the failed nodes' time.
pub(crate) async fn write(
    search: &SearchNodes,
    body: &[u8],
) -> Result<(BulkResponse, std::time::Duration), WriteError> {
    const PATH: &str = "/_bulk";
    let started = Instant::now();
    let answer = search
        .send(Method::Post, PATH, Some(body), "application/x-ndjson")
        .await
        .and_then(|answer| crate::search::parse_answer(Method::Post, PATH, answer));
    let (status, answer) = answer.map_err(|e| WriteError::Unavailable(e.to_string()))?;
    let took = started.elapsed();
    if !status.is_success() {
        let why = format!("bulk request answered {status}: {answer}");
        let code = status.as_u16();
        return Err(if code == 429 || code >= 500 {
            WriteError::Unavailable(why)
        } else {
            WriteError::Refused(why)
        });
    }
    let response: BulkResponse = serde_json::from_value(answer)
        .map_err(|e| WriteError::Refused(format!("the bulk answer cannot be read: {e}")))?;
    Ok((response, took))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::{Value, json};

    use super::*;

    #[test]
    fn actions_are_ndjson_with_external_versions() {
        let index = Action::Index {
            index: "l".into(),
            id: "a".into(),
            document: json!({"title": "x"}),
        };
        let delete = Action::Delete {
            index: "l".into(),
            id: "b".into(),
        };
        let body = String::from_utf8(encode([(&index, 7), (&delete, 8)])).expect("utf-8");
        let lines: Vec<Value> = body
            .lines()
            .map(|l| serde_json::from_str(l).expect("each line is JSON"))
            .collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0]["index"]["version"], 7);
        assert_eq!(lines[0]["index"]["version_type"], "external");
        assert_eq!(lines[0]["index"]["_id"], "a");
        assert_eq!(lines[1]["title"], "x");
        assert_eq!(lines[2]["delete"]["_id"], "b");
        assert!(body.ends_with('\n'));
    }

    proptest! {
        #[test]
        fn one_or_two_lines_per_action(ops in proptest::collection::vec(any::<bool>(), 0..50)) {
            let actions: Vec<Action> = ops.iter().enumerate().map(|(i, delete)| if *delete {
                Action::Delete { index: "l".into(), id: format!("{i}") }
            } else {
                Action::Index { index: "l".into(), id: format!("{i}"), document: json!({"n": i}) }
            }).collect();
            let body = encode(actions.iter().zip(1..));
            let lines = body.iter().filter(|b| **b == b'\n').count();
            prop_assert_eq!(lines, ops.iter().map(|d| if *d { 1 } else { 2 }).sum::<usize>());
        }
    }
}
