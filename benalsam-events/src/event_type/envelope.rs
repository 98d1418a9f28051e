//! The event envelope: the JSON body of every message (its AMQP properties are the
//! publisher's business).
//!
//! ```json
//! {
//!   "messageId": "job_42", "jobId": 42, "schemaVersion": 1,
//!   "routingKey": "listing.status.active", "table": "listings", "operation": "UPDATE",
//!   "recordId": "6f1c…", "changeData": {"old": {…}, "new": {…}},
//!   "status": "active", "previousStatus": "pending_approval",
//!   "occurredAt": "2026-11-27T12:00:00.123456Z", "traceId": "4bf92f35…"
//! }
//! ```
//!
//! `messageId` is `job_<jobId>` on every publish of a job, so duplicates can be recognised.
//! [`Envelope::decode`] checks a body against the schema it claims before anything uses it.
//!
//! The bundled consumer trusts only the job's identity (`jobId`, `table`, `recordId`,
//! `operation`), checks it against the outbox and builds the document from the outbox's
//! copy of the row: `changeData` and the other fields are informational for it (kept, with
//! the schema version, for other consumers).

use std::borrow::Cow;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::EnvelopeError;
use crate::event_type::Operation;

/// The envelope schema this build writes.
pub(crate) const SCHEMA_VERSION: u32 = 1;
/// Envelope schemas this build can read.
const READABLE_SCHEMA_VERSIONS: std::ops::RangeInclusive<u32> = 1..=1;

pub(crate) const DEFAULT_MAX_MESSAGE_BYTES: usize = Envelope::DEFAULT_MAX_BYTES;

/// Longest record key a message may carry: the search engines refuse document ids over 512
/// bytes, and with them the whole bulk request.
pub(crate) const MAX_RECORD_ID_BYTES: usize = 512;

/// The body of a change message.
///
/// Built from a [`Job`](crate::outbox::Job) by borrowing it ([`Envelope::of`]), so publishing copies no row;
/// [`Envelope::decode`] makes an owned one from a message body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[non_exhaustive]
pub struct Envelope<'a> {
    /// `job_<jobId>`.
    pub message_id: Cow<'a, str>,
    /// The outbox job.
    pub job_id: i64,
    /// The envelope schema version.
    pub schema_version: u32,
    /// The routing key it was published with.
    pub routing_key: Cow<'a, str>,
    /// The table that changed.
    pub table: Cow<'a, str>,
    /// What happened.
    pub operation: Operation,
    /// The row's key, as text.
    pub record_id: Cow<'a, str>,
    /// The row (INSERT), `{old, new}` (UPDATE), the old row (DELETE). Informational: the
    /// bundled consumer builds documents from the outbox's copy.
    pub change_data: Cow<'a, Value>,
    /// The row's status after the change (before it, for a DELETE), for tables with one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Cow<'a, str>>,
    /// The status before an UPDATE that changed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_status: Option<Cow<'a, str>>,
    /// When the change was committed; RFC 3339 UTC on the wire.
    #[serde(with = "rfc3339")]
    pub occurred_at: SystemTime,
    /// The W3C trace id of the writer, when it set one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<Cow<'a, str>>,
}

impl<'a> Envelope<'a> {
    /// Default of the largest message body the bridge publishes and the consumer reads
    /// (`BENALSAM_MAX_MESSAGE_BYTES`). 1 MiB: a fifth of a default bulk request (5 MiB), room for
    /// an UPDATE's old and new row of about 0.5 MiB each (far above the rows of the benchmarks), and
    /// with the default prefetch (500) it bounds the deliveries a consumer holds to 500 MiB.
    pub const DEFAULT_MAX_BYTES: usize = 1024 * 1024;

    /// The JSON body.
    pub fn to_bytes(&self) -> Vec<u8> {
        // Serialising plain data with string keys cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The row as it is after the change (the old row for a DELETE).
    pub fn current_row(&self) -> &Value {
        match self.operation {
            Operation::Update => &self.change_data["new"],
            Operation::Insert | Operation::Delete | Operation::Truncate | Operation::Rebuild => {
                &self.change_data
            }
        }
    }
}

impl Envelope<'static> {
    /// Parses and validates a message body.
    pub fn decode(body: &[u8]) -> crate::error::Result<Self> {
        Self::parse(body).map_err(|e| crate::error::Error::new(crate::error::Kind::Envelope(e)))
    }

