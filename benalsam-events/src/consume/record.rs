//! The indexer's record: every event the stages report, and what each does to the live
//! status ([`IndexerStatus`], the consumer's health answer) and to the metrics — the only
//! place that writes either.
//!
//! The counters of messages carry an `event_type` label (the event type's name; `unknown`
//! for a delivery that names none), so one busy or failing table shows on its own.

use std::time::{Duration, SystemTime};

use crate::consume::IndexerStatus;
use crate::consume::circuit::CircuitState;
use crate::consume::why::Why;
use crate::ops::events::{Event, Recorder, count_error};
use crate::ops::metrics::{KindOfType, OfType, Queue, inc, observe};
use crate::search::plan::Done;

pub(crate) use super::metrics::IndexerMetrics;

/// The indexer's recorder: its status and its families.
pub(crate) type IndexerRecorder = Recorder<IndexerStatus, IndexerMetrics>;

/// What became of one bulk item.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Item {
    /// Done; `delete` when the action was a delete, `latency` from the change's commit when
    /// it was applied now.
    Done {
        done: Done,
        delete: bool,
        latency: Option<Duration>,
    },
    /// Refused as busy: tried again after its backoff.
    Retrying,
    /// Refused as busy once too often: dead-lettered.
    Exhausted,
    /// Refused for good (a mapping error): dead-lettered.
    Refused,
}

