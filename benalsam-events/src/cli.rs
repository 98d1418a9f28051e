//! Command-line and environment settings shared by the binaries (feature `cli`).
//!
//! Each group is a `clap::Args` to `#[command(flatten)]` into a binary's parser. Values are
//! parsed into the validated types of [`crate::config`], so a bad value stops start-up with
//! clap's message naming the flag and the library's naming the variable. Defaults point at
//! the local stack of `scripts/stack`. Help never prints a password: environment values are
//! hidden and defaults are shown redacted.

use std::ffi::OsStr;
use std::marker::PhantomData;
use std::str::FromStr;

use clap::Args;
use clap::builder::TypedValueParser;
use clap::error::ErrorKind;

use crate::config::{
    AmqpUrl, DEFAULT_DATABASE_URL, DEFAULT_ELASTICSEARCH_URL, DEFAULT_RABBITMQ_URL, DatabaseUrl,
    SearchUrl, validate_schema,
};

/// PostgreSQL settings.
#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// PostgreSQL holding the listings and the outbox table
    /// [default: postgres://benalsam:***@127.0.0.1:5432/benalsam]
    #[arg(
        long,
        env = DatabaseUrl::SETTING,
        default_value = DEFAULT_DATABASE_URL,
        value_parser = SecretParser::<DatabaseUrl>::new(),
        hide_default_value = true,
        hide_env_values = true
    )]
    pub database_url: DatabaseUrl,

    /// PostgreSQL schema of the listings and outbox tables
    #[arg(long, env = "BENALSAM_SCHEMA", default_value = "public", value_parser = parse_schema)]
    pub schema: String,
}

/// RabbitMQ settings.
#[derive(Debug, Clone, Args)]
pub struct RabbitArgs {
    /// RabbitMQ broker
    /// [default: amqp://benalsam:***@127.0.0.1:5672/%2f]
    #[arg(
        long,
        env = AmqpUrl::SETTING,
        default_value = DEFAULT_RABBITMQ_URL,
        value_parser = SecretParser::<AmqpUrl>::new(),
        hide_default_value = true,
        hide_env_values = true
    )]
    pub rabbitmq_url: AmqpUrl,
}

/// Elasticsearch settings.
#[derive(Debug, Clone, Args)]
pub struct SearchArgs {
    /// Elasticsearch (or OpenSearch) node
    #[arg(
        long,
        env = SearchUrl::SETTING,
        default_value = DEFAULT_ELASTICSEARCH_URL,
        value_parser = SecretParser::<SearchUrl>::new(),
        hide_env_values = true
    )]
    pub elasticsearch_url: SearchUrl,
}

/// Parses a URL setting without ever echoing it: clap's own messages quote the raw value,
/// which would print a password; the library's errors show it redacted.
#[derive(Debug)]
struct SecretParser<T>(PhantomData<fn() -> T>);

impl<T> SecretParser<T> {
    fn new() -> Self {
        Self(PhantomData)
    }
}

impl<T> Clone for SecretParser<T> {
    fn clone(&self) -> Self {
        Self::new()
    }
}

impl<T> TypedValueParser for SecretParser<T>
where
    T: FromStr<Err = crate::Error> + Clone + Send + Sync + 'static,
{
    type Value = T;

    fn parse_ref(
        &self,
        _cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &OsStr,
    ) -> Result<T, clap::Error> {
        let flag = arg
            .and_then(|a| a.get_long())
            .map(|l| format!("--{l}"))
            .unwrap_or_else(|| "a URL setting".to_owned());
        let raw = value.to_str().ok_or_else(|| {
            clap::Error::raw(
                ErrorKind::InvalidUtf8,
                format!("{flag} is not valid UTF-8\n"),
            )
        })?;
        raw.parse::<T>()
            .map_err(|e| clap::Error::raw(ErrorKind::ValueValidation, format!("{flag}: {e}\n")))
    }
}

fn parse_schema(raw: &str) -> Result<String, String> {
    validate_schema(raw)
        .map(str::to_owned)
        .map_err(|e| e.to_string())
}

impl DatabaseArgs {
    /// Connects and applies the missing migrations to [`schema`](Self::schema).
    pub async fn migrate(&self) -> crate::Result<crate::migrate::Report> {
        let mut client = crate::postgres::connect(&self.database_url).await?;
        crate::migrate::migrate(&mut client, &self.schema).await
    }
}

/// Log output.
#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// Log lines as text or json (filtered by RUST_LOG; traces are exported when the standard
    /// OTEL_* variables ask for it, e.g. OTEL_EXPORTER_OTLP_ENDPOINT)
    #[arg(long, env = "BENALSAM_LOG_FORMAT", default_value = "text",
          value_parser = |s: &str| s.parse::<crate::telemetry::LogFormat>().map_err(|e| e.to_string()))]
    pub log_format: crate::telemetry::LogFormat,
}

