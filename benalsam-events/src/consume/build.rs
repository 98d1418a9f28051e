//! Documents: a verified change becomes the action it asks of the index, built from the
//! outbox's copy of its job's row. Truncations and joined documents are set aside for their
//! own stages (`truncate`, `join`).

use std::collections::HashMap;

use crate::consume::message::{Body, Message};
use crate::consume::shared::Shared;
use crate::consume::sorted::Sorted;
use crate::consume::why::Why;
use crate::event_type::BuildError;
use crate::event_type::EventType;
use crate::outbox::{Operation, Recorded};
use crate::publish::Envelope;

/// The delivered messages of a batch, by what they ask of the index.
#[derive(Default)]
pub(super) struct Documents {
    /// Built, in the batch's order: to be written.
    pub(super) writable: Vec<Message>,
    /// Of joined event types: read from the database first.
    pub(super) joined: Vec<Message>,
    /// Truncations: applied once the writes are done.
    pub(super) truncations: Vec<Message>,
}

/// Builds the document of every delivered message of a plain event type from `recorded`
/// (the outbox's rows); a change whose row cannot become a document is dead-lettered with
/// the reason.
pub(super) fn build(
    shared: &Shared,
    deliver: Vec<Message>,
    recorded: &HashMap<i64, Recorded>,
    sorted: &mut Sorted,
) -> Documents {
    let mut documents = Documents::default();
    for mut message in deliver {
        if let Body::Verifying { envelope } = &message.body {
            if envelope.operation == Operation::Truncate {
                documents.truncations.push(message);
                continue;
            }
            if shared
                .event_types
                .get(envelope.table.as_ref())
                .is_some_and(EventType::is_joined)
            {
                documents.joined.push(message);
                continue;
            }
            let job = message.job_id().and_then(|id| recorded.get(&id));
            message = build_one(shared, message, job);
        }
        match &message.body {
            Body::Change {
                action: Err(error), ..
            } => {
                let reason = error.to_string();
                sorted.dead.push((message, Why::Rejected, reason));
            }
            _ => documents.writable.push(message),
        }
    }
    documents
}

/// Builds the document of a verified change from the outbox's copy of its job, as the
/// bridge built the message from it: what the message itself carries never reaches the
/// index, so a forged copy of a real job can only deliver the genuine change. A message
/// built already (a retry) is left as it is.
fn build_one(shared: &Shared, mut message: Message, recorded: Option<&Recorded>) -> Message {
    let mut envelope = match message.body {
        Body::Verifying { envelope } => envelope,
        other => {
            message.body = other;
            return message;
        }
    };
    let action = match (
        shared.event_types.get(envelope.table.as_ref()),
        recorded.and_then(Recorded::job),
    ) {
        (Some(event_type), Some(job)) => {
            // The latency metric counts from the commit the outbox recorded, too.
            envelope.occurred_at = job.created_at;
            event_type.action(&Envelope::of(&job, event_type))
        }
        (None, _) => Err(BuildError(format!(
            "no event type is configured for table {:?}; add one to the consumer",
            envelope.table
        ))),
        (Some(_), None) => Err(BuildError(format!(
            "the outbox holds no row for job {} to build its document from",
            envelope.job_id
        ))),
    };
    message.body = Body::Change {
        version: envelope.job_id,
        envelope,
        action,
    };
    message
}
