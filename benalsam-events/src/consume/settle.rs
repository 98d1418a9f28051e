//! The settler: records what became of each message of a batch in the outbox, then acks it.
//!
//! Completions are reported first and acked after; dead letters are published (and
//! confirmed) to their queue's dead-letter exchange, reported failed, then acked. Each group
//! is one report to the outbox, retried while PostgreSQL is away: a message is never acked
//! before its outcome is recorded, so a crash anywhere means a (harmless) redelivery.

use futures::future::join_all;
use lapin::Channel;
use lapin::options::BasicAckOptions;

use crate::consume::dead_letter;
use crate::consume::message::{Finished, Message};
use crate::consume::record::IndexerEvent;
use crate::consume::shared::{Shared, retrying};
use crate::consume::sorted::Sorted;
use crate::consume::why::Why;
use crate::ops::metrics::OfType;
use crate::outbox::Outcome;

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

/// How long the acks of a batch may take to go out.
const ACK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Acks messages, all sent together: one at a time would wait on the connection's loop each
/// time.
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
