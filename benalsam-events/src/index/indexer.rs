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

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use lapin::Channel;
use lapin::message::Delivery;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::backoff::Backoff;
use crate::config::{AmqpUrl, require_positive};
use crate::index::batch::{Batcher, Limits};
use crate::index::circuit::{CircuitBreaker, CircuitState};
use crate::index::dead_letter::Why;
use crate::index::pace::{Answer, Pace};
use crate::index::settle::{self, Ledger};
use crate::index::source::{Event, Incoming, QueueRoute, Source};
use crate::index::truncate;
use crate::index::verify::{self, Check};
use crate::index::writer::{self, WriteError};
use crate::index::{Action, BuildError, SearchNodes, plan};
use crate::ops::Live;
use crate::ops::metrics::{self, IndexerMetrics, Metrics, Queue};
use crate::ops::telemetry;
use crate::outbox::{Operation, Outbox, Recorded};
use crate::publish::{Envelope, EnvelopeError, TRACEPARENT_HEADER};
use crate::{Error, EventType, Result};

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
            // From the benchmarks (BENCHMARKS.md): two requests of 250 in flight drain a
            // backlog as fast as 500 or 1,000 in the whole pipeline, and holding 500 messages
            // (rather than 1,000) keeps the consumer under 50 MiB with 4 KB rows under an
            // update-heavy load (every message carries the old and the new row).
            prefetch: 500,
            batch_size: 250,
            batch_bytes: 5 * 1024 * 1024,
            linger: Duration::from_millis(50),
            in_flight: 2,
            bulk_target: Duration::from_secs(1),
            max_attempts: 5,
            retry: Backoff::new(Duration::from_millis(500), Duration::from_secs(30)),
            circuit: Backoff::new(Duration::from_secs(1), Duration::from_secs(60)),
            reconnect: Backoff::default(),
            connection_name: "benalsam-consumer".to_owned(),
            max_message_bytes: crate::publish::DEFAULT_MAX_MESSAGE_BYTES,
        }
    }
}

/// What an indexer has been doing, for health checks.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct IndexerStatus {
    /// Whether it holds a consuming channel.
    pub connected: bool,
    /// The broker address in use (redacted), or last used while disconnected.
    pub broker: Option<String>,
    /// The search node in use (redacted): the one requests go to, or went to last. `None`
    /// for a client given without its address.
    pub search_node: Option<String>,
    /// Since when the circuit breaker holds requests back (`None` while it is closed).
    pub circuit_open_since: Option<SystemTime>,
    /// Consecutive failures of the cluster as a whole (0 while the circuit is closed).
    pub circuit_failures: u32,
    /// Messages received.
    pub received: u64,
    /// Documents written.
    pub indexed: u64,
    /// Documents deleted (or already absent).
    pub deleted: u64,
    /// Changes refused as older than the index's (duplicates, reordering).
    pub superseded: u64,
    /// Messages dead-lettered.
    pub dead_lettered: u64,
    /// Item attempts repeated after a busy answer.
    pub retried: u64,
    /// Messages acked (their outcome recorded).
    pub acked: u64,
    /// When a message was last acked.
    pub last_ack_at: Option<SystemTime>,
    /// Bulk requests sent.
    pub bulk_requests: u64,
    /// When the last bulk request answered.
    pub last_bulk_at: Option<SystemTime>,
    /// Its actions.
    pub last_bulk_items: usize,
    /// Its duration.
    pub last_bulk_duration: Option<Duration>,
    /// Actions the next bulk request may carry: `batch_size` while the engine answers
    /// quickly, fewer while it is slow or busy.
    pub bulk_limit: usize,
    /// Messages waiting in the consumed queues, when last looked (every few seconds).
    pub queue_depth: Option<u32>,
    /// Messages in their dead-letter queues.
    pub dlq_depth: Option<u32>,
    /// Deliveries refused because the outbox does not know their job as they tell it.
    pub unverified: u64,
    /// Joined documents read from the database (every change of a joined event type).
    pub joined_reads: u64,
    /// Since when outcomes cannot be recorded in PostgreSQL, and why (`None` while they can).
    pub outbox_failing: Option<(SystemTime, String)>,
    /// Errors: lost connections, failed bulk requests, failed reports.
    pub errors: u64,
    /// The last of those errors, and when.
    pub last_error: Option<(SystemTime, String)>,
}

impl Live<IndexerStatus> {
    fn circuit(&self, state: CircuitState) {
        let mut s = self.lock();
        (s.circuit_open_since, s.circuit_failures) = match state {
            CircuitState::Closed => (None, 0),
            CircuitState::Open { failures, since } => (Some(since), failures),
        };
    }