    /// [`Envelope::decode`], with the reason typed.
    pub(crate) fn parse(body: &[u8]) -> Result<Self, EnvelopeError> {
        // The version is checked first, so a newer producer's message is reported as such
        // rather than as a shape error.
        // Read twice, without building a tree of the whole body: the version alone (every
        // other field skipped), then the envelope itself.
        let only: VersionOnly =
            serde_json::from_slice(body).map_err(|e| EnvelopeError::Malformed(e.to_string()))?;
        let version = only
            .schema_version
            .as_ref()
            .and_then(Value::as_u64)
            .ok_or_else(|| EnvelopeError::Malformed("missing schemaVersion".to_owned()))?;
        let version = u32::try_from(version).unwrap_or(u32::MAX);
        if !READABLE_SCHEMA_VERSIONS.contains(&version) {
            return Err(EnvelopeError::UnsupportedVersion {
                found: version,
                min: *READABLE_SCHEMA_VERSIONS.start(),
                max: *READABLE_SCHEMA_VERSIONS.end(),
            });
        }
        let envelope: Envelope<'static> =
            serde_json::from_slice(body).map_err(|e| EnvelopeError::Malformed(e.to_string()))?;
        envelope.validate()?;
        Ok(envelope)
    }

    fn validate(&self) -> Result<(), EnvelopeError> {
        let invalid = |m: String| Err(EnvelopeError::Invalid(m));
        if self.job_id <= 0 {
            return invalid(format!("jobId {} is not positive", self.job_id));
        }
        if self.message_id != format!("job_{}", self.job_id) {
            return invalid(format!(
                "messageId {:?} does not match jobId {}",
                self.message_id, self.job_id
            ));
        }
        if self.record_id.is_empty() || self.table.is_empty() {
            return invalid("table and recordId must not be empty".to_owned());
        }
        if let Some(why) = record_id_problem(&self.record_id) {
            return invalid(why);
        }
        let row_ok = match self.operation {
            Operation::Insert | Operation::Delete | Operation::Truncate | Operation::Rebuild => {
                self.change_data.is_object()
            }
            Operation::Update => {
                self.change_data["old"].is_object() && self.change_data["new"].is_object()
            }
        };
        if !row_ok {
            return invalid(format!(
                "changeData of an {} must be {}",
                self.operation,
                if self.operation == Operation::Update {
                    "{\"old\": {…}, \"new\": {…}}"
                } else {
                    "the row as an object"
                }
            ));
        }
        Ok(())
    }
}

/// An envelope's version, read before its shape (a newer producer's message is then reported
/// as newer, not as malformed).
#[derive(Deserialize)]
struct VersionOnly {
    #[serde(rename = "schemaVersion", default)]
    schema_version: Option<Value>,
}

/// Why `record_id` cannot be carried to the index, if it cannot (see [`MAX_RECORD_ID_BYTES`]).
pub(crate) fn record_id_problem(record_id: &str) -> Option<String> {
    (record_id.len() > MAX_RECORD_ID_BYTES).then(|| {
        format!(
            "the record key is {} bytes; a search document id has at most {MAX_RECORD_ID_BYTES} (the engine's limit)",
            record_id.len()
        )
    })
}

/// RFC 3339 with microseconds on the wire. Times outside 1970..=9999 (which the formatter
/// refuses with a panic) are clamped to those bounds: a job table edited by hand must not
/// crash the bridge.
mod rfc3339 {
    use std::time::{Duration, SystemTime};

    use serde::{Deserialize, Deserializer, Serializer};

    /// 9999-12-31T23:59:59Z.
    const LAST: Duration = Duration::from_secs(253_402_300_799);

    pub(super) fn format(t: SystemTime) -> String {
        let since = t
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .min(LAST);
        humantime::format_rfc3339_micros(SystemTime::UNIX_EPOCH + since).to_string()
    }

    pub(super) fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(*t))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let text = std::borrow::Cow::<'de, str>::deserialize(d)?;
        humantime::parse_rfc3339(&text)
            .map_err(|_| serde::de::Error::custom(format!("occurredAt {text:?} is not RFC 3339")))
    }
}

