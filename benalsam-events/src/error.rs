//! The library's error type.

use std::fmt;

/// Everything that can go wrong in the library.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A setting has a value the library cannot use. `setting` names it as a user writes it
    /// (an environment variable or a flag).
    #[error("invalid setting {setting}: {reason}")]
    Config {
        /// The setting, e.g. `DATABASE_URL`.
        setting: &'static str,
        /// What is wrong with its value.
        reason: String,
    },

    /// A PostgreSQL call failed.
    #[error("PostgreSQL: {context}: {}", PgDetail(.source))]
    Postgres {
        /// What the library was doing.
        context: String,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },

    /// A RabbitMQ call failed.
    #[error("RabbitMQ: {context}: {source}")]
    Amqp {
        /// What the library was doing.
        context: String,
        /// The client's error.
        #[source]
        source: lapin::Error,
    },

    /// The broker has an exchange, queue or binding with other settings than this build
    /// declares (RabbitMQ's 406 PRECONDITION_FAILED).
    #[error(
        "RabbitMQ already has {entity} with other settings{}: {detail}; \
         align the settings (e.g. BENALSAM_QUEUE_TYPE) or delete and re-create it",
        argument.as_deref().map(|a| format!(" (argument {a})")).unwrap_or_default()
    )]
    TopologyConflict {
        /// The exchange, queue or binding.
        entity: String,
        /// The argument that differs, when the broker named it.
        argument: Option<String>,
        /// The broker's reply.
        detail: String,
    },

    /// A request to Elasticsearch failed (no answer, or an unreadable one).
    #[error("Elasticsearch: {context}: {reason}")]
    Search {
        /// What the library was doing.
        context: String,
        /// What went wrong.
        reason: String,
    },

    /// Elasticsearch answered with an error.
    #[error("Elasticsearch: {context}: status {status}: {body}")]
    SearchResponse {
        /// What the library was doing.
        context: String,
        /// HTTP status.
        status: u16,
        /// The answer.
        body: String,
    },

    /// The existing index maps a field with another type than this build needs.
    #[error(
        "index {index} maps field {field} as {found}, but this build needs {expected}; \
         create a new index version with the right mapping (or point BENALSAM_INDEX elsewhere)"
    )]
    MappingConflict {
        /// The concrete index.
        index: String,
        /// The field.
        field: String,
        /// The type we need.
        expected: String,
        /// The type it has.
        found: String,
    },

    /// The broker could not route a message (no queue bound) or refused it.
    #[error("RabbitMQ did not take the message for {exchange} / {routing_key}: {reply}")]
    Unroutable {
        /// The exchange.
        exchange: String,
        /// The routing key.
        routing_key: String,
        /// The broker's reply.
        reply: String,
    },

    /// A background part (the publisher, a consumer) has stopped and takes no more work.
    #[error("{what} has stopped")]
    Stopped {
        /// Which part.
        what: &'static str,
    },

    /// A queue row this build cannot read (the table was altered by hand).
    #[error("job {id} in the queue table cannot be read: {reason}")]
    InvalidJob {
        /// The job's id.
        id: i64,
        /// What is wrong with it.
        reason: String,
    },

    /// A migration that was applied earlier no longer has the same SQL.
    #[error(
        "migration {version} ({name}) differs from the one applied to this database; \
         migrations are immutable once applied: add a new one instead of editing it"
    )]
    MigrationChanged {
        /// Version number of the migration.
        version: i32,
        /// File name of the migration.
        name: &'static str,
    },

    /// The database has migrations this build does not know: it was migrated by a newer build.
    #[error(
        "database schema {schema} has migration {version}, which this build does not know; upgrade benalsam-events"
    )]
    UnknownMigration {
        /// The schema that was migrated.
        schema: String,
        /// The unknown version.
        version: i32,
    },
}

impl Error {
    /// Wraps a RabbitMQ error with what the library was doing.
    pub(crate) fn amqp(context: impl Into<String>, source: lapin::Error) -> Self {
        Error::Amqp {
            context: context.into(),
            source,
        }
    }

    /// Wraps a PostgreSQL error with what the library was doing.
    pub(crate) fn postgres(context: impl Into<String>, source: tokio_postgres::Error) -> Self {
        Error::Postgres {
            context: context.into(),
            source,
        }
    }

    /// Whether trying the same operation again later may succeed: a lost connection does, a
    /// bad setting or a changed migration never does.
    pub fn can_be_retried(&self) -> bool {
        match self {
            Error::Postgres { source, .. } => source.is_closed() || source.as_db_error().is_none(),
            Error::Amqp { source, .. } => !matches!(
                source.kind(),
                lapin::ErrorKind::ProtocolError(_) | lapin::ErrorKind::AuthProviderError(_)
            ),
            Error::Search { .. } => true,
            Error::SearchResponse { status, .. } => *status == 429 || *status >= 500,
            Error::Config { .. }
            | Error::Stopped { .. }
            | Error::MappingConflict { .. }
            | Error::Unroutable { .. }
            | Error::TopologyConflict { .. }
            | Error::InvalidJob { .. }
            | Error::MigrationChanged { .. }
            | Error::UnknownMigration { .. } => false,
        }
    }
}

/// Shorthand for results of this library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Renders a tokio-postgres error with the server's message, code and detail: its own
/// `Display` is only "db error".
struct PgDetail<'a>(&'a tokio_postgres::Error);

impl fmt::Display for PgDetail<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(db) = self.0.as_db_error() {
            write!(f, "{} (SQLSTATE {})", db.message(), db.code().code())?;
            if let Some(detail) = db.detail() {
                write!(f, "; {detail}")?;
            }
            // A missing table or function almost always means a schema that was never
            // migrated (or the wrong BENALSAM_SCHEMA): say what to do about it.
            if matches!(db.code().code(), "42P01" | "42883") {
                write!(
                    f,
                    "; is the schema migrated? run `benalsam-bridge migrate` (or start with \
                     --migrate), and check BENALSAM_SCHEMA"
                )?;
            }
            return Ok(());
        }
        write!(f, "{}", self.0)?;
        let mut source = std::error::Error::source(self.0);
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}
