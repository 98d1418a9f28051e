//! The command line of the bundled binaries (`benalsam-bridge`, `benalsam-consumer`): the
//! flags and environment variables they share, secrets from `*_FILE` variables, progress
//! lines of long operator commands and shutdown on signals. Not published: the library
//! (`benalsam-events`) takes typed settings, and these are one way to fill them.
//!
//! Connection settings are global: accepted before or after a subcommand, and listed in each
//! subcommand's help. The settings of running a service belong to its `run` subcommand (which
//! is also what runs when no subcommand is given, from the environment), so an operator
//! command never fails on a run-time setting it does not use. Values are parsed into the
//! validated types of [`benalsam_events::config`], so a bad value stops start-up with a message naming
//! the flag; help never prints a password (environment values are hidden, defaults shown
//! redacted). Defaults point at the local stack of `scripts/stack`.

// The doc comments of the settings are the binaries' --help text, written for a terminal:
// `[default: …]` and `<name>` are meant literally there, not as links or HTML.
#![allow(rustdoc::broken_intra_doc_links, rustdoc::invalid_html_tags)]

use std::ffi::OsStr;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::Args;
use clap::builder::TypedValueParser;
use clap::error::ErrorKind;

#[cfg(feature = "bridge")]
use benalsam_events::bridge::BridgeSettings;
use benalsam_events::config::{AmqpUrl, DatabaseUrl, SearchUrl};
#[cfg(feature = "consumer")]
use benalsam_events::consume::IndexerConfig;
#[cfg(feature = "consumer")]
use benalsam_events::consumer::ConsumerSettings;
#[cfg(feature = "bridge")]
use benalsam_events::outbox::{JobStreamConfig, Wake};
use benalsam_events::outbox::{Outbox, OutboxConfig};
#[cfg(feature = "bridge")]
use benalsam_events::publish::PublisherConfig;
use benalsam_events::publish::{QueueType, Topology, TopologyConfig};
use benalsam_events::{Error, EventType};

mod secret_file;
pub mod telemetry;

pub use secret_file::{parse_with_secret_files, try_parse_with_secret_files};
pub use telemetry::LogFormat;

/// The variables of the search engine's TLS files, which `SearchUrl::from_env` reads too.
const ELASTICSEARCH_CA: &str = "ELASTICSEARCH_CA";
const ELASTICSEARCH_CLIENT_CERT: &str = "ELASTICSEARCH_CLIENT_CERT";
const ELASTICSEARCH_CLIENT_KEY: &str = "ELASTICSEARCH_CLIENT_KEY";

/// PostgreSQL settings.
#[derive(Debug, Clone, Args)]
#[non_exhaustive]
pub struct DatabaseArgs {
    /// PostgreSQL holding the outbox table; TLS by libpq's URL parameters sslmode
    /// (disable, prefer, require, verify-ca, verify-full), sslrootcert, sslcert, sslkey
    /// [default: postgres://benalsam:***@127.0.0.1:5432/benalsam]
    #[arg(
        long,
        global = true,
        env = DatabaseUrl::SETTING,
        default_value = DatabaseUrl::DEFAULT,
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
          default_value = OutboxConfig::default().notify_channel, value_parser = parse_channel)]
    pub notify_channel: String,

    /// Record the changes from the WAL through this logical replication slot (and the
    /// publication of the same name) instead of triggers: writers pay nothing for the outbox.
    /// Needs wal_level = logical and a role with REPLICATION; `migrate` sets it up and drops
    /// the sync triggers (docs/database.md, "WAL capture"). Unset: triggers
    #[arg(long, global = true, env = "BENALSAM_CAPTURE_SLOT", value_parser = parse_slot)]
    pub capture_slot: Option<String>,
}

impl DatabaseArgs {
    /// The outbox these settings name, for operator commands (defaults otherwise).
    pub fn outbox(&self) -> benalsam_events::Result<Outbox> {
        Outbox::new(self.database_url.clone(), self.outbox_config())
    }

    fn outbox_config(&self) -> OutboxConfig {
        let mut config = OutboxConfig::in_schema(&self.schema);
        config.notify_channel = self.notify_channel.clone();
        config.capture_slot = self.capture_slot.clone();
        config
    }

    /// Connects, applies the missing migrations and attaches the trigger to the tables of
    /// `event_types`.
    pub async fn migrate(
        &self,
        event_types: &[EventType],
    ) -> benalsam_events::Result<benalsam_events::outbox::MigrationReport> {
        let mut client = self.database_url.connect().await?;
        self.outbox_config().migrate(&mut client, event_types).await
    }
}

/// The event types: a configuration file, or the seed's listings without one.
#[derive(Debug, Clone, Args)]
#[non_exhaustive]
pub struct ConfigArgs {
    /// The event-type file (TOML; see examples/config/benalsam.toml); without it, the
    /// listings of the architecture document
    #[arg(long, global = true, env = "BENALSAM_CONFIG")]
    pub config: Option<PathBuf>,
}

