//! The settler: records what became of each message of a batch in the outbox, then acks it.
//!
//! Completions are reported first and acked after; dead letters are published (and
//! confirmed) to their queue's dead-letter exchange, reported failed, then acked. Each group
//! is one report to the outbox, retried while PostgreSQL is away: a message is never acked
//! before its outcome is recorded, so a crash anywhere means a (harmless) redelivery.

use std::time::SystemTime;

use futures::future::join_all;
use lapin::Channel;
use lapin::options::BasicAckOptions;

use crate::consume::dead_letter::{self, Why};
use crate::consume::message::{Body, Finished, Message};
use crate::consume::record::{IndexerEvent, Item};
use crate::consume::shared::{Shared, retrying};
use crate::ops::metrics::OfType;
use crate::outbox::Outcome;
use crate::search::plan::{Decision, Done};

/// The messages of a batch, sorted by what happens to them.
#[derive(Default)]
pub(crate) struct Sorted {
    /// Indexed (or superseded in the index): completed, then acked.
    done: Vec<Message>,
    /// Covered without indexing (a later truncation, a truncation applied): completed, then
    /// acked.
    pub(crate) covered: Vec<Message>,
    /// Duplicates and deliveries their job does not expect yet: acked only.
    pub(crate) skipped: Vec<Message>,
    pub(crate) dead: Vec<(Message, Why, String)>,
    /// Back to the loop after their backoff (retries count an attempt, held ones do not).
    retries: Vec<Message>,
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

/// Settles a sorted batch: completions, then dead letters; the retries go back to the loop.
pub(crate) async fn settle(shared: &Shared, channel: Option<&Channel>, sorted: Sorted) -> Finished {
    let mut done = sorted.done;
    done.extend(sorted.covered);
    if !complete(shared, &done).await {
        return Finished::Abandoned;
    }
    ack(shared, sorted.skipped.iter()).await;
    let Some(link_broken) = dead_letter(shared, channel, sorted.dead).await else {
        return Finished::Abandoned;
    };
    let mut retries = sorted.retries;
    retries.extend(sorted.held);
    Finished::Done {
        retries,
        link_broken,
    }
}

/// Reports the jobs of `done` completed, then acks them; false if shutdown came while the
/// outbox could not be reached (they stay unacked).
async fn complete(shared: &Shared, done: &[Message]) -> bool {
    if done.is_empty() {
        return true;
    }
    let reports: Vec<(i64, Outcome)> = done
        .iter()
        .filter_map(|m| Some((m.job_id()?, Outcome::Completed)))
        .collect();
    if !record(shared, &reports).await {
        return false;
    }
    let completed = done.iter().filter(|m| m.job_id().is_some());
    for (event_type, jobs) in tally(completed.map(|m| &m.event_type)) {
        shared.record(IndexerEvent::Completed { event_type, jobs });
    }
    ack(shared, done.iter()).await;
    true
}

/// Publishes each dead letter (all confirmed together), reports the failed jobs, acks the
/// messages. Returns whether a publish failed (the channel is then gone, and the messages
/// not published stay unacked), or `None` if shutdown came first.
async fn dead_letter(
    shared: &Shared,
    channel: Option<&Channel>,
    dead: Vec<(Message, Why, String)>,
) -> Option<bool> {
    if dead.is_empty() {
        return Some(false);
    }
    let Some(channel) = channel else {
        return Some(true);
    };
    let published = join_all(dead.iter().map(|(message, why, reason)| {
        tracing::warn!(
            job = message.job_id(),
            kind = why.as_str(),
            reason,
            "dead-lettering a message"
        );
        dead_letter::publish(
            channel,
            &message.route.dead_letter_exchange,
            &message.delivery,
            *why,
            reason,
        )
    }))
    .await;
    let mut link_broken = false;
    let mut sent = Vec::new();
    for ((message, why, reason), result) in dead.into_iter().zip(published) {
        match result {
            Ok(()) => sent.push((message, why, reason)),
            Err(error) => {
                shared.record(IndexerEvent::Error(&format!("dead-lettering: {error}")));
                link_broken = true;
            }
        }
    }
    // A job is failed only when its message was its own: a malformed or unverified message
    // says nothing trustworthy about any job.
    let reports: Vec<(i64, Outcome)> = sent
        .iter()
        .filter(|(_, why, _)| matches!(why, Why::Rejected | Why::RetriesExhausted))
        .filter_map(|(m, _, reason)| {
            Some((
                m.job_id()?,
                Outcome::DeadLettered {
                    error: reason.clone(),
                },
            ))
        })
        .collect();
    if !record(shared, &reports).await {
        return None;
    }
    for (message, why, _) in &sent {
        shared.record(IndexerEvent::DeadLettered {
            event_type: &message.event_type,
            why: *why,
        });
    }
    ack(shared, sent.iter().map(|(m, _, _)| m)).await;
    Some(link_broken)
}

/// Reports outcomes to the outbox, retrying while it is unreachable; false if shutdown came
/// first.
async fn record(shared: &Shared, reports: &[(i64, Outcome)]) -> bool {
    reports.is_empty()
        || retrying(shared, || shared.ledger.report(reports))
            .await
            .is_some()
}

/// Acks messages, all sent together: one at a time would wait on the connection's loop each
/// time.
/// How long the acks of a batch may take to go out.
const ACK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

async fn ack<'a>(shared: &Shared, messages: impl Iterator<Item = &'a Message>) {
    let messages: Vec<&Message> = messages.collect();
    // Bounded: acks on a connection whose broker stopped answering (not yet known lost) must
    // not hold up the batch, nor the shutdown that waits for it. An ack that did not go out
    // is harmless: the delivery comes again, and its job, completed, is acked as a duplicate.
    let answers = tokio::time::timeout(
        ACK_WAIT,
        join_all(
            messages
                .iter()
                .map(|m| m.delivery.ack(BasicAckOptions::default())),
        ),
    )
    .await
    .unwrap_or_default();
    let acked = messages
        .iter()
        .zip(answers)
        .filter(|(_, answer)| answer.is_ok())
        .map(|(m, _)| &m.event_type);
    for (event_type, count) in tally(acked) {
        shared.record(IndexerEvent::Acked { event_type, count });
    }
}

/// The labels of `labels`, each with how often it occurs (few event types: a short list).
fn tally<'a>(labels: impl Iterator<Item = &'a OfType>) -> Vec<(&'a OfType, u64)> {
    let mut counts: Vec<(&OfType, u64)> = Vec::new();
    for label in labels {
        match counts.iter_mut().find(|(l, _)| *l == label) {
            Some((_, n)) => *n += 1,
            None => counts.push((label, 1)),
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tally_counts_each_label_once() {
        let (a, b) = (OfType::new("a"), OfType::new("b"));
        let counts = tally([&a, &b, &a].into_iter());
        assert_eq!(counts, vec![(&a, 2), (&b, 1)]);
    }
}
