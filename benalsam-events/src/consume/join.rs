//! Joined documents: the messages of an event type with relations are read from the
//! database, one read per event type of the batch (so one version for its documents), under
//! the lock the outbox's joined read takes.

use std::collections::HashMap;

use crate::consume::message::{Body, Message};
use crate::consume::record::IndexerEvent;
use crate::consume::shared::{Shared, retrying};
use crate::consume::sorted::Sorted;
use crate::consume::why::Why;

/// Reads the documents of `joined`; the messages whose document cannot be built are
/// dead-lettered with the reason, the others come back to be written. `None` when shutdown
/// came while PostgreSQL was away.
pub(super) async fn join(
    shared: &Shared,
    joined: Vec<Message>,
    sorted: &mut Sorted,
) -> Option<Vec<Message>> {
    let mut writable = Vec::new();
    if joined.is_empty() {
        return Some(writable);
    }
    for (message, rejected) in read_joined(shared, joined).await? {
        match rejected {
            None => writable.push(message),
            Some(reason) => sorted.dead.push((message, Why::Rejected, reason)),
        }
    }
    Some(writable)
}

/// Reads the documents of joined messages from the database, one read per event type (so
/// one version for its documents of the batch), and turns each message into a `Change`;
/// with the reason, the messages whose document cannot be built. `None` when shutdown came
/// while PostgreSQL was away.
async fn read_joined(
    shared: &Shared,
    messages: Vec<Message>,
) -> Option<Vec<(Message, Option<String>)>> {
    let mut by_table: HashMap<String, Vec<Message>> = HashMap::new();
    for message in messages {
        if let Some(envelope) = message.body.envelope() {
            by_table
                .entry(envelope.table.to_string())
                .or_default()
                .push(message);
        }
    }
    let mut out = Vec::new();
    for (table, messages) in by_table {
        let Some(event_type) = shared.event_types.get(&table) else {
            continue;
        };
        let mut ids: Vec<String> = messages
            .iter()
            .filter_map(|m| m.body.envelope().map(|e| e.record_id.to_string()))
            .collect();
        ids.sort_unstable();
        ids.dedup();
        let read = retrying(shared, || shared.ledger.read_joined(event_type, &ids)).await?;
        shared.record(IndexerEvent::JoinedRead { rows: ids.len() });
        for mut message in messages {
            let Body::Verifying { envelope } = message.body else {
                continue;
            };
            let id = envelope.record_id.to_string();
            let found = read.rows.get(&id);
            let action = event_type.joined_action(
                id,
                found.map(|(row, _)| row),
                found.map_or(&serde_json::Map::new(), |(_, related)| related),
                read.version,
            );
            let rejected = action.as_ref().err().map(ToString::to_string);
            message.body = Body::Change {
                envelope,
                action,
                version: read.version,
            };
            out.push((message, rejected));
        }
    }
    Some(out)
}