impl ConfigArgs {
    /// The event types of the file, or the listings.
    pub fn event_types(&self) -> benalsam_events::Result<Vec<EventType>> {
        match &self.config {
            Some(path) => EventType::from_file(path),
            None => Ok(vec![EventType::listings()]),
        }
    }

    /// The event types, the one named `name` only when given.
    pub fn select(&self, name: Option<&str>) -> benalsam_events::Result<Vec<EventType>> {
        select(self.event_types()?, name)
    }
}

/// The event types of `all`, the one named `name` only when given (`--type`).
pub fn select(all: Vec<EventType>, name: Option<&str>) -> benalsam_events::Result<Vec<EventType>> {
    let Some(name) = name else {
        return Ok(all);
    };
    let names: Vec<&str> = all.iter().map(|t| t.name.as_str()).collect();
    let known = names.join(", ");
    all.iter()
        .find(|t| t.name == name)
        .cloned()
        .map(|t| vec![t])
        .ok_or_else(|| Error::config("--type", format!("no event type {name:?} (known: {known})")))
}

/// RabbitMQ settings.
#[derive(Debug, Clone, Args)]
#[non_exhaustive]
pub struct RabbitArgs {
    /// RabbitMQ broker; amqps:// for TLS, with the URL parameters cacertfile, certfile,
    /// keyfile; several nodes of one vhost comma-separated, tried in turn
    /// [default: amqp://benalsam:***@127.0.0.1:5672/%2f]
    #[arg(
        long,
        global = true,
        env = AmqpUrl::SETTING,
        default_value = AmqpUrl::DEFAULT,
        value_parser = SecretParser::<AmqpUrl>::new(),
        hide_default_value = true,
        hide_env_values = true
    )]
    pub rabbitmq_url: AmqpUrl,
}

/// Elasticsearch settings.
#[derive(Debug, Clone, Args)]
#[non_exhaustive]
pub struct SearchArgs {
    /// Elasticsearch (or OpenSearch) node, http:// or https://; several nodes of one cluster
    /// comma-separated (one scheme, one user and password): requests go to one, and move to
    /// the next when it fails
    #[arg(
        long,
        global = true,
        env = SearchUrl::SETTING,
        default_value = SearchUrl::DEFAULT,
        value_parser = SecretParser::<SearchUrl>::new(),
        hide_env_values = true
    )]
    pub elasticsearch_url: SearchUrl,

    /// CA certificate(s) (PEM file) trusted for an https:// node, besides the public CAs
    #[arg(long, global = true, env = ELASTICSEARCH_CA, value_name = "PEM")]
    pub elasticsearch_ca: Option<PathBuf>,

    /// Client certificate (PEM file) for a node that asks for one; needs
    /// --elasticsearch-client-key
    #[arg(long, global = true, env = ELASTICSEARCH_CLIENT_CERT, value_name = "PEM",
          requires = "elasticsearch_client_key")]
    pub elasticsearch_client_cert: Option<PathBuf>,

    /// Unencrypted private key (PEM file) of --elasticsearch-client-cert
    #[arg(long, global = true, env = ELASTICSEARCH_CLIENT_KEY, value_name = "PEM",
          requires = "elasticsearch_client_cert")]
    pub elasticsearch_client_key: Option<PathBuf>,
}

impl SearchArgs {
    /// The node with the TLS files of these settings: what to build a client from.
    pub fn search_url(&self) -> SearchUrl {
        let mut url = self.elasticsearch_url.clone();
        if let Some(ca) = &self.elasticsearch_ca {
            url = url.with_ca(ca);
        }
        if let (Some(cert), Some(key)) = (
            &self.elasticsearch_client_cert,
            &self.elasticsearch_client_key,
        ) {
            url = url.with_client_certificate(cert, key);
        }
        url
    }
}

/// Log output.
#[derive(Debug, Clone, Args)]
#[non_exhaustive]
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
    T: FromStr<Err = Error> + Clone + Send + Sync + 'static,
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
    OutboxConfig::in_schema(raw)
        .validate()
        .map(|()| raw.to_owned())
        .map_err(|e| describe(&e))
}

fn parse_channel(raw: &str) -> Result<String, String> {
    let mut config = OutboxConfig::default();
    raw.clone_into(&mut config.notify_channel);
    config
        .validate()
        .map(|()| raw.to_owned())
        .map_err(|e| describe(&e))
}

fn parse_slot(raw: &str) -> Result<String, String> {
    let mut config = OutboxConfig::default();
    config.capture_slot = Some(raw.to_owned());
    config
        .validate()
        .map(|()| raw.to_owned())
        .map_err(|e| describe(&e))
}

