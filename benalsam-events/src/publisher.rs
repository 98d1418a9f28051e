//! [`Publisher`]: a `Sink` of jobs that publishes them to RabbitMQ and marks them `sent` only
//! once the broker has confirmed them.
//!
//! Every message is published `mandatory`, persistent, on a channel in confirm mode, with at
//! most `window` messages unconfirmed at a time. Then:
//!
//! | the broker answers | the job |
//! |---|---|
//! | ack | `sent` (marked in batches) |
//! | ack with the message returned (no queue bound for its key) | `failed`, reason stored, retried with backoff |
//! | nack | `failed`, retried with backoff |
//! | channel closed by an error (e.g. a missing exchange) | `failed`, reason stored, retried with backoff |
//! | nothing: the connection was lost | published again on a new connection, same `messageId` |
//!
//! A lost connection fails no job: while RabbitMQ is away the sink stops accepting jobs (so
//! the job stream stops claiming) and reconnects with backoff. A job is never marked `sent`
//! without its confirm; when in doubt it is published again, and the duplicate carries the
//! same `messageId`.
//!
//! The work runs in a task; closing the sink (`SinkExt::close`, which `forward` does at the
//! end of its stream) waits until every accepted job is confirmed and recorded.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant, SystemTime};

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, Sink, StreamExt};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Confirmation, Connection, ExchangeKind};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::PollSender;

use crate::backoff::Backoff;
use crate::config::AmqpUrl;
use crate::envelope::{Envelope, trace_id_of};
use crate::job::Job;
use crate::metrics::Metrics;
use crate::outbox::{Failure, Outbox};
use crate::routing::Routes;
use crate::status::StatusCell;
use crate::telemetry;
use crate::{Error, Result};

/// Largest message body published: RabbitMQ 4's default `max_message_size` (3.x allows 128 MiB).
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Settings of a [`Publisher`].
#[derive(Debug, Clone)]
pub struct PublisherConfig {
    /// Most messages published and not yet confirmed.
    pub window: usize,
    /// Confirmed jobs are marked `sent` in one statement once this many have gathered...
    pub mark_batch: usize,
    /// ...or this long after the first of them, whichever comes first.
    pub mark_interval: Duration,
    /// Delays between reconnect attempts.
    pub reconnect: Backoff,
    /// The `app_id` property of every message.
    pub app_id: String,
    /// The connection's name in the management UI.
    pub connection_name: String,
    /// Where publishes, confirms and failures are recorded.
    pub metrics: Arc<Metrics>,
}

impl Default for PublisherConfig {
    fn default() -> Self {
        Self {
            window: 1000,
            mark_batch: 500,
            mark_interval: Duration::from_millis(20),
            reconnect: Backoff::default(),
            app_id: "benalsam-bridge".to_owned(),
            connection_name: "benalsam-bridge publisher".to_owned(),
            metrics: Metrics::shared(),
        }
    }
}

/// What a publisher has been doing, for health checks and metrics.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct PublisherStatus {
    /// Whether it holds an open connection and channel.
    pub connected: bool,
    /// Messages handed to the broker (republications included).
    pub published: u64,
    /// Jobs confirmed and marked `sent`.
    pub confirmed: u64,
    /// Jobs nacked, returned as unroutable, or refused by the channel: marked `failed`.
    pub failed: u64,
    /// Messages published again because the connection was lost before their confirm.
    pub republished: u64,
    /// Messages waiting for their confirm right now.
    pub unconfirmed: usize,
    /// When a message was last published.
    pub last_publish_at: Option<SystemTime>,
    /// When a confirm was last received.
    pub last_confirm_at: Option<SystemTime>,
    /// Connection attempts that failed, lost connections and failed state updates.
    pub errors: u64,
    /// The last of those errors.
    pub last_error: Option<String>,
}

/// The live status of a publisher; clone the `Arc` to read it from a health server.
pub type Status = StatusCell<PublisherStatus>;

impl Status {
    fn error(&self, error: &Error) {
        let mut s = self.lock();
        s.errors += 1;
        s.last_error = Some(error.to_string());
    }
}

/// Publishes jobs to RabbitMQ. See the [module documentation](self).
#[derive(Debug)]
pub struct Publisher {
    sender: PollSender<Job>,
    task: Option<JoinHandle<()>>,
    status: Arc<Status>,
}

