//! Sending dead letters back: each letter only names a job, which is checked against the
//! outbox and published again as the bridge would publish it.

use std::collections::{BTreeSet, HashMap};

use lapin::Channel;
use lapin::message::BasicGetMessage;
use lapin::options::{BasicAckOptions, BasicGetOptions};
use lapin::types::AMQPValue;

use super::{REPLAYED_HEADER, confirm, describe, header_i64, open};
use crate::config::AmqpUrl;
use crate::consume::verify::{self, Check};
use crate::outbox::{Job, JobSelection, Outbox, Recorded};
use crate::publish::Envelope;
use crate::{error::Error, error::Result, event_type::EventType};

/// What a replay did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReplayReport {
    /// Jobs published again (confirmed), their letters removed from the DLQ.
    pub replayed: usize,
    /// Letters left in the DLQ because they were not selected.
    pub kept: usize,
    /// Selected letters that failed a check: not published, left in the DLQ.
    pub refused: Vec<RefusedLetter>,
    /// Jobs asked for (`JobSelection::Jobs`) that no letter of the DLQ names.
    pub missing: Vec<i64>,
}

/// A dead letter a replay refused to publish, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RefusedLetter {
    /// The job its body names, if it names one.
    pub job_id: Option<i64>,
    /// Why it was not replayed.
    pub reason: String,
}

/// What a replay needs besides the queue.
pub(super) struct Replay<'a> {
    pub(super) outbox: &'a Outbox,
    pub(super) event_types: &'a [EventType],
    pub(super) selection: &'a JobSelection,
}

/// Letters read and checked at once: one outbox query for each such group.
const REPLAY_CHUNK: u32 = 100;

/// Whether `letter` may be replayed, given what the outbox has for the job its body names:
/// the job (as the outbox has it) and its event type, or why not. The same checks as the
/// consumer's for a delivery.
pub(super) fn checked<'t>(
    letter: &Result<Envelope<'static>, String>,
    recorded: Option<&Recorded>,
    event_types: &'t [EventType],
) -> std::result::Result<(Job, &'t EventType), String> {
    let envelope = letter.as_ref().map_err(Clone::clone)?;
    let event_type = event_types
        .iter()
        .find(|t| t.job_table() == envelope.table.as_ref());
    match verify::check(envelope, recorded, event_type.is_some()) {
        Check::Deliver | Check::Superseded => {}
        Check::Duplicate => {
            return Err(format!(
                "job {} is completed already: nothing to replay",
                envelope.job_id
            ));
        }
        Check::NotYet => {
            return Err(format!(
                "job {} is pending: the bridge publishes it again",
                envelope.job_id
            ));
        }
        Check::Unverified(reason) => return Err(reason),
    }
    let (Some(event_type), Some(job)) = (event_type, recorded.and_then(Recorded::job)) else {
        return Err(format!(
            "the outbox holds no row for job {}",
            envelope.job_id
        ));
    };
    Ok((job, event_type))
}

/// Publishes the jobs of the selected dead letters of `queue` again (see
/// [`DeadLetterQueue::replay`](super::DeadLetterQueue::replay)), then removes those letters.
/// The others stay.
pub(super) async fn replay(
    url: &AmqpUrl,
    queue: &str,
    replay: &Replay<'_>,
    mut progress: impl FnMut(u64, u64),
) -> Result<ReplayReport> {
    let (connection, channel, count) = open(url, queue, "benalsam dlq replay").await?;
    let publisher = crate::connect::confirm_channel(&connection, "replay").await?;
    let mut report = ReplayReport::default();
    let mut found = BTreeSet::new();
    let mut seen = 0;
    while seen < count {
        progress(u64::from(seen), u64::from(count));
        let chunk = next_chunk(
            &channel,
            queue,
            replay.selection,
            count,
            &mut seen,
            &mut report,
        )
        .await?;
        if chunk.is_empty() {
            break;
        }
        let ids: Vec<i64> = chunk
            .iter()
            .filter_map(|letter| letter.envelope.as_ref().ok().map(|e| e.job_id))
            .collect();
        let recorded: HashMap<i64, Recorded> = replay
            .outbox
            .lookup(&ids)
            .await?
            .into_iter()
            .map(|r| (r.id, r))
            .collect();
        for letter in chunk {
            found.extend(letter.named);
            let known = letter
                .envelope
                .as_ref()
                .ok()
                .and_then(|e| recorded.get(&e.job_id));
            match checked(&letter.envelope, known, replay.event_types) {
                Ok((job, event_type)) => {
                    republish(&publisher, &letter.message, &job, event_type).await?;
                    report.replayed += 1;
                }
                Err(reason) => report.refused.push(RefusedLetter {
                    job_id: letter.named,
                    reason,
                }),
            }
        }
    }
    progress(u64::from(count), u64::from(count));
    if let JobSelection::Jobs(ids) = replay.selection {
        report.missing = ids
            .iter()
            .copied()
            .filter(|id| !found.contains(id))
            .collect();
        report.missing.sort_unstable();
        report.missing.dedup();
    }
    let _ = connection.close(200, "replayed".into()).await;
    Ok(report)
}