#[cfg(feature = "consumer")]
fn parse_index(raw: &str) -> Result<String, String> {
    let mut listings = EventType::listings();
    raw.clone_into(&mut listings.index.alias);
    listings
        .validate()
        .map(|()| raw.to_owned())
        // The event type's error names its key (`index.alias`); here the operator set
        // --index.
        .map_err(|e| renamed(&e, "--index", "BENALSAM_INDEX"))
}

/// The library's settings (its config types' fields, as its errors name them) and the flag
/// and variable of the binaries that set each one.
const SETTINGS: &[(&str, &str, &str)] = &[
    ("OutboxConfig::schema", "--schema", "BENALSAM_SCHEMA"),
    (
        "OutboxConfig::capture_slot",
        "--capture-slot",
        "BENALSAM_CAPTURE_SLOT",
    ),
    (
        "OutboxConfig::notify_channel",
        "--notify-channel",
        "BENALSAM_NOTIFY_CHANNEL",
    ),
    ("OutboxConfig::lease", "--lease", "BENALSAM_LEASE"),
    (
        "OutboxConfig::max_attempts",
        "--max-attempts",
        "BENALSAM_MAX_ATTEMPTS",
    ),
    (
        "OutboxConfig::retry_backoff.initial",
        "--retry-initial",
        "BENALSAM_RETRY_INITIAL",
    ),
    (
        "OutboxConfig::retry_backoff.max",
        "--retry-max",
        "BENALSAM_RETRY_MAX",
    ),
    (
        "JobStreamConfig::batch_size",
        "--batch-size",
        "BENALSAM_BATCH_SIZE",
    ),
    (
        "JobStreamConfig::poll_interval",
        "--poll-interval",
        "BENALSAM_POLL_INTERVAL",
    ),
    (
        "JobStreamConfig::linger",
        "--claim-linger",
        "BENALSAM_CLAIM_LINGER",
    ),
    (
        "PublisherConfig::window",
        "--publish-window",
        "BENALSAM_PUBLISH_WINDOW",
    ),
    (
        "PublisherConfig::window_bytes",
        "--publish-window-bytes",
        "BENALSAM_PUBLISH_WINDOW_BYTES",
    ),
    (
        "PublisherConfig::max_message_bytes",
        "--max-message-bytes",
        "BENALSAM_MAX_MESSAGE_BYTES",
    ),
    ("IndexerConfig::prefetch", "--prefetch", "BENALSAM_PREFETCH"),
    (
        "IndexerConfig::batch_size",
        "--bulk-size",
        "BENALSAM_BULK_SIZE",
    ),
    (
        "IndexerConfig::batch_bytes",
        "--bulk-bytes",
        "BENALSAM_BULK_BYTES",
    ),
    (
        "IndexerConfig::linger",
        "--bulk-linger",
        "BENALSAM_BULK_LINGER",
    ),
    (
        "IndexerConfig::in_flight",
        "--bulk-in-flight",
        "BENALSAM_BULK_IN_FLIGHT",
    ),
    (
        "IndexerConfig::bulk_target",
        "--bulk-target",
        "BENALSAM_BULK_TARGET",
    ),
    (
        "IndexerConfig::max_attempts",
        "--index-attempts",
        "BENALSAM_INDEX_ATTEMPTS",
    ),
    (
        "IndexerConfig::max_message_bytes",
        "--max-message-bytes",
        "BENALSAM_MAX_MESSAGE_BYTES",
    ),
    (
        "TopologyConfig::status_queue_max_length",
        "--status-queue-max-length",
        "BENALSAM_STATUS_QUEUE_MAX_LENGTH",
    ),
    (
        "TopologyConfig::health_queue_max_length",
        "--health-queue-max-length",
        "BENALSAM_HEALTH_QUEUE_MAX_LENGTH",
    ),
    (
        "BridgeSettings::health_addr",
        "--health-addr",
        "BENALSAM_HEALTH_ADDR",
    ),
    (
        "ConsumerSettings::health_addr",
        "--health-addr",
        "BENALSAM_HEALTH_ADDR",
    ),
    (
        "BridgeSettings::resend_after",
        "--resend-after",
        "BENALSAM_RESEND_AFTER",
    ),
    (
        "BridgeSettings::fanout_page",
        "--fanout-page",
        "BENALSAM_FANOUT_PAGE",
    ),
    (
        "BridgeSettings::health_window",
        "--health-window",
        "BENALSAM_HEALTH_WINDOW",
    ),
    (
        "BridgeSettings::heartbeat_interval",
        "--heartbeat-interval",
        "BENALSAM_HEARTBEAT_INTERVAL",
    ),
    (
        "ConsumerSettings::search_timeout",
        "--search-timeout",
        "BENALSAM_SEARCH_TIMEOUT",
    ),
    (
        "ConsumerSettings::health_window",
        "--health-window",
        "BENALSAM_HEALTH_WINDOW",
    ),
    (
        "ConsumerSettings::heartbeat_interval",
        "--heartbeat-interval",
        "BENALSAM_HEARTBEAT_INTERVAL",
    ),
];