impl Publisher {
    /// A publisher of jobs routed by `routes`, recording their states in `outbox`. Starts its
    /// task (and its connection) at once; must be called inside a tokio runtime.
    pub fn new(url: AmqpUrl, outbox: Outbox, routes: Routes, config: PublisherConfig) -> Self {
        let (tx, rx) = mpsc::channel(config.window.max(1));
        let status = Arc::new(Status::default());
        let worker = Worker {
            url,
            outbox,
            routes,
            config,
            status: Arc::clone(&status),
            rx,
            input_open: true,
            link: None,
            queue: VecDeque::new(),
            unconfirmed: HashMap::new(),
            confirms: FuturesUnordered::new(),
            next_seq: 0,
            sent: Vec::new(),
            failures: Vec::new(),
            marks_due: None,
            connect_failures: 0,
            known_exchanges: HashSet::new(),
        };
        Self {
            sender: PollSender::new(tx),
            task: Some(tokio::spawn(worker.run())),
            status,
        }
    }

    /// The live status, shareable with a health server.
    pub fn status(&self) -> Arc<Status> {
        Arc::clone(&self.status)
    }
}

fn stopped() -> Error {
    Error::Stopped {
        what: "the publisher",
    }
}

impl Sink<Job> for Publisher {
    type Error = Error;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        self.sender.poll_reserve(cx).map_err(|_| stopped())
    }

    fn start_send(mut self: Pin<&mut Self>, job: Job) -> Result<()> {
        self.sender.send_item(job).map_err(|_| stopped())
    }

    /// Jobs are handed to the publishing task as they are sent; their confirms arrive
    /// later. Close the sink to wait for them.
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        self.sender.close();
        if let Some(task) = self.task.as_mut() {
            let joined = ready!(Pin::new(task).poll(cx));
            self.task = None;
            if joined.is_err() {
                return Poll::Ready(Err(stopped()));
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// A published job awaiting its confirm.
struct InFlight {
    job: Job,
    published_at: Instant,
    /// The producer span of this publish; it ends with the confirm.
    _span: tracing::Span,
}

/// An open connection and its confirm-mode channel.
struct Link {
    connection: Connection,
    channel: Channel,
}

type ConfirmFuture = BoxFuture<'static, (u64, lapin::Result<Confirmation>)>;

/// The publishing task's state.
struct Worker {
    url: AmqpUrl,
    outbox: Outbox,
    routes: Routes,
    config: PublisherConfig,
    status: Arc<Status>,
    rx: mpsc::Receiver<Job>,
    input_open: bool,
    link: Option<Link>,
    /// Jobs to publish, those to publish again first.
    queue: VecDeque<Job>,
    /// Published jobs awaiting their confirm, by publish sequence, with when they went out.
    unconfirmed: HashMap<u64, InFlight>,
    confirms: FuturesUnordered<ConfirmFuture>,
    next_seq: u64,
    /// Confirmed, to be marked `sent`.
    sent: Vec<i64>,
    /// Refused, to be marked `failed`.
    failures: Vec<Failure>,
    /// When gathered marks must be written at the latest.
    marks_due: Option<Instant>,
    connect_failures: u32,
    /// Exchanges seen to exist on the current link. Publishing to a missing exchange would
    /// make the broker close the channel, failing every other message in flight with it, so
    /// each exchange is checked once per link on a throwaway channel first.
    known_exchanges: HashSet<String>,
}

impl Worker {
    async fn run(mut self) {
        loop {
            let idle = self.queue.is_empty() && self.unconfirmed.is_empty();
            if !self.input_open && idle {
                break;
            }
            if self.link.as_ref().is_some_and(|l| {
                !l.connection.status().connected() || !l.channel.status().connected()
            }) {
                self.link_lost(None);
            }
            if self.link.is_none() && !self.connect().await {
                // Closing while RabbitMQ stays away: take what the closed sink still holds and
                // give it all back rather than hang.
                if self.rx.is_closed() {
                    while let Ok(job) = self.rx.try_recv() {
                        self.queue.push_back(job);
                    }
                    self.input_open = false;
                }
                if !self.input_open && self.connect_failures >= 3 {
                    self.abandon().await;
                    break;
                }
                continue;
            }
            while self.unconfirmed.len() < self.config.window
                && self.link.is_some()
                && let Some(job) = self.queue.pop_front()
            {
                self.publish(job).await;
            }

            let room = self.unconfirmed.len() < self.config.window && self.link.is_some();
            let marks_due = self.marks_due;
            tokio::select! {
                biased;
                Some((seq, result)) = self.confirms.next(), if !self.confirms.is_empty() => {
                    self.confirmed(seq, result);
                }
                job = self.rx.recv(), if self.input_open && room && self.queue.is_empty() => match job {
                    Some(job) => self.queue.push_back(job),
                    None => self.input_open = false,
                },
                () = sleep_until(marks_due), if marks_due.is_some() => {}
                // Notice a connection that died while idle.
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            let gathered = self.sent.len() + self.failures.len();
            if gathered >= self.config.mark_batch
                || self.marks_due.is_some_and(|due| Instant::now() >= due)
            {
                self.write_marks().await;
            }
        }
        self.drain_marks().await;
        if let Some(link) = self.link.take() {
            let _ = link.connection.close(200, "publisher closed".into()).await;
        }
        self.status.lock().connected = false;
    }

    /// Opens a connection and a confirm-mode channel; on failure waits out the backoff.
    async fn connect(&mut self) -> bool {
        match open(&self.url, &self.config.connection_name).await {
            Ok(link) => {
                self.link = Some(link);
                self.connect_failures = 0;
                self.status.lock().connected = true;
                tracing::info!(broker = %self.url, "publisher connected");
                true
            }
            Err(error) => {
                self.status.error(&error);
                let delay = self.config.reconnect.delay(self.connect_failures);
                self.connect_failures = self.connect_failures.saturating_add(1);
                tracing::warn!(%error, retry_in = ?delay, "publisher cannot reach RabbitMQ");
                // Confirmed jobs still get recorded while the broker is away.
                self.write_marks().await;
                tokio::time::sleep(delay).await;
                false
            }
        }
    }

    async fn publish(&mut self, job: Job) {
        let Some(event_type) = self.routes.for_table(&job.table_name) else {
            self.fail(
                "unrouted_table",
                job.id,
                format!(
                    "no event type is configured for table {:?}; add one to the bridge's routes",
                    job.table_name
                ),
                false,
            );
            return;
        };
        let route = event_type.route(&job);
        let (Ok(exchange), Ok(routing_key)) = (
            ShortString::try_new(route.exchange.as_str()),
            ShortString::try_new(route.routing_key.as_str()),
        ) else {
            self.fail(
                "unrouted_table",
                job.id,
                format!(
                    "routing key {:?} is longer than 255 bytes",
                    route.routing_key
                ),
                false,
            );
            return;
        };
        let Some(link) = self.link.as_ref() else {
            self.queue.push_front(job);
            return;
        };
        if !self.known_exchanges.contains(&route.exchange) {
            match exchange_exists(&link.connection, exchange.clone()).await {
                Ok(true) => {
                    self.known_exchanges.insert(route.exchange.clone());
                }
                Ok(false) => {
                    self.fail(
                        "refused",
                        job.id,
                        format!(
                            "exchange {:?} does not exist; declare the topology (benalsam-bridge does at start)",
                            route.exchange
                        ),
                        true,
                    );
                    return;
                }
                Err(error) => {
                    self.queue.push_front(job);
                    self.link_lost(Some(error));
                    return;
                }
            }
        }
        // The producer span of this job's trace: its parent is the writer's trace context,
        // and its own context travels in the message to the consumer.
        let span = tracing::info_span!(
            "publish",
            otel.kind = "producer",
            otel.name = %format!("{} publish", route.exchange),
            messaging.system = "rabbitmq",
            messaging.destination.name = %route.exchange,
            messaging.rabbitmq.destination.routing_key = %route.routing_key,
            messaging.message.id = %job.message_id(),
            job.id = job.id,
        );
        if let Some(parent) = job.traceparent.as_deref() {
            telemetry::set_parent(&span, parent);
        }
        let traceparent = telemetry::traceparent_of(&span).or_else(|| job.traceparent.clone());
        let mut envelope = Envelope::new(&job, &route);
        if let Some(trace_id) = traceparent.as_deref().and_then(trace_id_of) {
            envelope.trace_id = Some(trace_id.to_owned());
        }
        let properties = envelope.properties(&self.config.app_id, traceparent.as_deref());
        let body = envelope.to_bytes();
        // The broker closes the whole channel on an oversized message, failing every other
        // message in flight with it; refuse it here, alone, with a reason.
        if body.len() > MAX_MESSAGE_BYTES {
            self.fail(
                "refused",
                job.id,
                format!(
                    "the message is {} bytes, over the {MAX_MESSAGE_BYTES}-byte limit of RabbitMQ 4; shrink the row or ignore its large columns",
                    body.len()
                ),
                false,
            );
            return;
        }
        let publishing = Instant::now();
        let published = link
            .channel
            .basic_publish(
                exchange,
                routing_key,
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &body,
                properties,
            )
            .await;
        match published {
            Ok(confirm) => {
                let metrics = &self.config.metrics;
                Metrics::observe(&metrics.publish_duration, publishing.elapsed());
                metrics.jobs_published.inc();
                let seq = self.next_seq;
                self.next_seq += 1;
                self.unconfirmed.insert(
                    seq,
                    InFlight {
                        job,
                        published_at: publishing,
                        _span: span,
                    },
                );
                self.confirms
                    .push(async move { (seq, confirm.await) }.boxed());
                let mut s = self.status.lock();
                s.published += 1;
                s.unconfirmed = self.unconfirmed.len();
                s.last_publish_at = Some(SystemTime::now());
            }
            Err(error) => {
                self.queue.push_front(job);
                self.link_lost(Some(Error::amqp("publishing", error)));
            }
        }
    }

    fn confirmed(&mut self, seq: u64, result: lapin::Result<Confirmation>) {
        // Gone if the link was reset meanwhile: the job is queued to be published again.
        let Some(InFlight {
            job, published_at, ..
        }) = self.unconfirmed.remove(&seq)
        else {
            return;
        };
        Metrics::observe(
            &self.config.metrics.confirm_duration,
            published_at.elapsed(),
        );
        {
            let mut s = self.status.lock();
            s.unconfirmed = self.unconfirmed.len();
            s.last_confirm_at = Some(SystemTime::now());
        }
        match result {
            Ok(Confirmation::Ack(None)) => {
                self.sent.push(job.id);
                self.marks_due.get_or_insert(Instant::now() + self.config.mark_interval);
            }
            Ok(Confirmation::Ack(Some(returned))) => self.fail(
                "unroutable",
                job.id,
                format!(
                    "unroutable: no queue is bound to exchange {} for routing key {} (broker returned {} {})",
                    returned.delivery.exchange,
                    returned.delivery.routing_key,
                    returned.reply_code,
                    returned.reply_text
                ),
                true,
            ),
            Ok(Confirmation::Nack(_)) => {
                self.fail("nack", job.id, "the broker refused the message (nack)".to_owned(), true);
            }
            Ok(Confirmation::NotRequested) => {
                self.fail("nack", job.id, "the channel was not in confirm mode".to_owned(), true);
            }
            Err(error) => {
                // A channel-level refusal (a missing exchange, say) is about the messages;
                // anything else is the connection, and says nothing about them.
                if let lapin::ErrorKind::ProtocolError(amqp) = error.kind()
                    && matches!(amqp.kind(), lapin::protocol::AMQPErrorKind::Soft(_))
                {
                    let reason = format!("RabbitMQ closed the channel: {}", amqp.get_message());
                    self.fail("refused", job.id, reason.clone(), true);
                    self.link_lost(Some(Error::amqp(reason, error)));
                } else {
                    self.queue.push_front(job);
                    self.link_lost(Some(Error::amqp("waiting for a confirm", error)));
                }
            }
        }
    }

    fn fail(&mut self, kind: &'static str, id: i64, error: String, retry: bool) {
        tracing::warn!(job = id, %error, retry, "publish failed");
        Metrics::inc(&self.config.metrics.jobs_publish_failed, kind);
        self.failures.push(Failure { id, error, retry });
        self.marks_due
            .get_or_insert(Instant::now() + self.config.mark_interval);
    }

    /// Drops the link; its unconfirmed jobs are published again on the next one.
    fn link_lost(&mut self, error: Option<Error>) {
        if let Some(error) = &error {
            self.status.error(error);
            tracing::warn!(%error, "publisher lost its channel; reconnecting");
        }
        self.link = None;
        self.known_exchanges.clear();
        self.confirms = FuturesUnordered::new();
        let mut orphans: Vec<Job> = self.unconfirmed.drain().map(|(_, f)| f.job).collect();
        self.config
            .metrics
            .jobs_republished
            .inc_by(orphans.len() as u64);
        orphans.sort_unstable_by_key(|j| std::cmp::Reverse(j.id));
        let mut s = self.status.lock();
        s.connected = false;
        s.unconfirmed = 0;
        s.republished += orphans.len() as u64;
        for job in orphans {
            self.queue.push_front(job);
        }
    }

    /// Gives jobs that could not be published back to `pending`, for the next bridge.
    async fn abandon(&mut self) {
        let ids: Vec<i64> = self.queue.drain(..).map(|j| j.id).collect();
        match self.outbox.release(&ids).await {
            Ok(marked) => tracing::warn!(
                released = marked.changed.len(),
                "closing without RabbitMQ: gave unpublished jobs back"
            ),
            Err(error) => tracing::warn!(
                %error,
                count = ids.len(),
                "closing without RabbitMQ or PostgreSQL: unpublished jobs return when their lease expires"
            ),
        }
    }

    /// Records gathered outcomes; what cannot be written now is kept for the next try.
    async fn write_marks(&mut self) -> bool {
        let mut ok = true;
        if !self.sent.is_empty() {
            match self.outbox.mark_sent(&self.sent).await {
                Ok(marked) => {
                    if !marked.unchanged.is_empty() {
                        tracing::debug!(jobs = ?marked.unchanged, "confirmed jobs were already sent or completed");
                    }
                    self.status.lock().confirmed += self.sent.len() as u64;
                    self.config
                        .metrics
                        .jobs_confirmed
                        .inc_by(self.sent.len() as u64);
                    self.sent.clear();
                }
                Err(error) => {
                    ok = false;
                    self.status.error(&error);
                    tracing::warn!(%error, "cannot mark confirmed jobs sent; will retry");
                }
            }
        }
        if !self.failures.is_empty() {
            match self.outbox.mark_failed(&self.failures).await {
                Ok(_) => {
                    self.status.lock().failed += self.failures.len() as u64;
                    self.failures.clear();
                }
                Err(error) => {
                    ok = false;
                    self.status.error(&error);
                    tracing::warn!(%error, "cannot mark refused jobs failed; will retry");
                }
            }
        }
        self.marks_due = if ok {
            None
        } else {
            Some(
                Instant::now()
                    + self
                        .config
                        .reconnect
                        .delay(0)
                        .max(self.config.mark_interval),
            )
        };
        ok
    }

    /// At close: keep trying to record outcomes for a while. Whatever cannot be recorded is
    /// found again when its lease expires (and published again, with the same messageId).
    async fn drain_marks(&mut self) {
        const PATIENCE: Duration = Duration::from_secs(30);
        let deadline = Instant::now() + PATIENCE;
        let mut attempt = 0;
        while !self.write_marks().await {
            if Instant::now() >= deadline {
                tracing::error!(
                    sent = self.sent.len(),
                    failed = self.failures.len(),
                    "giving up recording outcomes at shutdown; those jobs are published again after their lease"
                );
                return;
            }
            tokio::time::sleep(self.config.reconnect.delay(attempt)).await;
            attempt += 1;
        }
    }
}

async fn open(url: &AmqpUrl, name: &str) -> Result<Link> {
    let connection = crate::amqp::connect(url, name).await?;
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| Error::amqp("opening the publishing channel", e))?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| Error::amqp("enabling publisher confirms", e))?;
    Ok(Link {
        connection,
        channel,
    })
}

/// Whether `exchange` exists, asked on a channel of its own (the broker closes a channel
/// that asks about a missing exchange).
async fn exchange_exists(connection: &Connection, exchange: ShortString) -> Result<bool> {
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| Error::amqp("opening a channel to check an exchange", e))?;
    let declared = channel
        .exchange_declare(
            exchange,
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                passive: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await;
    match declared {
        Ok(()) => {
            let _ = channel.close(200, "checked".into()).await;
            Ok(true)
        }
        Err(error) => match error.kind() {
            lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == 404 => Ok(false),
            _ => Err(Error::amqp("checking an exchange", error)),
        },
    }
}

async fn sleep_until(due: Option<Instant>) {
    if let Some(due) = due {
        tokio::time::sleep_until(due.into()).await;
    }
}
