//! [`Indexer`]: consumes `elasticsearch.sync` into Elasticsearch bulk requests.
//!
//! ```text
//! deliveries (prefetch) ─► decode + validate ─► build action ─► batch (count, bytes, linger)
//!   ─► _bulk (external version = job id) ─► classify each item
//!        done      ─► mark completed (one statement) ─► ack
//!        permanent ─► dead-letter with reason ─► mark failed ─► ack
//!        retryable ─► held unacked, retried with backoff; after N attempts dead-lettered
//!   whole request failed / every item unavailable ─► circuit open: hold the batch, take
//!   nothing new, probe with backoff, resume — no job is failed by an outage
//! ```
//!
//! A message that is not a valid envelope, or whose row cannot become a document, is
//! dead-lettered with the reason at once; the indexer never stops on input. Acks come only
//! after the outcome is recorded, so a crash at any point means redelivery, and redelivery
//! is harmless: the index refuses versions it has already seen.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use elasticsearch::Elasticsearch;
use elasticsearch::http::Method;
use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::backoff::Backoff;
use crate::bulk::{self, BulkItem, ItemResult};
use crate::circuit::{CircuitBreaker, CircuitState};
use crate::config::AmqpUrl;
use crate::dead_letter::{self, Kind};
use crate::document::{Action, Documents};
use crate::envelope::{Envelope, JOB_ID_HEADER, TRACEPARENT_HEADER};
use crate::metrics::{self, Metrics};
use crate::outbox::{Failure, Outbox};
use crate::outcome::{Done, Outcome, classify};
use crate::status::StatusCell;
use crate::telemetry;
use crate::topology::{DEAD_LETTER_QUEUE, SYNC_QUEUE};
use crate::{Error, Result};

/// Settings of an [`Indexer`].
#[derive(Debug, Clone)]
pub struct IndexerConfig {
    /// The queue to consume.
    pub queue: String,
    /// Unacknowledged messages the broker may hand over at once (`basic.qos`).
    pub prefetch: u16,
    /// Most actions per bulk request.
    pub batch_size: usize,
    /// Most request bytes per bulk request.
    pub batch_bytes: usize,
    /// Longest wait for a batch to fill once its first message arrived.
    pub linger: Duration,
    /// Attempts of an item Elasticsearch refuses as busy before it is dead-lettered.
    pub max_attempts: u32,
    /// Delays between those attempts.
    pub retry: Backoff,
    /// Delays between probes while the circuit is open.
    pub circuit: Backoff,
    /// Delays between reconnects to RabbitMQ.
    pub reconnect: Backoff,
    /// The connection's name in the management UI.
    pub connection_name: String,
    /// Where deliveries, bulk requests and outcomes are recorded.
    pub metrics: Arc<Metrics>,
}

impl Default for IndexerConfig {
    fn default() -> Self {
        Self {
            queue: SYNC_QUEUE.to_owned(),
            // From the benchmarks (BENCHMARKS.md): 500 per request is as fast as 1,000 in the
            // whole pipeline and keeps the consumer's peak RSS near 40 MiB instead of 54; a
            // prefetch of twice that lets the next batch arrive while one is being written.
            prefetch: 1000,
            batch_size: 500,
            batch_bytes: 5 * 1024 * 1024,
            linger: Duration::from_millis(50),
            max_attempts: 5,
            retry: Backoff::new(Duration::from_millis(500), Duration::from_secs(30)),
            circuit: Backoff::new(Duration::from_secs(1), Duration::from_secs(60)),
            reconnect: Backoff::default(),
            connection_name: "benalsam-consumer".to_owned(),
            metrics: Metrics::shared(),
        }
    }
}

/// What an indexer has been doing, for health checks and metrics.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct IndexerStatus {
    /// Whether it holds a consuming channel.
    pub connected: bool,
    /// The circuit breaker.
    pub circuit: CircuitState,
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
    /// Bulk requests sent.
    pub bulk_requests: u64,
    /// When the last bulk request answered.
    pub last_bulk_at: Option<SystemTime>,
    /// Its actions.
    pub last_bulk_items: usize,
    /// Its duration.
    pub last_bulk_duration: Option<Duration>,
    /// Messages waiting in the queue, and in the DLQ, when last looked (every few seconds).
    pub queue_depth: Option<u32>,
    /// Messages in the DLQ.
    pub dlq_depth: Option<u32>,
    /// Errors: lost connections, failed bulk requests, failed state updates.
    pub errors: u64,
    /// The last of those errors.
    pub last_error: Option<String>,
}