/// The flag and variable of the binaries that set the library's `setting`, if one does.
pub fn flag_of(setting: &str) -> Option<(&'static str, &'static str)> {
    SETTINGS
        .iter()
        .find(|(field, _, _)| *field == setting)
        .map(|(_, flag, variable)| (*flag, *variable))
}

/// `error` as the operator of a binary should read it: a configuration error about a field
/// of the library's settings names the flag and variable that set it instead.
pub fn describe(error: &Error) -> String {
    match error.setting().and_then(flag_of) {
        Some((flag, variable)) => renamed(error, flag, variable),
        None => error.to_string(),
    }
}

/// `error`, a configuration error, with its setting named as `flag` (`variable`).
fn renamed(error: &Error, flag: &str, variable: &str) -> String {
    let text = error.to_string();
    let Some(setting) = error.setting() else {
        return text;
    };
    let named = format!("{flag} ({variable})");
    match text.strip_prefix(&format!("invalid setting {setting}: ")) {
        Some(reason) => format!(
            "invalid setting {named}: {}",
            reason.replace(setting, &named)
        ),
        None => text.replace(setting, &named),
    }
}

/// An error of a binary with the library's settings named as the operator sets them: when a
/// configuration error in its chain is about a field one of the flags sets, the flag and
/// variable are put in front.
pub fn name_the_setting(error: anyhow::Error) -> anyhow::Error {
    let named = error
        .chain()
        .filter_map(|cause| cause.downcast_ref::<Error>())
        .find_map(|e| {
            e.setting()
                .and_then(flag_of)
                .map(|names| (describe(e), names))
        });
    match named {
        Some((described, _)) => error.context(described),
        None => error,
    }
}

/// Parses a duration such as `500ms`, `1s`, `15m`, `1h 30m`; zero is refused (the settings
/// that take it cannot work with zero).
pub fn parse_duration(raw: &str) -> Result<Duration, String> {
    let duration = parse_duration_or_zero(raw)?;
    if duration.is_zero() {
        return Err(format!("{raw:?} is zero; give a duration longer than that"));
    }
    Ok(duration)
}

/// A duration that may be zero (`0s`: the thing it delays happens at once).
fn parse_duration_or_zero(raw: &str) -> Result<Duration, String> {
    humantime::parse_duration(raw)
        .map_err(|e| format!("{raw:?} is not a duration like 500ms, 1s or 15m ({e})"))
}

#[cfg(feature = "bridge")]
/// Where the bridge serves its health endpoints without `BENALSAM_HEALTH_ADDR`.
const BRIDGE_HEALTH_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 3001);
#[cfg(feature = "consumer")]
/// Where the consumer serves its health endpoints without `BENALSAM_HEALTH_ADDR`.
const CONSUMER_HEALTH_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 3002);

/// What the services share: health endpoints, heartbeats, migrations at start, the message
/// size limit.
#[derive(Debug, Clone, Args)]
#[non_exhaustive]
pub struct ServiceArgs {
    /// Address of the health endpoints (and /metrics, /livez, /readyz)
    /// [default: 127.0.0.1:3001 for the bridge, 127.0.0.1:3002 for the consumer]
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

    /// Largest message in bytes: the bridge fails a job whose message would be larger (once,
    /// with the reason), the consumer dead-letters a larger delivery unread. Keep RabbitMQ's
    /// max_message_size at this value: the consumer then holds at most prefetch times it
    #[arg(long, env = "BENALSAM_MAX_MESSAGE_BYTES", default_value_t = benalsam_events::Envelope::DEFAULT_MAX_BYTES as u64,
          value_parser = clap::value_parser!(u64).range(4096..=512 * 1024 * 1024))]
    pub max_message_bytes: u64,
}

/// The queue type, which both binaries read.
#[derive(Debug, Clone, Args)]
#[non_exhaustive]
pub struct QueueTypeArgs {
    /// Queue type: classic, or quorum for replicated queues on a cluster (a queue's type
    /// cannot change: see "Changing the queue type" in docs/topology.md)
    #[arg(long, env = "BENALSAM_QUEUE_TYPE", default_value = "classic",
          value_parser = |s: &str| s.parse::<QueueType>().map_err(|e| e.to_string()))]
    pub queue_type: QueueType,
}

/// The RabbitMQ topology's choices.
#[derive(Debug, Clone, Args)]
#[non_exhaustive]
pub struct TopologyArgs {
    /// The queue type.
    #[command(flatten)]
    pub queue_type: QueueTypeArgs,

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
    /// The topology's choices these flags make.
    pub fn config(&self) -> TopologyConfig {
        let mut config = TopologyConfig::default();
        config.queue_type = self.queue_type.queue_type;
        config.status_queue_max_length = self.status_queue_max_length;
        config.health_queue_max_length = self.health_queue_max_length;
        config
    }

