//! The consumer's health verdicts: pure functions of the indexer's status, so they are
//! tested without services.

use std::time::{Duration, SystemTime};

use serde_json::{Value, json};

use crate::consume::IndexerStatus;
use crate::ops::{HealthReport, rfc3339, since};

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
        "reindexNeeded": s.reindex_needed,
    })
}

/// The Elasticsearch verdict: unhealthy while the circuit is open, while outcomes cannot be
/// recorded in PostgreSQL, or while messages wait and none was acked within `window`.
pub(super) fn elasticsearch_report(
    s: &IndexerStatus,
    window: Duration,
    search: &str,
    now: SystemTime,
    started: SystemTime,
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
    // Judged from the start until the first ack: a consumer that has just started (or
    // restarted onto a backlog) has not been stalled for a window yet.
    let last_progress = s.last_ack_at.map_or(started, |t| t.max(started));
    let acked_recently = since(now, last_progress) <= window;
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
pub(super) fn rabbitmq_report(s: &IndexerStatus, broker: &str) -> HealthReport {
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
        let r = elasticsearch_report(
            &s,
            WINDOW,
            "http://es:9200",
            SystemTime::now(),
            SystemTime::UNIX_EPOCH,
        );
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
        assert!(!elasticsearch_report(&s, WINDOW, "es", now, SystemTime::UNIX_EPOCH).healthy);
        s.last_ack_at = Some(now);
        assert!(elasticsearch_report(&s, WINDOW, "es", now, SystemTime::UNIX_EPOCH).healthy);
        s.queue_depth = Some(0);
        s.last_ack_at = None;
        assert!(elasticsearch_report(&s, WINDOW, "es", now, SystemTime::UNIX_EPOCH).healthy);
        // Just started onto a backlog, nothing acked yet: not stalled before a window passed.
        s.queue_depth = Some(40);
        let just = now - Duration::from_secs(1);
        assert!(elasticsearch_report(&s, WINDOW, "es", now, just).healthy);
        assert!(!elasticsearch_report(&s, WINDOW, "es", now + WINDOW * 2, just).healthy);
    }

    #[test]
    fn an_unreachable_outbox_is_unhealthy() {
        let now = SystemTime::now();
        let s = IndexerStatus {
            outbox_failing: Some((now - Duration::from_secs(12), "connection refused".into())),
            ..IndexerStatus::default()
        };
        let r = elasticsearch_report(&s, WINDOW, "es", now, SystemTime::UNIX_EPOCH);
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
        let r = elasticsearch_report(
            &s,
            WINDOW,
            listed,
            SystemTime::now(),
            SystemTime::UNIX_EPOCH,
        );
        assert!(r.healthy);
        assert_eq!(r.message, "indexing into http://u:***@es2:9200/");
        assert_eq!(r.details["search"], listed);
        assert_eq!(r.details["searchNodeInUse"], "http://u:***@es2:9200/");
        let open = IndexerStatus {
            circuit_open_since: Some(SystemTime::now()),
            circuit_failures: 2,
            ..s
        };
        let r = elasticsearch_report(
            &open,
            WINDOW,
            listed,
            SystemTime::now(),
            SystemTime::UNIX_EPOCH,
        );
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
