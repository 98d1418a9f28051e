//! The settings of an [`Outbox`](super::Outbox).

use std::time::Duration;

use crate::backoff::Backoff;
use crate::config::{validate_identifier, validate_schema};
use crate::{error::Error, error::Result};

/// Settings of an [`Outbox`](super::Outbox).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct OutboxConfig {
    /// Schema holding `elasticsearch_sync_queue` (`BENALSAM_SCHEMA`).
    pub schema: String,
    /// How long a claim is exclusive. A bridge that dies holding jobs loses them to others
    /// after this long; one that is alive finishes a batch in well under a second.
    pub lease: Duration,
    /// Attempts per job in all, the first included: a job that has failed this many times
    /// stays `failed` with its last error (`BENALSAM_MAX_ATTEMPTS`).
    pub max_attempts: u32,
    /// The delay before retry `n` is drawn from this backoff (computed by PostgreSQL, so
    /// every bridge agrees on it).
    pub retry_backoff: Backoff,
    /// Written to `locked_by` on claim; reports that need the lease must come from the same
    /// id. Unique per process by default.
    pub worker_id: String,
    /// The NOTIFY channel that wakes bridges after operator commands (the trigger's
    /// `channel=` option).
    pub notify_channel: String,
    /// The tables whose jobs this outbox claims (a bridge claims only the tables it routes;
    /// the jobs of others wait as `pending` for a bridge that routes them). `None`: every
    /// table.
    pub tables: Option<Vec<String>>,
    /// Record the event types' changes from the WAL instead of triggers, through the logical
    /// replication slot (and the publication) of this name (`BENALSAM_CAPTURE_SLOT`): writers
    /// then pay nothing for the outbox. Needs `wal_level = logical` and a role with
    /// REPLICATION; `migrate` sets it up and drops the sync triggers. `None` (the default):
    /// the triggers record the jobs. See docs/database.md, "WAL capture".
    pub capture_slot: Option<String>,
}

impl OutboxConfig {
    /// The defaults, in `schema`.
    pub fn in_schema(schema: &str) -> Self {
        Self {
            schema: schema.to_owned(),
            ..Self::default()
        }
    }

    /// Checks the settings as [`Outbox::new`](super::Outbox::new) does: names that go into SQL text, a lease and
    /// retry waits longer than zero, at least one attempt.
    pub fn validate(&self) -> Result<()> {
        validate_schema(&self.schema)?;
        validate_identifier("OutboxConfig::notify_channel", &self.notify_channel)?;
        if self.max_attempts == 0 {
            return Err(Error::config(
                "OutboxConfig::max_attempts",
                "must be at least 1",
            ));
        }
        crate::config::require_positive("OutboxConfig::lease", self.lease)?;
        if let Some(slot) = &self.capture_slot {
            super::capture::validate_slot(slot)?;
        }
        let backoff = self.retry_backoff;
        crate::config::require_positive("OutboxConfig::retry_backoff.initial", backoff.initial)?;
        if backoff.initial > backoff.max {
            return Err(Error::config(
                "OutboxConfig::retry_backoff.initial",
                format!(
                    "{} is longer than OutboxConfig::retry_backoff.max ({})",
                    humantime::format_duration(backoff.initial),
                    humantime::format_duration(backoff.max)
                ),
            ));
        }
        Ok(())
    }
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            schema: "public".to_owned(),
            lease: Duration::from_secs(60),
            // About an hour of retries before a job is left `failed` for someone to look at.
            max_attempts: 10,
            retry_backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(600)),
            worker_id: format!(
                "pid {} on {}",
                std::process::id(),
                std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".to_owned())
            ),
            notify_channel: crate::outbox::DEFAULT_CHANNEL.to_owned(),
            tables: None,
            capture_slot: None,
        }
    }
}

impl OutboxConfig {
    /// Brings the outbox of these settings up to date and attaches the trigger to the table
    /// of every one of `event_types`, all in one transaction (see the module's migrations):
    /// the job table, its indexes and the trigger function in [`OutboxConfig::schema`]; a
    /// name the files give that the database lacks is refused before anything changes.
    pub async fn migrate(
        &self,
        client: &mut tokio_postgres::Client,
        event_types: &[crate::event_type::EventType],
    ) -> Result<super::MigrationReport> {
        super::migrate::migrate(client, self, event_types).await
    }

    /// `GRANT` statements (one per line, each ending in `;`) giving the roles `bridge` and
    /// `consumer` (either may be left out) what the bridge and the consumer need on this
    /// outbox for `event_types`, and nothing more. Run them as the outbox's owner.
    pub fn grants(
        &self,
        event_types: &[crate::event_type::EventType],
        bridge: Option<&str>,
        consumer: Option<&str>,
    ) -> Result<String> {
        super::grants::grants(self, event_types, bridge, consumer)
    }
}