impl Default for IndexerStatus {
    fn default() -> Self {
        Self {
            connected: false,
            circuit: CircuitState::Closed,
            received: 0,
            indexed: 0,
            deleted: 0,
            superseded: 0,
            dead_lettered: 0,
            retried: 0,
            bulk_requests: 0,
            last_bulk_at: None,
            last_bulk_items: 0,
            last_bulk_duration: None,
            queue_depth: None,
            dlq_depth: None,
            errors: 0,
            last_error: None,
        }
    }
}

/// The live status of an indexer; clone the `Arc` to read it from a health server.
pub type Status = StatusCell<IndexerStatus>;

impl Status {
    fn error(&self, error: &str) {
        let mut s = self.lock();
        s.errors += 1;
        s.last_error = Some(error.to_owned());
    }
}

/// A message on its way into the index.
struct Pending {
    delivery: Delivery,
    job_id: i64,
    /// When the change was committed, for the end-to-end latency.
    occurred_at: Option<SystemTime>,
    action: Action,
    bytes: usize,
    attempts: u32,
    /// The consumer span of this message, continuing the job's trace; ends with the message.
    span: tracing::Span,
    not_before: Instant,
}

/// The open connection: a consuming channel and a confirm-mode channel for dead letters.
struct Link {
    connection: Connection,
    consumer: Consumer,
    dead_letters: Channel,
}

/// Consumes change messages into Elasticsearch. See the [module documentation](self).
#[derive(Debug)]
pub struct Indexer {
    url: AmqpUrl,
    search: Elasticsearch,
    outbox: Outbox,
    documents: Documents,
    config: IndexerConfig,
    status: Arc<Status>,
}

impl Indexer {
    /// An indexer of `config.queue` into `search`, recording job states in `outbox`.
    pub fn new(
        url: AmqpUrl,
        search: Elasticsearch,
        outbox: Outbox,
        documents: Documents,
        config: IndexerConfig,
    ) -> Self {
        Self {
            url,
            search,
            outbox,
            documents,
            config,
            status: Arc::new(Status::default()),
        }
    }

    /// The live status, shareable with a health server.
    pub fn status(&self) -> Arc<Status> {
        Arc::clone(&self.status)
    }

    /// Consumes until `shutdown` is cancelled; the batch in hand is finished and acked
    /// first. Messages held for a retry go back to the queue.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut run = Run {
            indexer: &self,
            shutdown: shutdown.clone(),
            link: None,
            held: Vec::new(),
            breaker: CircuitBreaker::new(self.config.circuit),
            connect_failures: 0,
            next_depth_check: Instant::now(),
        };
        run.run(&shutdown).await;
        if let Some(link) = run.link.take() {
            let _ = link.connection.close(200, "shutting down".into()).await;
        }
        self.status.lock().connected = false;
    }
}

struct Run<'a> {
    indexer: &'a Indexer,
    shutdown: CancellationToken,
    link: Option<Link>,
    /// Messages waiting for a retry, unacked.
    held: Vec<Pending>,
    breaker: CircuitBreaker,
    connect_failures: u32,
    next_depth_check: Instant,
}

enum Next {
    Delivery(Box<Delivery>),
    LinkLost(String),
    Wake,
    Shutdown,
}

