//! The consumer as a service: change messages into Elasticsearch.
//!
//! [`run`] is everything `benalsam-consumer` does: health endpoints up from the first
//! moment, migrations (when asked), its queues waited for (the bridge declares them) and its
//! event types' indexes prepared, then the [`Indexer`] until shutdown, with a heartbeat
//! beside it.
//!
//! Its health verdicts judge progress: unhealthy
//! while the circuit is open, while outcomes cannot be recorded in PostgreSQL, or while
//! messages wait and none was acked within the window.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::config::{AmqpUrl, DatabaseUrl, SearchUrl, require_positive};
use crate::consume::{Indexer, IndexerConfig, IndexerStatus};
use crate::ops::{HealthReport, Live};
use crate::outbox::{Outbox, OutboxConfig};
use crate::search::{SearchNodes, ensure_index_on};
use crate::service::Heartbeat;
use crate::service::{Check, Service, check};
use crate::{error::Result, event_type::EventType};

mod health;

use health::{elasticsearch_report, rabbitmq_report};

/// Everything [`run`] needs.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ConsumerSettings {
    /// The database holding the outbox.
    pub database_url: DatabaseUrl,
    /// The broker.
    pub rabbitmq_url: AmqpUrl,
    /// The search engine: one node, or several of one cluster (requests go to one, and
    /// move to the next when it fails).
    pub search_url: SearchUrl,
    /// Timeout of one request to it.
    pub search_timeout: Duration,
    /// The outbox the outcomes are recorded in (its schema).
    pub outbox: OutboxConfig,
    /// Consuming and writing.
    pub indexer: IndexerConfig,
    /// The event types whose queues it consumes, each into its own index (prepared at
    /// start). The bridge declares the topology; the consumer waits for its queues.
    pub event_types: Vec<EventType>,
    /// The type of the queues it consumes (`BENALSAM_QUEUE_TYPE`), as the bridge declares
    /// them. The consumer declares nothing and AMQP tells a client without the right to
    /// declare nothing about a queue's type, so this is reported (health details,
    /// `queueType`, and the start-up log), not checked: the bridge's declare is the check.
    pub queue_type: crate::config::QueueType,
    /// Apply the database migrations before starting.
    pub migrate: bool,
    /// Where the health endpoints listen; `None` for none.
    pub health_addr: Option<SocketAddr>,
    /// How long messages may wait unacked before the consumer is unhealthy.
    pub health_window: Duration,
    /// How often a heartbeat goes to `benalsam.system`; `None` for none.
    pub heartbeat_interval: Option<Duration>,
}

impl ConsumerSettings {
    /// The defaults, for the listings of the architecture document, against these services.
    pub fn new(database_url: DatabaseUrl, rabbitmq_url: AmqpUrl, search_url: SearchUrl) -> Self {
        Self {
            database_url,
            rabbitmq_url,
            search_url,
            search_timeout: Duration::from_secs(30),
            outbox: OutboxConfig::default(),
            indexer: IndexerConfig::default(),
            event_types: vec![EventType::listings()],
            queue_type: crate::config::QueueType::default(),
            migrate: false,
            health_addr: None,
            health_window: Duration::from_secs(30),
            heartbeat_interval: Some(Duration::from_secs(30)),
        }
    }

    fn validate(&self) -> Result<()> {
        crate::service::validate(
            "consumer",
            &self.event_types,
            self.health_window,
            self.heartbeat_interval,
        )?;
        require_positive("ConsumerSettings::search_timeout", self.search_timeout)?;
        Ok(())
    }
}

/// Runs the consumer until `shutdown` is cancelled; the batches in hand are finished,
/// recorded and acked first.
pub async fn run(settings: ConsumerSettings, shutdown: CancellationToken) -> Result<()> {
    settings.validate()?;
    crate::connect::log_transports(
        &settings.database_url,
        &settings.rabbitmq_url,
        Some(&settings.search_url),
    );
    let mut service = Service::new("benalsam-consumer", &shutdown);
    let monitor: Arc<OnceLock<ConsumerMonitor>> = Arc::default();
    let search = SearchNodes::new(&settings.search_url, settings.search_timeout)?;
    // Built first, so /metrics lists every family from its first answer on.
    let outbox = Outbox::new(settings.database_url.clone(), settings.outbox.clone())?;
    let indexer = Indexer::new(
        settings.rabbitmq_url.clone(),
        search.clone(),
        outbox,
        settings.event_types.clone(),
        settings.indexer.clone(),
    )?
    .with_metrics(&service.metrics);
    service
        .serve_health("benalsam-consumer", settings.health_addr, checks(&monitor))
        .await?;
    let Some(needs_reindex) = prepare(&settings, &service, &search, &shutdown).await? else {
        return Ok(());
    };
    // Shown in the health answer (a fact, not a failure: indexing goes on).
    indexer.reindex_needed(needs_reindex);
    let consumer = ConsumerMonitor {
        indexer: indexer.status(),
        window: settings.health_window,
        search: settings.search_url.redacted(),
        broker: settings.rabbitmq_url.redacted(),
        queue_type: settings.queue_type,
        started: SystemTime::now(),
    };
    if let Some(interval) = settings.heartbeat_interval {
        let beat = consumer.clone();
        let heartbeat = Heartbeat::new(
            settings.rabbitmq_url.clone(),
            "consumer",
            interval,
            move || beat.elasticsearch(),
        )?;
        service.spawn(heartbeat.run(service.background()));
    }
    let _ = monitor.set(consumer);
    service.readiness.ready();
    tracing::info!("consumer running");
    indexer.run(shutdown).await;
    service.stop().await;
    tracing::info!("consumer stopped");
    Ok(())
}