/// The trace id (second field) of a W3C `traceparent`.
pub(crate) fn trace_id_of(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.split('-');
    let (_version, trace_id) = (parts.next()?, parts.next()?);
    (trace_id.len() == 32 && trace_id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(trace_id)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use std::time::Duration;

    use lapin::types::AMQPValue;

    use super::*;
    use crate::event_type::EventType;
    use crate::outbox::{ClaimKind, Job};
    use crate::publish::{JOB_ID_HEADER, TRACEPARENT_HEADER};

    fn job() -> Job {
        Job {
            id: 42,
            table_name: "listings".into(),
            operation: Operation::Update,
            record_id: "6f1c".into(),
            change_data: json!({"old": {"status": "pending_approval"}, "new": {"status": "active"}}),
            retry_count: 0,
            created_at: SystemTime::UNIX_EPOCH + Duration::from_micros(1_764_244_800_123_456),
            traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
            claim: ClaimKind::Fresh,
        }
    }

    fn envelope() -> Envelope<'static> {
        let job = job();
        Envelope::parse(&Envelope::of(&job, &EventType::listings()).to_bytes()).expect("round trip")
    }

    #[test]
    fn an_envelope_carries_the_job() {
        let e = envelope();
        let body: Value = serde_json::from_slice(&e.to_bytes()).expect("json");
        assert_eq!(body["messageId"], "job_42");
        assert_eq!(body["jobId"], 42);
        assert_eq!(body["schemaVersion"], 1);
        assert_eq!(body["routingKey"], "listing.status.active");
        assert_eq!(body["operation"], "UPDATE");
        assert_eq!(body["status"], "active");
        assert_eq!(body["previousStatus"], "pending_approval");
        assert_eq!(body["occurredAt"], "2025-11-27T12:00:00.123456Z");
        assert_eq!(body["traceId"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(Envelope::parse(&e.to_bytes()), Ok(e));
    }

    #[test]
    fn properties_make_a_persistent_json_message() {
        let e = envelope();
        let p = e.properties(
            "benalsam-bridge",
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        assert_eq!(p.message_id().as_ref().map(|s| s.as_str()), Some("job_42"));
        assert_eq!(p.delivery_mode(), &Some(2));
        assert_eq!(
            p.content_type().as_ref().map(|s| s.as_str()),
            Some("application/json")
        );
        assert_eq!(
            p.kind().as_ref().map(|s| s.as_str()),
            Some("listing.status.active")
        );
        assert_eq!(p.timestamp(), &Some(1_764_244_800));
        let headers = p.headers().as_ref().expect("headers");
        assert_eq!(
            headers.inner().get(JOB_ID_HEADER),
            Some(&AMQPValue::LongLongInt(42))
        );
        assert!(headers.inner().contains_key(TRACEPARENT_HEADER));
    }

    #[test]
    fn times_out_of_range_do_not_panic() {
        assert_eq!(
            rfc3339::format(SystemTime::UNIX_EPOCH - Duration::from_secs(5)),
            "1970-01-01T00:00:00.000000Z"
        );
        assert!(
            rfc3339::format(SystemTime::UNIX_EPOCH + Duration::from_secs(400_000_000_000))
                .starts_with("9999-12-31")
        );
    }

    #[test]
    fn decode_says_what_is_wrong() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"not json".to_vec(), "not a valid envelope"),
            (br#"{"jobId": 1}"#.to_vec(), "missing schemaVersion"),
            (
                br#"{"schemaVersion": 9}"#.to_vec(),
                "version 9 is not supported",
            ),
            (
                br#"{"schemaVersion": 1, "jobId": 1}"#.to_vec(),
                "missing field",
            ),
        ];
        for (body, expected) in cases {
            let err = Envelope::parse(&body).expect_err("invalid");
            assert!(err.to_string().contains(expected), "{err} vs {expected}");
        }
        let mut wrong_id = envelope();
        wrong_id.message_id = "job_41".into();
        let mut bad_time = serde_json::to_value(envelope()).expect("json");
        bad_time["occurredAt"] = json!("yesterday");
        let err = Envelope::parse(bad_time.to_string().as_bytes()).expect_err("time");
        assert!(err.to_string().contains("not RFC 3339"), "{err}");
        let err = Envelope::parse(&wrong_id.to_bytes()).expect_err("mismatch");
        assert!(err.to_string().contains("does not match jobId 42"), "{err}");

        let mut not_a_row = envelope();
        not_a_row.change_data = Cow::Owned(json!("x"));
        assert!(matches!(
            Envelope::parse(&not_a_row.to_bytes()),
            Err(EnvelopeError::Invalid(_))
        ));
    }

    proptest! {
        #[test]
        fn decode_never_panics(body in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Envelope::parse(&body);
        }

        #[test]
        fn envelopes_round_trip(id in 1i64..i64::MAX, record in "[a-z0-9-]{1,40}", title in ".{0,40}") {
            let mut j = job();
            j.id = id;
            j.record_id = record;
            j.change_data = json!({"old": {"status": "active", "title": "x"}, "new": {"status": "active", "title": title}});
            let e = Envelope::of(&j, &EventType::listings());
            let decoded = Envelope::parse(&e.to_bytes());
            prop_assert_eq!(decoded, Ok(e));
        }
    }
}