/// Parses a duration such as `500ms`, `1s`, `15m`, `1h 30m`.
pub fn parse_duration(raw: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(raw)
        .map_err(|e| format!("{raw:?} is not a duration like 500ms, 1s or 15m ({e})"))
}

fn parse_channel(raw: &str) -> Result<String, String> {
    crate::config::validate_identifier("BENALSAM_NOTIFY_CHANNEL", raw)
        .map(str::to_owned)
        .map_err(|e| e.to_string())
}

/// How the bridge claims and publishes jobs.
#[derive(Debug, Clone, Args)]
pub struct BridgeArgs {
    /// Most jobs claimed (and published) per batch
    #[arg(long, env = "BENALSAM_BATCH_SIZE", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub batch_size: u32,

    /// Longest wait between claims without a notification
    #[arg(long, env = "BENALSAM_POLL_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub poll_interval: std::time::Duration,

    /// Poll only, no LISTEN (for PgBouncer in transaction mode, or write-heavy databases)
    #[arg(long, env = "BENALSAM_POLL_ONLY")]
    pub poll_only: bool,

    /// NOTIFY channel of the trigger
    #[arg(long, env = "BENALSAM_NOTIFY_CHANNEL", default_value = crate::job_stream::DEFAULT_CHANNEL,
          value_parser = parse_channel)]
    pub notify_channel: String,

    /// How long a claim is exclusive; a dead bridge's jobs are claimable again after it
    #[arg(long, env = "BENALSAM_LEASE", default_value = "60s", value_parser = parse_duration)]
    pub lease: std::time::Duration,

    /// Attempts per job before it stays failed
    #[arg(long, env = "BENALSAM_MAX_ATTEMPTS", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub max_attempts: u32,

    /// Most messages published and not yet confirmed
    #[arg(long, env = "BENALSAM_PUBLISH_WINDOW", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(1..=65_535))]
    pub publish_window: u32,

    /// Send again jobs sent this long ago and never completed
    #[arg(long, env = "BENALSAM_RESEND_AFTER", default_value = "15m", value_parser = parse_duration)]
    pub resend_after: std::time::Duration,

    /// Unhealthy when the oldest pending job is older than this
    #[arg(long, env = "BENALSAM_MAX_PENDING_AGE", default_value = "60s", value_parser = parse_duration)]
    pub max_pending_age: std::time::Duration,
}

impl BridgeArgs {
    /// The outbox settings these flags make, in `schema`.
    pub fn outbox_config(&self, schema: &str) -> crate::OutboxConfig {
        crate::OutboxConfig {
            schema: schema.to_owned(),
            lease: self.lease,
            retry: crate::RetryPolicy {
                max_attempts: self.max_attempts,
                ..crate::RetryPolicy::default()
            },
            worker_id: format!(
                "benalsam-bridge pid {} on {}",
                std::process::id(),
                std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".to_owned())
            ),
        }
    }

    /// The job stream settings these flags make.
    pub fn job_stream_config(&self) -> crate::JobStreamConfig {
        crate::JobStreamConfig {
            batch_size: self.batch_size as usize,
            poll_interval: self.poll_interval,
            wake: if self.poll_only {
                crate::Wake::PollOnly
            } else {
                crate::Wake::Listen {
                    channel: self.notify_channel.clone(),
                }
            },
            ..crate::JobStreamConfig::default()
        }
    }

    /// The publisher settings these flags make.
    pub fn publisher_config(&self) -> crate::PublisherConfig {
        crate::PublisherConfig {
            window: self.publish_window as usize,
            ..crate::PublisherConfig::default()
        }
    }
}

/// The RabbitMQ topology's choices.
#[derive(Debug, Clone, Args)]
pub struct TopologyArgs {
    /// Queue type: classic, or quorum for replicated queues on a cluster
    #[arg(long, env = "BENALSAM_QUEUE_TYPE", default_value = "classic",
          value_parser = |s: &str| s.parse::<crate::topology::QueueType>().map_err(|e| e.to_string()))]
    pub queue_type: crate::topology::QueueType,

    /// Most messages kept in listing.status.changes (oldest dropped beyond)
    #[arg(
        long,
        env = "BENALSAM_STATUS_QUEUE_MAX_LENGTH",
        default_value_t = 100_000
    )]
    pub status_queue_max_length: u32,

    /// Most messages kept in system.health (oldest dropped beyond)
    #[arg(
        long,
        env = "BENALSAM_HEALTH_QUEUE_MAX_LENGTH",
        default_value_t = 1_000
    )]
    pub health_queue_max_length: u32,
}

impl TopologyArgs {
    /// The topology these flags make.
    pub fn topology(&self) -> crate::topology::Topology {
        let mut config = crate::topology::TopologyConfig {
            queue_type: self.queue_type,
            ..crate::topology::TopologyConfig::default()
        };
        config.status_changes.max_length = self.status_queue_max_length;
        config.health.max_length = self.health_queue_max_length;
        crate::topology::Topology::benalsam(&config)
    }
}

