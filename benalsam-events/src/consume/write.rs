//! Writing: the built actions of a batch go out as one `_bulk` request (each with its
//! version), every item is decided once ([`plan`](crate::search::plan)) and its message
//! filed for settling. A request the cluster refuses as a whole is sent again action by
//! action; a cluster that does not answer leaves the batch untouched.
//!
//! While a table is being reindexed, each of its actions is sent twice in the same request:
//! to the alias and to the new index, with the same version. A job is completed once both
//! answered and the new index holds its change or a newer one (see [`fold`]).

use std::collections::HashMap;
use std::time::Duration;

use tracing::Instrument;

use crate::consume::message::{Body, Message};
use crate::consume::pace::Answer;
use crate::consume::record::IndexerEvent;
use crate::consume::shared::Shared;
use crate::consume::sorted::Sorted;
use crate::event_type::Action;
use crate::ops::telemetry;
use crate::search::bulk::{self as writer, WriteError};
use crate::search::plan;

/// Writes `writable` and files each message by its item's decision. When the cluster as a
/// whole is unavailable nothing was done: the messages come back with the reason.
pub(super) async fn write(
    shared: &Shared,
    writable: Vec<Message>,
    reindexing: &HashMap<String, String>,
    sorted: &mut Sorted,
) -> Result<(), (Vec<Message>, String)> {
    if writable.is_empty() {
        return Ok(());
    }
    match bulk(shared, &writable, reindexing).await {
        Ok(decisions) => {
            for (message, decision) in writable.into_iter().zip(decisions) {
                sorted.decided(shared, message, decision);
            }
            Ok(())
        }
        Err(reason) => Err((writable, reason)),
    }
}

/// One item of a bulk request: an action, its version, and the index it goes to when not
/// its own (a reindex's new index).
type Item<'a> = (&'a Action, i64, Option<&'a str>);

/// The items of `batch`, and for each the position of its message among those with an
/// action.
fn items<'a>(
    batch: &'a [Message],
    reindexing: &'a HashMap<String, String>,
) -> (Vec<Item<'a>>, Vec<usize>) {
    let mut items = Vec::with_capacity(batch.len());
    let mut owners = Vec::with_capacity(batch.len());
    let changes = batch.iter().filter_map(|m| match &m.body {
        Body::Change {
            action: Ok(action),
            version,
            envelope,
            ..
        } => Some((action, *version, envelope.table.as_ref())),
        _ => None,
    });
    for (owner, (action, version, table)) in changes.enumerate() {
        items.push((action, version, None));
        owners.push(owner);
        if let Some(new_index) = reindexing.get(table) {
            items.push((action, version, Some(new_index.as_str())));
            owners.push(owner);
        }
    }
    (items, owners)
}

/// The decision of each message from those of its items (the alias's first, then the new
/// index's): a retry by either is a retry; a refusal by the new index is a refusal (the
/// reindex then stops before its swap, naming the dead letters). A refusal by the old index
/// alone counts as done: the index readers will see holds the change, and a change the old
/// mapping cannot take (a new field that needs the new analysis) is what the reindex is for.
fn fold(decisions: Vec<plan::Decision>, owners: &[usize]) -> Vec<plan::Decision> {
    use plan::Decision::{Dead, Done, Retry};
    let mut folded: Vec<plan::Decision> = Vec::new();
    for (decision, owner) in decisions.into_iter().zip(owners) {
        let Some(kept) = folded.get_mut(*owner) else {
            folded.push(decision);
            continue;
        };
        *kept = match (std::mem::replace(kept, Done(plan::Done::Applied)), decision) {
            (Retry(why), _) | (_, Retry(why)) => Retry(why),
            (_, Dead(why)) => Dead(why),
            (Dead(why), done) => {
                tracing::warn!(reason = %why, "the live index refused a document the reindex's new index took; it is done there");
                done
            }
            (done, _) => done,
        };
    }
    folded
}

