//! Writing: the built actions of a batch go out as one `_bulk` request (each with its
//! version), every item is decided once ([`plan`](crate::search::plan)) and its message
//! filed for settling. A request the cluster refuses as a whole is sent again action by
//! action; a cluster that does not answer leaves the batch untouched.

use std::time::Duration;

use tracing::Instrument;

use crate::consume::message::{Body, Message};
use crate::consume::pace::Answer;
use crate::consume::record::IndexerEvent;
use crate::consume::settle::Sorted;
use crate::consume::shared::Shared;
use crate::event_type::Action;
use crate::ops::telemetry;
use crate::search::bulk::{self as writer, WriteError};
use crate::search::plan;

/// Writes `writable` and files each message by its item's decision. When the cluster as a
/// whole is unavailable nothing was done: the messages come back with the reason.
pub(super) async fn write(
    shared: &Shared,
    writable: Vec<Message>,
    sorted: &mut Sorted,
) -> Result<(), (Vec<Message>, String)> {
    if writable.is_empty() {
        return Ok(());
    }
    match bulk(shared, &writable).await {
        Ok(decisions) => {
            for (message, decision) in writable.into_iter().zip(decisions) {
                sorted.decided(shared, message, decision);
            }
            Ok(())
        }
        Err(reason) => Err((writable, reason)),
    }
}

/// Sends the actions of `batch` as one bulk request and decides every item; `Err` when the
/// cluster as a whole is unavailable.
async fn bulk(shared: &Shared, batch: &[Message]) -> Result<Vec<plan::Decision>, String> {
    let actions: Vec<(&Action, i64)> = batch
        .iter()
        .filter_map(|m| match &m.body {
            Body::Change {
                action: Ok(action),
                version,
                ..
            } => Some((action, *version)),
            _ => None,
        })
        .collect();
    let deletes: Vec<bool> = actions.iter().map(|(a, _)| a.is_delete()).collect();
    // One span per bulk request, linked to the messages it carries.
    let span = tracing::info_span!("bulk", otel.kind = "client", actions = actions.len());
    for message in batch {
        telemetry::link(&span, &message.span);
    }
    let answer = send(
        shared,
        writer::encode(actions.iter().copied()),
        actions.len(),
    )
    .instrument(span.clone())
    .await;
    match answer {
        Ok((response, took)) => match plan::plan(&deletes, &response) {
            Ok(decisions) if plan::all_retry(&decisions) => {
                shared.observe(Answer {
                    items: actions.len(),
                    took,
                    busy: decisions.len(),
                });
                Err(format!(
                    "every item refused as unavailable, e.g. {}",
                    match &decisions[0] {
                        plan::Decision::Retry(why) => why.as_str(),
                        _ => "",
                    }
                ))
            }
            Ok(decisions) => {
                shared.observe(Answer {
                    items: actions.len(),
                    took,
                    busy: decisions
                        .iter()
                        .filter(|d| matches!(d, plan::Decision::Retry(_)))
                        .count(),
                });
                Ok(decisions)
            }
            Err(why) => Ok(one_by_one(shared, &actions, &why).instrument(span).await),
        },
        Err(WriteError::Unavailable(why)) => Err(why),
        // The cluster answered but refused the request as a whole (one action it cannot
        // parse, a body too large): find the culprit item by item rather than holding the
        // queue forever.
        Err(WriteError::Refused(why)) => {
            tracing::warn!(reason = %why, actions = actions.len(), "bulk request refused; sending its actions one by one");
            Ok(one_by_one(shared, &actions, &why).instrument(span).await)
        }
    }
}

/// Sends each action in a request of its own, after the cluster refused them together. An
/// action refused alone gets that refusal (a permanent failure); one that meets an
/// unavailable cluster is retried later like any busy item.
async fn one_by_one(
    shared: &Shared,
    actions: &[(&Action, i64)],
    refusal: &str,
) -> Vec<plan::Decision> {
    use plan::ItemResult;
    if actions.len() == 1 {
        return vec![plan::decide(
            actions[0].0.is_delete(),
            &ItemResult::refused(refusal),
        )];
    }
    let mut decisions = Vec::with_capacity(actions.len());
    for (action, version) in actions {
        let result = match send(shared, writer::encode([(*action, *version)]), 1).await {
            Ok((response, _)) => match plan::plan(&[action.is_delete()], &response) {
                Ok(mut one) => one.remove(0),
                Err(why) => plan::decide(action.is_delete(), &ItemResult::refused(&why)),
            },
            Err(WriteError::Refused(why)) => {
                plan::decide(action.is_delete(), &ItemResult::refused(&why))
            }
            Err(WriteError::Unavailable(why)) => {
                plan::decide(action.is_delete(), &ItemResult::unavailable(&why))
            }
        };
        decisions.push(result);
    }
    decisions
}

/// One bulk request, with its metrics and status.
async fn send(
    shared: &Shared,
    body: Vec<u8>,
    actions: usize,
) -> Result<(plan::BulkResponse, Duration), WriteError> {
    let written = writer::write(&shared.search, &body).await;
    // The request may have moved to another node, answered or not.
    shared.record(IndexerEvent::SearchNode(shared.search.in_use()));
    match written {
        Ok((response, took)) => {
            shared.record(IndexerEvent::BulkAnswered { actions, took });
            Ok((response, took))
        }
        Err(error) => {
            shared.record(IndexerEvent::BulkFailed { actions });
            Err(error)
        }
    }
}