    /// The topology of `event_types` with these choices.
    pub fn topology(&self, event_types: &[EventType]) -> Topology {
        Topology::for_event_types(event_types, &self.config())
    }
}

#[cfg(feature = "bridge")]
/// How the bridge claims and publishes jobs (`benalsam-bridge run`).
#[derive(Debug, Clone, Args)]
#[non_exhaustive]
pub struct BridgeArgs {
    /// Most jobs claimed (and published) per batch
    #[arg(long, env = "BENALSAM_BATCH_SIZE", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub batch_size: u32,

    /// Longest wait between claims without a notification
    #[arg(long, env = "BENALSAM_POLL_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub poll_interval: Duration,

    /// After a notification wakes an idle bridge, wait this long before claiming, so the
    /// changes of that moment go in one claim, publish and settle (0s: claim at once)
    #[arg(long, env = "BENALSAM_CLAIM_LINGER", default_value = "50ms", value_parser = parse_duration_or_zero)]
    pub claim_linger: Duration,

    /// Poll only, no LISTEN (for PgBouncer in transaction mode, or write-heavy databases)
    #[arg(long, env = "BENALSAM_POLL_ONLY")]
    pub poll_only: bool,

    /// While draining a backlog, mark the bridge busy so the triggers of its tables skip
    /// NOTIFY (faster concurrent writes; a change committed as the bridge goes idle may wait
    /// up to the poll interval); false: every change notifies
    #[arg(long, env = "BENALSAM_ADAPTIVE_NOTIFY", default_value_t = true,
          action = clap::ArgAction::Set, value_name = "BOOL",
          value_parser = clap::builder::BoolishValueParser::new())]
    pub adaptive_notify: bool,

    /// How long a claim is exclusive; a dead bridge's jobs are claimable again after it
    #[arg(long, env = "BENALSAM_LEASE", default_value = "60s", value_parser = parse_duration)]
    pub lease: Duration,

    /// Attempts per job before it stays failed
    #[arg(long, env = "BENALSAM_MAX_ATTEMPTS", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub max_attempts: u32,

    /// Wait before the first retry of a failed job (doubling with each failure, jittered)
    #[arg(long, env = "BENALSAM_RETRY_INITIAL", default_value = "1s", value_parser = parse_duration)]
    pub retry_initial: Duration,

    /// Longest wait between retries of a failed job
    #[arg(long, env = "BENALSAM_RETRY_MAX", default_value = "10m", value_parser = parse_duration)]
    pub retry_max: Duration,

    /// Most messages published and not yet confirmed
    #[arg(long, env = "BENALSAM_PUBLISH_WINDOW", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(1..=65_535))]
    pub publish_window: u32,

    /// Most bytes of messages published and not yet confirmed (large rows narrow the window)
    #[arg(long, env = "BENALSAM_PUBLISH_WINDOW_BYTES", default_value_t = 4 * 1024 * 1024,
          value_parser = clap::value_parser!(u32).range(1024..))]
    pub publish_window_bytes: u32,

    /// Send again jobs sent this long ago and never completed
    #[arg(long, env = "BENALSAM_RESEND_AFTER", default_value = "15m", value_parser = parse_duration)]
    pub resend_after: Duration,

    /// Documents per page when a related row's change is fanned out to the documents that
    /// contain it (event types with relations)
    #[arg(long, env = "BENALSAM_FANOUT_PAGE", default_value_t = 500,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub fanout_page: u32,

    /// Health, heartbeats, migrations.
    #[command(flatten)]
    pub service: ServiceArgs,

    /// The RabbitMQ topology.
    #[command(flatten)]
    pub topology: TopologyArgs,
}

#[cfg(feature = "bridge")]
impl BridgeArgs {
    /// The bridge these flags (and the connection settings) make, for `event_types`.
    pub fn settings(
        &self,
        database: &DatabaseArgs,
        rabbitmq: &RabbitArgs,
        event_types: Vec<EventType>,
    ) -> BridgeSettings {
        let mut s =
            BridgeSettings::new(database.database_url.clone(), rabbitmq.rabbitmq_url.clone());
        s.event_types = event_types;
        s.outbox = database.outbox_config();
        s.outbox.lease = self.lease;
        s.outbox.max_attempts = self.max_attempts;
        s.outbox.retry_backoff = benalsam_events::Backoff::new(self.retry_initial, self.retry_max);
        s.outbox.worker_id = format!("benalsam-bridge {}", s.outbox.worker_id);
        let mut stream = JobStreamConfig::default();
        stream.batch_size = self.batch_size as usize;
        stream.poll_interval = self.poll_interval;
        stream.linger = self.claim_linger;
        stream.wake = if self.poll_only {
            Wake::PollOnly
        } else {
            Wake::Listen {
                channel: database.notify_channel.clone(),
            }
        };
        stream.adaptive_notify = self.adaptive_notify;
        s.stream = stream;
        let mut publisher = PublisherConfig::default();
        publisher.window = self.publish_window as usize;
        publisher.window_bytes = self.publish_window_bytes as usize;
        publisher.max_message_bytes =
            usize::try_from(self.service.max_message_bytes).unwrap_or(usize::MAX);
        s.publisher = publisher;
        s.topology = self.topology.config();
        s.resend_after = self.resend_after;
        s.fanout_page = self.fanout_page as usize;
        s.migrate = self.service.migrate;
        s.health_addr = Some(self.service.health_addr.unwrap_or(BRIDGE_HEALTH_ADDR));
        s.health_window = self.service.health_window;
        s.heartbeat_interval = Some(self.service.heartbeat_interval);
        s
    }
}