/// Sends the actions of `batch` as one bulk request and decides every item; `Err` when the
/// cluster as a whole is unavailable.
async fn bulk(
    shared: &Shared,
    batch: &[Message],
    reindexing: &HashMap<String, String>,
) -> Result<Vec<plan::Decision>, String> {
    let (actions, owners) = items(batch, reindexing);
    let deletes: Vec<bool> = actions.iter().map(|(a, _, _)| a.is_delete()).collect();
    // One span per bulk request, linked to the messages it carries.
    let span = tracing::info_span!("bulk", otel.kind = "client", actions = actions.len());
    for message in batch {
        telemetry::link(&span, &message.span);
    }
    let answer = send(
        shared,
        writer::encode_to(actions.iter().copied()),
        actions.len(),
    )
    .instrument(span.clone())
    .await;
    let decisions = match answer {
        Ok((response, took)) => match plan::plan(&deletes, &response) {
            Ok(decisions) if plan::all_retry(&decisions) => {
                shared.observe(Answer {
                    items: actions.len(),
                    took,
                    busy: decisions.len(),
                });
                return Err(format!(
                    "every item refused as unavailable, e.g. {}",
                    match &decisions[0] {
                        plan::Decision::Retry(why) => why.as_str(),
                        _ => "",
                    }
                ));
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
                decisions
            }
            Err(why) => one_by_one(shared, &actions, &why).instrument(span).await,
        },
        Err(WriteError::Unavailable(why)) => return Err(why),
        // The cluster answered but refused the request as a whole (one action it cannot
        // parse, a body too large): find the culprit item by item rather than holding the
        // queue forever.
        Err(WriteError::Refused(why)) => {
            tracing::warn!(reason = %why, actions = actions.len(), "bulk request refused; sending its actions one by one");
            one_by_one(shared, &actions, &why).instrument(span).await
        }
    };
    Ok(fold(decisions, &owners))
}

/// Sends each action in a request of its own, after the cluster refused them together. An
/// action refused alone gets that refusal (a permanent failure); one that meets an
/// unavailable cluster is retried later like any busy item.
async fn one_by_one(shared: &Shared, actions: &[Item<'_>], refusal: &str) -> Vec<plan::Decision> {
    use plan::ItemResult;
    if actions.len() == 1 {
        return vec![plan::decide(
            actions[0].0.is_delete(),
            &ItemResult::refused(refusal),
        )];
    }
    let mut decisions = Vec::with_capacity(actions.len());
    for (action, version, target) in actions {
        let result = match send(shared, writer::encode_to([(*action, *version, *target)]), 1).await
        {
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::search::plan::{Decision, Done};

    #[test]
    fn a_message_of_a_reindexed_table_waits_for_both_indexes_and_follows_the_new_one() {
        let owners = [0, 0, 1, 2, 2];
        let decisions = vec![
            Decision::Done(Done::Applied),
            Decision::Done(Done::Superseded),
            Decision::Done(Done::AlreadyGone),
            Decision::Done(Done::Applied),
            Decision::Retry("busy".into()),
        ];
        assert_eq!(
            fold(decisions, &owners),
            vec![
                Decision::Done(Done::Applied),
                Decision::Done(Done::AlreadyGone),
                Decision::Retry("busy".into()),
            ]
        );
        let by_new = vec![
            Decision::Done(Done::Applied),
            Decision::Dead("mapping".into()),
        ];
        assert_eq!(
            fold(by_new, &[0, 0]),
            vec![Decision::Dead("mapping".into())]
        );
        let by_old = vec![
            Decision::Dead("strict".into()),
            Decision::Done(Done::Applied),
        ];
        assert_eq!(fold(by_old, &[0, 0]), vec![Decision::Done(Done::Applied)]);
        let alone = vec![Decision::Dead("strict".into())];
        assert_eq!(fold(alone, &[0]), vec![Decision::Dead("strict".into())]);
    }

    #[test]
    fn only_actions_of_a_table_being_reindexed_go_to_its_new_index_too() {
        let action = Action::Index {
            index: "l".into(),
            id: "a".into(),
            document: json!({}),
        };
        let body = String::from_utf8(writer::encode_to([
            (&action, 7, None),
            (&action, 7, Some("l_v2")),
        ]))
        .expect("utf-8");
        let metas: Vec<serde_json::Value> = body
            .lines()
            .step_by(2)
            .map(|l| serde_json::from_str(l).expect("JSON"))
            .collect();
        assert_eq!(metas[0]["index"]["_index"], "l");
        assert_eq!(metas[1]["index"]["_index"], "l_v2");
        assert_eq!(metas[1]["index"]["version"], 7, "the same version");
    }
}
