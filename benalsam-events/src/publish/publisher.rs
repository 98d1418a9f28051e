//! [`Publisher`]: a `Sink` of jobs that publishes them to RabbitMQ and reports each one `sent`
//! only once the broker has confirmed it.
//!
//! Every message is published `mandatory`, persistent, on a channel in confirm mode, with at
//! most `window` messages unconfirmed at a time. What each confirm means is decided by
//! [`confirm::judge`](super::confirm); outcomes are reported in batches to the
//! [`Settle`] the publisher was given (the outbox), which alone changes job states.
//!
//! A lost connection fails no job: while RabbitMQ is away the sink stops accepting jobs (so
//! the job stream stops claiming) and reconnects with backoff. A job is never reported `sent`
//! without its confirm; when in doubt it is published again, and the duplicate carries the
//! same `messageId`. With a [`Topology`] in its settings the publisher declares it on every
//! new connection and again when a publish finds an exchange missing or a key unbound, so a
//! broker that lost its definitions is repaired rather than failing every job.
//!
//! The work runs in a task; closing the sink (`SinkExt::close`, which `forward` does at the
//! end of its stream) waits until every accepted job is confirmed and reported.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, Sink, StreamExt};
use lapin::options::{BasicPublishOptions, ExchangeDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ExchangeKind};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::PollSender;

use crate::backoff::Backoff;
use crate::config::{Addresses, AmqpUrl};
use crate::event_type::{DEFAULT_MAX_MESSAGE_BYTES, record_id_problem, trace_id_of};
use crate::ops::Live;
use crate::ops::metrics::Metrics;
use crate::ops::telemetry;
use crate::outbox::{Job, Outcome, Settle};
use crate::publish::confirm::{self, Refusal, Verdict};
use crate::publish::record::{
    PublisherEvent, PublisherMetrics, PublisherRecorder, PublisherStatus,
};
use crate::publish::{Envelope, Routes, Topology};
use crate::{Error, EventType, Result};

/// Most claimed jobs waiting for the publishing task.
const HANDOFF: usize = 128;

/// How soon after one repair of the topology another may be tried.
const REPAIR_INTERVAL: Duration = Duration::from_secs(5);

/// How long every confirm may be a nack before the channel is replaced. RabbitMQ 3.10 can
/// leave a channel that began publishing to a quorum queue while the queue elected a new
/// leader (its old leader's node killed) nacking every publish after the election, for as
/// long as the channel lives (the cluster tests met it: minutes of nacks, until the jobs
/// would have run out of attempts); a new channel publishes normally. A queue that is full
/// (`reject-publish` under a length policy) nacks on a new channel too: the replacement
/// then only costs a reconnect every few seconds.
const NACKED_CHANNEL: Duration = Duration::from_secs(5);

/// Settings of a [`Publisher`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PublisherConfig {
    /// Most messages published and not yet confirmed.
    pub window: usize,
    /// Most bytes of message bodies published and not yet confirmed (one message is always
    /// allowed, however large): large rows narrow the window instead of growing memory.
    pub window_bytes: usize,
    /// Confirmed jobs are reported in one call once this many have gathered...
    pub report_batch: usize,
    /// ...or this long after the first of them, whichever comes first.
    pub report_interval: Duration,
    /// Delays between reconnect attempts.
    pub reconnect: Backoff,
    /// The `app_id` property of every message.
    pub app_id: String,
    /// The connection's name in the management UI.
    pub connection_name: String,
    /// Declared on every new connection and after a refusal that says it is missing.
    pub topology: Option<Topology>,
    /// Largest message body published (`BENALSAM_MAX_MESSAGE_BYTES`): a job whose message
    /// would be larger fails at once, with the reason, and is not tried again. Keep it at or
    /// under the broker's `max_message_size` and the consumers' limit.
    pub max_message_bytes: usize,
}

