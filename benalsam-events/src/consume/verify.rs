//! The wire is not trusted: every delivery is checked against the outbox before it touches
//! the index (one query per batch, [`verify`]). The decision ([`check`]) is pure, so it is
//! tested without services.
//!
//! | the outbox has | decision |
//! |---|---|
//! | no such job, or one of another table, record or operation | dead-lettered as "unknown or mismatched job"; no job is touched |
//! | a table this consumer does not index (another consumer's, or a relation's `<table>#<relation>` job, which the bridge's fan-out handles and never publishes) | dead-lettered as unverified; the job is not touched |
//! | the job `completed` | a duplicate: acked, not indexed |
//! | the job `pending` (given back, or resent) | acked, not indexed: a bridge publishes it again |
//! | a later TRUNCATE of the table | superseded: completed without indexing |
//! | the job `processing`, `sent` or `failed` | delivered: the document is built from the outbox's row of the job (returned by the same query), never from the message's `changeData` |
//!
//! A broker client that can publish to the exchange therefore cannot invent a change, alter
//! one (whichever copy of a real job arrives first, the index gets the row the application
//! wrote), move a document to another record, complete a job that was never published, or
//! freeze a document with a job id from the future: it can only make the consumer index a
//! real job's change as the outbox has it.

#[cfg(feature = "consumer")]
use std::collections::HashMap;

#[cfg(feature = "consumer")]
use crate::consume::message::{Body, Message};
#[cfg(feature = "consumer")]
use crate::consume::record::IndexerEvent;
#[cfg(feature = "consumer")]
use crate::consume::shared::{Shared, retrying};
#[cfg(feature = "consumer")]
use crate::consume::sorted::Sorted;
#[cfg(feature = "consumer")]
use crate::consume::why::Why;
use crate::outbox::Recorded;
use crate::publish::Envelope;

/// What to do with a delivery, after the outbox was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Check {
    /// Index it.
    Deliver,
    /// Its job is completed already: ack it, nothing more.
    Duplicate,
    /// Its job waits to be published again: ack it, nothing more.
    NotYet,
    /// A later truncation of its table covers it: complete the job without indexing.
    Superseded,
    /// No such job, or not this one: dead-letter it, touch no job.
    Unverified(String),
}

/// Checks `envelope` against what the outbox has for its job id.
pub(crate) fn check(
    envelope: &Envelope<'_>,
    recorded: Option<&Recorded>,
    indexed_here: bool,
) -> Check {
    // Only a job this consumer is meant to complete may be touched: otherwise a forged
    // delivery naming another consumer's job, or a fan-out in progress (`processing`), would
    // pass the checks below and fail it.
    if !indexed_here {
        return Check::Unverified(format!(
            "this consumer indexes no table {:?} (a relation's job is never published; another table needs its event type in this consumer's configuration)",
            envelope.table
        ));
    }
    let Some(r) = recorded.filter(|r| r.table.is_some()) else {
        return Check::Unverified(format!(
            "unknown or mismatched job: the outbox has no job {}",
            envelope.job_id
        ));
    };
    let mismatch = |what: &str, theirs: &str, ours: Option<&str>| {
        Check::Unverified(format!(
            "unknown or mismatched job: job {} is {what} {:?} in the outbox, the message says {theirs:?}",
            envelope.job_id,
            ours.unwrap_or("")
        ))
    };
    if r.table.as_deref() != Some(envelope.table.as_ref()) {
        return mismatch("of table", &envelope.table, r.table.as_deref());
    }
    if r.record_id.as_deref() != Some(envelope.record_id.as_ref()) {
        return mismatch("of record", &envelope.record_id, r.record_id.as_deref());
    }
    if r.operation != Some(envelope.operation) {
        return mismatch(
            "an",
            envelope.operation.as_str(),
            r.operation.map(|o| o.as_str()),
        );
    }
    match r.status.as_deref() {
        Some("completed") => Check::Duplicate,
        Some("pending") => Check::NotYet,
        _ if r.truncated_after => Check::Superseded,
        _ => Check::Deliver,
    }
}

/// A batch after verification: the messages to deliver, in the batch's order, with the
/// outbox's rows of their jobs; the others filed already.
#[cfg(feature = "consumer")]
pub(super) struct Verified {
    pub(super) deliver: Vec<Message>,
    pub(super) recorded: HashMap<i64, Recorded>,
    pub(super) sorted: Sorted,
    /// The reindexes under way, by table: the new index every action of the table goes to
    /// as well.
    pub(super) reindexing: HashMap<String, String>,
}