impl Run<'_> {
    fn config(&self) -> &IndexerConfig {
        &self.indexer.config
    }

    fn status(&self) -> &Status {
        &self.indexer.status
    }

    fn metrics(&self) -> &Metrics {
        &self.indexer.config.metrics
    }

    async fn run(&mut self, shutdown: &CancellationToken) {
        while !shutdown.is_cancelled() {
            if self.link.is_none() && !self.connect(shutdown).await {
                continue;
            }
            self.check_depths().await;
            let mut batch = self.due_retries();
            if batch.is_empty() {
                match self.next(shutdown, self.wake_at()).await {
                    Next::Delivery(d) => self.admit(*d, &mut batch).await,
                    Next::LinkLost(why) => {
                        self.link_lost(&why);
                        continue;
                    }
                    Next::Wake => continue,
                    Next::Shutdown => break,
                }
            }
            // Fill the batch for at most `linger`; a shutdown meanwhile still finishes it.
            let deadline = Instant::now() + self.config().linger;
            let never = CancellationToken::new();
            let mut bytes: usize = batch.iter().map(|p| p.bytes).sum();
            while batch.len() < self.config().batch_size && bytes < self.config().batch_bytes {
                match self.next(&never, Some(deadline)).await {
                    Next::Delivery(d) => {
                        let before = batch.len();
                        self.admit(*d, &mut batch).await;
                        bytes += batch.get(before).map_or(0, |p| p.bytes);
                    }
                    Next::LinkLost(why) => {
                        self.link_lost(&why);
                        break;
                    }
                    Next::Wake | Next::Shutdown => break,
                }
            }
            if !batch.is_empty() && !self.process(batch, shutdown).await {
                break;
            }
        }
    }

    async fn connect(&mut self, shutdown: &CancellationToken) -> bool {
        match open(self.indexer).await {
            Ok(link) => {
                self.link = Some(link);
                self.connect_failures = 0;
                self.status().lock().connected = true;
                tracing::info!(queue = %self.config().queue, "consuming");
                true
            }
            Err(error) => {
                self.status().error(&error.to_string());
                let delay = self.config().reconnect.delay(self.connect_failures);
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
        self.link = None;
        // The broker hands unacked messages back; the held ones come again.
        self.held.clear();
        self.status().lock().connected = false;
    }

    /// The next delivery, or a wake-up at `until`, or the shutdown.
    async fn next(&mut self, shutdown: &CancellationToken, until: Option<Instant>) -> Next {
        let Some(link) = self.link.as_mut() else {
            return Next::LinkLost("no channel".to_owned());
        };
        let sleep = async {
            match until {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            () = shutdown.cancelled() => Next::Shutdown,
            delivery = link.consumer.next() => match delivery {
                Some(Ok(d)) => Next::Delivery(Box::new(d)),
                Some(Err(e)) => Next::LinkLost(format!("consuming: {e}")),
                None => Next::LinkLost("the broker cancelled the consumer".to_owned()),
            },
            () = sleep => Next::Wake,
        }
    }

    /// When to wake without a delivery: the next due retry or depth check.
    fn wake_at(&self) -> Option<Instant> {
        let retry = self.held.iter().map(|p| p.not_before).min();
        Some(retry.map_or(self.next_depth_check, |r| r.min(self.next_depth_check)))
    }

    fn due_retries(&mut self) -> Vec<Pending> {
        let now = Instant::now();
        let (due, later): (Vec<Pending>, Vec<Pending>) =
            self.held.drain(..).partition(|p| p.not_before <= now);
        self.held = later;
        due
    }

    /// Decodes and builds one delivery; what cannot be indexed is dead-lettered at once.
    async fn admit(&mut self, delivery: Delivery, batch: &mut Vec<Pending>) {
        self.status().lock().received += 1;
        self.metrics().deliveries_received.inc();
        let envelope = match Envelope::decode(&delivery.data) {
            Ok(envelope) => envelope,
            Err(error) => {
                let job = delivery.properties.headers().as_ref().and_then(|h| {
                    match h.inner().get(JOB_ID_HEADER) {
                        Some(lapin::types::AMQPValue::LongLongInt(id)) => Some(*id),
                        _ => None,
                    }
                });
                self.reject(delivery, job, Kind::Malformed, &error.to_string())
                    .await;
                return;
            }
        };
        let span = tracing::info_span!(
            "process",
            otel.kind = "consumer",
            otel.name = %format!("{} process", self.config().queue),
            messaging.system = "rabbitmq",
            messaging.destination.name = %self.config().queue,
            messaging.message.id = %envelope.message_id,
            job.id = envelope.job_id,
        );
        if let Some(parent) = header_text(&delivery, TRACEPARENT_HEADER) {
            telemetry::set_parent(&span, &parent);
        }
        match self.indexer.documents.build(&envelope) {
            Ok(action) => {
                // The message's size bounds the document's (an UPDATE carries two rows), so the
                // batch's byte limit holds without serialising each document an extra time.
                let bytes = match &action {
                    Action::Index { .. } => delivery.data.len() + 128,
                    Action::Delete { .. } => 128,
                };
                batch.push(Pending {
                    delivery,
                    job_id: envelope.job_id,
                    occurred_at: humantime::parse_rfc3339(&envelope.occurred_at).ok(),
                    action,
                    bytes,
                    attempts: 0,
                    span,
                    not_before: Instant::now(),
                });
            }
            Err(error) => {
                self.reject(
                    delivery,
                    Some(envelope.job_id),
                    Kind::Rejected,
                    &error.to_string(),
                )
                .await;
            }
        }
    }

    /// Dead-letters one message, fails its job, acks it.
    async fn reject(&mut self, delivery: Delivery, job: Option<i64>, kind: Kind, reason: &str) {
        tracing::warn!(
            job,
            kind = kind.as_str(),
            reason,
            "dead-lettering a message"
        );
        let Some(link) = self.link.as_ref() else {
            return;
        };
        if let Err(error) = dead_letter::publish(&link.dead_letters, &delivery, kind, reason).await
        {
            // Not acked: it comes back, and is judged again.
            self.link_lost(&format!("dead-lettering: {error}"));
            return;
        }
        if let Some(id) = job {
            let failure = Failure {
                id,
                error: reason.to_owned(),
                retry: false,
            };
            if !self.record_failures(&[failure]).await {
                return;
            }
        }
        self.status().lock().dead_lettered += 1;
        Metrics::inc(&self.metrics().deliveries_dead_lettered, kind.as_str());
        if delivery.ack(BasicAckOptions::default()).await.is_ok() {
            self.metrics().deliveries_acked.inc();
        }
    }

    /// Sends one batch; returns false when shutdown interrupted an outage.
    async fn process(&mut self, batch: Vec<Pending>, shutdown: &CancellationToken) -> bool {
        let items: Vec<BulkItem> = batch
            .iter()
            .map(|p| BulkItem {
                action: p.action.clone(),
                version: p.job_id,
            })
            .collect();
        // One span per bulk request, linked to the messages it carries.
        let bulk_span = tracing::info_span!("bulk", otel.kind = "client", actions = items.len());
        for pending in &batch {
            telemetry::link(&bulk_span, &pending.span);
        }
        let results = loop {
            match self.bulk(&items).instrument(bulk_span.clone()).await {
                Ok(results) if !all_unavailable(&batch, &results) => {
                    self.close_circuit();
                    break results;
                }
                // The cluster answered but refused the request as a whole (one action it cannot
                // parse, a body too large): find the culprit item by item rather than holding
                // the queue forever.
                Err(BulkFailure::Refused(why)) => {
                    self.close_circuit();
                    tracing::warn!(reason = %why, actions = items.len(), "bulk request refused; sending its actions one by one");
                    break self
                        .one_by_one(&items, &why)
                        .instrument(bulk_span.clone())
                        .await;
                }
                outcome => {
                    let why = match outcome {
                        Err(BulkFailure::Unavailable(why) | BulkFailure::Refused(why)) => why,
                        Ok(results) => format!(
                            "every item refused as unavailable, e.g. {}",
                            results[0].reason.clone().unwrap_or_default()
                        ),
                    };
                    let wait = self.breaker.failure(SystemTime::now());
                    self.status().lock().circuit = self.breaker.state();
                    self.metrics().circuit_open.set(1);
                    self.status().error(&why);
                    tracing::warn!(reason = %why, probe_in = ?wait, "Elasticsearch unavailable: circuit open, holding the batch");
                    tokio::select! {
                        // The batch stays unacked; the broker hands it to the next consumer.
                        () = shutdown.cancelled() => return false,
                        () = tokio::time::sleep(wait) => {}
                    }
                }
            }
        };

        let mut done = Vec::new();
        let mut rejected = Vec::new();
        for (pending, result) in batch.into_iter().zip(&results) {
            let outcome = classify(pending.action.is_delete(), result);
            Metrics::inc(&self.metrics().bulk_items, outcome_kind(&outcome));
            match outcome {
                Outcome::Done(kind) => {
                    let mut s = self.status().lock();
                    match kind {
                        Done::Applied if pending.action.is_delete() => s.deleted += 1,
                        Done::Applied => s.indexed += 1,
                        Done::AlreadyGone => s.deleted += 1,
                        Done::Superseded => s.superseded += 1,
                    }
                    if kind == Done::Applied
                        && let Some(latency) = pending
                            .occurred_at
                            .and_then(|t| SystemTime::now().duration_since(t).ok())
                    {
                        Metrics::observe(&self.metrics().end_to_end_latency, latency);
                    }
                    done.push(pending);
                }
                Outcome::Permanent(reason) => rejected.push((pending, Kind::Rejected, reason)),
                Outcome::Retry(reason) => {
                    let mut pending = pending;
                    pending.attempts += 1;
                    if pending.attempts >= self.config().max_attempts {
                        let reason = format!("{} attempts: {reason}", pending.attempts);
                        rejected.push((pending, Kind::RetriesExhausted, reason));
                    } else {
                        pending.not_before =
                            Instant::now() + self.config().retry.delay(pending.attempts - 1);
                        self.status().lock().retried += 1;
                        self.held.push(pending);
                    }
                }
            }
        }

        // Completed first, acked after: a crash in between means a harmless redelivery.
        let ids: Vec<i64> = done.iter().map(|p| p.job_id).collect();
        if self.record_completed(&ids, shutdown).await {
            self.metrics().jobs_completed.inc_by(ids.len() as u64);
            // Sent together: one ack at a time would wait on the connection's loop each time.
            let acks = done
                .iter()
                .map(|pending| pending.delivery.ack(BasicAckOptions::default()));
            let acked = futures::future::join_all(acks)
                .await
                .iter()
                .filter(|r| r.is_ok())
                .count();
            self.metrics().deliveries_acked.inc_by(acked as u64);
        }
        for (pending, kind, reason) in rejected {
            self.reject(pending.delivery, Some(pending.job_id), kind, &reason)
                .await;
        }
        true
    }

    fn close_circuit(&mut self) {
        self.breaker.success();
        self.status().lock().circuit = self.breaker.state();
        self.metrics().circuit_open.set(0);
    }

    /// Sends each action in a request of its own, after the cluster refused them together.
    /// An action refused alone gets that refusal as its result (a permanent failure, 4xx); one
    /// that meets an unavailable cluster is retried later like any busy item.
    async fn one_by_one(&mut self, items: &[BulkItem], refusal: &str) -> Vec<ItemResult> {
        if items.len() == 1 {
            return vec![refused(refusal)];
        }
        let mut results = Vec::with_capacity(items.len());
        for item in items {
            let result = match self.bulk(std::slice::from_ref(item)).await {
                Ok(mut one) => one
                    .pop()
                    .unwrap_or_else(|| refused("no answer for the action")),
                Err(BulkFailure::Refused(why)) => refused(&why),
                Err(BulkFailure::Unavailable(why)) => ItemResult {
                    status: 503,
                    error_type: Some("unavailable".to_owned()),
                    reason: Some(why),
                },
            };
            results.push(result);
        }
        results
    }

    async fn bulk(&mut self, items: &[BulkItem]) -> Result<Vec<ItemResult>, BulkFailure> {
        let started = Instant::now();
        let metrics = Arc::clone(&self.indexer.config.metrics);
        metrics.bulk_size.observe(items.len() as f64);
        let answer = crate::search::request(
            &self.indexer.search,
            Method::Post,
            "/_bulk",
            Some(bulk::encode(items)),
            "application/x-ndjson",
        )
        .await
        .map_err(|e| {
            Metrics::inc(&metrics.bulk_requests, "failed");
            BulkFailure::Unavailable(e.to_string())
        })?;
        Metrics::observe(&metrics.bulk_duration, started.elapsed());
        {
            let mut s = self.status().lock();
            s.bulk_requests += 1;
            s.last_bulk_at = Some(SystemTime::now());
            s.last_bulk_items = items.len();
            s.last_bulk_duration = Some(started.elapsed());
        }
        let (status, body) = answer;
        if !status.is_success() {
            Metrics::inc(&metrics.bulk_requests, "failed");
            let why = format!("bulk request answered {status}: {body}");
            let code = status.as_u16();
            return Err(if code == 429 || code >= 500 {
                BulkFailure::Unavailable(why)
            } else {
                BulkFailure::Refused(why)
            });
        }
        Metrics::inc(&metrics.bulk_requests, "ok");
        bulk::parse_response(&body, items.len()).map_err(BulkFailure::Refused)
    }

    /// Marks jobs completed, retrying while PostgreSQL is away; false if shutdown came first.
    async fn record_completed(&mut self, ids: &[i64], shutdown: &CancellationToken) -> bool {
        let mut attempt = 0;
        loop {
            match self.indexer.outbox.mark_completed(ids).await {
                Ok(_) => return true,
                Err(error) => {
                    self.status().error(&error.to_string());
                    let wait = self.config().reconnect.delay(attempt);
                    attempt += 1;
                    tracing::warn!(%error, retry_in = ?wait, "cannot mark jobs completed; holding their acks");
                    tokio::select! {
                        () = shutdown.cancelled() => return false,
                        () = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }

    /// Marks dead-lettered jobs failed, retrying while PostgreSQL is away; false if shutdown
    /// came first (the message is then not acked, and judged again after redelivery).
    async fn record_failures(&mut self, failures: &[Failure]) -> bool {
        let mut attempt = 0;
        loop {
            match self.indexer.outbox.mark_failed(failures).await {
                Ok(_) => return true,
                Err(error) => {
                    self.status().error(&error.to_string());
                    let wait = self.config().reconnect.delay(attempt);
                    attempt += 1;
                    tracing::warn!(%error, retry_in = ?wait, "cannot mark dead-lettered jobs failed; holding their acks");
                    tokio::select! {
                        () = self.shutdown.cancelled() => return false,
                        () = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }

    /// Looks at the depth of the queue and the DLQ every few seconds.
    async fn check_depths(&mut self) {
        const EVERY: Duration = Duration::from_secs(5);
        if Instant::now() < self.next_depth_check {
            return;
        }
        self.next_depth_check = Instant::now() + EVERY;
        let Some(link) = self.link.as_ref() else {
            return;
        };
        let queue = depth(&link.dead_letters, &self.config().queue).await;
        let dlq = depth(&link.dead_letters, DEAD_LETTER_QUEUE).await;
        for (name, depth) in [(SYNC_QUEUE, queue), (DEAD_LETTER_QUEUE, dlq)] {
            if let Some(depth) = depth {
                self.metrics()
                    .queue_messages
                    .get_or_create(&metrics::Queue { queue: name })
                    .set(i64::from(depth));
            }
        }
        let mut s = self.status().lock();
        s.queue_depth = queue;
        s.dlq_depth = dlq;
    }
}

/// Why a bulk request as a whole failed.
enum BulkFailure {
    /// No answer, or busy / unavailable (429, 5xx): the circuit breaker's business.
    Unavailable(String),
    /// The cluster answered and refused the request itself (another 4xx, or an answer that
    /// does not match the actions): something in the batch is wrong, not the cluster.
    Refused(String),
}

/// The result given to an action the cluster refused in a request of its own.
fn refused(reason: &str) -> ItemResult {
    ItemResult {
        status: 400,
        error_type: Some("request_refused".to_owned()),
        reason: Some(reason.to_owned()),
    }
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

/// The `bulk_items` label of an outcome.
fn outcome_kind(outcome: &Outcome) -> &'static str {
    match outcome {
        Outcome::Done(Done::Applied) => "applied",
        Outcome::Done(Done::Superseded) => "superseded",
        Outcome::Done(Done::AlreadyGone) => "already_gone",
        Outcome::Retry(_) => "retry",
        Outcome::Permanent(_) => "permanent",
    }
}

/// Every item refused as unavailable or busy: the cluster, not the documents.
fn all_unavailable(batch: &[Pending], results: &[ItemResult]) -> bool {
    !results.is_empty()
        && batch
            .iter()
            .zip(results)
            .all(|(p, r)| matches!(classify(p.action.is_delete(), r), Outcome::Retry(_)))
}

async fn depth(channel: &Channel, queue: &str) -> Option<u32> {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .ok()
        .map(|q| q.message_count())
}

async fn open(indexer: &Indexer) -> Result<Link> {
    let config = &indexer.config;
    let connection = crate::amqp::connect(&indexer.url, &config.connection_name).await?;
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| Error::amqp("opening the consuming channel", e))?;
    channel
        .basic_qos(config.prefetch, BasicQosOptions::default())
        .await
        .map_err(|e| Error::amqp("setting the prefetch", e))?;
    let consumer = channel
        .basic_consume(
            config.queue.as_str().into(),
            config.connection_name.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| Error::amqp(format!("consuming {}", config.queue), e))?;
    let dead_letters = connection
        .create_channel()
        .await
        .map_err(|e| Error::amqp("opening the dead-letter channel", e))?;
    dead_letters
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| Error::amqp("enabling confirms for dead letters", e))?;
    Ok(Link {
        connection,
        consumer,
        dead_letters,
    })
}