    pub(crate) fn error(&self, error: &str) {
        let mut s = self.lock();
        s.errors += 1;
        s.last_error = Some((SystemTime::now(), error.to_owned()));
    }
}

/// What a message holds once decoded, and once built.
pub(crate) enum Body {
    /// Not a valid envelope.
    Malformed(EnvelopeError),
    /// A change as the message names it (its job, table, record, operation), its row
    /// dropped: the document is built once the delivery is verified, from the outbox's copy
    /// of the row (or, for a joined event type, from the rows read from the database), and
    /// it becomes a `Change`. A truncation stays as it is: it asks for no document.
    Verifying { envelope: Box<Envelope<'static>> },
    /// A verified change, and the action it asks of the index (or why it cannot become
    /// one), written with `version` (the job id, or for a joined document the version of
    /// its read).
    Change {
        envelope: Box<Envelope<'static>>,
        action: Result<Action, BuildError>,
        version: i64,
    },
}

impl Body {
    fn envelope(&self) -> Option<&Envelope<'static>> {
        match self {
            Body::Change { envelope, .. } | Body::Verifying { envelope } => Some(envelope),
            Body::Malformed(_) => None,
        }
    }
}

/// A message on its way into the index.
pub(crate) struct Message {
    pub(crate) delivery: Delivery,
    pub(crate) route: Arc<QueueRoute>,
    pub(crate) body: Body,
    /// Its share of a bulk request's bytes.
    pub(crate) bytes: usize,
    /// Item attempts so far.
    pub(crate) attempts: u32,
    /// Not to be retried before this.
    pub(crate) not_before: Instant,
    /// The consumer span of this message, continuing the job's trace; ends with it.
    pub(crate) span: tracing::Span,
}

impl Message {
    pub(crate) fn job_id(&self) -> Option<i64> {
        match &self.body {
            Body::Change { envelope, .. } | Body::Verifying { envelope } => Some(envelope.job_id),
            Body::Malformed(_) => None,
        }
    }
}

/// What the stages share: the clients, the settings, the status and metrics.
pub(crate) struct Shared {
    pub(crate) search: SearchNodes,
    pub(crate) ledger: Arc<dyn Ledger>,
    /// The event types, by table.
    pub(crate) event_types: HashMap<String, EventType>,
    pub(crate) config: IndexerConfig,
    pub(crate) status: Live<IndexerStatus>,
    pub(crate) metrics: IndexerMetrics,
    pub(crate) shutdown: CancellationToken,
    /// The size of the next bulk requests, from the answers to the last ones.
    pub(crate) pace: Mutex<Pace>,
}

impl Shared {
    /// Adjusts the size of the next bulk requests to an answer.
    fn observe(&self, answer: Answer) {
        let size = {
            let mut pace = self.pace.lock().unwrap_or_else(PoisonError::into_inner);
            pace.observe(answer);
            pace.size()
        };
        self.metrics
            .bulk_limit
            .set(i64::try_from(size).unwrap_or(i64::MAX));
        self.status.lock().bulk_limit = size;
    }

    fn bulk_limit(&self) -> usize {
        self.pace
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .size()
    }
}

/// How one batch ended.
pub(crate) enum Finished {
    /// Written and settled; `retries` wait for their backoff. `link_broken` when dead
    /// letters could not be published (the channel is gone).
    Done {
        retries: Vec<Message>,
        link_broken: bool,
    },
    /// The cluster is unavailable: nothing was done; hold the batch.
    Unavailable { batch: Vec<Message>, reason: String },
    /// Shutdown came while outcomes could not be recorded: left unacked for redelivery.
    Abandoned,
}

/// What the loop may wake for without a delivery: a batch's linger, a due retry, a probe, a
/// depth check.
#[derive(Debug, Clone, Copy)]
struct Wake {
    batch_closes: Option<Instant>,
    batch_full: bool,
    next_retry: Option<Instant>,
    probe_at: Option<Instant>,
    in_flight: usize,
    max_in_flight: usize,
    depth_check: Instant,
}

