//! Admission: a delivery becomes a message of the batch being filled, with its span and
//! its share of the request's bytes; its rows are dropped (the document is built later, from
//! the outbox's copy).

use lapin::message::Delivery;
use tokio::time::Instant;

use crate::consume::message::{Body, Message};
use crate::consume::record::IndexerEvent;
use crate::consume::shared::Shared;
use crate::consume::source::Incoming;
use crate::event_type::EventType;
use crate::ops::telemetry;
use crate::outbox::Operation;
use crate::publish::{Envelope, TRACEPARENT_HEADER};

/// Decodes one delivery into a message, counting it.
pub(super) fn admit(shared: &Shared, incoming: Incoming) -> Message {
    let Incoming {
        delivery,
        route,
        envelope,
    } = incoming;
    let event_type = shared
        .label_of(envelope.as_ref().ok().map(|e| e.table.as_ref()))
        .clone();
    shared.record(IndexerEvent::Received(&event_type));
    let (body, span, bytes) = match envelope {
        Err(error) => (Body::Malformed(error), tracing::Span::none(), 128),
        Ok(mut envelope) => {
            let span = consumer_span(&route.queue, &envelope, &delivery);
            // The message's rows are never used (the wire is not trusted: the document
            // is built from the outbox's copy once the job is verified), and holding
            // them parsed until the ack would double the memory of every message in
            // hand; a dead letter keeps the delivery's bytes.
            envelope.change_data = std::borrow::Cow::Owned(serde_json::Value::Null);
            let joined = shared
                .event_types
                .get(envelope.table.as_ref())
                .is_some_and(EventType::is_joined);
            let bytes = match envelope.operation {
                Operation::Truncate | Operation::Delete => 128,
                // Unknown until read: about a row with a few related ones.
                _ if joined => 4096,
                // A genuine message carries the outbox's row (an UPDATE two of them), so
                // its size bounds the document's and the batch's byte limit holds without
                // serialising each document an extra time.
                _ => delivery.data.len() + 128,
            };
            let body = Body::Verifying {
                envelope: Box::new(envelope),
            };
            (body, span, bytes)
        }
    };
    Message {
        delivery,
        route,
        body,
        event_type,
        bytes,
        attempts: 0,
        not_before: Instant::now(),
        span,
    }
}

/// The consumer span of one message, continuing the trace its `traceparent` header names.
fn consumer_span(queue: &str, envelope: &Envelope<'_>, delivery: &Delivery) -> tracing::Span {
    let span = tracing::info_span!(
        "process",
        otel.kind = "consumer",
        otel.name = %format!("{queue} process"),
        messaging.system = "rabbitmq",
        messaging.destination.name = %queue,
        messaging.message.id = %envelope.message_id,
        job.id = envelope.job_id,
    );
    if let Some(parent) = header_text(delivery, TRACEPARENT_HEADER) {
        telemetry::set_parent(&span, &parent);
    }
    span
}

/// A text header of a delivery.
fn header_text(delivery: &Delivery, name: &str) -> Option<String> {
    match delivery.properties.headers().as_ref()?.inner().get(name)? {
        lapin::types::AMQPValue::LongString(s) => {
            Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
        }
        lapin::types::AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}
