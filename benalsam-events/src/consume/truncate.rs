//! Truncations: a `TRUNCATE` empties its event type's index of everything older than it,
//! once no older job of the table is still on its way (those may still write). The delete
//! itself is the search engine's business ([`delete`](crate::search::delete)).

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::consume::message::Message;
use crate::consume::record::IndexerEvent;
use crate::consume::shared::Shared;
use crate::consume::sorted::Sorted;
use crate::consume::why::Why;
use crate::search::delete;

/// Applies each truncation of a batch, filing it covered once applied, held while it waits.
/// A table being reindexed (`reindexing`: table → new index) has its new index emptied too.
pub(super) async fn truncate(
    shared: &Shared,
    truncations: Vec<Message>,
    reindexing: &HashMap<String, String>,
    sorted: &mut Sorted,
) {
    for message in truncations {
        truncate_one(shared, message, reindexing, sorted).await;
    }
}

/// Empties the index of a truncated table of everything older than the truncation, once no
/// older job of the table is on its way any more (those may still write); until then, and
/// while the cluster is away, the truncation waits (without counting attempts).
async fn truncate_one(
    shared: &Shared,
    mut message: Message,
    reindexing: &HashMap<String, String>,
    sorted: &mut Sorted,
) {
    let Some(envelope) = message.body.envelope() else {
        return;
    };
    let (table, job) = (envelope.table.to_string(), envelope.job_id);
    let Some(event_type) = shared.event_types.get(&table) else {
        let reason =
            format!("no event type is configured for table {table:?}; add one to the consumer");
        sorted.dead.push((message, Why::Rejected, reason));
        return;
    };
    let result = match shared.ledger.unsettled_before(&table, job).await {
        // Expected for a moment: older messages are still being indexed.
        Ok(n) if n > 0 => {
            tracing::debug!(table, job, older = n, "truncation waits for older jobs");
            Err(None)
        }
        Ok(_) => {
            let mut deleted =
                delete::delete_older(&shared.search, &event_type.index.alias, job).await;
            if let (Ok(n), Some(new_index)) = (&deleted, reindexing.get(&table)) {
                deleted = delete::delete_older(&shared.search, new_index, job)
                    .await
                    .map(|m| n + m);
            }
            shared.record(IndexerEvent::SearchNode(shared.search.in_use()));
            deleted.map_err(Some)
        }
        Err(error) => Err(Some(error.to_string())),
    };
    match result {
        Ok(deleted) => {
            tracing::info!(table, job, deleted, "truncation applied to the index");
            sorted.covered.push(message);
        }
        Err(failure) => {
            // Not expected: say so, and keep trying (the index must not keep the old rows).
            if let Some(why) = failure {
                tracing::warn!(table, job, reason = %why, "truncation cannot be applied yet; retrying");
                shared.record(IndexerEvent::Error(&why));
            }
            message.not_before = Instant::now() + Duration::from_secs(1);
            sorted.held.push(message);
        }
    }
}