/// Asks the outbox about every change of the batch (one query, which also brings the rows
/// of the jobs that expect a delivery), retrying while it is away, and files each message by
/// its [`Check`]; `None` when shutdown came first.
#[cfg(feature = "consumer")]
pub(super) async fn verify(shared: &Shared, batch: Vec<Message>) -> Option<Verified> {
    let ids: Vec<i64> = batch.iter().filter_map(Message::job_id).collect();
    let recorded = retrying(shared, || shared.ledger.lookup(&ids)).await?;
    let recorded: HashMap<i64, Recorded> = recorded.into_iter().map(|r| (r.id, r)).collect();
    // After the jobs were checked, never cached: a reindex that began before this read is
    // seen, and one that began after it covers these jobs with its backfill (whose jobs read
    // the rows after these jobs committed).
    let reindexing: HashMap<String, String> = retrying(shared, || shared.ledger.reindexing())
        .await?
        .into_iter()
        .collect();
    let mut sorted = Sorted::default();
    let mut deliver = Vec::new();
    for message in batch {
        let check = match message.body.envelope() {
            Some(envelope) => check(
                envelope,
                recorded.get(&envelope.job_id),
                shared.event_types.contains_key(envelope.table.as_ref()),
            ),
            None => Check::Deliver,
        };
        match (check, &message.body) {
            (_, Body::Malformed(error)) => {
                let reason = error.to_string();
                sorted.dead.push((message, Why::Malformed, reason));
            }
            (Check::Unverified(reason), _) => {
                shared.record(IndexerEvent::Unverified);
                sorted.dead.push((message, Why::Unverified, reason));
            }
            (Check::Duplicate | Check::NotYet, _) => sorted.skipped.push(message),
            (Check::Superseded, _) => {
                shared.record(IndexerEvent::Superseded);
                sorted.covered.push(message);
            }
            (Check::Deliver, _) => deliver.push(message),
        }
    }
    Some(Verified {
        deliver,
        recorded,
        sorted,
        reindexing,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::outbox::Operation;

    fn envelope(job: i64, record: &str) -> Envelope<'static> {
        let body = json!({
            "messageId": format!("job_{job}"), "jobId": job, "schemaVersion": 1,
            "routingKey": "listing.update", "table": "listings", "operation": "UPDATE",
            "recordId": record, "changeData": {"old": {}, "new": {}},
            "occurredAt": "2026-11-27T12:00:00Z"
        });
        Envelope::decode(body.to_string().as_bytes()).expect("valid")
    }

    fn recorded(status: &str) -> Recorded {
        Recorded {
            id: 5,
            table: Some("listings".into()),
            operation: Some(Operation::Update),
            record_id: Some("L1".into()),
            status: Some(status.into()),
            truncated_after: false,
            change_data: Some(json!({"old": {}, "new": {}})),
            created_at: Some(std::time::SystemTime::UNIX_EPOCH),
            traceparent: None,
        }
    }

    #[test]
    fn only_a_job_that_expects_this_delivery_is_indexed() {
        let e = envelope(5, "L1");
        for status in ["processing", "sent", "failed"] {
            assert_eq!(
                check(&e, Some(&recorded(status)), true),
                Check::Deliver,
                "{status}"
            );
        }
        assert_eq!(
            check(&e, Some(&recorded("completed")), true),
            Check::Duplicate
        );
        assert_eq!(check(&e, Some(&recorded("pending")), true), Check::NotYet);
        let truncated = Recorded {
            truncated_after: true,
            ..recorded("sent")
        };
        assert_eq!(check(&e, Some(&truncated), true), Check::Superseded);
    }

    #[test]
    fn a_delivery_for_a_table_this_consumer_does_not_index_touches_nothing() {
        let body = json!({
            "messageId": "job_5", "jobId": 5, "schemaVersion": 1,
            "routingKey": "listing.update", "table": "listings#seller", "operation": "UPDATE",
            "recordId": "L1", "changeData": {"old": {}, "new": {}},
            "occurredAt": "2026-11-27T12:00:00Z"
        });
        let forged = Envelope::decode(body.to_string().as_bytes()).expect("valid");
        let fan_out = Recorded {
            table: Some("listings#seller".into()),
            ..recorded("processing")
        };
        assert!(
            matches!(check(&forged, Some(&fan_out), false), Check::Unverified(why) if why.contains("never published"))
        );
    }

    #[test]
    fn a_forged_message_is_refused_with_the_reason() {
        let unknown = check(&envelope(9_000_000_000_000_000_000, "L1"), None, true);
        assert!(
            matches!(&unknown, Check::Unverified(why) if why.contains("no job")),
            "{unknown:?}"
        );
        let missing = Recorded {
            table: None,
            ..recorded("sent")
        };
        assert!(matches!(
            check(&envelope(5, "L1"), Some(&missing), true),
            Check::Unverified(_)
        ));
        let other_record = check(&envelope(5, "L2"), Some(&recorded("pending")), true);
        assert!(
            matches!(&other_record, Check::Unverified(why) if why.contains("record") && why.contains("L2")),
            "{other_record:?}"
        );
        let delete = Recorded {
            operation: Some(Operation::Delete),
            ..recorded("sent")
        };
        assert!(matches!(
            check(&envelope(5, "L1"), Some(&delete), true),
            Check::Unverified(_)
        ));
    }
}
