//! Command-line and environment settings shared by the binaries (feature `cli`).
//!
//! Connection settings are global: accepted before or after a subcommand, and listed in each
//! subcommand's help. The settings of running a service belong to its `run` subcommand (which
//! is also what runs when no subcommand is given, from the environment), so an operator
//! command never fails on a run-time setting it does not use. Values are parsed into the
//! validated types of [`crate::config`], so a bad value stops start-up with a message naming
//! the flag; help never prints a password (environment values are hidden, defaults shown
//! redacted). Defaults point at the local stack of `scripts/stack`.

use std::ffi::OsStr;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use clap::Args;
use clap::builder::TypedValueParser;
use clap::error::ErrorKind;

use crate::bridge::BridgeSettings;
use crate::config::{
    AmqpUrl, DEFAULT_DATABASE_URL, DEFAULT_ELASTICSEARCH_URL, DEFAULT_RABBITMQ_URL, DatabaseUrl,
    SearchUrl, validate_identifier, validate_schema,
};
use crate::consumer::ConsumerSettings;
use crate::index::{Documents, IndexConfig, IndexerConfig, ListingDocuments};
use crate::ops::telemetry::LogFormat;
use crate::outbox::{JobStreamConfig, Outbox, OutboxConfig, RetryPolicy, Wake};
use crate::publish::{PublisherConfig, QueueType, Topology, TopologyConfig};

/// PostgreSQL settings.
#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// PostgreSQL holding the outbox table
    /// [default: postgres://benalsam:***@127.0.0.1:5432/benalsam]
    #[arg(
        long,
        global = true,
        env = DatabaseUrl::SETTING,
        default_value = DEFAULT_DATABASE_URL,
        value_parser = SecretParser::<DatabaseUrl>::new(),
        hide_default_value = true,
        hide_env_values = true
    )]
    pub database_url: DatabaseUrl,

    /// PostgreSQL schema of the outbox table
    #[arg(long, global = true, env = "BENALSAM_SCHEMA", default_value = "public", value_parser = parse_schema)]
    pub schema: String,

    /// NOTIFY channel of the trigger (channel= option)
    #[arg(long, global = true, env = "BENALSAM_NOTIFY_CHANNEL",
          default_value = crate::outbox::DEFAULT_CHANNEL, value_parser = parse_channel)]
    pub notify_channel: String,
}

impl DatabaseArgs {
    /// The outbox these settings name, for operator commands (defaults otherwise).
    pub fn outbox(&self) -> crate::Result<Outbox> {
        Outbox::new(self.database_url.clone(), self.outbox_config())
    }

    fn outbox_config(&self) -> OutboxConfig {
        let mut config = OutboxConfig::in_schema(&self.schema);
        config.notify_channel = self.notify_channel.clone();
        config
    }

    /// Connects and applies the missing migrations.
    pub async fn migrate(&self) -> crate::Result<crate::outbox::MigrationReport> {
        let mut client = crate::connect::postgres(&self.database_url).await?;
        crate::outbox::migrate(&mut client, &self.schema).await
    }
}

/// RabbitMQ settings.
#[derive(Debug, Clone, Args)]
pub struct RabbitArgs {
    /// RabbitMQ broker
    /// [default: amqp://benalsam:***@127.0.0.1:5672/%2f]
    #[arg(
        long,
        global = true,
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
        global = true,
        env = SearchUrl::SETTING,
        default_value = DEFAULT_ELASTICSEARCH_URL,
        value_parser = SecretParser::<SearchUrl>::new(),
        hide_env_values = true
    )]
    pub elasticsearch_url: SearchUrl,
}

/// Log output.
#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// Log lines as text or json (filtered by RUST_LOG; traces are exported when the standard
    /// OTEL_* variables ask for it, e.g. OTEL_EXPORTER_OTLP_ENDPOINT)
    #[arg(long, global = true, env = "BENALSAM_LOG_FORMAT", default_value = "text",
          value_parser = |s: &str| s.parse::<LogFormat>().map_err(|e| e.to_string()))]
    pub log_format: LogFormat,
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

