//! The bridge and the consumer inside one tokio service of your own.
//!
//! # When to copy this
//!
//! Copy it when you would rather not run `benalsam-bridge` and `benalsam-consumer` as two
//! processes: a small deployment, a service that already owns the database and wants search
//! sync as part of itself, or a test environment. Everything the binaries do is here in
//! library calls: migrations, the RabbitMQ topology, the search index, the job stream
//! forwarded into the publisher, and the indexer. Add your own health server or metrics
//! around the `status()` handles.
//!
//! ```text
//! scripts/stack up
//! cargo run --example embedded      # Ctrl-C to stop
//! ```

use std::time::Duration;

use benalsam_events::config::{
    AmqpUrl, DEFAULT_DATABASE_URL, DEFAULT_ELASTICSEARCH_URL, DEFAULT_RABBITMQ_URL, DatabaseUrl,
    SearchUrl,
};
use benalsam_events::document::{Documents, ListingDocuments};
use benalsam_events::routing::Routes;
use benalsam_events::search::{self, IndexConfig};
use benalsam_events::topology::{Topology, TopologyConfig};
use benalsam_events::{
    Indexer, IndexerConfig, JobStream, JobStreamConfig, Outbox, OutboxConfig, Publisher,
    PublisherConfig, amqp, migrate, postgres,
};
use futures::StreamExt;
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
            database_url: DatabaseUrl::from_env_or(DEFAULT_DATABASE_URL)?,
            schema: std::env::var("BENALSAM_SCHEMA").unwrap_or_else(|_| "public".to_owned()),
            rabbitmq_url: AmqpUrl::from_env_or(DEFAULT_RABBITMQ_URL)?,
            elasticsearch_url: SearchUrl::from_env_or(DEFAULT_ELASTICSEARCH_URL)?,
            index: std::env::var("BENALSAM_INDEX")
                .unwrap_or_else(|_| "benalsam_listings".to_owned()),
        })
    }
}

/// Runs the bridge and the consumer until `shutdown` is cancelled, then lets both finish
/// what they hold.
pub async fn run(
    settings: Settings,
    shutdown: CancellationToken,
) -> Result<(), benalsam_events::Error> {
    // Schema, topology and index: each idempotent, so every start may do them.
    let mut client = postgres::connect(&settings.database_url).await?;
    migrate::migrate(&mut client, &settings.schema).await?;
    let connection = amqp::connect(&settings.rabbitmq_url, "embedded topology").await?;
    Topology::benalsam(&TopologyConfig::default())
        .declare(&connection)
        .await?;
    let search = search::client(&settings.elasticsearch_url, Duration::from_secs(30))?;
    let index = IndexConfig {
        alias: settings.index.clone(),
        ..IndexConfig::default()
    };
    search::ensure_index(&search, &index, &search::listings_index_body(&index)).await?;

    let outbox = Outbox::new(
        settings.database_url.clone(),
        OutboxConfig {
            schema: settings.schema.clone(),
            ..OutboxConfig::default()
        },
    )?;

    // The bridge: claimed jobs, one at a time, into the publisher (confirms, then `sent`).
    let jobs = JobStream::new(outbox.clone(), JobStreamConfig::default(), shutdown.clone())?;
    let publisher = Publisher::new(
        settings.rabbitmq_url.clone(),
        outbox.clone(),
        Routes::default(),
        PublisherConfig {
            app_id: "embedded".to_owned(),
            ..PublisherConfig::default()
        },
    );
    let bridge = tokio::spawn(
        jobs.flat_map(futures::stream::iter)
            .map(Ok)
            .forward(publisher),
    );

    // The consumer: elasticsearch.sync into bulk requests, jobs `completed`.
    let documents = Documents::new().with("listings", ListingDocuments::new(&settings.index));
    let indexer = Indexer::new(
        settings.rabbitmq_url,
        search,
        outbox,
        documents,
        IndexerConfig::default(),
    );
    let consumer = tokio::spawn(indexer.run(shutdown));

    let (bridge, consumer) = tokio::join!(bridge, consumer);
    let _ = connection.close(200, "bye".into()).await;
    consumer.map_err(|_| benalsam_events::Error::Stopped {
        what: "the consumer",
    })?;
    bridge.map_err(|_| benalsam_events::Error::Stopped { what: "the bridge" })?
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