/// A selected letter, held unacknowledged until it is replayed.
struct Letter {
    message: BasicGetMessage,
    /// The job its body names (as `dlq list` shows it), even when the body is no valid
    /// envelope: such a letter is selected, then refused with the reason.
    named: Option<i64>,
    envelope: std::result::Result<Envelope<'static>, String>,
}

/// The next chunk of selected letters (up to [`REPLAY_CHUNK`]), held unacknowledged so the
/// next get takes the next one; those not replayed go back to the queue when the channel
/// closes. Letters not selected are counted in `report.kept`. Empty when the queue has none
/// left.
async fn next_chunk(
    channel: &Channel,
    queue: &str,
    selection: &JobSelection,
    count: u32,
    seen: &mut u32,
    report: &mut ReplayReport,
) -> Result<Vec<Letter>> {
    let mut chunk = Vec::new();
    while *seen < count && chunk.len() < REPLAY_CHUNK as usize {
        let message = channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await
            .map_err(|e| Error::amqp("reading the DLQ", e))?;
        let Some(message) = message else {
            // Fewer letters than counted at the start (another reader took some).
            *seen = count;
            break;
        };
        *seen += 1;
        let envelope = Envelope::parse(&message.delivery.data)
            .map_err(|e| format!("{e}: it names no job to replay"));
        let named = match &envelope {
            Ok(envelope) => Some(envelope.job_id),
            Err(_) => describe(&message).job_id,
        };
        let selected = match selection {
            JobSelection::All => true,
            JobSelection::Jobs(_) => named.is_some_and(|id| selection.contains(id)),
        };
        if selected {
            chunk.push(Letter {
                message,
                named,
                envelope,
            });
        } else {
            report.kept += 1;
        }
    }
    Ok(chunk)
}

/// Publishes `job` as the bridge would (its event type's exchange and routing key), counting
/// the replay in a header, waits for the confirm, then removes the letter from the DLQ.
async fn republish(
    publisher: &Channel,
    message: &BasicGetMessage,
    job: &Job,
    event_type: &EventType,
) -> Result<()> {
    let delivery = &message.delivery;
    let headers = delivery.properties.headers().clone().unwrap_or_default();
    let replays = header_i64(&headers, REPLAYED_HEADER).unwrap_or(0) + 1;
    let route = event_type.route(job);
    let (exchange, routing_key) = (route.exchange.clone(), route.routing_key.clone());
    let envelope = Envelope::routed(job, route);
    let mut properties = envelope.properties("benalsam-replay", job.traceparent.as_deref());
    let mut headers = properties.headers().clone().unwrap_or_default();
    headers.insert(REPLAYED_HEADER.into(), AMQPValue::LongLongInt(replays));
    properties = properties.with_headers(headers);
    confirm(
        publisher,
        &exchange,
        &routing_key,
        &envelope.to_bytes(),
        properties,
        "replaying a dead letter",
    )
    .await?;
    delivery
        .ack(BasicAckOptions::default())
        .await
        .map_err(|e| Error::amqp("removing a replayed message from the DLQ", e))?;
    Ok(())
}