fn parse_channel(raw: &str) -> Result<String, String> {
    validate_identifier("BENALSAM_NOTIFY_CHANNEL", raw)
        .map(str::to_owned)
        .map_err(|e| e.to_string())
}

/// Parses a duration such as `500ms`, `1s`, `15m`, `1h 30m`; zero is refused (no setting of
/// the library works with a zero duration).
pub fn parse_duration(raw: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(raw)
        .map_err(|e| format!("{raw:?} is not a duration like 500ms, 1s or 15m ({e})"))?;
    if duration.is_zero() {
        return Err(format!("{raw:?} is zero; give a duration longer than that"));
    }
    Ok(duration)
}

/// What the services share: health endpoints, heartbeats, migrations at start.
#[derive(Debug, Clone, Args)]
pub struct ServiceArgs {
    /// Address of the health endpoints (and /metrics, /livez, /readyz)
    #[arg(long, env = "BENALSAM_HEALTH_ADDR")]
    pub health_addr: Option<SocketAddr>,

    /// How long work may stand still (jobs waiting, messages unacked) before health is red
    #[arg(long, env = "BENALSAM_HEALTH_WINDOW", default_value = "30s", value_parser = parse_duration)]
    pub health_window: Duration,

    /// Interval of heartbeat events (health.<service> on benalsam.system)
    #[arg(long, env = "BENALSAM_HEARTBEAT_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub heartbeat_interval: Duration,

    /// Apply the database migrations before starting
    #[arg(long, env = "BENALSAM_MIGRATE")]
    pub migrate: bool,
}

/// The RabbitMQ topology's choices.
#[derive(Debug, Clone, Args)]
pub struct TopologyArgs {
    /// Queue type: classic, or quorum for replicated queues on a cluster
    #[arg(long, env = "BENALSAM_QUEUE_TYPE", default_value = "classic",
          value_parser = |s: &str| s.parse::<QueueType>().map_err(|e| e.to_string()))]
    pub queue_type: QueueType,

    /// Most messages kept in listing.status.changes (oldest dropped beyond)
    #[arg(long, env = "BENALSAM_STATUS_QUEUE_MAX_LENGTH", default_value_t = 100_000,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub status_queue_max_length: u32,

    /// Most messages kept in system.health (oldest dropped beyond)
    #[arg(long, env = "BENALSAM_HEALTH_QUEUE_MAX_LENGTH", default_value_t = 1_000,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub health_queue_max_length: u32,
}

impl TopologyArgs {
    /// The topology these flags make.
    pub fn topology(&self) -> Topology {
        let mut config = TopologyConfig {
            queue_type: self.queue_type,
            ..TopologyConfig::default()
        };
        config.status_changes.max_length = self.status_queue_max_length;
        config.health.max_length = self.health_queue_max_length;
        Topology::benalsam(&config)
    }
}

/// How the bridge claims and publishes jobs (`benalsam-bridge run`).
#[derive(Debug, Clone, Args)]
pub struct BridgeArgs {
    /// Most jobs claimed (and published) per batch
    #[arg(long, env = "BENALSAM_BATCH_SIZE", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub batch_size: u32,

    /// Longest wait between claims without a notification
    #[arg(long, env = "BENALSAM_POLL_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub poll_interval: Duration,

    /// Poll only, no LISTEN (for PgBouncer in transaction mode, or write-heavy databases)
    #[arg(long, env = "BENALSAM_POLL_ONLY")]
    pub poll_only: bool,

    /// How long a claim is exclusive; a dead bridge's jobs are claimable again after it
    #[arg(long, env = "BENALSAM_LEASE", default_value = "60s", value_parser = parse_duration)]
    pub lease: Duration,

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
    pub resend_after: Duration,

    /// Health, heartbeats, migrations.
    #[command(flatten)]
    pub service: ServiceArgs,

    /// The RabbitMQ topology.
    #[command(flatten)]
    pub topology: TopologyArgs,
}

