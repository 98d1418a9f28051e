//! The dead-letter queue: where messages go that cannot be indexed, with their reason, and
//! the tools to look at them and send them back.
//!
//! The consumer dead-letters a message itself (rather than rejecting it) so it can say why:
//! it publishes a copy to its queue's dead-letter exchange (`benalsam.dlx` for
//! `elasticsearch.sync`) with the original routing key and these headers, waits for the
//! broker's confirm, then acks the original.
//!
//! | header | meaning |
//! |---|---|
//! | `x-dead-letter-kind` | `malformed` (not a valid envelope), `unverified` (a job the outbox does not know as the message tells it), `rejected` (a permanent Elasticsearch error, or a row that is no document), `retries-exhausted` |
//! | `x-dead-letter-reason` | the reason, for a person |
//! | `x-original-exchange`, `x-original-routing-key` | where it was first published (shown by `dlq list`; a replay does not use them) |
//! | `x-dead-lettered-at` | when, RFC 3339 |
//!
//! Messages dead-lettered by RabbitMQ itself (a quorum queue's delivery limit) carry its
//! `x-first-death-reason` instead; the tools read both.
//!
//! Whoever may write to a dead-letter exchange (the consumer's broker user) can put anything
//! in a DLQ, headers included, so a replay trusts none of it: a dead letter only names a job
//! (its body's `jobId`, `table`, `recordId`, `operation`), which is checked against the outbox
//! as the consumer checks a delivery; the message published is that job's, built from the
//! outbox's row, to the exchange and routing key the configured event type of its table
//! gives it, as the bridge would publish it. A letter that fails a check is not published: it
//! stays in the DLQ and the replay reports it with the reason.

use std::time::SystemTime;

use lapin::message::{BasicGetMessage, Delivery};
use lapin::options::{BasicGetOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation};

use crate::config::AmqpUrl;
use crate::consume::why::Why;
use crate::outbox::{JobSelection, Outbox};
use crate::publish::{JOB_ID_HEADER, LISTINGS_EXCHANGE};
use crate::{error::Error, error::Result, event_type::EventType};

mod replay;

pub use replay::{RefusedLetter, ReplayReport};

/// Header: what kind of failure.
const KIND_HEADER: &str = "x-dead-letter-kind";
/// Header: the reason.
const REASON_HEADER: &str = "x-dead-letter-reason";
/// Header: the exchange the message was first published to.
const ORIGINAL_EXCHANGE_HEADER: &str = "x-original-exchange";
/// Header: the routing key it was first published with.
const ORIGINAL_ROUTING_KEY_HEADER: &str = "x-original-routing-key";
/// Header: when it was dead-lettered.
const DEAD_LETTERED_AT_HEADER: &str = "x-dead-lettered-at";
/// Header: how often it was replayed from the DLQ.
const REPLAYED_HEADER: &str = "x-replayed";

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

fn header_str(headers: &FieldTable, key: &str) -> Option<String> {
    match headers.inner().get(key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        AMQPValue::LongLongInt(i) => Some(i.to_string()),
        AMQPValue::LongInt(i) => Some(i.to_string()),
        AMQPValue::LongUInt(i) => Some(i.to_string()),
        AMQPValue::Boolean(b) => Some(b.to_string()),
        AMQPValue::Timestamp(t) => Some(t.to_string()),
        // Anything else a client put there: named by its kind, not shown as Rust data.
        _ => Some("(a value that is not text)".to_owned()),
    }
}

fn header_i64(headers: &FieldTable, key: &str) -> Option<i64> {
    match headers.inner().get(key)? {
        AMQPValue::LongLongInt(i) => Some(*i),
        AMQPValue::LongInt(i) => Some(i64::from(*i)),
        AMQPValue::LongUInt(i) => Some(i64::from(*i)),
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).parse().ok(),
        _ => None,
    }
}

