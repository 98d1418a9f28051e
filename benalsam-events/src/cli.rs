//! Command-line and environment settings shared by the binaries (feature `cli`).
//!
//! Each group is a `clap::Args` to `#[command(flatten)]` into a binary's parser. Values are
//! parsed into the validated types of [`crate::config`], so a bad value stops start-up with
//! clap's message naming the flag and the library's naming the variable. Defaults point at
//! the local stack of `scripts/stack`. Help never prints a password: environment values are
//! hidden and defaults are shown redacted.

use clap::Args;

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
        hide_env_values = true
    )]
    pub elasticsearch_url: SearchUrl,
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

/// Installs the log output of the binaries: text on stderr, filtered by `RUST_LOG`
/// (default `info`).
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
}
