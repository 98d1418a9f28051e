//! The library's error: opaque, with predicates for the questions callers ask of it (may I
//! retry? is it my configuration?) and a `Display` that tells an operator what to do.

use std::fmt;

mod certificates;
mod postgres;

use certificates::Tls;
use postgres::PgDetail;
pub(crate) use postgres::pg_detail;

/// Everything that can go wrong in the library.
///
/// Ask it what kind it is with the `is_*` predicates; its `Display` names what the library
/// was doing, what failed, and (where there is one) what to do about it. The source chain
/// (`std::error::Error::source`) reaches the driver's own error.
pub struct Error(Box<Kind>);

/// The kinds behind [`Error`]; private so new kinds are not breaking changes.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Kind {
    #[error("invalid setting {setting}: {reason}")]
    Config { setting: String, reason: String },

    #[error("PostgreSQL: {context}: {}", PgDetail(.source))]
    Postgres {
        context: String,
        #[source]
        source: tokio_postgres::Error,
    },

    #[error("RabbitMQ: {reason}")]
    Broker { reason: String },

    #[error("RabbitMQ: {context}: {source}")]
    Amqp {
        context: String,
        #[source]
        source: lapin::Error,
    },

    #[error(
        "RabbitMQ already has {entity} with other settings{}: {detail}; \
         align the settings (e.g. BENALSAM_QUEUE_TYPE) or delete and re-create it",
        argument.as_deref().map(|a| format!(" (argument {a})")).unwrap_or_default()
    )]
    TopologyConflict {
        entity: String,
        argument: Option<String>,
        detail: String,
    },

    #[error(
        "RabbitMQ already has queue {queue} as a {existing} queue, but BENALSAM_QUEUE_TYPE asks \
         for {wanted} queues, and a queue's type cannot change. Either run with \
         BENALSAM_QUEUE_TYPE={existing}, or migrate the queues to {wanted} as docs/topology.md's \
         \"Changing the queue type\" describes (stop the bridges, let the consumers drain the \
         queues, delete them, start with BENALSAM_QUEUE_TYPE={wanted}; the outbox sends again \
         whatever was lost)"
    )]
    QueueTypeMismatch {
        queue: String,
        existing: crate::queue_type::QueueType,
        wanted: crate::queue_type::QueueType,
    },

    #[error("Elasticsearch: {context}: {reason}")]
    Search { context: String, reason: String },

    #[error("Elasticsearch: {context}: status {status}: {body}")]
    SearchResponse {
        context: String,
        status: u16,
        body: String,
    },

    #[error(
        "index {index} maps field {field} as {found}, but this build needs {expected}; \
         create a new index version with the right mapping (or point the event type's index elsewhere)"
    )]
    MappingConflict {
        index: String,
        field: String,
        expected: String,
        found: String,
    },

    #[error("{what} has stopped")]
    Stopped { what: String },

    #[error("reindex of {event_type}: {reason}")]
    Reindex { event_type: String, reason: String },

    #[error("job {id} in the queue table cannot be read: {reason}")]
    InvalidJob { id: i64, reason: String },

    #[error("WAL capture through slot {slot}: {reason}")]
    Capture { slot: String, reason: String },

    #[error(
        "migration {version} ({name}) differs from the one applied to this database; \
         migrations are immutable once applied: add a new one instead of editing it"
    )]
    MigrationChanged { version: i32, name: &'static str },

    #[error(
        "database schema {schema} has migration {version}, which this build does not know; upgrade benalsam-events"
    )]
    UnknownMigration { schema: String, version: i32 },

    #[error("{0}")]
    Envelope(EnvelopeError),

    #[error("{service}: {context}: {problem}; check {check}")]
    Tls {
        service: &'static str,
        setting: &'static str,
        context: String,
        problem: String,
        check: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl Error {
    pub(crate) fn new(kind: Kind) -> Self {
        Self(Box::new(kind))
    }

    /// A setting with a value that cannot work; `setting` names it as a user writes it (an
    /// environment variable, a flag or a configuration key).
    pub fn config(setting: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::new(Kind::Config {
            setting: setting.into(),
            reason: reason.into(),
        })
    }

    /// A part of a pipeline (`what`) stopped and takes no more work.
    pub fn stopped(what: impl Into<String>) -> Self {
        Self::new(Kind::Stopped { what: what.into() })
    }

    pub(crate) fn amqp(context: impl Into<String>, source: lapin::Error) -> Self {
        Self::new(Kind::Amqp {
            context: context.into(),
            source,
        })
    }

    pub(crate) fn broker(reason: impl Into<String>) -> Self {
        Self::new(Kind::Broker {
            reason: reason.into(),
        })
    }

    /// A failed PostgreSQL connection attempt: a refused certificate (see [`Kind::Tls`]) or
    /// a PostgreSQL error.
    pub(crate) fn postgres_connect(
        context: impl Into<String>,
        source: tokio_postgres::Error,
    ) -> Self {
        match Tls::POSTGRES.refusal(&source) {
            Some(tls) => tls.error(context.into(), Box::new(source)),
            None => Self::postgres(context, source),
        }
    }

    /// A failed RabbitMQ connection attempt: a refused certificate or a broker error.
    pub(crate) fn amqp_connect(context: impl Into<String>, source: lapin::Error) -> Self {
        match Tls::RABBITMQ.refusal(&source) {
            Some(tls) => tls.error(context.into(), Box::new(source)),
            None => Self::amqp(context, source),
        }
    }

    /// A request to the search node that got no answer: a refused certificate or an
    /// unreachable node.
    #[cfg(feature = "consumer")]
    pub(crate) fn search_request(context: impl Into<String>, source: elasticsearch::Error) -> Self {
        match Tls::SEARCH.refusal(&source) {
            Some(tls) => tls.error(context.into(), Box::new(source)),
            None => Self::search(context, source.to_string()),
        }
    }

    pub(crate) fn postgres(context: impl Into<String>, source: tokio_postgres::Error) -> Self {
        Self::new(Kind::Postgres {
            context: context.into(),
            source,
        })
    }

    pub(crate) fn search(context: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::new(Kind::Search {
            context: context.into(),
            reason: reason.into(),
        })
    }

    pub(crate) fn search_response(
        context: impl Into<String>,
        status: u16,
        body: impl Into<String>,
    ) -> Self {
        Self::new(Kind::SearchResponse {
            context: context.into(),
            status,
            body: body.into(),
        })
    }

    pub(crate) fn invalid_job(id: i64, reason: impl Into<String>) -> Self {
        Self::new(Kind::InvalidJob {
            id,
            reason: reason.into(),
        })
    }

    pub(crate) fn capture(slot: &str, reason: impl Into<String>) -> Self {
        Self::new(Kind::Capture {
            slot: slot.to_owned(),
            reason: reason.into(),
        })
    }

    pub(crate) fn kind(&self) -> &Kind {
        &self.0
    }

    /// Whether trying the same operation again later may succeed: a lost connection or an
    /// unavailable service does; a bad setting, a TLS certificate refused (by either side), a
    /// conflicting topology or mapping, a changed migration never does.
    pub fn is_retryable(&self) -> bool {
        match self.kind() {
            Kind::Postgres { source, .. } => source.is_closed() || source.as_db_error().is_none(),
            Kind::Amqp { source, .. } => !matches!(
                source.kind(),
                lapin::ErrorKind::ProtocolError(_) | lapin::ErrorKind::AuthProviderError(_)
            ),
            Kind::Search { .. } | Kind::Broker { .. } => true,
            Kind::SearchResponse { status, .. } => *status == 429 || *status >= 500,
            _ => false,
        }
    }

    /// Whether a setting (or a configuration file) is wrong, or the TLS settings do not fit
    /// the server: its certificate does not verify against the CA they name, or it refused
    /// the client certificate.
    pub fn is_config(&self) -> bool {
        matches!(self.kind(), Kind::Config { .. } | Kind::Tls { .. })
    }

    /// The setting a configuration error is about.
    pub fn setting(&self) -> Option<&str> {
        match self.kind() {
            Kind::Config { setting, .. } => Some(setting),
            Kind::Tls { setting, .. } => Some(setting),
            _ => None,
        }
    }

    /// Whether the broker or the search engine already has something (an exchange, a queue,
    /// a field) defined differently from what this build needs.
    pub fn is_conflict(&self) -> bool {
        matches!(
            self.kind(),
            Kind::TopologyConflict { .. }
                | Kind::QueueTypeMismatch { .. }
                | Kind::MappingConflict { .. }
        )
    }

    /// Whether the database's migrations do not match this build's.
    pub fn is_migration(&self) -> bool {
        matches!(
            self.kind(),
            Kind::MigrationChanged { .. } | Kind::UnknownMigration { .. }
        )
    }

    /// Whether a message is no envelope this build can read (not JSON, not its shape, an
    /// unsupported schema version, or fields that contradict each other).
    pub fn is_malformed(&self) -> bool {
        matches!(self.kind(), Kind::Envelope(_))
    }

    /// Whether a reindex was refused or cannot go on (another one of the same type is
    /// running, the index is not behind an alias, jobs of the reindex failed); the message
    /// says what to do.
    pub fn is_reindex_refused(&self) -> bool {
        matches!(self.kind(), Kind::Reindex { .. })
    }

    pub(crate) fn reindex(event_type: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::new(Kind::Reindex {
            event_type: event_type.into(),
            reason: reason.into(),
        })
    }

    /// Whether a part of the pipeline has stopped.
    pub fn is_stopped(&self) -> bool {
        matches!(self.kind(), Kind::Stopped { .. })
    }

    /// The existing and the wanted type of a queue that is of the other type than
    /// `BENALSAM_QUEUE_TYPE` asks for.
    pub fn queue_types(
        &self,
    ) -> Option<(crate::queue_type::QueueType, crate::queue_type::QueueType)> {
        match self.kind() {
            Kind::QueueTypeMismatch {
                existing, wanted, ..
            } => Some((*existing, *wanted)),
            _ => None,
        }
    }

    /// The argument a topology conflict names, when the broker said which one differs.
    pub fn conflicting_argument(&self) -> Option<&str> {
        match self.kind() {
            Kind::TopologyConflict { argument, .. } => argument.as_deref(),
            Kind::QueueTypeMismatch { .. } => Some("x-queue-type"),
            Kind::MappingConflict { field, .. } => Some(field),
            _ => None,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&*self.0)
    }
}

impl From<Kind> for Error {
    fn from(kind: Kind) -> Self {
        Self::new(kind)
    }
}

/// Shorthand for results of this library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a message body is not a usable envelope.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum EnvelopeError {
    /// Not JSON, or not the envelope's shape.
    #[error("not a valid envelope: {0}")]
    Malformed(String),
    /// A schema version this build cannot read.
    #[error("envelope schema version {found} is not supported (this build reads {min}..={max})")]
    UnsupportedVersion {
        /// The version in the message.
        found: u32,
        /// Oldest readable.
        min: u32,
        /// Newest readable.
        max: u32,
    },
    /// Well-formed, but its fields contradict each other.
    #[error("invalid envelope: {0}")]
    Invalid(String),
    /// Larger than the consumer reads: not parsed at all.
    #[error(
        "the message is {bytes} bytes, over the {limit}-byte limit (BENALSAM_MAX_MESSAGE_BYTES); it was not read"
    )]
    TooLarge {
        /// Its size.
        bytes: usize,
        /// The limit.
        limit: usize,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn predicates_follow_the_kind() {
        let config = Error::config("BENALSAM_LEASE", "must be positive");
        assert!(config.is_config() && !config.is_retryable());
        assert_eq!(config.setting(), Some("BENALSAM_LEASE"));
        assert_eq!(
            config.to_string(),
            "invalid setting BENALSAM_LEASE: must be positive"
        );
        let busy = Error::search_response("bulk", 429, "{}");
        assert!(busy.is_retryable() && !busy.is_config());
        assert!(!Error::search_response("bulk", 400, "{}").is_retryable());
        assert!(Error::stopped("the publisher").is_stopped());
    }
}