impl Wake {
    /// The earliest moment at which waking could act. A batch whose linger is over but finds
    /// every in-flight slot taken waits for a batch to finish (which wakes the loop anyway);
    /// a due retry waits while the batch is full; a probe waits for the batch in flight.
    /// Waking for them earlier would spin, taking the CPU the search engine needs.
    fn at(self) -> Instant {
        let room = self.probe_at.is_none() && self.in_flight < self.max_in_flight;
        [
            self.batch_closes.filter(|_| room),
            self.next_retry.filter(|_| !self.batch_full),
            self.probe_at.filter(|_| self.in_flight == 0),
        ]
        .into_iter()
        .flatten()
        .fold(self.depth_check, Instant::min)
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
    status: Live<IndexerStatus>,
    metrics: IndexerMetrics,
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
        require_positive("BENALSAM_BULK_LINGER", config.linger)?;
        require_positive("BENALSAM_BULK_TARGET", config.bulk_target)?;
        if config.batch_size == 0 || config.in_flight == 0 || config.max_attempts == 0 {
            return Err(Error::config(
                "indexer",
                "batch size, in-flight batches and attempts must each be at least 1",
            ));
        }
        let schema = outbox.config().schema.clone();
        let search = search.into();
        let status = Live::<IndexerStatus>::default();
        {
            let mut s = status.lock();
            s.bulk_limit = config.batch_size;
            s.search_node = search.in_use();
        }
        let metrics = IndexerMetrics {
            search_node_switches: search.switches(),
            ..IndexerMetrics::default()
        };
        Ok(Self {
            url,
            event_types: event_types
                .into_iter()
                .map(|t| t.recorded_in(&schema))
                .collect(),
            search,
            ledger: Arc::new(outbox),
            config,
            status,
            metrics,
        })
    }

    /// Records deliveries, bulk requests and outcomes in `metrics`.
    pub fn with_metrics(self, metrics: &Metrics) -> Self {
        self.metrics.register(metrics);
        // Every queue's depth series exists from the start (at zero until measured).
        for event_type in &self.event_types {
            for queue in [&event_type.queue, &event_type.dead_letter_queue] {
                let _ = self.metrics.queue_messages.get_or_create(&Queue {
                    queue: queue.clone(),
                });
            }
        }
        self
    }

    /// The live status, for health checks.
    pub fn status(&self) -> Live<IndexerStatus> {
        self.status.clone()
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
        self.metrics
            .bulk_limit
            .set(i64::try_from(pace.size()).unwrap_or(i64::MAX));
        // The start-up steps may have moved on from the first node.
        self.status.lock().search_node = self.search.in_use();
        let shared = Arc::new(Shared {
            search: self.search,
            ledger: self.ledger,
            event_types: self
                .event_types
                .into_iter()
                .map(|t| (t.table.clone(), t))
                .collect(),
            config: self.config,
            status: self.status.clone(),
            metrics: self.metrics,
            shutdown: shutdown.clone(),
            pace: Mutex::new(pace),
        });
        let mut run = Run {
            shared,
            source,
            batcher: Batcher::new(limits),
            held: Vec::new(),
            outage: VecDeque::new(),
            in_flight: FuturesUnordered::new(),
            breaker,
            probe_at: None,
            connect_failures: 0,
            next_depth_check: Instant::now(),
        };
        // An idle consumer must still know whether it could record an outcome: the outbox
        // is asked beside the loop, so a slow answer never holds deliveries up.
        let watch = tokio::spawn(watch_outbox(Arc::clone(&run.shared)));
        run.run(&shutdown).await;
        run.finish().await;
        watch.abort();
        self.status.lock().connected = false;
    }
}

/// Asks the outbox every few seconds whether it answers, so health turns red while
/// PostgreSQL is away even when no batch needs it, and green again when it answers.
async fn watch_outbox(shared: Arc<Shared>) {
    const EVERY: Duration = Duration::from_secs(5);
    loop {
        match shared.ledger.ping().await {
            Ok(()) => shared.status.lock().outbox_failing = None,
            Err(error) => settle::outbox_failing(&shared, &error),
        }
        tokio::select! {
            () = shared.shutdown.cancelled() => return,
            () = tokio::time::sleep(EVERY) => {}
        }
    }
}

/// The loop's state.
struct Run {
    shared: Arc<Shared>,
    source: Source,
    batcher: Batcher<Message>,
    /// Messages waiting for a retry, unacked.
    held: Vec<Message>,
    /// Batches held back by an open circuit, the next probe first.
    outage: VecDeque<Vec<Message>>,
    in_flight: FuturesUnordered<BoxFuture<'static, Finished>>,
    breaker: CircuitBreaker,
    probe_at: Option<Instant>,
    connect_failures: u32,
    next_depth_check: Instant,
}

impl Run {
    fn status(&self) -> &Live<IndexerStatus> {
        &self.shared.status
    }

