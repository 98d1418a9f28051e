//! `_bulk` requests: encoding actions as NDJSON with external versions, and reading the
//! per-item answers. Pure, so both are tested without a cluster.
//!
//! Every action carries `version_type=external` and `version` = the job id. Job ids grow with
//! every change of a record, so the index keeps the newest change whatever order or how many
//! times messages arrive: an older or repeated one is refused with 409, which means "already
//! superseded", not "failed".

use serde_json::{Value, json};

use crate::document::Action;

/// One action of a bulk request, with its version.
#[derive(Debug, Clone, PartialEq)]
pub struct BulkItem {
    /// What to do.
    pub action: Action,
    /// The external version: the job id.
    pub version: i64,
}

/// The NDJSON body of a `_bulk` request.
pub fn encode(items: &[BulkItem]) -> Vec<u8> {
    let mut body = Vec::with_capacity(items.len() * 512);
    for item in items {
        let (verb, index, id, document) = match &item.action {
            Action::Index {
                index,
                id,
                document,
            } => ("index", index, id, Some(document)),
            Action::Delete { index, id } => ("delete", index, id, None),
        };
        let meta = json!({ verb: {
            "_index": index, "_id": id,
            "version": item.version, "version_type": "external"
        }});
        // Serialising JSON values cannot fail.
        serde_json::to_writer(&mut body, &meta).unwrap_or_default();
        body.push(b'\n');
        if let Some(document) = document {
            serde_json::to_writer(&mut body, document).unwrap_or_default();
            body.push(b'\n');
        }
    }
    body
}

/// The answer for one item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemResult {
    /// HTTP status of the item.
    pub status: u16,
    /// `error.type`, when it failed.
    pub error_type: Option<String>,
    /// `error.reason` (and the caused-by chain), when it failed.
    pub reason: Option<String>,
}

/// Reads the per-item results of a `_bulk` answer, in request order. `_bulk` answers 200
/// even when items fail, so every item is read.
pub fn parse_response(answer: &Value, expected: usize) -> Result<Vec<ItemResult>, String> {
    let items = answer["items"].as_array().ok_or_else(|| {
        format!(
            "no items in the bulk answer: {}",
            truncate(&answer.to_string())
        )
    })?;
    if items.len() != expected {
        return Err(format!(
            "the bulk answer has {} items for {expected} actions",
            items.len()
        ));
    }
    items
        .iter()
        .map(|item| {
            let result = item
                .as_object()
                .and_then(|o| o.values().next())
                .ok_or_else(|| format!("malformed bulk item: {item}"))?;
            let status = result["status"]
                .as_u64()
                .and_then(|s| u16::try_from(s).ok())
                .ok_or_else(|| format!("bulk item without status: {item}"))?;
            let error = &result["error"];
            Ok(ItemResult {
                status,
                error_type: error["type"].as_str().map(str::to_owned),
                reason: (!error.is_null()).then(|| describe(error)),
            })
        })
        .collect()
}

/// `type: reason (caused by type: reason)`, as one line.
fn describe(error: &Value) -> String {
    let mut text = match error {
        Value::String(s) => s.clone(),
        _ => format!(
            "{}: {}",
            error["type"].as_str().unwrap_or("error"),
            error["reason"].as_str().unwrap_or("")
        ),
    };
    let cause = &error["caused_by"];
    if cause.is_object() {
        text.push_str(&format!(" (caused by {})", describe(cause)));
    }
    truncate(&text)
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

    use super::*;

    #[test]
    fn actions_are_ndjson_with_external_versions() {
        let items = vec![
            BulkItem {
                action: Action::Index {
                    index: "l".into(),
                    id: "a".into(),
                    document: json!({"title": "x"}),
                },
                version: 7,
            },
            BulkItem {
                action: Action::Delete {
                    index: "l".into(),
                    id: "b".into(),
                },
                version: 8,
            },
        ];
        let body = String::from_utf8(encode(&items)).expect("utf-8");
        let lines: Vec<Value> = body
            .lines()
            .map(|l| serde_json::from_str(l).expect("each line is JSON"))
            .collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0]["index"]["version"], 7);
        assert_eq!(lines[0]["index"]["version_type"], "external");
        assert_eq!(lines[1]["title"], "x");
        assert_eq!(lines[2]["delete"]["_id"], "b");
        assert!(body.ends_with('\n'));
    }

    #[test]
    fn every_item_is_read() {
        let answer = json!({"errors": true, "items": [
            {"index": {"_id": "a", "status": 201}},
            {"index": {"_id": "b", "status": 409, "error": {"type": "version_conflict_engine_exception", "reason": "current version [9] is higher"}}},
            {"delete": {"_id": "c", "status": 404, "result": "not_found"}},
            {"index": {"_id": "d", "status": 400, "error": {"type": "mapper_parsing_exception", "reason": "failed to parse",
                        "caused_by": {"type": "illegal_argument_exception", "reason": "bad value"}}}}
        ]});
        let results = parse_response(&answer, 4).expect("parsed");
        assert_eq!(results[0].status, 201);
        assert_eq!(
            results[1].error_type.as_deref(),
            Some("version_conflict_engine_exception")
        );
        assert_eq!(results[2].status, 404);
        assert_eq!(
            results[3].reason.as_deref(),
            Some(
                "mapper_parsing_exception: failed to parse (caused by illegal_argument_exception: bad value)"
            )
        );
        assert!(
            parse_response(&answer, 3).is_err(),
            "a count mismatch is an error"
        );
        assert!(parse_response(&json!({"error": "x"}), 1).is_err());
    }

    proptest! {
        #[test]
        fn one_or_two_lines_per_action(ops in proptest::collection::vec(any::<bool>(), 0..50)) {
            let items: Vec<BulkItem> = ops.iter().enumerate().map(|(i, delete)| BulkItem {
                action: if *delete {
                    Action::Delete { index: "l".into(), id: format!("{i}") }
                } else {
                    Action::Index { index: "l".into(), id: format!("{i}"), document: json!({"n": i}) }
                },
                version: i as i64 + 1,
            }).collect();
            let body = encode(&items);
            let lines = body.iter().filter(|b| **b == b'\n').count();
            prop_assert_eq!(lines, ops.iter().map(|d| if *d { 1 } else { 2 }).sum::<usize>());
        }

        #[test]
        fn parsing_never_panics(answer in any::<String>()) {
            let _ = parse_response(&json!({"items": [answer]}), 1);
        }
    }
}
