//! [`Indexer`]: consumes change messages into Elasticsearch bulk requests, as stages.
//!
//! ```text
//!  source ───► batcher ───► ┌ verify ───► build ──► write ─► plan ─► settle ┐ × in_flight
//!  (consume,   (count,      │ (against    (from the  (_bulk)  (decide  (completed,
//!   decode,     bytes,      │  the outbox, outbox's           each     dead letters,
//!   reconnect)  linger)     │  one query)  row)               item)    then acks)
//!                 ▲         └──────────────────────────────────────────────┘
//!                 └──── retries, after their backoff ◄───┘
//!
//!  every item unavailable, or no answer ──► circuit open: hold the batch, take nothing
//!  new, probe with backoff, resume (an outage fails no job)
//! ```
//!
//! One indexer serves the queues of all its event types, each message built by its table's
//! event type into that type's index. Up to `in_flight` batches are written and settled at
//! once: the order of writes does not matter, because every write carries its job id as
//! external version. Every delivery is checked against the outbox first
//! ([`verify`](super::verify)), and its document is built from the outbox's copy of the
//! job's row (a joined one from the rows read from the database), never from the message's
//! own copy. A message that is not a valid envelope, not a job the outbox knows, or whose
//! row cannot become a document, is dead-lettered with the reason; the indexer never stops
//! on input.
//!
//! A TRUNCATE empties its event type's index of everything older than it: once no older job
//! of the table is still on its way, a delete-by-query removes the documents whose `job_id`
//! is lower. Any older message that arrives later is superseded (verification sees the
//! truncation), so the index holds exactly the rows written after the truncate. Acks come only after the outcome is recorded, so a crash
//! at any point means redelivery, and redelivery is harmless: the index refuses versions it
//! has already seen.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::config::{AmqpUrl, require_positive};
use crate::consume::IndexerStatus;
use crate::consume::batch::{Batcher, Limits};
use crate::consume::circuit::CircuitBreaker;
use crate::consume::pace::Pace;
use crate::consume::record::{IndexerEvent, IndexerMetrics, IndexerRecorder};
use crate::consume::run::Run;
use crate::consume::shared::{Ledger, Shared, outbox_failing};
use crate::consume::source::{QueueRoute, Source};
use crate::ops::Live;
use crate::ops::metrics::{Metrics, OfType};
use crate::outbox::Outbox;
use crate::search::SearchNodes;
use crate::{error::Error, error::Result, event_type::EventType};

/// Settings of an [`Indexer`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct IndexerConfig {
    /// Unacknowledged messages the broker may hand over at once (`basic.qos`).
    pub prefetch: u16,
    /// Most actions per bulk request.
    pub batch_size: usize,
    /// Most request bytes per bulk request.
    pub batch_bytes: usize,
    /// Longest wait for a batch to fill once its first message arrived.
    pub linger: Duration,
    /// Most batches written and settled at once.
    pub in_flight: usize,
    /// Answer time a bulk request should stay under: slower answers shrink the next
    /// requests (down to 10 actions), quick ones grow them back to `batch_size`; items the
    /// engine refuses as busy halve them.
    pub bulk_target: Duration,
    /// Attempts of an item Elasticsearch refuses as busy before it is dead-lettered.
    pub max_attempts: u32,
    /// Delays between those attempts.
    pub retry: Backoff,
    /// Delays between probes while the circuit is open.
    pub circuit: Backoff,
    /// Delays between reconnects to RabbitMQ, and between attempts to record outcomes
    /// while PostgreSQL is away.
    pub reconnect: Backoff,
    /// The connection's name in the management UI.
    pub connection_name: String,
    /// Largest delivery read (`BENALSAM_MAX_MESSAGE_BYTES`); a larger one is dead-lettered
    /// unread. The deliveries held at once are at most `prefetch` times the broker's
    /// `max_message_size`: set that to this value to bound them.
    pub max_message_bytes: usize,
}

impl Default for IndexerConfig {
    fn default() -> Self {
        Self {
            // Chosen from the pipeline benchmark (BENCHMARKS.md, "Knobs" and "Memory with
            // large rows under updates"): two requests of 250 in flight drain a backlog as
            // fast as larger ones, and the held messages bound the consumer's memory (every
            // update message carries the old and the new row), so the prefetch is the
            // smallest that keeps both requests full.
            prefetch: 500,
            batch_size: 250,
            batch_bytes: 5 * 1024 * 1024,
            // At a low rate a batch goes by its linger, and every batch costs a check, a
            // request and a settle: BENCHMARKS.md, "Low rates".
            linger: Duration::from_millis(100),
            in_flight: 2,
            bulk_target: Duration::from_secs(1),
            max_attempts: 5,
            retry: Backoff::new(Duration::from_millis(500), Duration::from_secs(30)),
            circuit: Backoff::new(Duration::from_secs(1), Duration::from_secs(60)),
            reconnect: Backoff::default(),
            connection_name: "benalsam-consumer".to_owned(),
            max_message_bytes: crate::event_type::DEFAULT_MAX_MESSAGE_BYTES,
        }
    }
}

/// Consumes change messages into Elasticsearch: each delivery is decoded, checked against
/// the outbox, batched into bulk requests, and acked once its outcome is recorded.
pub struct Indexer {
    url: AmqpUrl,
    event_types: Vec<EventType>,
    search: SearchNodes,
    ledger: Arc<dyn Ledger>,
    config: IndexerConfig,
    /// Its status and metrics, written only by recording events.
    recorder: IndexerRecorder,
}

