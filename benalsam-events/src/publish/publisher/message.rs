//! How a claimed job becomes a message: its route, its trace context, its size checked.

use lapin::BasicProperties;
use lapin::types::ShortString;

use crate::event_type::{record_id_problem, trace_id_of};
use crate::ops::telemetry;
use crate::outbox::{Job, Settle};
use crate::publish::Envelope;
use crate::publish::confirm::Refusal;
use crate::publish::publisher::Worker;

/// A message ready to go.
pub(super) struct Message {
    pub(super) exchange: ShortString,
    pub(super) routing_key: ShortString,
    pub(super) body: Vec<u8>,
    pub(super) properties: BasicProperties,
    /// The producer span of this publish; it ends with the confirm.
    _span: tracing::Span,
}

impl<S: Settle> Worker<S> {
    /// The message of `job`, or why it cannot be one.
    pub(super) fn message(&self, job: &Job) -> Result<Message, (Refusal, String, bool)> {
        let Some(event_type) = self.routes.for_table(&job.table_name) else {
            return Err((
                Refusal::UnroutedTable,
                format!(
                    "no event type is configured for table {:?}; add one to the bridge's routes",
                    job.table_name
                ),
                false,
            ));
        };
        // A key the index cannot take would be refused by every consumer and resent for
        // ever: the job fails here, once, with the reason.
        if let Some(why) = record_id_problem(&job.record_id) {
            return Err((
                Refusal::Refused,
                format!("{why}; use a shorter key column for this table"),
                false,
            ));
        }
        let route = event_type.route(job);
        let (Ok(exchange), Ok(routing_key)) = (
            ShortString::try_new(route.exchange.as_str()),
            ShortString::try_new(route.routing_key.as_str()),
        ) else {
            return Err((
                Refusal::UnroutedTable,
                format!(
                    "routing key {:?} is longer than 255 bytes",
                    route.routing_key
                ),
                false,
            ));
        };
        // The producer span of this job's trace: its parent is the writer's trace context,
        // and its own context travels in the message to the consumer.
        let span = tracing::info_span!(
            "publish",
            otel.kind = "producer",
            otel.name = %format!("{} publish", route.exchange),
            messaging.system = "rabbitmq",
            messaging.destination.name = %route.exchange,
            messaging.rabbitmq.destination.routing_key = %route.routing_key,
            messaging.message.id = %job.message_id(),
            job.id = job.id,
        );
        if let Some(parent) = job.traceparent.as_deref() {
            telemetry::set_parent(&span, parent);
        }
        let traceparent = telemetry::traceparent_of(&span).or_else(|| job.traceparent.clone());
        let mut envelope = Envelope::routed(job, route);
        if let Some(trace_id) = traceparent.as_deref().and_then(trace_id_of) {
            envelope.trace_id = Some(trace_id.to_owned().into());
        }
        let body = envelope.to_bytes();
        // The broker closes the whole channel on an oversized message, failing every other
        // message in flight with it; refuse it here, alone, with a reason.
        let limit = self.config.max_message_bytes;
        if body.len() > limit {
            return Err((
                Refusal::Refused,
                format!(
                    "the message is {} bytes, over the {limit}-byte limit (BENALSAM_MAX_MESSAGE_BYTES); ignore the table's large columns or raise the limit (and the broker's max_message_size with it)",
                    body.len()
                ),
                false,
            ));
        }
        let properties = envelope.properties(&self.config.app_id, traceparent.as_deref());
        Ok(Message {
            exchange,
            routing_key,
            body,
            properties,
            _span: span,
        })
    }
}