    async fn run(&mut self, shutdown: &CancellationToken) {
        while !shutdown.is_cancelled() {
            if !self.source.is_connected() && !self.connect(shutdown).await {
                continue;
            }
            self.check_depths().await;
            self.batcher.set_count(self.shared.bulk_limit());
            self.release_due_retries();
            self.dispatch();
            let circuit_open = self.probe_at.is_some();
            let intake = !circuit_open && !self.batcher.is_full();
            let wake_at = self.wake_at();
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                Some(finished) = self.in_flight.next(), if !self.in_flight.is_empty() => {
                    self.finished(finished);
                }
                event = self.source.next(), if intake => match event {
                    Event::Delivery(incoming) => self.admit(*incoming),
                    Event::Lost(why) => self.link_lost(&why),
                },
                () = tokio::time::sleep_until(wake_at) => {}
            }
        }
    }

    /// At shutdown: the batch being filled and the held-back batches go out (unless the
    /// circuit is open), every batch in flight finishes; retries go back to the queue.
    async fn finish(&mut self) {
        if self.probe_at.is_none() {
            if !self.batcher.is_empty() {
                let batch = self.batcher.take();
                self.spawn(batch);
            }
            while let Some(batch) = self.outage.pop_front() {
                self.spawn(batch);
            }
        }
        while let Some(finished) = self.in_flight.next().await {
            if let Finished::Done { retries, .. } = finished {
                self.held.extend(retries);
            }
        }
        self.held.clear();
        self.source.close().await;
    }

    async fn connect(&mut self, shutdown: &CancellationToken) -> bool {
        // A shutdown is let through while connecting (a cluster test saw a consumer ignore
        // SIGTERM while its channel was being set up on a node that had just come back).
        let attempt = tokio::select! {
            () = shutdown.cancelled() => return false,
            attempt = self.source.connect() => attempt,
        };
        match attempt {
            Ok(broker) => {
                self.connect_failures = 0;
                tracing::info!(%broker, "consuming");
                let mut s = self.status().lock();
                s.connected = true;
                s.broker = Some(broker);
                true
            }
            Err(error) => {
                self.status().error(&error.to_string());
                let delay = self.shared.config.reconnect.delay(self.connect_failures);
                self.connect_failures = self.connect_failures.saturating_add(1);
                tracing::warn!(%error, retry_in = ?delay, "consumer cannot reach RabbitMQ");
                tokio::select! {
                    () = shutdown.cancelled() => {}
                    () = tokio::time::sleep(delay) => {}
                }
                false
            }
        }
    }

    fn link_lost(&mut self, why: &str) {
        self.status().error(why);
        tracing::warn!(reason = why, "consumer lost its channel; reconnecting");
        self.source.lost();
        // The broker hands unacked messages back: whatever waits here comes again.
        self.held.clear();
        self.outage.clear();
        drop(self.batcher.take());
        self.status().lock().connected = false;
    }

    /// When to wake without a delivery (see [`Wake`]).
    fn wake_at(&self) -> Instant {
        Wake {
            batch_closes: self.batcher.deadline(),
            batch_full: self.batcher.is_full(),
            next_retry: self.held.iter().map(|m| m.not_before).min(),
            probe_at: self.probe_at,
            in_flight: self.in_flight.len(),
            max_in_flight: self.shared.config.in_flight,
            depth_check: self.next_depth_check,
        }
        .at()
    }

    /// Moves retries whose backoff is over into the batch being filled.
    fn release_due_retries(&mut self) {
        let now = Instant::now();
        let mut i = 0;
        while i < self.held.len() && !self.batcher.is_full() {
            if self.held[i].not_before <= now {
                let message = self.held.swap_remove(i);
                let bytes = message.bytes;
                self.batcher.push(message, bytes);
            } else {
                i += 1;
            }
        }
    }

    /// Starts batches while there is room: held-back ones first. While the circuit is open,
    /// only one probe at a time, when it is due.
    fn dispatch(&mut self) {
        if let Some(probe_at) = self.probe_at {
            if self.in_flight.is_empty() && Instant::now() >= probe_at {
                let batch = self
                    .outage
                    .pop_front()
                    .unwrap_or_else(|| self.batcher.take());
                if !batch.is_empty() {
                    self.spawn(batch);
                }
            }
            return;
        }
        while self.in_flight.len() < self.shared.config.in_flight {
            if let Some(batch) = self.outage.pop_front() {
                self.spawn(batch);
            } else if self.batcher.is_ready() {
                let batch = self.batcher.take();
                self.spawn(batch);
            } else {
                break;
            }
        }
    }

    fn spawn(&mut self, batch: Vec<Message>) {
        let shared = Arc::clone(&self.shared);
        let channel = self.source.dead_letters();
        self.in_flight
            .push(Box::pin(process(shared, channel, batch)));
    }

    fn finished(&mut self, finished: Finished) {
        match finished {
            Finished::Done {
                retries,
                link_broken,
            } => {
                if self.probe_at.take().is_some() {
                    self.breaker.success();
                    self.shared.metrics.circuit_open.set(0);
                    self.status().circuit(self.breaker.state());
                    tracing::info!("Elasticsearch answers again: circuit closed");
                }
                self.held.extend(retries);
                if link_broken {
                    self.link_lost("dead letters could not be published");
                }
            }
            Finished::Unavailable { batch, reason } => {
                let wait = self.breaker.failure(SystemTime::now());
                self.probe_at = Some(Instant::now() + wait);
                self.status().circuit(self.breaker.state());
                self.shared.metrics.circuit_open.set(1);
                self.status().error(&reason);
                tracing::warn!(%reason, probe_in = ?wait, "Elasticsearch unavailable: circuit open, holding the batch");
                self.outage.push_front(batch);
            }
            Finished::Abandoned => {}
        }
    }

    /// Decodes one delivery into the batch being filled.
    fn admit(&mut self, incoming: Incoming) {
        self.status().lock().received += 1;
        self.shared.metrics.deliveries_received.inc();
        let Incoming {
            delivery,
            route,
            envelope,
        } = incoming;
        let (body, span, bytes) = match envelope {
            Err(error) => (Body::Malformed(error), tracing::Span::none(), 128),
            Ok(mut envelope) => {
                let span = consumer_span(&route.queue, &envelope, &delivery);
                // The message's rows are never used (the wire is not trusted: the document
                // is built from the outbox's copy once the job is verified), and holding
                // them parsed until the ack would double the memory of every message in
                // hand; a dead letter keeps the delivery's bytes.
                envelope.change_data = std::borrow::Cow::Owned(serde_json::Value::Null);
                let joined = self
                    .shared
                    .event_types
                    .get(envelope.table.as_ref())
                    .is_some_and(EventType::is_joined);
                let bytes = match envelope.operation {
                    Operation::Truncate | Operation::Delete => 128,
                    // Unknown until read: about a row with a few related ones.
                    _ if joined => 4096,
                    // A genuine message carries the outbox's row (an UPDATE two of them), so
                    // its size bounds the document's and the batch's byte limit holds without
                    // serialising each document an extra time.
                    _ => delivery.data.len() + 128,
                };
                let body = Body::Verifying {
                    envelope: Box::new(envelope),
                };
                (body, span, bytes)
            }
        };
        self.batcher.push(
            Message {
                delivery,
                route,
                body,
                bytes,
                attempts: 0,
                not_before: Instant::now(),
                span,
            },
            bytes,
        );
    }

    /// Looks at the depth of the queue and the DLQ every few seconds.
    async fn check_depths(&mut self) {
        const EVERY: Duration = Duration::from_secs(5);
        if Instant::now() < self.next_depth_check {
            return;
        }
        self.next_depth_check = Instant::now() + EVERY;
        let depths = self.source.depths().await;
        let (mut queued, mut dead) = (None::<u32>, None::<u32>);
        for (queue, dlq, depth) in depths {
            if let Some(depth) = depth {
                self.shared
                    .metrics
                    .queue_messages
                    .get_or_create(&Queue { queue })
                    .set(i64::from(depth));
                let sum = if dlq { &mut dead } else { &mut queued };
                *sum = Some(sum.unwrap_or(0).saturating_add(depth));
            }
        }
        let mut s = self.shared.status.lock();
        s.queue_depth = queued;
        s.dlq_depth = dead;
    }
}

