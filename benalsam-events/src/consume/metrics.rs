//! The indexer's metric families: what they are called, their labels and help, and the
//! series that exist from the start. Only its record (`record.rs`) writes them.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Unit;

use crate::consume::why::Why;
use crate::ops::metrics::{
    HistogramFamily, Kind, KindOfType, Metrics, OfType, Queue, latency, precreate,
};

/// End-to-end latency buckets: 5 ms doubling to about 22 minutes.
fn end_to_end() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 18))
}

/// The indexer's families (consumer).
#[derive(Debug, Clone)]
pub(crate) struct IndexerMetrics {
    pub(super) deliveries_received: Family<OfType, Counter>,
    pub(super) deliveries_acked: Family<OfType, Counter>,
    pub(super) deliveries_dead_lettered: Family<KindOfType, Counter>,
    pub(super) bulk_requests: Family<Kind, Counter>,
    pub(super) bulk_duration: Histogram,
    pub(super) bulk_size: Histogram,
    pub(super) bulk_limit: Gauge,
    pub(super) bulk_items: Family<KindOfType, Counter>,
    pub(super) jobs_completed: Family<OfType, Counter>,
    pub(super) circuit_open: Gauge,
    /// Moves from one search node to the next (shared with the indexer's `SearchNodes`).
    pub(super) search_node_switches: Counter,
    pub(super) end_to_end_latency: HistogramFamily<OfType>,
    pub(super) queue_messages: Family<Queue, Gauge>,
}

impl IndexerMetrics {
    /// Families at zero; `search_node_switches` is the counter the search nodes keep.
    pub(crate) fn new(search_node_switches: Counter) -> Self {
        Self {
            deliveries_received: Family::default(),
            deliveries_acked: Family::default(),
            deliveries_dead_lettered: Family::default(),
            bulk_requests: Family::default(),
            bulk_duration: latency(),
            bulk_size: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            bulk_limit: Gauge::default(),
            bulk_items: Family::default(),
            jobs_completed: Family::default(),
            circuit_open: Gauge::default(),
            search_node_switches,
            end_to_end_latency: Family::new_with_constructor(end_to_end),
            queue_messages: Family::default(),
        }
    }

    /// Creates the series of every event type in `event_types` and every queue in `queues`
    /// at zero, so dashboards see zeros rather than gaps.
    pub(crate) fn precreate(&self, event_types: &[OfType], queues: &[String]) {
        precreate(&self.bulk_requests, &["ok", "failed"]);
        for of in event_types {
            let _ = self.deliveries_received.get_or_create(of);
            let _ = self.deliveries_acked.get_or_create(of);
            let _ = self.jobs_completed.get_or_create(of);
            let _ = self.end_to_end_latency.get_or_create(of);
            for why in [
                Why::Malformed,
                Why::Rejected,
                Why::RetriesExhausted,
                Why::Unverified,
            ] {
                let _ = self
                    .deliveries_dead_lettered
                    .get_or_create(&KindOfType::new(why.as_str(), of));
            }
            for kind in [
                "applied",
                "superseded",
                "already_gone",
                "retry",
                "permanent",
            ] {
                let _ = self.bulk_items.get_or_create(&KindOfType::new(kind, of));
            }
        }
        for queue in queues {
            let _ = self.queue_messages.get_or_create(&Queue {
                queue: queue.clone(),
            });
        }
    }

    pub(crate) fn register(&self, metrics: &Metrics) {
        self.register_deliveries(metrics);
        self.register_bulk(metrics);
        metrics.register(
            "circuit_open",
            "1 while the circuit breaker holds requests to Elasticsearch back",
            None,
            self.circuit_open.clone(),
        );
        metrics.register(
            "search_node_switches",
            "Moves from a search node that failed a request to the next",
            None,
            self.search_node_switches.clone(),
        );
        metrics.register(
            "rabbitmq_queue_messages",
            "Messages waiting in a RabbitMQ queue, by queue (sampled)",
            None,
            self.queue_messages.clone(),
        );
    }

    /// The families of messages, by event type.
    fn register_deliveries(&self, metrics: &Metrics) {
        metrics.register(
            "deliveries_received",
            "Deliveries received from the consumed queues, by event type",
            None,
            self.deliveries_received.clone(),
        );
        metrics.register(
            "deliveries_acked",
            "Deliveries acked after their outcome was recorded, by event type",
            None,
            self.deliveries_acked.clone(),
        );
        metrics.register(
            "deliveries_dead_lettered",
            "Deliveries dead-lettered, by kind and event type",
            None,
            self.deliveries_dead_lettered.clone(),
        );
        metrics.register(
            "jobs_completed",
            "Jobs reported completed by the consumer, by event type",
            None,
            self.jobs_completed.clone(),
        );
        metrics.register(
            "end_to_end_latency",
            "From the change's commit to its document being indexed, by event type",
            Some(Unit::Seconds),
            self.end_to_end_latency.clone(),
        );
    }

    /// The families of bulk requests (which mix event types) and of their items.
    fn register_bulk(&self, metrics: &Metrics) {
        metrics.register(
            "bulk_requests",
            "Bulk requests to Elasticsearch, by kind (ok, failed)",
            None,
            self.bulk_requests.clone(),
        );
        metrics.register(
            "bulk_duration",
            "Duration of bulk requests",
            Some(Unit::Seconds),
            self.bulk_duration.clone(),
        );
        metrics.register(
            "bulk_size_actions",
            "Actions per bulk request",
            None,
            self.bulk_size.clone(),
        );
        metrics.register(
            "bulk_limit_actions",
            "Actions the next bulk request may carry (shrinks while Elasticsearch is slow or busy)",
            None,
            self.bulk_limit.clone(),
        );
        metrics.register(
            "bulk_items",
            "Bulk item outcomes, by kind and event type",
            None,
            self.bulk_items.clone(),
        );
    }
}