/// Installs handlers for SIGINT and SIGTERM that cancel the returned token.
pub fn shutdown_on_signals() -> tokio_util::sync::CancellationToken {
    let token = tokio_util::sync::CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        let terminate = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut signal) => {
                    signal.recv().await;
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot watch SIGTERM");
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
            () = terminate => tracing::info!("SIGTERM: shutting down"),
        }
        cancel.cancel();
    });
    token
}

fn parse_status(raw: &str) -> Result<String, String> {
    let status = raw.trim();
    if status.is_empty() {
        Err("a status must not be empty (e.g. active,featured)".to_owned())
    } else {
        Ok(status.to_owned())
    }
}

/// How the consumer takes messages and writes to Elasticsearch.
#[derive(Debug, Clone, Args)]
pub struct ConsumerArgs {
    /// Alias of the listings index (created as <alias>_v1 when missing)
    #[arg(long, env = "BENALSAM_INDEX", default_value = "benalsam_listings",
          value_parser = |s: &str| crate::config::validate_identifier("BENALSAM_INDEX", s).map(str::to_owned).map_err(|e| e.to_string()))]
    pub index: String,

    /// Replicas of a newly created index (0 keeps a single node green)
    #[arg(long, env = "BENALSAM_INDEX_REPLICAS", default_value_t = 0)]
    pub index_replicas: u32,

    /// Statuses whose listings are searchable, comma-separated; others are removed from the index
    #[arg(long, env = "BENALSAM_SEARCHABLE_STATUSES", default_value = "active",
          value_delimiter = ',', num_args = 1.., value_parser = parse_status)]
    pub searchable_statuses: Vec<String>,

    /// Unacknowledged messages taken at once (basic.qos)
    #[arg(long, env = "BENALSAM_PREFETCH", default_value_t = 1000,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub prefetch: u16,

    /// Most actions per bulk request
    #[arg(long, env = "BENALSAM_BULK_SIZE", default_value_t = 500,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub bulk_size: u32,

    /// Most bytes per bulk request
    #[arg(long, env = "BENALSAM_BULK_BYTES", default_value_t = 5 * 1024 * 1024,
          value_parser = clap::value_parser!(u32).range(1024..))]
    pub bulk_bytes: u32,

    /// Longest wait for a bulk request to fill
    #[arg(long, env = "BENALSAM_BULK_LINGER", default_value = "50ms", value_parser = parse_duration)]
    pub bulk_linger: std::time::Duration,

    /// Attempts of a document Elasticsearch refuses as busy before it is dead-lettered
    #[arg(long, env = "BENALSAM_INDEX_ATTEMPTS", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(1..=100))]
    pub index_attempts: u32,

    /// Timeout of one request to Elasticsearch
    #[arg(long, env = "BENALSAM_SEARCH_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub search_timeout: std::time::Duration,
}

impl ConsumerArgs {
    /// The index settings these flags make.
    pub fn index_config(&self) -> crate::search::IndexConfig {
        crate::search::IndexConfig {
            alias: self.index.clone(),
            replicas: self.index_replicas,
            ..crate::search::IndexConfig::default()
        }
    }

    /// The listings document builder these flags make.
    pub fn documents(&self) -> crate::document::Documents {
        crate::document::Documents::new().with(
            "listings",
            crate::document::ListingDocuments {
                index: self.index.clone(),
                searchable_statuses: self.searchable_statuses.clone(),
            },
        )
    }

    /// The indexer settings these flags make.
    pub fn indexer_config(&self) -> crate::IndexerConfig {
        crate::IndexerConfig {
            prefetch: self.prefetch,
            batch_size: self.bulk_size as usize,
            batch_bytes: self.bulk_bytes as usize,
            linger: self.bulk_linger,
            max_attempts: self.index_attempts,
            ..crate::IndexerConfig::default()
        }
    }
}

/// The start-up steps both binaries share: migrations (when asked) and the RabbitMQ topology.
/// Each waits for its service with backoff rather than giving up, while a wrong setting or a
/// conflicting topology still stops start-up. Returns `false` when `shutdown` came first.
pub async fn prepare(
    database: &DatabaseArgs,
    migrate: bool,
    rabbitmq: &AmqpUrl,
    topology: &crate::topology::Topology,
    service: &str,
    shutdown: &tokio_util::sync::CancellationToken,
) -> crate::Result<bool> {
    use crate::backoff::{Backoff, retry};
    if migrate
        && retry("migrating", Backoff::default(), shutdown, || {
            database.migrate()
        })
        .await?
        .is_none()
    {
        return Ok(false);
    }
    let name = format!("{service} topology");
    let declared = retry(
        "declaring the topology",
        Backoff::default(),
        shutdown,
        || async {
            let connection = crate::amqp::connect(rabbitmq, &name).await?;
            topology.declare(&connection).await?;
            let _ = connection.close(200, "declared".into()).await;
            Ok(())
        },
    )
    .await?;
    Ok(declared.is_some())
}
