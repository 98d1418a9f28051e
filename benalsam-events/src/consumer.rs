//! The consumer's health verdicts, pure over the indexer's status so they are tested
//! without services.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};

use crate::circuit::CircuitState;
use crate::health::{Check, HealthReport, HealthServer};
use crate::indexer::{self, IndexerStatus};

/// What the consumer's health endpoints look at.
#[derive(Debug, Clone)]
pub struct ConsumerMonitor {
    /// The indexer's status.
    pub indexer: Arc<indexer::Status>,
    /// Unhealthy when messages wait but no bulk request was answered for this long.
    pub max_bulk_gap: Duration,
    /// The search node, for the answer.
    pub search: String,
    /// The broker, redacted, for the answer.
    pub broker: String,
}

impl ConsumerMonitor {
    /// Adds the consumer's two endpoints to `server`.
    pub fn routes(self: &Arc<Self>, server: HealthServer) -> HealthServer {
        let (search, rabbitmq) = (Arc::clone(self), Arc::clone(self));
        server
            .check("/api/v1/health/elasticsearch-service", move || {
                search.elasticsearch()
            })
            .check("/api/v1/health/rabbitmq", move || rabbitmq.rabbitmq())
    }

    /// The report the consumer's heartbeat carries: its Elasticsearch verdict.
    pub fn heartbeat(self: &Arc<Self>) -> Check {
        let monitor = Arc::clone(self);
        Arc::new(move || monitor.elasticsearch())
    }

    /// `GET /api/v1/health/elasticsearch-service`.
    pub fn elasticsearch(&self) -> HealthReport {
        elasticsearch_report(
            &self.indexer.snapshot(),
            self.max_bulk_gap,
            &self.search,
            SystemTime::now(),
        )
    }

    /// `GET /api/v1/health/rabbitmq`.
    pub fn rabbitmq(&self) -> HealthReport {
        rabbitmq_report(&self.indexer.snapshot(), &self.broker)
    }
}

fn rfc3339(t: Option<SystemTime>) -> Value {
    t.map_or(Value::Null, |t| {
        json!(humantime::format_rfc3339_millis(t).to_string())
    })
}

fn details(s: &IndexerStatus) -> Value {
    let (circuit, open_since, failures) = match s.circuit {
        CircuitState::Closed => ("closed", None, 0),
        CircuitState::Open { failures, since } => ("open", Some(since), failures),
    };
    json!({
        "circuit": circuit,
        "circuitOpenSince": rfc3339(open_since),
        "consecutiveFailures": failures,
        "lastBulkAt": rfc3339(s.last_bulk_at),
        "lastBulkItems": s.last_bulk_items,
        "lastBulkMillis": s.last_bulk_duration.map(|d| d.as_millis() as u64),
        "bulkRequests": s.bulk_requests,
        "received": s.received,
        "indexed": s.indexed,
        "deleted": s.deleted,
        "superseded": s.superseded,
        "retried": s.retried,
        "deadLettered": s.dead_lettered,
        "queueDepth": s.queue_depth,
        "dlqDepth": s.dlq_depth,
        "errors": s.errors,
        "lastError": s.last_error,
    })
}

/// Healthy while the circuit is closed and, when messages wait, bulk requests keep coming.
pub fn elasticsearch_report(
    s: &IndexerStatus,
    max_bulk_gap: Duration,
    search: &str,
    now: SystemTime,
) -> HealthReport {
    let stalled = s.queue_depth.unwrap_or(0) > 0
        && s.last_bulk_at
            .is_none_or(|t| now.duration_since(t).unwrap_or_default() > max_bulk_gap);
    let (healthy, message) = match s.circuit {
        CircuitState::Open { failures, .. } => (
            false,
            format!(
                "circuit open after {failures} failed attempts on {search}: {}",
                s.last_error.as_deref().unwrap_or("unavailable")
            ),
        ),
        CircuitState::Closed if stalled => (
            false,
            format!(
                "{} messages wait but no bulk request for over {}s: the consumer is stalled",
                s.queue_depth.unwrap_or(0),
                max_bulk_gap.as_secs()
            ),
        ),
        CircuitState::Closed => (true, format!("indexing into {search}")),
    };
    let mut details = details(s);
    details["search"] = json!(search);
    HealthReport::new("elasticsearch-service", healthy, message, details)
}

/// Healthy while the consumer holds its channel.
pub fn rabbitmq_report(s: &IndexerStatus, broker: &str) -> HealthReport {
    let message = if s.connected {
        format!("consuming from {broker}")
    } else {
        format!("not connected to {broker}")
    };
    let mut details = details(s);
    details["broker"] = json!(broker);
    details["connected"] = json!(s.connected);
    HealthReport::new("rabbitmq", s.connected, message, details)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_open_circuit_is_unhealthy_and_says_why() {
        let s = IndexerStatus {
            circuit: CircuitState::Open {
                failures: 3,
                since: SystemTime::now(),
            },
            last_error: Some("connection refused".into()),
            ..IndexerStatus::default()
        };
        let r = elasticsearch_report(
            &s,
            Duration::from_secs(60),
            "http://es:9200",
            SystemTime::now(),
        );
        assert!(!r.healthy);
        assert!(r.message.contains("connection refused"), "{}", r.message);
        assert_eq!(r.details["circuit"], "open");
    }

    #[test]
    fn waiting_messages_without_bulk_requests_are_a_stall() {
        let now = SystemTime::now();
        let mut s = IndexerStatus {
            queue_depth: Some(40),
            last_bulk_at: Some(now - Duration::from_secs(300)),
            ..IndexerStatus::default()
        };
        assert!(!elasticsearch_report(&s, Duration::from_secs(60), "es", now).healthy);
        s.queue_depth = Some(0);
        assert!(elasticsearch_report(&s, Duration::from_secs(60), "es", now).healthy);
    }

    #[test]
    fn rabbitmq_follows_the_channel() {
        let mut s = IndexerStatus::default();
        assert!(!rabbitmq_report(&s, "amqp://u:***@h").healthy);
        s.connected = true;
        assert!(rabbitmq_report(&s, "amqp://u:***@h").healthy);
    }
}