impl Default for PublisherConfig {
    fn default() -> Self {
        Self {
            window: 1000,
            window_bytes: 4 * 1024 * 1024,
            report_batch: 500,
            report_interval: Duration::from_millis(20),
            reconnect: Backoff::default(),
            app_id: "benalsam-bridge".to_owned(),
            connection_name: "benalsam-bridge publisher".to_owned(),
            topology: None,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
        }
    }
}

/// Publishes jobs to RabbitMQ with publisher confirms, a `Sink` of jobs that reports every
/// outcome to its [`Settle`](crate::Settle).
#[derive(Debug)]
pub struct Publisher {
    sender: PollSender<Job>,
    task: Option<JoinHandle<()>>,
    recorder: PublisherRecorder,
}

impl Publisher {
    /// A publisher of the jobs of `event_types`, reporting their outcomes to `settle`.
    /// Starts its task (and its connection) at once; must be called inside a tokio runtime.
    pub fn new(
        url: AmqpUrl,
        settle: impl Settle,
        event_types: Vec<EventType>,
        config: PublisherConfig,
    ) -> Self {
        let routes = Routes::new(event_types);
        // Claimed jobs wait here, rows and all, until the window has room: a short queue is
        // enough to keep the window full, and bounds memory however large the window is.
        let (tx, rx) = mpsc::channel(config.window.clamp(1, HANDOFF));
        let recorder = PublisherRecorder::new(PublisherMetrics::default());
        let worker = Worker {
            url,
            settle,
            routes,
            config,
            recorder: recorder.clone(),
            rx,
            input_open: true,
            link: None,
            queue: VecDeque::new(),
            unconfirmed: HashMap::new(),
            unconfirmed_bytes: 0,
            confirms: FuturesUnordered::new(),
            next_seq: 0,
            reports: Vec::new(),
            reports_due: None,
            connect_failures: 0,
            addresses: Addresses::default(),
            known_exchanges: HashSet::new(),
            last_repair: None,
            nacked_since: None,
        };
        Self {
            sender: PollSender::new(tx),
            task: Some(tokio::spawn(worker.run())),
            recorder,
        }
    }

    /// Records publishes, confirms and failures in `metrics`.
    pub fn with_metrics(self, metrics: &Metrics) -> Self {
        self.recorder.metrics().register(metrics);
        self
    }

    /// The live status, for health checks.
    pub fn status(&self) -> Live<PublisherStatus> {
        self.recorder.status().clone()
    }
}