#[cfg(feature = "consumer")]
fn parse_status(raw: &str) -> Result<String, String> {
    let status = raw.trim();
    if status.is_empty() {
        Err("a status must not be empty (e.g. active,featured)".to_owned())
    } else {
        Ok(status.to_owned())
    }
}

#[cfg(feature = "consumer")]
/// How the consumer takes messages and writes to Elasticsearch (`benalsam-consumer run`).
#[derive(Debug, Clone, Args)]
#[non_exhaustive]
pub struct ConsumerArgs {
    /// Without BENALSAM_CONFIG: alias of the listings index (created as <alias>_v1 when
    /// missing) [default: benalsam_listings]
    #[arg(long, env = "BENALSAM_INDEX",
          value_parser = parse_index)]
    pub index: Option<String>,

    /// Without BENALSAM_CONFIG: replicas of a newly created listings index (0 keeps a single
    /// node green) [default: 0]
    #[arg(long, env = "BENALSAM_INDEX_REPLICAS")]
    pub index_replicas: Option<u32>,

    /// Without BENALSAM_CONFIG: statuses whose listings are searchable, comma-separated;
    /// others are removed from the index [default: active]
    #[arg(long, env = "BENALSAM_SEARCHABLE_STATUSES",
          value_delimiter = ',', num_args = 1.., value_parser = parse_status)]
    pub searchable_statuses: Option<Vec<String>>,

    /// Unacknowledged messages taken at once (basic.qos)
    #[arg(long, env = "BENALSAM_PREFETCH", default_value_t = 500,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub prefetch: u16,

    /// Most actions per bulk request
    #[arg(long, env = "BENALSAM_BULK_SIZE", default_value_t = 250,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub bulk_size: u32,

    /// Most bytes per bulk request
    #[arg(long, env = "BENALSAM_BULK_BYTES", default_value_t = 5 * 1024 * 1024,
          value_parser = clap::value_parser!(u32).range(1024..))]
    pub bulk_bytes: u32,

    /// Longest wait for a bulk request to fill
    #[arg(long, env = "BENALSAM_BULK_LINGER", default_value = "100ms", value_parser = parse_duration)]
    pub bulk_linger: Duration,

    /// Bulk requests written and settled at once
    #[arg(long, env = "BENALSAM_BULK_IN_FLIGHT", default_value_t = 2,
          value_parser = clap::value_parser!(u32).range(1..=64))]
    pub bulk_in_flight: u32,

    /// Answer time a bulk request should stay under: slower answers shrink the next
    /// requests (to 10 actions at least), quick ones grow them back to --bulk-size
    #[arg(long, env = "BENALSAM_BULK_TARGET", default_value = "1s", value_parser = parse_duration)]
    pub bulk_target: Duration,

    /// Attempts of a document Elasticsearch refuses as busy before it is dead-lettered
    #[arg(long, env = "BENALSAM_INDEX_ATTEMPTS", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(1..=100))]
    pub index_attempts: u32,

    /// Timeout of one request to Elasticsearch
    #[arg(long, env = "BENALSAM_SEARCH_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub search_timeout: Duration,

    /// The queue type the bridge declares (reported in the health details).
    #[command(flatten)]
    pub queue_type: QueueTypeArgs,

    /// Health, heartbeats, migrations.
    #[command(flatten)]
    pub service: ServiceArgs,
}

