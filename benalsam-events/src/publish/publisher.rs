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
use lapin::Confirmation;
use lapin::options::BasicPublishOptions;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::PollSender;

use crate::config::{Addresses, AmqpUrl};
use crate::ops::Live;
use crate::ops::metrics::Metrics;
use crate::outbox::{Job, Outcome, Settle};
use crate::publish::Routes;
use crate::publish::confirm::Refusal;
use crate::publish::record::{
    PublisherEvent, PublisherMetrics, PublisherRecorder, PublisherStatus,
};
use crate::{error::Error, error::Result, event_type::EventType};

mod config;
mod link;
mod message;
mod outcomes;

pub use config::PublisherConfig;

use link::{Link, exchange_exists};
use message::Message;

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

/// Publishes jobs to RabbitMQ with publisher confirms, a `Sink` of jobs that reports every
/// outcome to its [`Settle`](crate::outbox::Settle).
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

type ConfirmFuture = BoxFuture<'static, (u64, lapin::Result<Confirmation>)>;

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
                // Closed under us (the broker, a proxy or the network): a lost connection
                // is an error the health answer counts, whoever noticed it first.
                self.link_lost(Error::broker(
                    "the connection or channel to RabbitMQ was closed",
                ));
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
                    self.link_lost(error);
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
                self.link_lost(Error::amqp("publishing", error));
            }
        }
    }
}

/// Whether the window has room for another message beside `count` unconfirmed ones of
/// `bytes` in all: below both limits, and one message always fits, however large.
fn window_has_room(count: usize, bytes: usize, config: &PublisherConfig) -> bool {
    count == 0 || (count < config.window && bytes < config.window_bytes)
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