impl std::fmt::Debug for Indexer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Indexer")
            .field("url", &self.url)
            .field("search", &self.search)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Indexer {
    /// An indexer of the queues of `event_types` into `search`, checking every delivery
    /// against `outbox` and reporting outcomes to it.
    ///
    /// `search` is one client (an [`Elasticsearch`](elasticsearch::Elasticsearch)) or the
    /// [`SearchNodes`] of a cluster: requests go to one node, and move to the next when it
    /// fails; the circuit opens only once every node failed.
    pub fn new(
        url: AmqpUrl,
        search: impl Into<SearchNodes>,
        outbox: Outbox,
        event_types: Vec<EventType>,
        config: IndexerConfig,
    ) -> Result<Self> {
        if event_types.is_empty() {
            return Err(Error::config(
                "event types",
                "an indexer needs at least one",
            ));
        }
        crate::event_type::validate_all(&event_types)?;
        require_positive("IndexerConfig::linger", config.linger)?;
        require_positive("IndexerConfig::bulk_target", config.bulk_target)?;
        if config.batch_size == 0 || config.in_flight == 0 || config.max_attempts == 0 {
            return Err(Error::config(
                "indexer",
                "batch size, in-flight batches and attempts must each be at least 1",
            ));
        }
        let schema = outbox.config().schema.clone();
        let search = search.into();
        let recorder = IndexerRecorder::new(IndexerMetrics::new(search.switches()));
        recorder.record(IndexerEvent::BulkLimit(config.batch_size));
        recorder.record(IndexerEvent::SearchNode(search.in_use()));
        Ok(Self {
            url,
            event_types: event_types
                .into_iter()
                .map(|t| t.recorded_in(&schema))
                .collect(),
            search,
            ledger: Arc::new(outbox),
            config,
            recorder,
        })
    }

    /// Records deliveries, bulk requests and outcomes in `metrics`.
    pub fn with_metrics(self, metrics: &Metrics) -> Self {
        let families = self.recorder.metrics();
        families.register(metrics);
        // Every event type's and every queue's series exist from the start, at zero.
        let labels: Vec<OfType> = self
            .event_types
            .iter()
            .map(|t| OfType::new(&t.name))
            .collect();
        let queues: Vec<String> = self
            .event_types
            .iter()
            .flat_map(|t| [t.queue.clone(), t.dead_letter_queue.clone()])
            .collect();
        families.precreate(&labels, &queues);
        self
    }

    /// Records what the indexes lack that only a reindex gives them (the consumer's start
    /// finds it; the health answer shows it).
    pub(crate) fn reindex_needed(&self, lines: Vec<String>) {
        self.recorder.record(IndexerEvent::ReindexNeeded(lines));
    }

    /// The live status, for health checks.
    pub fn status(&self) -> Live<IndexerStatus> {
        self.recorder.status().clone()
    }

    /// Consumes until `shutdown` is cancelled; the batches in hand are finished and acked
    /// first. Messages held for a retry go back to the queue.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut routes: Vec<QueueRoute> = Vec::new();
        for t in &self.event_types {
            if !routes.iter().any(|r| r.queue == t.queue) {
                routes.push(QueueRoute {
                    queue: t.queue.clone(),
                    dead_letter_exchange: t.dead_letter_exchange.clone(),
                    dead_letter_queue: t.dead_letter_queue.clone(),
                });
            }
        }
        let source = Source::new(
            self.url.clone(),
            routes,
            self.config.prefetch,
            self.config.connection_name.clone(),
        )
        .with_max_message_bytes(self.config.max_message_bytes);
        let limits = Limits {
            count: self.config.batch_size,
            bytes: self.config.batch_bytes,
            linger: self.config.linger,
        };
        let breaker = CircuitBreaker::new(self.config.circuit);
        let pace = Pace::new(self.config.batch_size, self.config.bulk_target);
        self.recorder.record(IndexerEvent::BulkLimit(pace.size()));
        // The start-up steps may have moved on from the first node.
        self.recorder
            .record(IndexerEvent::SearchNode(self.search.in_use()));
        let shared = Arc::new(Shared {
            search: self.search,
            ledger: self.ledger,
            labels: self
                .event_types
                .iter()
                .map(|t| (t.job_table().to_owned(), OfType::new(&t.name)))
                .collect(),
            unknown: OfType::new(OfType::UNKNOWN),
            event_types: self
                .event_types
                .into_iter()
                .map(|t| (t.job_table().to_owned(), t))
                .collect(),
            config: self.config,
            recorder: self.recorder.clone(),
            shutdown: shutdown.clone(),
            pace: Mutex::new(pace),
        });
        let mut run = Run::new(shared, source, Batcher::new(limits), breaker);
        // An idle consumer must still know whether it could record an outcome: the outbox
        // is asked beside the loop, so a slow answer never holds deliveries up.
        let watch = tokio::spawn(watch_outbox(run.shared()));
        run.run(&shutdown).await;
        run.finish().await;
        watch.abort();
        self.recorder
            .record(IndexerEvent::Disconnected { why: None });
    }
}

/// Asks the outbox every few seconds whether it answers, so health turns red while
/// PostgreSQL is away even when no batch needs it, and green again when it answers.
async fn watch_outbox(shared: Arc<Shared>) {
    const EVERY: Duration = Duration::from_secs(5);
    loop {
        match shared.ledger.ping().await {
            Ok(()) => shared.record(IndexerEvent::OutboxAnswers),
            Err(error) => outbox_failing(&shared, &error),
        }
        tokio::select! {
            () = shared.shutdown.cancelled() => return,
            () = tokio::time::sleep(EVERY) => {}
        }
    }
}