/// Publishes a copy of `delivery` to `exchange` (its queue's dead-letter exchange) with
/// `why` and `reason`, and waits for the broker's confirm. `channel` must be in confirm mode.
/// The caller acks the original afterwards.
pub(crate) async fn publish(
    channel: &Channel,
    exchange: &str,
    delivery: &Delivery,
    why: Why,
    reason: &str,
) -> Result<()> {
    let mut headers = delivery.properties.headers().clone().unwrap_or_default();
    headers.insert(KIND_HEADER.into(), long(why.as_str()));
    headers.insert(REASON_HEADER.into(), long(reason));
    if header_str(&headers, ORIGINAL_EXCHANGE_HEADER).is_none() {
        headers.insert(
            ORIGINAL_EXCHANGE_HEADER.into(),
            long(delivery.exchange.as_str()),
        );
        headers.insert(
            ORIGINAL_ROUTING_KEY_HEADER.into(),
            long(delivery.routing_key.as_str()),
        );
    }
    headers.insert(
        DEAD_LETTERED_AT_HEADER.into(),
        long(&humantime::format_rfc3339_millis(SystemTime::now()).to_string()),
    );
    let properties = delivery.properties.clone().with_headers(headers);
    confirm(
        channel,
        exchange,
        delivery.routing_key.as_str(),
        &delivery.data,
        properties,
        "dead-lettering a message",
    )
    .await
}

async fn confirm(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
    what: &str,
) -> Result<()> {
    let routing = ShortString::try_new(routing_key).map_err(|_| {
        Error::config(
            "routing key",
            format!("{routing_key:?} is longer than 255 bytes"),
        )
    })?;
    let exchange_name = ShortString::try_new(exchange)
        .map_err(|_| Error::config("exchange", format!("{exchange:?} is longer than 255 bytes")))?;
    let confirmation = channel
        .basic_publish(
            exchange_name,
            routing,
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            body,
            properties,
        )
        .await
        .map_err(|e| Error::amqp(what.to_owned(), e))?
        .await
        .map_err(|e| Error::amqp(what.to_owned(), e))?;
    match confirmation {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(returned)) => Err(Error::broker(format!(
            "{what}: {exchange} / {routing_key} is unroutable: {}",
            returned.reply_text
        ))),
        Confirmation::Nack(_) | Confirmation::NotRequested => Err(Error::broker(format!(
            "{what}: {exchange} / {routing_key}: the broker refused it (nack)"
        ))),
    }
}

/// A dead-lettered message, as the tools show it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeadLetter {
    /// The job, when the message names one.
    pub job_id: Option<i64>,
    /// `malformed`, `rejected`, `retries-exhausted`, or RabbitMQ's own reason.
    pub kind: Option<String>,
    /// Why.
    pub reason: Option<String>,
    /// Where it was first published.
    pub exchange: String,
    /// With which routing key.
    pub routing_key: String,
    /// When it was dead-lettered.
    pub dead_lettered_at: Option<String>,
    /// The body, as text.
    pub body: String,
}

fn describe(message: &BasicGetMessage) -> DeadLetter {
    let delivery = &message.delivery;
    let headers = delivery.properties.headers().clone().unwrap_or_default();
    let body_job = serde_json::from_slice::<serde_json::Value>(&delivery.data)
        .ok()
        .and_then(|v| v["jobId"].as_i64());
    DeadLetter {
        // The body's job is the one a replay acts on (the header is anyone's to set).
        job_id: body_job.or_else(|| header_i64(&headers, JOB_ID_HEADER)),
        kind: header_str(&headers, KIND_HEADER)
            .or_else(|| header_str(&headers, "x-first-death-reason")),
        reason: header_str(&headers, REASON_HEADER),
        exchange: header_str(&headers, ORIGINAL_EXCHANGE_HEADER)
            .or_else(|| header_str(&headers, "x-first-death-exchange"))
            .unwrap_or_else(|| LISTINGS_EXCHANGE.to_owned()),
        routing_key: header_str(&headers, ORIGINAL_ROUTING_KEY_HEADER)
            .unwrap_or_else(|| delivery.routing_key.to_string()),
        dead_lettered_at: header_str(&headers, DEAD_LETTERED_AT_HEADER),
        body: String::from_utf8_lossy(&delivery.data).into_owned(),
    }
}

async fn open(url: &AmqpUrl, queue: &str, name: &str) -> Result<(lapin::Connection, Channel, u32)> {
    let connection = crate::connect::amqp(url, name).await?;
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| Error::amqp("opening a channel on the DLQ", e))?;
    let name = ShortString::try_new(queue)
        .map_err(|_| Error::config("queue", format!("{queue:?} is longer than 255 bytes")))?;
    let declared = channel
        .queue_declare(
            name,
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| Error::amqp(format!("looking up {queue}"), e))?;
    Ok((connection, channel, declared.message_count()))
}

/// A dead-letter queue, for the operator's tools: look at what is in it, send it back.
#[derive(Debug, Clone)]
pub struct DeadLetterQueue {
    url: AmqpUrl,
    queue: String,
}

