//! What a bulk item's answer means for its job: the pure classifier behind every decision of
//! the consumer, tested without a network.

use crate::bulk::ItemResult;

/// The consequence of one item's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The index holds this change or a newer one: complete the job, ack the message.
    Done(Done),
    /// Try again later: the cluster is busy or briefly unable.
    Retry(String),
    /// Trying again cannot help (a mapping error): dead-letter it and fail the job.
    Permanent(String),
}

/// Why an item counts as done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Done {
    /// Written or deleted now.
    Applied,
    /// Refused as older than what the index has (409 under external versioning).
    Superseded,
    /// A delete of a document that is not there.
    AlreadyGone,
}

/// Classifies one item: 2xx, 409 version conflicts and 404 deletes are done; 429, 5xx, write
/// blocks (403 `cluster_block_exception`) and a missing index are retried; any other 4xx is
/// permanent.
pub fn classify(is_delete: bool, item: &ItemResult) -> Outcome {
    let reason = || {
        item.reason
            .clone()
            .unwrap_or_else(|| format!("status {}", item.status))
    };
    match item.status {
        200..=299 => Outcome::Done(Done::Applied),
        409 if item.error_type.as_deref() == Some("version_conflict_engine_exception") => {
            Outcome::Done(Done::Superseded)
        }
        404 if is_delete && item.error_type.as_deref() != Some("index_not_found_exception") => {
            Outcome::Done(Done::AlreadyGone)
        }
        // A write block (a reindex, a full disk) or a missing index is the cluster's state,
        // not the document's: retried, and when a whole batch meets it, the circuit opens.
        403 if item.error_type.as_deref() == Some("cluster_block_exception") => {
            Outcome::Retry(reason())
        }
        404 if item.error_type.as_deref() == Some("index_not_found_exception") => {
            Outcome::Retry(reason())
        }
        429 | 500..=599 => Outcome::Retry(reason()),
        // A 409 of another kind is a concurrent write to the same document: try again.
        409 => Outcome::Retry(reason()),
        _ => Outcome::Permanent(format!(
            "Elasticsearch refused the document ({}): {}",
            item.status,
            reason()
        )),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn item(status: u16, error_type: Option<&str>) -> ItemResult {
        ItemResult {
            status,
            error_type: error_type.map(str::to_owned),
            reason: error_type.map(|t| format!("{t}: because")),
        }
    }

    #[test]
    fn the_table_of_the_design() {
        assert_eq!(
            classify(false, &item(201, None)),
            Outcome::Done(Done::Applied)
        );
        assert_eq!(
            classify(true, &item(200, None)),
            Outcome::Done(Done::Applied)
        );
        assert_eq!(
            classify(false, &item(409, Some("version_conflict_engine_exception"))),
            Outcome::Done(Done::Superseded)
        );
        assert_eq!(
            classify(true, &item(404, None)),
            Outcome::Done(Done::AlreadyGone)
        );
        for (delete, status, kind) in [
            (false, 404, "index_not_found_exception"),
            (true, 404, "index_not_found_exception"),
            (false, 403, "cluster_block_exception"),
        ] {
            assert!(
                matches!(
                    classify(delete, &item(status, Some(kind))),
                    Outcome::Retry(_)
                ),
                "{status} {kind} is the cluster's state"
            );
        }
        assert!(matches!(
            classify(false, &item(403, Some("security_exception"))),
            Outcome::Permanent(_)
        ));
        assert!(matches!(
            classify(false, &item(429, Some("es_rejected_execution_exception"))),
            Outcome::Retry(_)
        ));
        assert!(matches!(
            classify(false, &item(503, Some("unavailable_shards_exception"))),
            Outcome::Retry(_)
        ));
        let Outcome::Permanent(reason) =
            classify(false, &item(400, Some("mapper_parsing_exception")))
        else {
            panic!("a mapping error is permanent");
        };
        assert!(
            reason.contains("mapper_parsing_exception: because"),
            "{reason}"
        );
    }

    proptest! {
        #[test]
        fn every_status_has_exactly_the_class_of_its_range(status in 100u16..600, delete: bool, conflict: bool) {
            let error = if conflict { Some("version_conflict_engine_exception") } else { Some("other") };
            let outcome = classify(delete, &item(status, error));
            let expected_done = (200..300).contains(&status)
                || (status == 409 && conflict)
                || (status == 404 && delete);
            let expected_retry = !expected_done && (status == 429 || status >= 500 || status == 409);
            prop_assert_eq!(matches!(outcome, Outcome::Done(_)), expected_done);
            prop_assert_eq!(matches!(outcome, Outcome::Retry(_)), expected_retry);
            prop_assert_eq!(matches!(outcome, Outcome::Permanent(_)), !expected_done && !expected_retry);
        }
    }
}