#[cfg(feature = "consumer")]
impl ConsumerArgs {
    /// The consumer these flags (and the connection settings) make, for the event types of
    /// `config`.
    pub fn settings(
        &self,
        database: &DatabaseArgs,
        rabbitmq: &RabbitArgs,
        search: &SearchArgs,
        config: &ConfigArgs,
    ) -> benalsam_events::Result<ConsumerSettings> {
        let mut s = ConsumerSettings::new(
            database.database_url.clone(),
            rabbitmq.rabbitmq_url.clone(),
            search.search_url(),
        );
        s.outbox = database.outbox_config();
        s.search_timeout = self.search_timeout;
        s.event_types = self.event_types(config)?;
        let mut indexer = IndexerConfig::default();
        indexer.prefetch = self.prefetch;
        indexer.batch_size = self.bulk_size as usize;
        indexer.batch_bytes = self.bulk_bytes as usize;
        indexer.linger = self.bulk_linger;
        indexer.in_flight = self.bulk_in_flight as usize;
        indexer.bulk_target = self.bulk_target;
        indexer.max_attempts = self.index_attempts;
        indexer.max_message_bytes =
            usize::try_from(self.service.max_message_bytes).unwrap_or(usize::MAX);
        s.indexer = indexer;
        s.queue_type = self.queue_type.queue_type;
        s.migrate = self.service.migrate;
        s.health_addr = Some(self.service.health_addr.unwrap_or(CONSUMER_HEALTH_ADDR));
        s.health_window = self.service.health_window;
        s.heartbeat_interval = Some(self.service.heartbeat_interval);
        Ok(s)
    }

    /// The event types: the file's, or the listings with the settings above.
    pub fn event_types(&self, config: &ConfigArgs) -> benalsam_events::Result<Vec<EventType>> {
        if config.config.is_some() {
            let given = [
                ("BENALSAM_INDEX", self.index.is_some()),
                ("BENALSAM_INDEX_REPLICAS", self.index_replicas.is_some()),
                (
                    "BENALSAM_SEARCHABLE_STATUSES",
                    self.searchable_statuses.is_some(),
                ),
            ];
            if let Some((setting, _)) = given.iter().find(|(_, set)| *set) {
                return Err(Error::config(
                    *setting,
                    "applies to the built-in listings only; with BENALSAM_CONFIG, set it in the file",
                ));
            }
            return config.event_types();
        }
        let mut listings = EventType::listings();
        if let Some(alias) = &self.index {
            alias.clone_into(&mut listings.index.alias);
        }
        if let Some(replicas) = self.index_replicas {
            listings.index.replicas = replicas;
        }
        if let Some(statuses) = &self.searchable_statuses {
            listings.document.searchable_statuses = Some(statuses.clone());
        }
        Ok(vec![listings])
    }
}

/// Progress of a long operator command, for a person: on a terminal one line rewritten in
/// place, otherwise (a log) a line at most every five seconds and one at the end; both with
/// the share done, the rate and the time left.
#[derive(Debug)]
pub struct Progress {
    what: String,
    unit: &'static str,
    started: std::time::Instant,
    /// What was done before this run (a resumed backfill), so the rate is this run's.
    first: Option<u64>,
    last_line: Option<std::time::Instant>,
    terminal: bool,
}

impl Progress {
    /// Progress of `what` (e.g. `listings`), counted in `unit` (e.g. `rows`), on stderr.
    pub fn new(what: &str, unit: &'static str) -> Self {
        use std::io::IsTerminal;
        Self {
            what: what.to_owned(),
            unit,
            started: std::time::Instant::now(),
            first: None,
            last_line: None,
            terminal: std::io::stderr().is_terminal(),
        }
    }

    /// Shows that `done` of `total` are done.
    pub fn update(&mut self, done: u64, total: u64) {
        let first = *self.first.get_or_insert(done);
        let finished = done >= total;
        let rate =
            done.saturating_sub(first) as f64 / self.started.elapsed().as_secs_f64().max(0.001);
        let share = if total > 0 {
            100.0 * done as f64 / total as f64
        } else {
            100.0
        };
        let left = total.saturating_sub(done) as f64;
        let eta = if rate > 0.0 && !finished {
            let secs = Duration::from_secs((left / rate).ceil() as u64);
            format!(", about {} left", humantime::format_duration(secs))
        } else {
            String::new()
        };
        let line = format!(
            "{}: {done}/{total} {} ({share:.0}%), {rate:.0} {}/s{eta}",
            self.what, self.unit, self.unit
        );
        if self.terminal {
            eprint!("\r\x1b[2K{line}");
        } else if finished
            || self
                .last_line
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(5))
        {
            eprintln!("{line}");
            self.last_line = Some(std::time::Instant::now());
        }
    }

    /// Ends the line on a terminal.
    pub fn finish(&self) {
        if self.terminal {
            eprintln!();
        }
    }
}

/// Parses a binary's command line, like [`clap::Parser::parse`], with the secrets' `*_FILE`
/// variables ([`parse_with_secret_files`]), saying where a misplaced setting
/// belongs.
///
/// The settings of running a service belong to its `run` subcommand, so
/// `benalsam-bridge --migrate` is refused like any unknown flag; instead of clap's bare
/// "unexpected argument", the error then names the subcommand and shows the corrected form
/// (`benalsam-bridge [OPTIONS] run --migrate …`). The corrected form is built from the
/// definition, not from the command line given, so no value typed there (a URL with its
/// password) is echoed.
pub fn parse<C: clap::Parser>() -> C {
    parse_from(std::env::args_os()).unwrap_or_else(|error| error.exit())
}