impl DeadLetterQueue {
    /// The dead-letter queue `queue` on the broker at `url`.
    pub fn new(url: AmqpUrl, queue: &str) -> Self {
        Self {
            url,
            queue: queue.to_owned(),
        }
    }

    /// Up to `limit` messages, left in the queue.
    pub async fn list(&self, limit: usize) -> Result<Vec<DeadLetter>> {
        list(&self.url, &self.queue, limit).await
    }

    /// Publishes the jobs of the selected dead letters again, then removes the letters.
    ///
    /// A letter is replayed only when its job exists in `outbox` as the letter tells it
    /// (table, record, operation), is not completed, and its table has one of
    /// `event_types`: the message published is the job's own, built from the outbox's row,
    /// to the exchange and routing key its event type gives it (never those the letter's
    /// headers name). `JobSelection::Jobs` selects by the job the letter's body names. Letters
    /// that fail a check stay in the DLQ and are listed in [`ReplayReport::refused`]; asked-for
    /// jobs without a letter in [`ReplayReport::missing`]. Calls `progress` with the messages
    /// looked at so far and the queue's depth at the start.
    pub async fn replay(
        &self,
        outbox: &Outbox,
        event_types: &[EventType],
        selection: &JobSelection,
        progress: impl FnMut(u64, u64),
    ) -> Result<ReplayReport> {
        replay::replay(
            &self.url,
            &self.queue,
            &replay::Replay {
                outbox,
                event_types,
                selection,
            },
            progress,
        )
        .await
    }
}

/// Lists up to `limit` messages of the dead-letter queue `queue` without removing them (they
/// are fetched unacknowledged and handed back when the channel closes).
async fn list(url: &AmqpUrl, queue: &str, limit: usize) -> Result<Vec<DeadLetter>> {
    let (connection, channel, count) = open(url, queue, "benalsam dlq list").await?;
    let mut letters = Vec::new();
    for _ in 0..count.min(u32::try_from(limit).unwrap_or(u32::MAX)) {
        let message = channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await
            .map_err(|e| Error::amqp("reading the DLQ", e))?;
        let Some(message) = message else { break };
        letters.push(describe(&message));
    }
    let _ = connection.close(200, "listed".into()).await;
    Ok(letters)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::replay::checked;
    use super::*;
    use crate::outbox::Operation;
    use crate::outbox::Recorded;
    use crate::publish::Envelope;

    fn letter(table: &str) -> std::result::Result<Envelope<'static>, String> {
        let body = json!({
            "messageId": "job_5", "jobId": 5, "schemaVersion": 1,
            "routingKey": "inventory.insert", "table": table, "operation": "INSERT",
            "recordId": "L1", "changeData": {"title": "forged"},
            "occurredAt": "2026-11-27T12:00:00Z"
        });
        Envelope::parse(body.to_string().as_bytes()).map_err(|e| e.to_string())
    }

    fn recorded(status: &str) -> Recorded {
        Recorded {
            id: 5,
            table: Some("listings".into()),
            operation: Some(Operation::Insert),
            record_id: Some("L1".into()),
            status: Some(status.into()),
            truncated_after: false,
            change_data: Some(json!({"title": "genuine", "status": "active"})),
            created_at: Some(std::time::SystemTime::UNIX_EPOCH),
            traceparent: None,
        }
    }

    #[test]
    fn a_letter_is_replayed_only_as_the_outbox_has_its_job_and_routed_by_the_configuration() {
        let types = [
            EventType::listings(),
            EventType::new("inventory", "inventory_items"),
        ];
        let (job, event_type) =
            checked(&letter("listings"), Some(&recorded("failed")), &types).expect("replayable");
        assert_eq!(job.change_data["title"], "genuine");
        assert_eq!(event_type.route(&job).exchange, "benalsam.listings");
        let refused = |letter, recorded: Option<&Recorded>| {
            checked(&letter, recorded, &types).expect_err("refused")
        };
        assert!(refused(letter("inventory_items"), Some(&recorded("failed"))).contains("table"));
        assert!(refused(letter("listings"), Some(&recorded("completed"))).contains("completed"));
        assert!(refused(letter("listings"), Some(&recorded("pending"))).contains("pending"));
        assert!(refused(letter("listings"), None).contains("no job"));
        assert!(refused(Err("not a valid envelope".into()), None).contains("not a valid"));
        let unconfigured = checked(&letter("listings"), Some(&recorded("failed")), &types[1..]);
        assert!(unconfigured.is_err());
    }
}