impl BridgeArgs {
    /// The bridge these flags (and the connection settings) make.
    pub fn settings(&self, database: &DatabaseArgs, rabbitmq: &RabbitArgs) -> BridgeSettings {
        let mut s =
            BridgeSettings::new(database.database_url.clone(), rabbitmq.rabbitmq_url.clone());
        s.outbox = database.outbox_config();
        s.outbox.lease = self.lease;
        s.outbox.retry = RetryPolicy::new(self.max_attempts, RetryPolicy::default().backoff);
        s.outbox.worker_id = format!("benalsam-bridge {}", s.outbox.worker_id);
        s.stream = JobStreamConfig {
            batch_size: self.batch_size as usize,
            poll_interval: self.poll_interval,
            wake: if self.poll_only {
                Wake::PollOnly
            } else {
                Wake::Listen {
                    channel: database.notify_channel.clone(),
                }
            },
            ..JobStreamConfig::default()
        };
        s.publisher = PublisherConfig {
            window: self.publish_window as usize,
            ..PublisherConfig::default()
        };
        s.topology = self.topology.topology();
        s.resend_after = self.resend_after;
        s.migrate = self.service.migrate;
        s.health_addr = self.service.health_addr;
        s.health_window = self.service.health_window;
        s.heartbeat_interval = Some(self.service.heartbeat_interval);
        s
    }
}

fn parse_status(raw: &str) -> Result<String, String> {
    let status = raw.trim();
    if status.is_empty() {
        Err("a status must not be empty (e.g. active,featured)".to_owned())
    } else {
        Ok(status.to_owned())
    }
}

/// How the consumer takes messages and writes to Elasticsearch (`benalsam-consumer run`).
#[derive(Debug, Clone, Args)]
pub struct ConsumerArgs {
    /// Alias of the listings index (created as <alias>_v1 when missing)
    #[arg(long, env = "BENALSAM_INDEX", default_value = "benalsam_listings",
          value_parser = |s: &str| validate_identifier("BENALSAM_INDEX", s).map(str::to_owned).map_err(|e| e.to_string()))]
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
    pub bulk_linger: Duration,

    /// Bulk requests written and settled at once
    #[arg(long, env = "BENALSAM_BULK_IN_FLIGHT", default_value_t = 2,
          value_parser = clap::value_parser!(u32).range(1..=64))]
    pub bulk_in_flight: u32,

    /// Attempts of a document Elasticsearch refuses as busy before it is dead-lettered
    #[arg(long, env = "BENALSAM_INDEX_ATTEMPTS", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(1..=100))]
    pub index_attempts: u32,

    /// Timeout of one request to Elasticsearch
    #[arg(long, env = "BENALSAM_SEARCH_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub search_timeout: Duration,

    /// Health, heartbeats, migrations.
    #[command(flatten)]
    pub service: ServiceArgs,

    /// The RabbitMQ topology.
    #[command(flatten)]
    pub topology: TopologyArgs,
}

impl ConsumerArgs {
    /// The consumer these flags (and the connection settings) make.
    pub fn settings(
        &self,
        database: &DatabaseArgs,
        rabbitmq: &RabbitArgs,
        search: &SearchArgs,
    ) -> ConsumerSettings {
        let mut s = ConsumerSettings::new(
            database.database_url.clone(),
            rabbitmq.rabbitmq_url.clone(),
            search.elasticsearch_url.clone(),
        );
        s.outbox = database.outbox_config();
        s.search_timeout = self.search_timeout;
        let mut index = IndexConfig::default();
        index.alias = self.index.clone();
        index.replicas = self.index_replicas;
        let body = crate::index::listings_index_body(&index);
        s.index = Some((index, body));
        let mut listings = ListingDocuments::new(&self.index);
        listings.searchable_statuses = self.searchable_statuses.clone();
        s.documents = Documents::new().with("listings", listings);
        s.indexer = IndexerConfig {
            prefetch: self.prefetch,
            batch_size: self.bulk_size as usize,
            batch_bytes: self.bulk_bytes as usize,
            linger: self.bulk_linger,
            in_flight: self.bulk_in_flight as usize,
            max_attempts: self.index_attempts,
            ..IndexerConfig::default()
        };
        s.topology = self.topology.topology();
        s.migrate = self.service.migrate;
        s.health_addr = self.service.health_addr;
        s.health_window = self.service.health_window;
        s.heartbeat_interval = Some(self.service.heartbeat_interval);
        s
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
