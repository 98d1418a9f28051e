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

use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::config::{AmqpUrl, DatabaseUrl, SearchUrl, require_positive};
use crate::consume::{Indexer, IndexerConfig, IndexerStatus};
use crate::ops::{HealthReport, Live, rfc3339, since};
use crate::outbox::{Outbox, OutboxConfig};
use crate::search::{SearchNodes, ensure_index_on};
use crate::service::Heartbeat;
use crate::service::{Check, Service, check};
use crate::{EventType, Result};

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
    if !prepare(&settings, &service, &search, &shutdown).await? {
        return Ok(());
    }
    let consumer = ConsumerMonitor {
        indexer: indexer.status(),
        window: settings.health_window,
        search: settings.search_url.redacted(),
        broker: settings.rabbitmq_url.redacted(),
        queue_type: settings.queue_type,
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
/// with). False when shutdown came first.
async fn prepare(
    settings: &ConsumerSettings,
    service: &Service,
    search: &SearchNodes,
    shutdown: &CancellationToken,
) -> Result<bool> {
    if settings.migrate {
        let migrated = service
            .step("migrating the database", shutdown, || async {
                let mut client = crate::connect::postgres(&settings.database_url).await?;
                crate::outbox::migrate(&mut client, &settings.outbox, &[]).await
            })
            .await?;
        if migrated.is_none() {
            return Ok(false);
        }
    }
    if settings.event_types.iter().any(EventType::is_joined) {
        let checked = service
            .step(
                "checking the relations against the database",
                shutdown,
                || async {
                    let client =
                        crate::connect::postgres_as(&settings.database_url, "benalsam-check")
                            .await?;
                    crate::outbox::check_catalog(
                        &client,
                        &settings.outbox.schema,
                        &settings.event_types,
                    )
                    .await
                },
            )
            .await?;
        if checked.is_none() {
            return Ok(false);
        }
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
        return Ok(false);
    }
    for event_type in &settings.event_types {
        let step = format!("preparing the search index {}", event_type.index.alias);
        let prepared = service
            .step(&step, shutdown, || ensure_index_on(search, event_type))
            .await?;
        if prepared.is_none() {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Whether every queue exists (asked passively, each on a channel of its own: the broker
/// closes a channel that asks about a missing queue). A missing one is an error worth
/// retrying: the bridge declares the topology when it starts.
async fn queues_exist(url: &crate::AmqpUrl, queues: &[&str]) -> Result<()> {
    let connection = crate::connect::amqp(url, "benalsam-consumer start").await?;
    let mut missing = Vec::new();
    for queue in queues {
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| crate::Error::amqp("opening a channel", e))?;
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
        Err(crate::Error::broker(format!(
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
}

impl ConsumerMonitor {
    fn elasticsearch(&self) -> HealthReport {
        elasticsearch_report(
            &self.indexer.snapshot(),
            self.window,
            &self.search,
            SystemTime::now(),
        )
    }

    fn rabbitmq(&self) -> HealthReport {
        let mut report = rabbitmq_report(&self.indexer.snapshot(), &self.broker);
        report.details["queueType"] = json!(self.queue_type.as_str());
        report
    }
}

fn details(s: &IndexerStatus) -> Value {
    json!({
        "circuit": if s.circuit_open_since.is_some() { "open" } else { "closed" },
        "circuitOpenSince": rfc3339(s.circuit_open_since),
        "consecutiveFailures": s.circuit_failures,
        "lastBulkAt": rfc3339(s.last_bulk_at),
        "lastBulkItems": s.last_bulk_items,
        "lastBulkMillis": s.last_bulk_duration.map(|d| d.as_millis() as u64),
        "bulkLimit": s.bulk_limit,
        "lastAckAt": rfc3339(s.last_ack_at),
        "bulkRequests": s.bulk_requests,
        "received": s.received,
        "acked": s.acked,
        "indexed": s.indexed,
        "deleted": s.deleted,
        "superseded": s.superseded,
        "retried": s.retried,
        "deadLettered": s.dead_lettered,
        "queueDepth": s.queue_depth,
        "dlqDepth": s.dlq_depth,
        "outboxFailingSince": rfc3339(s.outbox_failing.as_ref().map(|(at, _)| *at)),
        "errors": s.errors,
        "lastError": s.last_error.as_ref().map(|(_, e)| e),
    })
}

/// The Elasticsearch verdict: unhealthy while the circuit is open, while outcomes cannot be
/// recorded in PostgreSQL, or while messages wait and none was acked within `window`.
fn elasticsearch_report(
    s: &IndexerStatus,
    window: Duration,
    search: &str,
    now: SystemTime,
) -> HealthReport {
    let mut problems = Vec::new();
    if s.circuit_open_since.is_some() {
        problems.push(format!(
            "circuit open after {} failed attempts on {search}: {}",
            s.circuit_failures,
            s.last_error
                .as_ref()
                .map_or("unavailable", |(_, e)| e.as_str())
        ));
    }
    if let Some((since_at, why)) = &s.outbox_failing {
        problems.push(format!(
            "cannot record outcomes in PostgreSQL for {}s (acks held back): {why}",
            since(now, *since_at).as_secs()
        ));
    }
    let acked_recently = s.last_ack_at.is_some_and(|t| since(now, t) <= window);
    if s.queue_depth.unwrap_or(0) > 0 && !acked_recently && s.circuit_open_since.is_none() {
        problems.push(format!(
            "{} messages wait but none was acked for over {}s: the consumer is stalled",
            s.queue_depth.unwrap_or(0),
            window.as_secs()
        ));
    }
    let healthy = problems.is_empty();
    let message = if healthy {
        // Of a list of nodes, the one in use.
        format!(
            "indexing into {}",
            s.search_node.as_deref().unwrap_or(search)
        )
    } else {
        problems.join("; ")
    };
    let mut details = details(s);
    details["search"] = json!(search);
    details["searchNodeInUse"] = json!(s.search_node);
    HealthReport::new("elasticsearch-service", healthy, message, details)
}

/// The RabbitMQ verdict: healthy while the consumer holds its channel.
fn rabbitmq_report(s: &IndexerStatus, broker: &str) -> HealthReport {
    let message = if s.connected {
        // Of a list of brokers, the one in use.
        format!("consuming from {}", s.broker.as_deref().unwrap_or(broker))
    } else {
        format!(
            "not connected to {broker}{}",
            s.last_error
                .as_ref()
                .map(|(_, e)| format!(": {e}"))
                .unwrap_or_default()
        )
    };
    let mut details = details(s);
    details["broker"] = json!(broker);
    details["brokerInUse"] = json!(s.broker);
    details["connected"] = json!(s.connected);
    HealthReport::new("rabbitmq", s.connected, message, details)
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(30);

    #[test]
    fn an_open_circuit_is_unhealthy_and_says_why() {
        let s = IndexerStatus {
            circuit_open_since: Some(SystemTime::now()),
            circuit_failures: 3,
            last_error: Some((SystemTime::now(), "connection refused".into())),
            ..IndexerStatus::default()
        };
        let r = elasticsearch_report(&s, WINDOW, "http://es:9200", SystemTime::now());
        assert!(!r.healthy);
        assert!(r.message.contains("connection refused"), "{}", r.message);
        assert_eq!(r.details["circuit"], "open");
    }

    #[test]
    fn waiting_messages_without_acks_are_a_stall() {
        let now = SystemTime::now();
        let mut s = IndexerStatus {
            queue_depth: Some(40),
            last_ack_at: Some(now - Duration::from_secs(300)),
            ..IndexerStatus::default()
        };
        assert!(!elasticsearch_report(&s, WINDOW, "es", now).healthy);
        s.last_ack_at = Some(now);
        assert!(elasticsearch_report(&s, WINDOW, "es", now).healthy);
        s.queue_depth = Some(0);
        s.last_ack_at = None;
        assert!(elasticsearch_report(&s, WINDOW, "es", now).healthy);
    }

    #[test]
    fn an_unreachable_outbox_is_unhealthy() {
        let now = SystemTime::now();
        let s = IndexerStatus {
            outbox_failing: Some((now - Duration::from_secs(12), "connection refused".into())),
            ..IndexerStatus::default()
        };
        let r = elasticsearch_report(&s, WINDOW, "es", now);
        assert!(!r.healthy);
        assert!(r.message.contains("PostgreSQL for 12s"), "{}", r.message);
    }

    #[test]
    fn of_several_brokers_health_names_the_one_in_use() {
        let s = IndexerStatus {
            connected: true,
            broker: Some("amqp://u:***@mq2/%2f".into()),
            ..IndexerStatus::default()
        };
        let r = rabbitmq_report(&s, "amqp://u:***@mq1/%2f,amqp://u:***@mq2/%2f");
        assert_eq!(r.message, "consuming from amqp://u:***@mq2/%2f");
        assert_eq!(r.details["brokerInUse"], "amqp://u:***@mq2/%2f");
    }

    #[test]
    fn of_several_search_nodes_health_names_the_one_in_use() {
        let s = IndexerStatus {
            search_node: Some("http://u:***@es2:9200/".into()),
            ..IndexerStatus::default()
        };
        let listed = "http://u:***@es1:9200/,http://u:***@es2:9200/";
        let r = elasticsearch_report(&s, WINDOW, listed, SystemTime::now());
        assert!(r.healthy);
        assert_eq!(r.message, "indexing into http://u:***@es2:9200/");
        assert_eq!(r.details["search"], listed);
        assert_eq!(r.details["searchNodeInUse"], "http://u:***@es2:9200/");
        let open = IndexerStatus {
            circuit_open_since: Some(SystemTime::now()),
            circuit_failures: 2,
            ..s
        };
        let r = elasticsearch_report(&open, WINDOW, listed, SystemTime::now());
        assert!(!r.healthy);
        assert!(
            r.message.contains(listed),
            "every node failed: {}",
            r.message
        );
    }

    #[test]
    fn rabbitmq_follows_the_channel() {
        let mut s = IndexerStatus::default();
        assert!(!rabbitmq_report(&s, "amqp://u:***@h").healthy);
        s.connected = true;
        assert!(rabbitmq_report(&s, "amqp://u:***@h").healthy);
    }
}