/// [`parse`] over the given arguments (the first is the program's name).
pub fn parse_from<C, I, T>(args: I) -> Result<C, clap::Error>
where
    C: clap::Parser,
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    try_parse_with_secret_files::<C, _, _>(args)
        .map_err(|error| misplaced::<C>(&error).unwrap_or(error))
}

/// The error for a setting of `run` given where it does not belong, if `error` is one.
fn misplaced<C: clap::CommandFactory>(error: &clap::Error) -> Option<clap::Error> {
    use clap::error::{ContextKind, ContextValue};
    if error.kind() != ErrorKind::UnknownArgument {
        return None;
    }
    let Some(ContextValue::String(given)) = error.get(ContextKind::InvalidArg) else {
        return None;
    };
    let flag = given.split('=').next()?.strip_prefix("--")?;
    let mut command = C::command();
    command.build();
    let name = command.get_name().to_owned();
    let run = command.find_subcommand("run")?;
    let arg = run.get_arguments().find(|a| a.get_long() == Some(flag))?;
    let value = arg
        .get_value_names()
        .filter(|_| arg.get_action().takes_values())
        .map(|names| format!(" <{}>", names.join("> <")))
        .unwrap_or_default();
    Some(command.error(
        ErrorKind::UnknownArgument,
        format!(
            "`--{flag}` is a setting of `run`, which takes it after the subcommand:\n\n    {name} [OPTIONS] run --{flag}{value} …\n\n(without a subcommand, `run` runs with its settings from the environment: {env})",
            env = arg
                .get_env()
                .map(|v| v.to_string_lossy().into_owned())
                .unwrap_or_else(|| "none for this one".into()),
        ),
    ))
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

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Search {
        #[command(flatten)]
        search: SearchArgs,
    }

    #[test]
    fn a_library_setting_is_named_as_the_operator_sets_it() {
        let mut config = OutboxConfig::default();
        config.lease = Duration::ZERO;
        let error = config.validate().expect_err("a zero lease");
        assert_eq!(error.setting(), Some("OutboxConfig::lease"));
        let text = describe(&error);
        assert!(text.contains("--lease (BENALSAM_LEASE)"), "{text}");
        assert!(!text.contains("OutboxConfig"), "{text}");
        let named = name_the_setting(anyhow::Error::new(error).context("running the bridge"));
        let shown = format!("{named:?}");
        assert!(shown.contains("BENALSAM_LEASE"), "{shown}");
    }

    #[test]
    fn the_search_tls_files_go_into_the_url() {
        let parsed = Search::try_parse_from([
            "test",
            "--elasticsearch-url=https://es.internal:9200",
            "--elasticsearch-ca=/etc/pki/ca.pem",
            "--elasticsearch-client-cert=/etc/pki/client.pem",
            "--elasticsearch-client-key=/etc/pki/client-key.pem",
        ])
        .expect("valid flags");
        let expected = "https://es.internal:9200"
            .parse::<SearchUrl>()
            .expect("valid url")
            .with_ca("/etc/pki/ca.pem")
            .with_client_certificate("/etc/pki/client.pem", "/etc/pki/client-key.pem");
        assert_eq!(parsed.search.search_url(), expected);
        assert!(format!("{expected:?}").contains("/etc/pki/ca.pem"));
    }

    #[test]
    fn a_list_of_search_nodes_takes_the_tls_files_for_each() {
        let parsed = Search::try_parse_from([
            "test",
            "--elasticsearch-url=https://u:s3cret@es1:9200,https://u:s3cret@es2:9200",
            "--elasticsearch-ca=/etc/pki/ca.pem",
        ])
        .expect("valid flags");
        let nodes = parsed.search.search_url().addresses();
        assert_eq!(nodes.len(), 2);
        for node in &nodes {
            let debug = format!("{node:?}");
            assert!(debug.contains("/etc/pki/ca.pem"), "{debug}");
            assert!(!debug.contains("s3cret"), "{debug}");
        }
        let error = Search::try_parse_from([
            "test",
            "--elasticsearch-url=https://u:s3cret@es1:9200,http://u:s3cret@es2:9200",
        ])
        .expect_err("TLS for one node only");
        let text = error.to_string();
        assert!(text.contains("same scheme"), "{text}");
        assert!(!text.contains("s3cret"), "{text}");
    }

    #[test]
    fn a_client_certificate_needs_its_key_and_the_other_way_round() {
        for flag in [
            "--elasticsearch-client-cert=/c.pem",
            "--elasticsearch-client-key=/k.pem",
        ] {
            let error = Search::try_parse_from(["test", flag]).expect_err(flag);
            assert_eq!(error.kind(), ErrorKind::MissingRequiredArgument, "{flag}");
        }
    }
}
