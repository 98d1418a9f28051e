//! A batch's messages sorted by what happens to them, as the stages decide: the settler
//! then acts on each group.

use std::time::SystemTime;

use crate::consume::message::{Body, Message};
use crate::consume::record::{IndexerEvent, Item};
use crate::consume::shared::Shared;
use crate::consume::why::Why;
use crate::search::plan::{Decision, Done};

/// The messages of a batch, sorted by what happens to them.
#[derive(Default)]
pub(crate) struct Sorted {
    /// Indexed (or superseded in the index): completed, then acked.
    pub(super) done: Vec<Message>,
    /// Covered without indexing (a later truncation, a truncation applied): completed, then
    /// acked.
    pub(crate) covered: Vec<Message>,
    /// Duplicates and deliveries their job does not expect yet: acked only.
    pub(crate) skipped: Vec<Message>,
    pub(crate) dead: Vec<(Message, Why, String)>,
    /// Back to the loop after their backoff (retries count an attempt, held ones do not).
    pub(super) retries: Vec<Message>,
    pub(crate) held: Vec<Message>,
}

impl Sorted {
    /// Every message, unsettled (the cluster is away: the batch is held as a whole).
    pub(crate) fn into_messages(self) -> Vec<Message> {
        let mut all = self.done;
        all.extend(self.covered);
        all.extend(self.skipped);
        all.extend(self.dead.into_iter().map(|(m, _, _)| m));
        all.extend(self.retries);
        all.extend(self.held);
        all
    }

    /// Files `message` by its item's decision, counting it.
    pub(crate) fn decided(&mut self, shared: &Shared, mut message: Message, decision: Decision) {
        let event_type = message.event_type.clone();
        let kind = decision.label();
        let item = match decision {
            Decision::Done(done) => {
                let item = done_item(&message, done);
                self.done.push(message);
                item
            }
            Decision::Dead(reason) => {
                self.dead.push((message, Why::Rejected, reason));
                Item::Refused
            }
            Decision::Retry(reason) => {
                message.attempts += 1;
                let config = &shared.config;
                if message.attempts >= config.max_attempts {
                    let reason = format!("{} attempts: {reason}", message.attempts);
                    self.dead.push((message, Why::RetriesExhausted, reason));
                    Item::Exhausted
                } else {
                    message.not_before =
                        tokio::time::Instant::now() + config.retry.delay(message.attempts - 1);
                    self.retries.push(message);
                    Item::Retrying
                }
            }
        };
        shared.record(IndexerEvent::Item {
            event_type: &event_type,
            kind,
            item,
        });
    }
}

/// A done item: whether its action was a delete, and, applied now, how long since the
/// change's commit.
fn done_item(message: &Message, done: Done) -> Item {
    let (delete, occurred_at) = match &message.body {
        Body::Change {
            envelope, action, ..
        } => (
            action.as_ref().is_ok_and(|a| a.is_delete()),
            Some(envelope.occurred_at),
        ),
        _ => (false, None),
    };
    let latency = occurred_at
        .filter(|_| done == Done::Applied)
        .and_then(|at| SystemTime::now().duration_since(at).ok());
    Item::Done {
        done,
        delete,
        latency,
    }
}
