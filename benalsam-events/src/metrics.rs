//! Prometheus metrics: one registry with every metric of the pipeline, names prefixed
//! `benalsam_`, units in the names, labels from small fixed sets only.
//!
//! Components record into a shared [`Metrics`] given in their configs; a binary serves
//! [`Metrics::encode`] at `GET /metrics`, and an embedding service can do the same or
//! register more metrics of its own in [`Metrics::registry`].

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

/// A label set of one label, whose values come from a fixed list in this crate.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Kind {
    /// The value.
    pub kind: &'static str,
}

/// A job status label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Status {
    /// The status.
    pub status: &'static str,
}

/// A queue label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Queue {
    /// The queue.
    pub queue: &'static str,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// Every metric of the pipeline.
#[derive(Debug)]
pub struct Metrics {
    registry: Mutex<Registry>,
    // Job stream (bridge)
    /// Jobs claimed, by `kind` (`fresh`, `retry`).
    pub jobs_claimed: Family<Kind, Counter>,
    /// Jobs given back to `pending` after their lease expired.
    pub jobs_reclaimed: Counter,
    /// Jobs sent again by the resender (sent, never completed).
    pub jobs_resent: Counter,
    /// Jobs in the queue table by live status, sampled.
    pub queue_jobs: Family<Status, Gauge>,
    /// Age of the oldest pending job, sampled.
    pub oldest_pending_age: FloatGauge,
    /// Age of the oldest sent (not yet completed) job, sampled.
    pub oldest_sent_age: FloatGauge,
    // Publisher (bridge)
    /// Messages published (republications included).
    pub jobs_published: Counter,
    /// Jobs confirmed by the broker and marked sent.
    pub jobs_confirmed: Counter,
    /// Publishes that failed, by `kind` (`unroutable`, `nack`, `refused`, `unrouted_table`).
    pub jobs_publish_failed: Family<Kind, Counter>,
    /// Messages published again after a lost connection.
    pub jobs_republished: Counter,
    /// Time from publish to the broker's confirm.
    pub confirm_duration: Histogram,
    /// Time to hand one message to the broker.
    pub publish_duration: Histogram,
    // Indexer (consumer)
    /// Deliveries received from `elasticsearch.sync`.
    pub deliveries_received: Counter,
    /// Deliveries acked after their outcome was recorded.
    pub deliveries_acked: Counter,
    /// Deliveries dead-lettered, by `kind` (`malformed`, `rejected`, `retries-exhausted`).
    pub deliveries_dead_lettered: Family<Kind, Counter>,
    /// Bulk requests, by `kind` (`ok`, `failed`).
    pub bulk_requests: Family<Kind, Counter>,
    /// Duration of bulk requests.
    pub bulk_duration: Histogram,
    /// Actions per bulk request.
    pub bulk_size: Histogram,
    /// Bulk item outcomes, by `kind` (`applied`, `superseded`, `already_gone`, `retry`, `permanent`).
    pub bulk_items: Family<Kind, Counter>,
    /// Jobs marked completed.
    pub jobs_completed: Counter,
    /// 1 while the circuit breaker holds requests back.
    pub circuit_open: Gauge,
    /// From the change's commit (the job's `created_at`) to its document being indexed.
    pub end_to_end_latency: Histogram,
    /// Messages waiting in a queue, by `queue`, sampled.
    pub queue_messages: Family<Queue, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every metric, registered.
    pub fn new() -> Self {
        let latency = || Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        let m = Self {
            registry: Mutex::new(Registry::with_prefix("benalsam")),
            jobs_claimed: Family::default(),
            jobs_reclaimed: Counter::default(),
            jobs_resent: Counter::default(),
            queue_jobs: Family::default(),
            oldest_pending_age: FloatGauge::default(),
            oldest_sent_age: FloatGauge::default(),
            jobs_published: Counter::default(),
            jobs_confirmed: Counter::default(),
            jobs_publish_failed: Family::default(),
            jobs_republished: Counter::default(),
            confirm_duration: latency(),
            publish_duration: latency(),
            deliveries_received: Counter::default(),
            deliveries_acked: Counter::default(),
            deliveries_dead_lettered: Family::default(),
            bulk_requests: Family::default(),
            bulk_duration: latency(),
            bulk_size: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            bulk_items: Family::default(),
            jobs_completed: Counter::default(),
            circuit_open: Gauge::default(),
            end_to_end_latency: Histogram::new(exponential_buckets(0.005, 2.0, 18)),
            queue_messages: Family::default(),
        };
        // Every label value exists from the start, so each series is there (at zero) before
        // its first event: dashboards and alerts see zeros, not gaps.
        let kinds = |family: &Family<Kind, Counter>, kinds: &[&'static str]| {
            for kind in kinds {
                let _ = family.get_or_create(&Kind { kind });
            }
        };
        kinds(&m.jobs_claimed, &["fresh", "retry"]);
        kinds(
            &m.jobs_publish_failed,
            &["unroutable", "nack", "refused", "unrouted_table"],
        );
        kinds(
            &m.deliveries_dead_lettered,
            &["malformed", "rejected", "retries-exhausted"],
        );
        kinds(&m.bulk_requests, &["ok", "failed"]);
        kinds(
            &m.bulk_items,
            &[
                "applied",
                "superseded",
                "already_gone",
                "retry",
                "permanent",
            ],
        );
        for status in ["pending", "processing", "sent", "retrying"] {
            let _ = m.queue_jobs.get_or_create(&Status { status });
        }
        for queue in [
            crate::topology::SYNC_QUEUE,
            crate::topology::DEAD_LETTER_QUEUE,
        ] {
            let _ = m.queue_messages.get_or_create(&Queue { queue });
        }
        {
            let mut r = m.registry.lock().unwrap_or_else(|p| p.into_inner());
            r.register(
                "jobs_claimed",
                "Jobs claimed from the outbox, by kind (fresh, retry)",
                m.jobs_claimed.clone(),
            );
            r.register(
                "jobs_reclaimed",
                "Jobs given back to pending after their lease expired",
                m.jobs_reclaimed.clone(),
            );
            r.register(
                "jobs_resent",
                "Sent jobs that never completed, sent again",
                m.jobs_resent.clone(),
            );
            r.register(
                "queue_jobs",
                "Jobs in the queue table by live status (sampled)",
                m.queue_jobs.clone(),
            );
            r.register_with_unit(
                "queue_oldest_pending_age",
                "Age of the oldest pending job (sampled)",
                Unit::Seconds,
                m.oldest_pending_age.clone(),
            );
            r.register_with_unit(
                "queue_oldest_sent_age",
                "Age of the oldest sent, not completed job (sampled)",
                Unit::Seconds,
                m.oldest_sent_age.clone(),
            );
            r.register(
                "jobs_published",
                "Messages published to RabbitMQ, republications included",
                m.jobs_published.clone(),
            );
            r.register(
                "jobs_confirmed",
                "Jobs confirmed by RabbitMQ and marked sent",
                m.jobs_confirmed.clone(),
            );
            r.register(
                "jobs_publish_failed",
                "Publishes that failed, by kind",
                m.jobs_publish_failed.clone(),
            );
            r.register(
                "jobs_republished",
                "Messages published again after a lost connection",
                m.jobs_republished.clone(),
            );
            r.register_with_unit(
                "confirm_duration",
                "Time from publish to the broker's confirm",
                Unit::Seconds,
                m.confirm_duration.clone(),
            );
            r.register_with_unit(
                "publish_duration",
                "Time to hand one message to the broker",
                Unit::Seconds,
                m.publish_duration.clone(),
            );
            r.register(
                "deliveries_received",
                "Deliveries received from elasticsearch.sync",
                m.deliveries_received.clone(),
            );
            r.register(
                "deliveries_acked",
                "Deliveries acked after their outcome was recorded",
                m.deliveries_acked.clone(),
            );
            r.register(
                "deliveries_dead_lettered",
                "Deliveries dead-lettered, by kind",
                m.deliveries_dead_lettered.clone(),
            );
            r.register(
                "bulk_requests",
                "Bulk requests to Elasticsearch, by kind (ok, failed)",
                m.bulk_requests.clone(),
            );
            r.register_with_unit(
                "bulk_duration",
                "Duration of bulk requests",
                Unit::Seconds,
                m.bulk_duration.clone(),
            );
            r.register(
                "bulk_size_actions",
                "Actions per bulk request",
                m.bulk_size.clone(),
            );
            r.register(
                "bulk_items",
                "Bulk item outcomes, by kind",
                m.bulk_items.clone(),
            );
            r.register(
                "jobs_completed",
                "Jobs marked completed by the consumer",
                m.jobs_completed.clone(),
            );
            r.register(
                "circuit_open",
                "1 while the circuit breaker holds requests to Elasticsearch back",
                m.circuit_open.clone(),
            );
            r.register_with_unit(
                "end_to_end_latency",
                "From the change's commit to its document being indexed",
                Unit::Seconds,
                m.end_to_end_latency.clone(),
            );
            r.register(
                "rabbitmq_queue_messages",
                "Messages waiting in a RabbitMQ queue, by queue (sampled)",
                m.queue_messages.clone(),
            );
        }
        m
    }

    /// A fresh, shareable set.
    pub fn shared() -> Arc<Self> {
        Arc::new(Self::new())
    }

    /// The registry, to register metrics of your own next to these.
    pub fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The Prometheus text exposition of every registered metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry());
        out
    }

    /// Counts a labelled event.
    pub(crate) fn inc(family: &Family<Kind, Counter>, kind: &'static str) {
        family.get_or_create(&Kind { kind }).inc();
    }

    /// Observes a duration in seconds.
    pub(crate) fn observe(histogram: &Histogram, duration: Duration) {
        histogram.observe(duration.as_secs_f64());
    }
}