fn stopped() -> Error {
    Error::stopped("the publisher")
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

/// A published message awaiting its confirm. It keeps the encoded message, not the job's
/// parsed row (several times its size), so it can be published again as it was.
struct InFlight {
    id: i64,
    message: Box<Message>,
    published_at: Instant,
}

/// What waits to be published: a claimed job, or a message published before whose confirm
/// was lost with its link.
enum Outgoing {
    Job(Job),
    Again { id: i64, message: Box<Message> },
}

impl Outgoing {
    fn id(&self) -> i64 {
        match self {
            Outgoing::Job(job) => job.id,
            Outgoing::Again { id, .. } => *id,
        }
    }
}

/// An open connection and its confirm-mode channel.
struct Link {
    connection: Connection,
    channel: Channel,
}

type ConfirmFuture = BoxFuture<'static, (u64, lapin::Result<Confirmation>)>;

/// A message ready to go.
struct Message {
    exchange: ShortString,
    routing_key: ShortString,
    body: Vec<u8>,
    properties: BasicProperties,
    /// The producer span of this publish; it ends with the confirm.
    _span: tracing::Span,
}

/// The publishing task's state.
struct Worker<S> {
    url: AmqpUrl,
    settle: S,
    routes: Routes,
    config: PublisherConfig,
    /// Its status and metrics, written only by recording events.
    recorder: PublisherRecorder,
    rx: mpsc::Receiver<Job>,
    input_open: bool,
    link: Option<Link>,
    /// Jobs to publish, those to publish again first.
    queue: VecDeque<Outgoing>,
    /// Published jobs awaiting their confirm, by publish sequence, with when they went out.
    unconfirmed: HashMap<u64, InFlight>,
    /// Bytes of their bodies.
    unconfirmed_bytes: usize,
    confirms: FuturesUnordered<ConfirmFuture>,
    next_seq: u64,
    /// Outcomes gathered for the next report.
    reports: Vec<(i64, Outcome)>,
    /// When gathered outcomes must be reported at the latest.
    reports_due: Option<Instant>,
    connect_failures: u32,
    /// Which of the URL's addresses the next connection tries first.
    addresses: Addresses,
    /// Exchanges seen to exist on the current link. Publishing to a missing exchange would
    /// make the broker close the channel, failing every other message in flight with it, so
    /// each exchange is checked once per link on a throwaway channel first.
    known_exchanges: HashSet<String>,
    last_repair: Option<Instant>,
    /// The first nack since the last positive confirm (see [`NACKED_CHANNEL`]).
    nacked_since: Option<Instant>,
}

impl<S: Settle> Worker<S> {
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
                if self.give_up_closing().await {
                    break;
                }
                continue;
            }
            while self.has_room()
                && let Some(next) = self.queue.pop_front()
            {
                self.publish(next).await;
            }
            self.wait().await;
            if self.reports.len() >= self.config.report_batch
                || self.reports_due.is_some_and(|due| Instant::now() >= due)
            {
                self.report().await;
            }
        }
        self.drain_reports().await;
        if let Some(link) = self.link.take() {
            let _ = link.connection.close(200, "publisher closed".into()).await;
        }
        self.recorder.record(PublisherEvent::Closed);
    }

    /// Whether another message may go out: a link, and room in the window (by count and by
    /// bytes).
    fn has_room(&self) -> bool {
        self.link.is_some()
            && window_has_room(self.unconfirmed.len(), self.unconfirmed_bytes, &self.config)
    }

    /// Waits for the next thing to do: a confirm, a job (when there is room), a report due.
    async fn wait(&mut self) {
        let room = self.has_room();
        let reports_due = self.reports_due;
        tokio::select! {
            biased;
            Some((seq, answer)) = self.confirms.next(), if !self.confirms.is_empty() => {
                self.confirmed(seq, &answer).await;
            }
            job = self.rx.recv(), if self.input_open && room && self.queue.is_empty() => match job {
                Some(job) => self.queue.push_back(Outgoing::Job(job)),
                None => self.input_open = false,
            },
            () = sleep_until(reports_due), if reports_due.is_some() => {}
            // Notice a connection that died while idle.
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }

    /// Closing while RabbitMQ stays away: takes what the closed sink still holds and gives
    /// it all back rather than hang. Returns whether to stop.
    async fn give_up_closing(&mut self) -> bool {
        if self.rx.is_closed() {
            while let Ok(job) = self.rx.try_recv() {
                self.queue.push_back(Outgoing::Job(job));
            }
            self.input_open = false;
        }
        if !self.input_open && self.connect_failures >= 3 {
            self.abandon().await;
            return true;
        }
        false
    }

    /// Opens a connection and a confirm-mode channel (declaring the topology when it has
    /// one); on failure waits out the backoff.
    async fn connect(&mut self) -> bool {
        match open(&self.url, self.addresses.next(), &self.config).await {
            Ok((link, index)) => {
                self.link = Some(link);
                self.connect_failures = 0;
                self.addresses.connected(index);
                let broker = self.url.addresses().get(index).map(AmqpUrl::redacted);
                tracing::info!(
                    broker = broker.as_deref().unwrap_or_default(),
                    "publisher connected"
                );
                self.recorder.record(PublisherEvent::Connected { broker });
                true
            }
            Err(error) => {
                self.recorder.record(PublisherEvent::Error(&error));
                let delay = self.config.reconnect.delay(self.connect_failures);
                self.connect_failures = self.connect_failures.saturating_add(1);
                tracing::warn!(%error, retry_in = ?delay, "publisher cannot reach RabbitMQ");
                // Confirmed jobs still get reported while the broker is away.
                self.report().await;
                tokio::time::sleep(delay).await;
                false
            }
        }
    }

    /// The message of `job`, or why it cannot be one.
    fn message(&self, job: &Job) -> Result<Message, (Refusal, String, bool)> {
        let Some(event_type) = self.routes.for_table(&job.table_name) else {
            return Err((
                Refusal::UnroutedTable,
                format!(
                    "no event type is configured for table {:?}; add one to the bridge's routes",
                    job.table_name
                ),
                false,
            ));
        };
        // A key the index cannot take would be refused by every consumer and resent for
        // ever: the job fails here, once, with the reason.
        if let Some(why) = record_id_problem(&job.record_id) {
            return Err((
                Refusal::Refused,
                format!("{why}; use a shorter key column for this table"),
                false,
            ));
        }
        let route = event_type.route(job);
        let (Ok(exchange), Ok(routing_key)) = (
            ShortString::try_new(route.exchange.as_str()),
            ShortString::try_new(route.routing_key.as_str()),
        ) else {
            return Err((
                Refusal::UnroutedTable,
                format!(
                    "routing key {:?} is longer than 255 bytes",
                    route.routing_key
                ),
                false,
            ));
        };
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
        let mut envelope = Envelope::routed(job, route);
        if let Some(trace_id) = traceparent.as_deref().and_then(trace_id_of) {
            envelope.trace_id = Some(trace_id.to_owned().into());
        }
        let body = envelope.to_bytes();
        // The broker closes the whole channel on an oversized message, failing every other
        // message in flight with it; refuse it here, alone, with a reason.
        let limit = self.config.max_message_bytes;
        if body.len() > limit {
            return Err((
                Refusal::Refused,
                format!(
                    "the message is {} bytes, over the {limit}-byte limit (BENALSAM_MAX_MESSAGE_BYTES); ignore the table's large columns or raise the limit (and the broker's max_message_size with it)",
                    body.len()
                ),
                false,
            ));
        }
        let properties = envelope.properties(&self.config.app_id, traceparent.as_deref());
        Ok(Message {
            exchange,
            routing_key,
            body,
            properties,
            _span: span,
        })
    }

    async fn publish(&mut self, next: Outgoing) {
        let (id, message) = match next {
            Outgoing::Job(job) => match self.message(&job) {
                Ok(message) => (job.id, Box::new(message)),
                Err((kind, reason, retry)) => return self.fail(kind, job.id, reason, retry),
            },
            Outgoing::Again { id, message } => (id, message),
        };
        let Some(link) = self.link.as_ref() else {
            self.queue.push_front(Outgoing::Again { id, message });
            return;
        };
        if !self.known_exchanges.contains(message.exchange.as_str()) {
            match exchange_exists(&link.connection, message.exchange.clone()).await {
                Ok(true) => {
                    self.known_exchanges.insert(message.exchange.to_string());
                }
                Ok(false) => {
                    let reason = format!(
                        "exchange {:?} does not exist; declare the topology (benalsam-bridge does at start)",
                        message.exchange.as_str()
                    );
                    self.fail(Refusal::Refused, id, reason, true);
                    self.repair().await;
                    return;
                }
                Err(error) => {
                    self.queue.push_front(Outgoing::Again { id, message });
                    self.link_lost(Some(error));
                    return;
                }
            }
        }
        let publishing = Instant::now();
        let published = link
            .channel
            .basic_publish(
                message.exchange.clone(),
                message.routing_key.clone(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &message.body,
                message.properties.clone(),
            )
            .await;
        match published {
            Ok(confirm) => {
                let took = publishing.elapsed();
                let seq = self.next_seq;
                self.next_seq += 1;
                self.unconfirmed_bytes += message.body.len();
                self.unconfirmed.insert(
                    seq,
                    InFlight {
                        id,
                        message,
                        published_at: publishing,
                    },
                );
                self.confirms
                    .push(async move { (seq, confirm.await) }.boxed());
                self.recorder.record(PublisherEvent::Published {
                    took,
                    unconfirmed: self.unconfirmed.len(),
                });
            }
            Err(error) => {
                self.queue.push_front(Outgoing::Again { id, message });
                self.link_lost(Some(Error::amqp("publishing", error)));
            }
        }
    }

    async fn confirmed(&mut self, seq: u64, answer: &lapin::Result<Confirmation>) {
        // Gone if the link was reset meanwhile: the job is queued to be published again.
        let Some(InFlight {
            id,
            message,
            published_at,
        }) = self.unconfirmed.remove(&seq)
        else {
            return;
        };
        self.unconfirmed_bytes -= message.body.len();
        self.recorder.record(PublisherEvent::Confirmed {
            took: published_at.elapsed(),
            unconfirmed: self.unconfirmed.len(),
        });
        match confirm::judge(answer) {
            Verdict::Sent => {
                self.nacked_since = None;
                self.gather(id, Outcome::Sent);
            }
            Verdict::Refused {
                kind,
                reason,
                closes_link,
            } => {
                self.fail(kind, id, reason.clone(), true);
                let nacked_long = kind == Refusal::Nack
                    && self.nacked_since.get_or_insert_with(Instant::now).elapsed()
                        >= NACKED_CHANNEL;
                if closes_link {
                    self.link_lost(Some(Error::broker(reason)));
                } else if nacked_long {
                    self.link_lost(Some(Error::broker(format!(
                        "every publish nacked for {} s; opening a new channel",
                        NACKED_CHANNEL.as_secs()
                    ))));
                } else if kind == Refusal::Unroutable {
                    self.repair().await;
                }
            }
            Verdict::Unknown(reason) => {
                self.queue.push_front(Outgoing::Again { id, message });
                self.link_lost(Some(Error::broker(reason)));
            }
        }
    }

    /// Declares the topology again after a refusal that says part of it is missing, at most
    /// once per [`REPAIR_INTERVAL`]; the failed jobs are retried after their backoff.
    async fn repair(&mut self) {
        let (Some(topology), Some(link)) = (&self.config.topology, &self.link) else {
            return;
        };
        if self
            .last_repair
            .is_some_and(|at| at.elapsed() < REPAIR_INTERVAL)
        {
            return;
        }
        self.last_repair = Some(Instant::now());
        match topology.declare(&link.connection).await {
            Ok(()) => {
                self.known_exchanges.clear();
                self.recorder.record(PublisherEvent::Repaired);
                tracing::warn!("a publish found the topology incomplete; declared it again");
            }
            Err(error) => {
                self.recorder.record(PublisherEvent::Error(&error));
                tracing::warn!(%error, "cannot declare the topology again");
            }
        }
    }

    fn gather(&mut self, id: i64, outcome: Outcome) {
        self.reports.push((id, outcome));
        self.reports_due
            .get_or_insert(Instant::now() + self.config.report_interval);
    }

    fn fail(&mut self, kind: Refusal, id: i64, error: String, retry: bool) {
        tracing::warn!(job = id, %error, retry, "publish failed");
        self.recorder.record(PublisherEvent::Refused {
            kind,
            error: &error,
        });
        self.gather(id, Outcome::Failed { error, retry });
    }

    /// Drops the link; its unconfirmed jobs are published again on the next one.
    fn link_lost(&mut self, error: Option<Error>) {
        if let Some(error) = &error {
            tracing::warn!(%error, "publisher lost its channel; reconnecting");
        }
        self.link = None;
        self.nacked_since = None;
        // The next connection starts with the address after the one just lost: a node that
        // went away is tried again only once the others have been. With one address this is
        // that address again.
        self.addresses.advance();
        self.known_exchanges.clear();
        self.confirms = FuturesUnordered::new();
        let mut orphans: Vec<Outgoing> = self
            .unconfirmed
            .drain()
            .map(|(_, f)| Outgoing::Again {
                id: f.id,
                message: f.message,
            })
            .collect();
        self.unconfirmed_bytes = 0;
        orphans.sort_unstable_by_key(|o| std::cmp::Reverse(o.id()));
        self.recorder.record(PublisherEvent::LinkLost {
            error: error.as_ref(),
            republished: orphans.len() as u64,
        });
        for orphan in orphans {
            self.queue.push_front(orphan);
        }
    }

    /// Gives jobs that could not be published back to `pending`, for the next bridge.
    async fn abandon(&mut self) {
        let reports: Vec<(i64, Outcome)> = self
            .queue
            .drain(..)
            .map(|o| (o.id(), Outcome::Released))
            .collect();
        match self.settle.settle(&reports).await {
            Ok(settled) => tracing::warn!(
                released = settled.changed.len(),
                "closing without RabbitMQ: gave unpublished jobs back"
            ),
            Err(error) => tracing::warn!(
                %error,
                count = reports.len(),
                "closing without RabbitMQ or PostgreSQL: unpublished jobs return when their lease expires"
            ),
        }
    }

    /// Reports gathered outcomes; what cannot be reported now is kept for the next try.
    async fn report(&mut self) -> bool {
        if self.reports.is_empty() {
            self.reports_due = None;
            return true;
        }
        match self.settle.settle(&self.reports).await {
            Ok(settled) => {
                if !settled.unchanged.is_empty() {
                    tracing::debug!(jobs = ?settled.unchanged, "reported jobs had moved on (completed, or failed by a consumer)");
                }
                let sent = self
                    .reports
                    .iter()
                    .filter(|(_, o)| *o == Outcome::Sent)
                    .count() as u64;
                let failed = self.reports.len() as u64 - sent;
                self.recorder
                    .record(PublisherEvent::Reported { sent, failed });
                self.reports.clear();
                self.reports_due = None;
                true
            }
            Err(error) => {
                self.recorder.record(PublisherEvent::Error(&error));
                tracing::warn!(%error, "cannot report publish outcomes; will retry");
                let wait = self
                    .config
                    .reconnect
                    .delay(0)
                    .max(self.config.report_interval);
                self.reports_due = Some(Instant::now() + wait);
                false
            }
        }
    }

    /// At close: keep trying to report outcomes for a while. Whatever cannot be reported is
    /// found again when its lease expires (and published again, with the same messageId).
    async fn drain_reports(&mut self) {
        const PATIENCE: Duration = Duration::from_secs(30);
        let deadline = Instant::now() + PATIENCE;
        let mut attempt = 0;
        while !self.report().await {
            if Instant::now() >= deadline {
                tracing::error!(
                    outcomes = self.reports.len(),
                    "giving up reporting outcomes at shutdown; those jobs are published again after their lease"
                );
                return;
            }
            tokio::time::sleep(self.config.reconnect.delay(attempt)).await;
            attempt += 1;
        }
    }
}

/// Whether the window has room for another message beside `count` unconfirmed ones of
/// `bytes` in all: below both limits, and one message always fits, however large.
fn window_has_room(count: usize, bytes: usize, config: &PublisherConfig) -> bool {
    count == 0 || (count < config.window && bytes < config.window_bytes)
}

/// Opens a link to the first address of `url` that answers, trying them from `start`;
/// returns it with the index of that address.
async fn open(url: &AmqpUrl, start: usize, config: &PublisherConfig) -> Result<(Link, usize)> {
    let (connection, index) =
        crate::connect::amqp_from(url, &config.connection_name, start).await?;
    if let Some(topology) = &config.topology {
        topology.declare(&connection).await?;
    }
    let channel = crate::connect::confirm_channel(&connection, "publishing").await?;
    Ok((
        Link {
            connection,
            channel,
        },
        index,
    ))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_is_bounded_by_count_and_by_bytes_and_one_message_always_fits() {
        let mut config = PublisherConfig {
            window: 3,
            window_bytes: 1000,
            ..PublisherConfig::default()
        };
        assert!(window_has_room(0, 0, &config));
        assert!(window_has_room(2, 999, &config));
        assert!(!window_has_room(3, 10, &config), "count");
        assert!(!window_has_room(1, 1000, &config), "bytes");
        config.window_bytes = 1;
        config.window = 1;
        assert!(
            window_has_room(0, 0, &config),
            "a message larger than the window still goes, alone"
        );
        assert!(!window_has_room(1, 5_000_000, &config));
    }
}
