//! The bridge and the consumer inside one tokio service of your own.
//!
//! # When to copy this
//!
//! Copy it when you would rather not run `benalsam-bridge` and `benalsam-consumer` as two
//! processes: a small deployment, a service that already owns the database and wants search
//! sync as part of itself, or a test environment. Everything the binaries do is here in
//! library calls: `bridge::run` and `consumer::run` are the two services, and their settings
//! are what the binaries' flags fill in. For finer control, compose the parts they are made
//! of (`JobStream`, `Publisher`, `Indexer`) as `custom_sink.rs` does.
//!
//! ```text
//! scripts/stack up
//! cargo run --example embedded      # Ctrl-C to stop
//! ```

use benalsam_events::bridge::{self, BridgeSettings};
use benalsam_events::consumer::{self, ConsumerSettings};
use benalsam_events::{AmqpUrl, DatabaseUrl, EventType, OutboxConfig, SearchUrl};
use tokio_util::sync::CancellationToken;

/// Where everything is.
#[derive(Debug, Clone)]
pub struct Settings {
    pub database_url: DatabaseUrl,
    pub schema: String,
    pub rabbitmq_url: AmqpUrl,
    pub elasticsearch_url: SearchUrl,
    pub index: String,
}

impl Settings {
    /// From the usual environment variables, with the local stack as default.
    pub fn from_env() -> Result<Self, benalsam_events::Error> {
        Ok(Self {
            database_url: DatabaseUrl::from_env()?,
            schema: std::env::var("BENALSAM_SCHEMA").unwrap_or_else(|_| "public".to_owned()),
            rabbitmq_url: AmqpUrl::from_env()?,
            elasticsearch_url: SearchUrl::from_env()?,
            index: std::env::var("BENALSAM_INDEX")
                .unwrap_or_else(|_| "benalsam_listings".to_owned()),
        })
    }
}

/// Runs the bridge and the consumer until `shutdown` is cancelled, then lets both finish
/// what they hold. Each does what its binary does: migrations and the trigger, topology,
/// index, the job stream into the publisher, the indexer, heartbeats. Give them a
/// `health_addr` to serve the health endpoints and /metrics as well. The event types are
/// the listings here; add your own to both lists (see `custom_document.rs`).
pub async fn run(
    settings: Settings,
    shutdown: CancellationToken,
) -> Result<(), benalsam_events::Error> {
    let mut listings = EventType::listings();
    listings.index.alias = settings.index;

    let mut bridge =
        BridgeSettings::new(settings.database_url.clone(), settings.rabbitmq_url.clone());
    bridge.outbox = OutboxConfig::in_schema(&settings.schema);
    bridge.event_types = vec![listings.clone()];
    bridge.migrate = true;

    let mut consumer = ConsumerSettings::new(
        settings.database_url,
        settings.rabbitmq_url,
        settings.elasticsearch_url,
    );
    consumer.outbox = OutboxConfig::in_schema(&settings.schema);
    consumer.event_types = vec![listings];

    let (bridge, consumer) = tokio::join!(
        bridge::run(bridge, shutdown.clone()),
        consumer::run(consumer, shutdown)
    );
    bridge.and(consumer)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let settings = Settings::from_env()?;
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        stop.cancel();
    });
    println!("bridge and consumer running in one process; Ctrl-C stops them");
    run(settings, shutdown).await?;
    Ok(())
}