/// The start-up steps: migrations when asked, the queues (declared by the bridge: waited
/// for), the indexes (on the first search node that answers, which the indexer then starts
/// with). Returns what needs a reindex (`<event type>: <change>`); `None` when shutdown came
/// first.
async fn prepare(
    settings: &ConsumerSettings,
    service: &Service,
    search: &SearchNodes,
    shutdown: &CancellationToken,
) -> Result<Option<Vec<String>>> {
    // The consumer attaches no trigger: the bridge's migration does.
    let migrate = settings.migrate.then_some(&[][..]);
    let checked = service
        .check_database(
            &settings.database_url,
            &settings.outbox,
            migrate,
            &settings.event_types,
            shutdown,
        )
        .await?;
    if !checked {
        return Ok(None);
    }
    let queues: Vec<&str> = settings
        .event_types
        .iter()
        .map(|t| t.queue.as_str())
        .collect();
    let found = service
        .step(
            "waiting for the queues (benalsam-bridge declares them)",
            shutdown,
            || queues_exist(&settings.rabbitmq_url, &queues),
        )
        .await?;
    if found.is_none() {
        return Ok(None);
    }
    let mut needs_reindex = Vec::new();
    for event_type in &settings.event_types {
        let step = format!("preparing the search index {}", event_type.index.alias);
        let prepared = service
            .step(&step, shutdown, || ensure_index_on(search, event_type))
            .await?;
        let Some(report) = prepared else {
            return Ok(None);
        };
        if !report.needs_reindex.is_empty() {
            let name = &event_type.name;
            tracing::warn!(
                event_type = %name,
                alias = %event_type.index.alias,
                changes = ?report.needs_reindex,
                "the live index cannot take these changes of the event type file in place; \
                 indexing goes on with its current mapping until you run \
                 `benalsam-consumer reindex --type {name}` (zero downtime, see docs/schema-changes.md)"
            );
            needs_reindex.extend(report.needs_reindex.iter().map(|c| format!("{name}: {c}")));
        }
    }
    Ok(Some(needs_reindex))
}

/// Whether every queue exists (asked passively, each on a channel of its own: the broker
/// closes a channel that asks about a missing queue). A missing one is an error worth
/// retrying: the bridge declares the topology when it starts.
async fn queues_exist(url: &crate::config::AmqpUrl, queues: &[&str]) -> Result<()> {
    let connection = crate::connect::amqp(url, "benalsam-consumer start").await?;
    let mut missing = Vec::new();
    for queue in queues {
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| crate::error::Error::amqp("opening a channel", e))?;
        let declared = channel
            .queue_declare(
                (*queue).into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                lapin::types::FieldTable::default(),
            )
            .await;
        if declared.is_err() {
            missing.push(*queue);
        } else {
            let _ = channel.close(200, "checked".into()).await;
        }
    }
    let _ = connection.close(200, "checked".into()).await;
    if missing.is_empty() {
        Ok(())
    } else {
        Err(crate::error::Error::broker(format!(
            "queue {} does not exist yet; benalsam-bridge declares the topology when it starts",
            missing.join(", ")
        )))
    }
}

fn checks(monitor: &Arc<OnceLock<ConsumerMonitor>>) -> Vec<Check> {
    vec![
        check(
            "/api/v1/health/elasticsearch-service",
            monitor,
            ConsumerMonitor::elasticsearch,
        ),
        check(
            "/api/v1/health/rabbitmq",
            monitor,
            ConsumerMonitor::rabbitmq,
        ),
    ]
}

/// What the consumer's health endpoints look at.
#[derive(Debug, Clone)]
struct ConsumerMonitor {
    indexer: Live<IndexerStatus>,
    window: Duration,
    search: String,
    broker: String,
    queue_type: crate::config::QueueType,
    /// When the consumer started: a stall is judged from then until its first ack.
    started: SystemTime,
}

impl ConsumerMonitor {
    fn elasticsearch(&self) -> HealthReport {
        elasticsearch_report(
            &self.indexer.snapshot(),
            self.window,
            &self.search,
            SystemTime::now(),
            self.started,
        )
    }

    fn rabbitmq(&self) -> HealthReport {
        let mut report = rabbitmq_report(&self.indexer.snapshot(), &self.broker);
        report.details["queueType"] = json!(self.queue_type.as_str());
        report
    }
}