/// The consumer span of one message, continuing the trace its `traceparent` header names.
fn consumer_span(queue: &str, envelope: &Envelope<'_>, delivery: &Delivery) -> tracing::Span {
    let span = tracing::info_span!(
        "process",
        otel.kind = "consumer",
        otel.name = %format!("{queue} process"),
        messaging.system = "rabbitmq",
        messaging.destination.name = %queue,
        messaging.message.id = %envelope.message_id,
        job.id = envelope.job_id,
    );
    if let Some(parent) = header_text(delivery, TRACEPARENT_HEADER) {
        telemetry::set_parent(&span, &parent);
    }
    span
}

/// A text header of a delivery.
fn header_text(delivery: &Delivery, name: &str) -> Option<String> {
    match delivery.properties.headers().as_ref()?.inner().get(name)? {
        lapin::types::AMQPValue::LongString(s) => {
            Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
        }
        lapin::types::AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

/// Reads the documents of joined messages from the database, one read per event type (so
/// one version for its documents of the batch), and turns each message into a `Change`;
/// with the reason, the messages whose document cannot be built. `None` when shutdown came
/// while PostgreSQL was away.
async fn read_joined(
    shared: &Shared,
    messages: Vec<Message>,
) -> Option<Vec<(Message, Option<String>)>> {
    let mut by_table: HashMap<String, Vec<Message>> = HashMap::new();
    for message in messages {
        if let Some(envelope) = message.body.envelope() {
            by_table
                .entry(envelope.table.to_string())
                .or_default()
                .push(message);
        }
    }
    let mut out = Vec::new();
    for (table, messages) in by_table {
        let Some(event_type) = shared.event_types.get(&table) else {
            continue;
        };
        let mut ids: Vec<String> = messages
            .iter()
            .filter_map(|m| m.body.envelope().map(|e| e.record_id.to_string()))
            .collect();
        ids.sort_unstable();
        ids.dedup();
        let read = settle::retrying(shared, || shared.ledger.read_joined(event_type, &ids)).await?;
        shared.status.lock().joined_reads += ids.len() as u64;
        for mut message in messages {
            let Body::Verifying { envelope } = message.body else {
                continue;
            };
            let id = envelope.record_id.to_string();
            let found = read.rows.get(&id);
            let action = event_type.joined_action(
                id,
                found.map(|(row, _)| row),
                found.map_or(&serde_json::Map::new(), |(_, related)| related),
                read.version,
            );
            let rejected = action.as_ref().err().map(ToString::to_string);
            message.body = Body::Change {
                envelope,
                action,
                version: read.version,
            };
            out.push((message, rejected));
        }
    }
    Some(out)
}

/// Checks one batch against the outbox, builds its documents from the outbox's rows,
/// writes it and settles every message of it.
async fn process(shared: Arc<Shared>, channel: Option<Channel>, batch: Vec<Message>) -> Finished {
    let Some((checks, recorded)) = verify_batch(&shared, &batch).await else {
        return Finished::Abandoned;
    };
    let mut sorted = settle::Sorted::default();
    let mut writable = Vec::new();
    let mut truncations = Vec::new();
    let mut joined = Vec::new();
    for (mut message, check) in batch.into_iter().zip(checks) {
        if check == Check::Deliver
            && let Body::Verifying { envelope } = &message.body
            && envelope.operation != Operation::Truncate
            && !shared
                .event_types
                .get(envelope.table.as_ref())
                .is_some_and(EventType::is_joined)
        {
            let job = message.job_id().and_then(|id| recorded.get(&id));
            message = build(&shared, message, job);
        }
        match (check, &message.body) {
            (_, Body::Malformed(error)) => {
                let reason = error.to_string();
                sorted.dead.push((message, Why::Malformed, reason));
            }
            (Check::Unverified(reason), _) => {
                shared.status.lock().unverified += 1;
                sorted.dead.push((message, Why::Unverified, reason));
            }
            (Check::Duplicate | Check::NotYet, _) => sorted.skipped.push(message),
            (Check::Superseded, _) => {
                shared.status.lock().superseded += 1;
                sorted.covered.push(message);
            }
            (Check::Deliver, Body::Verifying { envelope })
                if envelope.operation == Operation::Truncate =>
            {
                truncations.push(message);
            }
            (Check::Deliver, Body::Verifying { .. }) => joined.push(message),
            (Check::Deliver, Body::Change { action: Ok(_), .. }) => writable.push(message),
            (
                Check::Deliver,
                Body::Change {
                    action: Err(error), ..
                },
            ) => {
                let reason = error.to_string();
                sorted.dead.push((message, Why::Rejected, reason));
            }
        }
    }
    if !joined.is_empty() {
        let Some(read) = read_joined(&shared, joined).await else {
            return Finished::Abandoned;
        };
        for (message, rejected) in read {
            match rejected {
                None => writable.push(message),
                Some(reason) => sorted.dead.push((message, Why::Rejected, reason)),
            }
        }
    }
    if !writable.is_empty() {
        match write(&shared, &writable).await {
            Ok(decisions) => {
                for (message, decision) in writable.into_iter().zip(decisions) {
                    sorted.decided(&shared, message, decision);
                }
            }
            // Nothing was done: the whole batch waits for the cluster (verifying it again
            // later is harmless).
            Err(reason) => {
                let mut batch = writable;
                batch.extend(truncations);
                batch.extend(sorted.into_messages());
                return Finished::Unavailable { batch, reason };
            }
        }
    }
    for message in truncations {
        truncate(&shared, message, &mut sorted).await;
    }
    settle::settle(&shared, channel.as_ref(), sorted).await
}

/// Asks the outbox about every change of the batch (one query, which also brings the rows
/// of the jobs that expect a delivery), retrying while it is away; `None` when shutdown
/// came first.
async fn verify_batch(
    shared: &Shared,
    batch: &[Message],
) -> Option<(Vec<Check>, HashMap<i64, Recorded>)> {
    let ids: Vec<i64> = batch.iter().filter_map(Message::job_id).collect();
    let recorded = settle::retrying(shared, || shared.ledger.lookup(&ids)).await?;
    let by_id: HashMap<i64, Recorded> = recorded.into_iter().map(|r| (r.id, r)).collect();
    let checks = batch
        .iter()
        .map(|m| match m.body.envelope() {
            Some(envelope) => verify::check(
                envelope,
                by_id.get(&envelope.job_id),
                shared.event_types.contains_key(envelope.table.as_ref()),
            ),
            None => Check::Deliver,
        })
        .collect();
    Some((checks, by_id))
}

/// Builds the document of a verified change from the outbox's copy of its job, as the
/// bridge built the message from it: what the message itself carries never reaches the
/// index, so a forged copy of a real job can only deliver the genuine change. A message
/// built already (a retry) is left as it is.
fn build(shared: &Shared, mut message: Message, recorded: Option<&Recorded>) -> Message {
    let mut envelope = match message.body {
        Body::Verifying { envelope } => envelope,
        other => {
            message.body = other;
            return message;
        }
    };
    let action = match (
        shared.event_types.get(envelope.table.as_ref()),
        recorded.and_then(Recorded::job),
    ) {
        (Some(event_type), Some(job)) => {
            // The latency metric counts from the commit the outbox recorded, too.
            envelope.occurred_at = job.created_at;
            event_type.action(&Envelope::of(&job, event_type))
        }
        (None, _) => Err(BuildError(format!(
            "no event type is configured for table {:?}; add one to the consumer",
            envelope.table
        ))),
        (Some(_), None) => Err(BuildError(format!(
            "the outbox holds no row for job {} to build its document from",
            envelope.job_id
        ))),
    };
    message.body = Body::Change {
        version: envelope.job_id,
        envelope,
        action,
    };
    message
}

/// Empties the index of a truncated table of everything older than the truncation, once no
/// older job of the table is on its way any more (those may still write); until then, and
/// while the cluster is away, the truncation waits (without counting attempts).
async fn truncate(shared: &Shared, mut message: Message, sorted: &mut settle::Sorted) {
    let Some(envelope) = message.body.envelope() else {
        return;
    };
    let (table, job) = (envelope.table.to_string(), envelope.job_id);
    let Some(event_type) = shared.event_types.get(&table) else {
        let reason =
            format!("no event type is configured for table {table:?}; add one to the consumer");
        sorted.dead.push((message, Why::Rejected, reason));
        return;
    };
    let result = match shared.ledger.unsettled_before(&table, job).await {
        // Expected for a moment: older messages are still being indexed.
        Ok(n) if n > 0 => {
            tracing::debug!(table, job, older = n, "truncation waits for older jobs");
            Err(None)
        }
        Ok(_) => {
            let deleted =
                truncate::delete_older(&shared.search, &event_type.index.alias, job).await;
            shared.status.lock().search_node = shared.search.in_use();
            deleted.map_err(Some)
        }
        Err(error) => Err(Some(error.to_string())),
    };
    match result {
        Ok(deleted) => {
            tracing::info!(table, job, deleted, "truncation applied to the index");
            sorted.covered.push(message);
        }
        Err(failure) => {
            // Not expected: say so, and keep trying (the index must not keep the old rows).
            if let Some(why) = failure {
                tracing::warn!(table, job, reason = %why, "truncation cannot be applied yet; retrying");
                shared.status.error(&why);
            }
            message.not_before = Instant::now() + Duration::from_secs(1);
            sorted.held.push(message);
        }
    }
}

/// Sends the actions of `batch` as one bulk request and decides every item; `Err` when the
/// cluster as a whole is unavailable.
async fn write(shared: &Shared, batch: &[Message]) -> Result<Vec<plan::Decision>, String> {
    let actions: Vec<(&Action, i64)> = batch
        .iter()
        .filter_map(|m| match &m.body {
            Body::Change {
                action: Ok(action),
                version,
                ..
            } => Some((action, *version)),
            _ => None,
        })
        .collect();
    let deletes: Vec<bool> = actions.iter().map(|(a, _)| a.is_delete()).collect();
    // One span per bulk request, linked to the messages it carries.
    let span = tracing::info_span!("bulk", otel.kind = "client", actions = actions.len());
    for message in batch {
        telemetry::link(&span, &message.span);
    }
    let answer = send(
        shared,
        writer::encode(actions.iter().copied()),
        actions.len(),
    )
    .instrument(span.clone())
    .await;
    match answer {
        Ok((response, took)) => match plan::plan(&deletes, &response) {
            Ok(decisions) if plan::all_retry(&decisions) => {
                shared.observe(Answer {
                    items: actions.len(),
                    took,
                    busy: decisions.len(),
                });
                Err(format!(
                    "every item refused as unavailable, e.g. {}",
                    match &decisions[0] {
                        plan::Decision::Retry(why) => why.as_str(),
                        _ => "",
                    }
                ))
            }
            Ok(decisions) => {
                shared.observe(Answer {
                    items: actions.len(),
                    took,
                    busy: decisions
                        .iter()
                        .filter(|d| matches!(d, plan::Decision::Retry(_)))
                        .count(),
                });
                Ok(decisions)
            }
            Err(why) => Ok(one_by_one(shared, &actions, &why).instrument(span).await),
        },
        Err(WriteError::Unavailable(why)) => Err(why),
        // The cluster answered but refused the request as a whole (one action it cannot
        // parse, a body too large): find the culprit item by item rather than holding the
        // queue forever.
        Err(WriteError::Refused(why)) => {
            tracing::warn!(reason = %why, actions = actions.len(), "bulk request refused; sending its actions one by one");
            Ok(one_by_one(shared, &actions, &why).instrument(span).await)
        }
    }
}

/// Sends each action in a request of its own, after the cluster refused them together. An
/// action refused alone gets that refusal (a permanent failure); one that meets an
/// unavailable cluster is retried later like any busy item.
async fn one_by_one(
    shared: &Shared,
    actions: &[(&Action, i64)],
    refusal: &str,
) -> Vec<plan::Decision> {
    use plan::ItemResult;
    if actions.len() == 1 {
        return vec![plan::decide(
            actions[0].0.is_delete(),
            &ItemResult::refused(refusal),
        )];
    }
    let mut decisions = Vec::with_capacity(actions.len());
    for (action, version) in actions {
        let result = match send(shared, writer::encode([(*action, *version)]), 1).await {
            Ok((response, _)) => match plan::plan(&[action.is_delete()], &response) {
                Ok(mut one) => one.remove(0),
                Err(why) => plan::decide(action.is_delete(), &ItemResult::refused(&why)),
            },
            Err(WriteError::Refused(why)) => {
                plan::decide(action.is_delete(), &ItemResult::refused(&why))
            }
            Err(WriteError::Unavailable(why)) => {
                plan::decide(action.is_delete(), &ItemResult::unavailable(&why))
            }
        };
        decisions.push(result);
    }
    decisions
}

/// One bulk request, with its metrics and status.
async fn send(
    shared: &Shared,
    body: Vec<u8>,
    actions: usize,
) -> Result<(plan::BulkResponse, Duration), WriteError> {
    let m = &shared.metrics;
    m.bulk_size.observe(actions as f64);
    let written = writer::write(&shared.search, &body).await;
    // The request may have moved to another node, answered or not.
    shared.status.lock().search_node = shared.search.in_use();
    match written {
        Ok((response, took)) => {
            metrics::inc(&m.bulk_requests, "ok");
            metrics::observe(&m.bulk_duration, took);
            let mut s = shared.status.lock();
            s.bulk_requests += 1;
            s.last_bulk_at = Some(SystemTime::now());
            s.last_bulk_items = actions;
            s.last_bulk_duration = Some(took);
            Ok((response, took))
        }
        Err(error) => {
            metrics::inc(&m.bulk_requests, "failed");
            Err(error)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_loop_wakes_only_for_what_it_can_act_on() {
        let now = Instant::now();
        let later = now + Duration::from_secs(5);
        let past = now - Duration::from_millis(1);
        let wake = Wake {
            batch_closes: Some(past),
            batch_full: true,
            next_retry: Some(past),
            probe_at: None,
            in_flight: 2,
            max_in_flight: 2,
            depth_check: later,
        };
        assert_eq!(
            wake.at(),
            later,
            "a ready batch with no free slot and retries behind a full batch wait: no spin"
        );
        assert_eq!(
            Wake {
                in_flight: 1,
                ..wake
            }
            .at(),
            past,
            "a free slot: the batch goes"
        );
        assert_eq!(
            Wake {
                batch_full: false,
                batch_closes: None,
                ..wake
            }
            .at(),
            past,
            "room in the batch: the retry goes in"
        );
        let open = Wake {
            batch_closes: Some(past),
            probe_at: Some(now),
            in_flight: 1,
            ..wake
        };
        assert_eq!(
            open.at(),
            later,
            "the circuit is open and a batch is still out"
        );
        assert_eq!(
            Wake {
                in_flight: 0,
                ..open
            }
            .at(),
            now,
            "then the probe is due"
        );
    }
}