/// Something the indexer reports once.
#[derive(Debug)]
pub(crate) enum IndexerEvent<'a> {
    /// Consuming on a channel to `broker` (redacted).
    Connected { broker: String },
    /// The consuming channel is gone: lost (`why`), or closed at shutdown (`None`).
    Disconnected { why: Option<&'a str> },
    /// A failure that changes nothing else: a connect that failed, a dead letter not
    /// published, a truncation not applied yet.
    Error(&'a str),
    /// The search node requests go to now (redacted).
    SearchNode(Option<String>),
    /// What the live indexes lack that only a reindex gives them (found at start; indexing
    /// goes on with the old mapping).
    ReindexNeeded(Vec<String>),
    /// Actions the next bulk request may carry.
    BulkLimit(usize),
    /// A delivery arrived.
    Received(&'a OfType),
    /// Joined documents read from the database.
    JoinedRead { rows: usize },
    /// A delivery the outbox does not know as it tells it (dead-lettered next).
    Unverified,
    /// A change the outbox already knows a newer one of, covered without writing.
    Superseded,
    /// A bulk request answered.
    BulkAnswered { actions: usize, took: Duration },
    /// A bulk request got no usable answer.
    BulkFailed { actions: usize },
    /// What became of one bulk item; `kind` is its decision's `bulk_items` label.
    Item {
        event_type: &'a OfType,
        kind: &'static str,
        item: Item,
    },
    /// Jobs reported completed.
    Completed { event_type: &'a OfType, jobs: u64 },
    /// A delivery dead-lettered (published to its DLQ and recorded).
    DeadLettered { event_type: &'a OfType, why: Why },
    /// Deliveries acked.
    Acked { event_type: &'a OfType, count: u64 },
    /// The circuit breaker moved; `reason` when a failure opened (or kept open) it.
    Circuit {
        state: CircuitState,
        reason: Option<&'a str>,
    },
    /// The depths of the consumed queues and their DLQs: (queue, is a DLQ, depth if known).
    Depths(&'a [(String, bool, Option<u32>)]),
    /// The outbox does not answer: outcomes cannot be recorded.
    OutboxFailing(&'a str),
    /// The outbox answers again.
    OutboxAnswers,
}

impl Event for IndexerEvent<'_> {
    type Status = IndexerStatus;
    type Metrics = IndexerMetrics;

    fn apply(self, s: &mut IndexerStatus, m: &IndexerMetrics) {
        match self {
            IndexerEvent::Connected { broker } => {
                s.connected = true;
                s.broker = Some(broker);
            }
            IndexerEvent::Disconnected { why } => {
                if let Some(why) = why {
                    count_error(s, why);
                }
                s.connected = false;
            }
            IndexerEvent::Error(error) => count_error(s, error),
            IndexerEvent::SearchNode(node) => s.search_node = node,
            IndexerEvent::ReindexNeeded(lines) => s.reindex_needed = lines,
            IndexerEvent::BulkLimit(size) => {
                m.bulk_limit.set(i64::try_from(size).unwrap_or(i64::MAX));
                s.bulk_limit = size;
            }
            IndexerEvent::Received(of) => {
                s.received += 1;
                m.deliveries_received.get_or_create(of).inc();
            }
            IndexerEvent::JoinedRead { rows } => s.joined_reads += rows as u64,
            IndexerEvent::Unverified => s.unverified += 1,
            IndexerEvent::Superseded => s.superseded += 1,
            IndexerEvent::BulkAnswered { actions, took } => {
                m.bulk_size.observe(actions as f64);
                inc(&m.bulk_requests, "ok");
                observe(&m.bulk_duration, took);
                s.bulk_requests += 1;
                s.last_bulk_at = Some(SystemTime::now());
                s.last_bulk_items = actions;
                s.last_bulk_duration = Some(took);
            }
            IndexerEvent::BulkFailed { actions } => {
                m.bulk_size.observe(actions as f64);
                inc(&m.bulk_requests, "failed");
            }
            IndexerEvent::Item {
                event_type,
                kind,
                item,
            } => item_decided(s, m, KindOfType::new(kind, event_type), item),
            IndexerEvent::Completed { event_type, jobs } => {
                m.jobs_completed.get_or_create(event_type).inc_by(jobs);
            }
            IndexerEvent::DeadLettered { event_type, why } => {
                s.dead_lettered += 1;
                m.deliveries_dead_lettered
                    .get_or_create(&KindOfType::new(why.as_str(), event_type))
                    .inc();
            }
            IndexerEvent::Acked { event_type, count } => {
                m.deliveries_acked.get_or_create(event_type).inc_by(count);
                s.acked += count;
                if count > 0 {
                    s.last_ack_at = Some(SystemTime::now());
                }
            }
            IndexerEvent::Circuit { state, reason } => circuit(s, m, state, reason),
            IndexerEvent::Depths(depths) => depths_seen(s, m, depths),
            IndexerEvent::OutboxFailing(reason) => {
                count_error(s, reason);
                s.outbox_failing
                    .get_or_insert_with(|| (SystemTime::now(), reason.to_owned()));
            }
            IndexerEvent::OutboxAnswers => s.outbox_failing = None,
        }
    }
}

fn item_decided(s: &mut IndexerStatus, m: &IndexerMetrics, label: KindOfType, item: Item) {
    m.bulk_items.get_or_create(&label).inc();
    match item {
        Item::Done {
            done,
            delete,
            latency,
        } => {
            match done {
                Done::Applied if delete => s.deleted += 1,
                Done::Applied => s.indexed += 1,
                Done::AlreadyGone => s.deleted += 1,
                Done::Superseded => s.superseded += 1,
            }
            if let Some(latency) = latency {
                let of = OfType {
                    event_type: label.event_type,
                };
                observe(&m.end_to_end_latency.get_or_create(&of), latency);
            }
        }
        Item::Retrying => s.retried += 1,
        Item::Exhausted | Item::Refused => {}
    }
}

fn circuit(s: &mut IndexerStatus, m: &IndexerMetrics, state: CircuitState, reason: Option<&str>) {
    (s.circuit_open_since, s.circuit_failures) = match state {
        CircuitState::Closed => (None, 0),
        CircuitState::Open { failures, since } => (Some(since), failures),
    };
    m.circuit_open
        .set(i64::from(matches!(state, CircuitState::Open { .. })));
    if let Some(reason) = reason {
        count_error(s, reason);
    }
}

fn depths_seen(s: &mut IndexerStatus, m: &IndexerMetrics, depths: &[(String, bool, Option<u32>)]) {
    let (mut queued, mut dead) = (None::<u32>, None::<u32>);
    for (queue, dlq, depth) in depths {
        if let Some(depth) = *depth {
            m.queue_messages
                .get_or_create(&Queue {
                    queue: queue.clone(),
                })
                .set(i64::from(depth));
            let sum = if *dlq { &mut dead } else { &mut queued };
            *sum = Some(sum.unwrap_or(0).saturating_add(depth));
        }
    }
    s.queue_depth = queued;
    s.dlq_depth = dead;
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::counter::Counter;

    use super::*;
    use crate::ops::metrics::Metrics;

    fn recorder() -> (IndexerRecorder, Metrics) {
        let recorder = IndexerRecorder::new(IndexerMetrics::new(Counter::default()));
        let metrics = Metrics::new();
        recorder.metrics().register(&metrics);
        (recorder, metrics)
    }

    #[test]
    fn an_applied_item_counts_in_the_status_and_under_its_event_type() {
        let (recorder, metrics) = recorder();
        let (listings, offers) = (OfType::new("listings"), OfType::new("offers"));
        recorder
            .metrics()
            .precreate(&[listings.clone(), offers.clone()], &[]);
        for (of, delete) in [(&listings, false), (&listings, true), (&offers, false)] {
            recorder.record(IndexerEvent::Item {
                event_type: of,
                kind: "applied",
                item: Item::Done {
                    done: Done::Applied,
                    delete,
                    latency: Some(Duration::from_millis(20)),
                },
            });
        }
        recorder.record(IndexerEvent::Item {
            event_type: &offers,
            kind: "retry",
            item: Item::Retrying,
        });
        let s = recorder.status().snapshot();
        assert_eq!((s.indexed, s.deleted, s.retried), (2, 1, 1));
        let text = metrics.encode();
        for line in [
            "benalsam_bulk_items_total{kind=\"applied\",event_type=\"listings\"} 2\n",
            "benalsam_bulk_items_total{kind=\"applied\",event_type=\"offers\"} 1\n",
            "benalsam_bulk_items_total{kind=\"retry\",event_type=\"offers\"} 1\n",
            "benalsam_bulk_items_total{kind=\"permanent\",event_type=\"offers\"} 0\n",
            "benalsam_end_to_end_latency_seconds_count{event_type=\"listings\"} 2\n",
            "benalsam_deliveries_received_total{event_type=\"offers\"} 0\n",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
    }

    #[test]
    fn the_circuit_and_the_outbox_show_in_the_status_and_the_gauge() {
        let (recorder, metrics) = recorder();
        let since = SystemTime::now();
        recorder.record(IndexerEvent::Circuit {
            state: CircuitState::Open { failures: 2, since },
            reason: Some("no answer"),
        });
        recorder.record(IndexerEvent::OutboxFailing("db away"));
        recorder.record(IndexerEvent::OutboxFailing("still away"));
        let s = recorder.status().snapshot();
        assert_eq!((s.circuit_open_since, s.circuit_failures), (Some(since), 2));
        assert_eq!(s.errors, 3);
        assert_eq!(
            s.outbox_failing.map(|(_, why)| why).as_deref(),
            Some("db away"),
            "since the first failure"
        );
        assert!(metrics.encode().contains("benalsam_circuit_open 1\n"));
        recorder.record(IndexerEvent::Circuit {
            state: CircuitState::Closed,
            reason: None,
        });
        recorder.record(IndexerEvent::OutboxAnswers);
        let s = recorder.status().snapshot();
        assert_eq!((s.circuit_open_since, s.outbox_failing), (None, None));
        assert!(metrics.encode().contains("benalsam_circuit_open 0\n"));
    }
}
