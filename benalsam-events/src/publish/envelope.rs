//! A job's message: its envelope ([`Envelope`], the model's) routed as its event type says,
//! and the AMQP properties it is published with.

use std::borrow::Cow;
use std::time::{Duration, SystemTime};

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

use crate::event_type::EventType;
use crate::event_type::{Envelope, SCHEMA_VERSION, trace_id_of};
use crate::outbox::Job;
use crate::publish::Route;

/// Header carrying the W3C trace context.
pub(crate) const TRACEPARENT_HEADER: &str = "traceparent";
/// Header carrying the job id, so tools can find the job without parsing the body.
pub(crate) const JOB_ID_HEADER: &str = "x-job-id";
/// Header carrying the envelope schema version.
const SCHEMA_VERSION_HEADER: &str = "x-schema-version";

impl<'a> Envelope<'a> {
    /// The envelope of `job` as `event_type` routes it, borrowing the job's row.
    pub fn of(job: &'a Job, event_type: &EventType) -> Self {
        Self::routed(job, event_type.route(job))
    }

    /// The envelope of `job` routed by `route`.
    pub(crate) fn routed(job: &'a Job, route: Route) -> Self {
        Self {
            message_id: Cow::Owned(job.message_id()),
            job_id: job.id,
            schema_version: SCHEMA_VERSION,
            routing_key: Cow::Owned(route.routing_key),
            table: Cow::Borrowed(&job.table_name),
            operation: job.operation,
            record_id: Cow::Borrowed(&job.record_id),
            change_data: Cow::Borrowed(&job.change_data),
            status: route.status.map(Cow::Owned),
            previous_status: route.previous_status.map(Cow::Owned),
            occurred_at: job.created_at,
            trace_id: job
                .traceparent
                .as_deref()
                .and_then(trace_id_of)
                .map(Cow::Borrowed),
        }
    }

    /// The AMQP properties of this envelope's message: persistent, JSON, with the job id and
    /// (when known) the trace context in headers.
    pub fn properties(&self, app_id: &str, traceparent: Option<&str>) -> BasicProperties {
        let mut headers = FieldTable::default();
        headers.insert(JOB_ID_HEADER.into(), AMQPValue::LongLongInt(self.job_id));
        headers.insert(
            SCHEMA_VERSION_HEADER.into(),
            AMQPValue::LongUInt(self.schema_version),
        );
        if let Some(parent) = traceparent {
            headers.insert(
                TRACEPARENT_HEADER.into(),
                AMQPValue::LongString(LongString::from(parent)),
            );
        }
        let timestamp = self
            .occurred_at
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_secs();
        // Both are checked to fit a short string before publishing (routing keys by the
        // publisher, app ids by their settings); an overlong one is left out, not a panic.
        let mut properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_timestamp(timestamp)
            .with_headers(headers);
        if let Ok(id) = ShortString::try_new(self.message_id.as_ref()) {
            properties = properties.with_message_id(id);
        }
        if let Ok(kind) = ShortString::try_new(self.routing_key.as_ref()) {
            properties = properties.with_type(kind);
        }
        if let Ok(app) = ShortString::try_new(app_id) {
            properties = properties.with_app_id(app);
        }
        properties
    }
}
