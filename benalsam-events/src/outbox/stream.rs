//! [`JobStream`]: the outbox as a `Stream` of claimed batches of jobs.
//!
//! The stream claims when woken: by a notification from the trigger (LISTEN mode), by the
//! poll interval (always), at start and after every reconnect (a sweep: whatever was committed
//! while nobody listened is found then). It claims again at once while batches come back
//! full, so a backlog drains at the speed of the consumer of the stream.
//!
//! While it drains a backlog it tells writers so (adaptive NOTIFY, see
//! [`JobStreamConfig::adaptive_notify`]), and their triggers skip the NOTIFY, whose
//! cluster-wide lock at commit is the trigger's main cost.
//!
//! Stopping: cancel the [`CancellationToken`] given to [`JobStream::new`]. The stream then
//! ends after handing out nothing more; a batch it claimed but had not handed out is given
//! back to `pending`. Batches already handed out belong to the caller, who reports what became
//! of them ([`Settle`](crate::outbox::Settle)); whatever the caller drops unreported comes back
//! when its lease expires.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::Stream;
use futures::stream::BoxStream;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::config::{require_positive, validate_identifier};
use crate::ops::Live;
use crate::ops::metrics::Metrics;
use crate::outbox::listener::Listener;
use crate::outbox::{Job, Outbox, Outcome, Settle};
use crate::{error::Error, error::Result};
use census::{Census, CensusTask};
use presence::Presence;
pub use record::JobStreamStatus;
use record::{StreamEvent, StreamMetrics, StreamRecorder};

mod census;
mod presence;
pub(crate) mod record;

/// The NOTIFY channel the trigger uses unless given `channel=`.
pub(crate) const DEFAULT_CHANNEL: &str = "benalsam_sync_queue";

/// [`JobStreamConfig::linger`] unless told otherwise: see BENCHMARKS.md, "Low rates".
pub(crate) const DEFAULT_LINGER: Duration = Duration::from_millis(50);

/// The fewest jobs a short claim must find for the stream to stay busy and claim again
/// after the linger (see [`JobStreamConfig::adaptive_notify`]): two commits within one
/// linger mean tens of changes per second or more, where skipping a NOTIFY per commit pays
/// for a busy mark, an idle mark and two empty claims at the end; a lone change is claimed
/// and the stream waits as before.
const TRICKLE: usize = 2;

/// How the stream learns that there is work.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Wake {
    /// LISTEN on this channel (woken within milliseconds of a commit) and poll besides.
    Listen {
        /// The trigger's `channel=` option.
        channel: String,
    },
    /// Poll only. For PgBouncer in transaction pooling (LISTEN does not work through it) and
    /// for write-heavy databases where the NOTIFY lock at every commit costs too much.
    PollOnly,
}

/// Settings of a [`JobStream`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct JobStreamConfig {
    /// Most jobs per claim (and per batch handed out).
    pub batch_size: usize,
    /// Longest wait between claims when no notification arrives; also how often expired
    /// leases are reclaimed and the backlog is counted.
    pub poll_interval: Duration,
    /// LISTEN or poll only.
    pub wake: Wake,
    /// After a notification wakes an idle stream, how long it waits before claiming, so the
    /// changes committed in that moment are claimed, published and settled together rather
    /// than one claim each. Zero: claim at once. Each change's latency grows by at most this;
    /// a backlog, the poll and a sweep after a reconnect do not wait.
    pub linger: Duration,
    /// Delays between attempts while PostgreSQL is unreachable.
    pub reconnect: Backoff,
    /// Adaptive NOTIFY (`BENALSAM_ADAPTIVE_NOTIFY`, with [`Wake::Listen`] only): while its
    /// claims find jobs, the stream marks itself busy in `benalsam_listeners` (a small
    /// write every few seconds), and the triggers of its tables skip the NOTIFY, so writers
    /// no longer commit one at a time. A full claim is followed by the next at once; a short
    /// one that found two jobs or more by the next after [`linger`](Self::linger), so a
    /// steady trickle of changes is claimed every `linger` without a NOTIFY per commit. The first claim that
    /// finds nothing marks the stream idle. The price: a change committed in the instant the
    /// stream goes idle may wait for the next notifying change or the poll interval. Off:
    /// every change notifies, as before migration 4.
    pub adaptive_notify: bool,
}

impl Default for JobStreamConfig {
    fn default() -> Self {
        Self {
            batch_size: 100,
            poll_interval: Duration::from_secs(1),
            wake: Wake::Listen {
                channel: DEFAULT_CHANNEL.to_owned(),
            },
            reconnect: Backoff::default(),
            adaptive_notify: true,
            linger: DEFAULT_LINGER,
        }
    }
}

/// The outbox as a stream of claimed batches: woken by `NOTIFY` (or polling), claiming under
/// a lease, ending when its shutdown token is cancelled.
pub struct JobStream {
    batches: BoxStream<'static, Vec<Job>>,
    /// Its status and metrics, written only by recording events.
    recorder: StreamRecorder,
    _listener: Option<Listener>,
    _census: CensusTask,
}

impl std::fmt::Debug for JobStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobStream")
            .field("status", &self.recorder.status().snapshot())
            .finish_non_exhaustive()
    }
}

impl JobStream {
    /// A stream of batches claimed from `outbox`, ending when `shutdown` is cancelled.
    ///
    /// Must be called inside a tokio runtime (the LISTEN connection runs as a task).
    pub fn new(
        outbox: Outbox,
        config: JobStreamConfig,
        shutdown: CancellationToken,
    ) -> Result<Self> {
        if config.batch_size == 0 {
            return Err(Error::config(
                "JobStreamConfig::batch_size",
                "must be at least 1",
            ));
        }
        require_positive("JobStreamConfig::poll_interval", config.poll_interval)?;
        // Longer, a notified claim would come later than a polled one.
        if config.linger > config.poll_interval {
            return Err(Error::config(
                "JobStreamConfig::linger",
                "must not be longer than the poll interval (JobStreamConfig::poll_interval)",
            ));
        }
        let recorder = StreamRecorder::new(StreamMetrics::for_tables(
            outbox.config().tables.iter().flatten(),
        ));
        let wake = Arc::new(Notify::new());
        let listener = match &config.wake {
            Wake::Listen { channel } => {
                validate_identifier("NOTIFY channel", channel)?;
                recorder.record(StreamEvent::Listening(false));
                Some(Listener::spawn(
                    outbox.database_url().clone(),
                    channel.clone(),
                    Arc::clone(&wake),
                    recorder.clone(),
                    config.reconnect,
                ))
            }
            Wake::PollOnly => None,
        };
        // Only a listening stream is woken by NOTIFY, so only it has something to say about
        // whether writers need to send one.
        let presence = (config.adaptive_notify && matches!(config.wake, Wake::Listen { .. }))
            .then(Presence::default);
        let census = Census {
            outbox: outbox.clone(),
            recorder: recorder.clone(),
            every: config.poll_interval,
        }
        .spawn(shutdown.clone());
        let claimer = Claimer {
            outbox,
            config,
            presence,
            wake,
            shutdown,
            recorder: recorder.clone(),
            failures: 0,
            drained: false,
            pacing: false,
            next_housekeeping: Instant::now(),
        };
        let batches = futures::stream::unfold(claimer, |mut claimer| async move {
            match claimer.next_batch().await {
                Some(batch) => Some((batch, claimer)),
                None => {
                    claimer.leave().await;
                    None
                }
            }
        });
        Ok(Self {
            batches: Box::pin(batches),
            recorder,
            _listener: listener,
            _census: census,
        })
    }

    /// Records claims, reclaims and the sampled backlog in `metrics`.
    pub fn with_metrics(self, metrics: &Metrics) -> Self {
        self.recorder.metrics().register(metrics);
        self
    }

    /// The live status, for health checks.
    pub fn status(&self) -> Live<JobStreamStatus> {
        self.recorder.status().clone()
    }
}

impl Stream for JobStream {
    type Item = Vec<Job>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.batches.as_mut().poll_next(cx)
    }
}

/// The state behind the stream.
struct Claimer {
    outbox: Outbox,
    config: JobStreamConfig,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
    recorder: StreamRecorder,
    /// Consecutive failed attempts, for the reconnect backoff.
    failures: u32,
    /// The last claim came back empty (or short, without adaptive NOTIFY): wait for a
    /// wake-up before claiming again.
    drained: bool,
    /// The last claim came back short but found jobs while writers were told not to
    /// notify: claim again after the linger, without waiting for a wake-up.
    pacing: bool,
    next_housekeeping: Instant,
    /// What writers were told about this stream; `None` without adaptive NOTIFY.
    presence: Option<Presence>,
}

impl Claimer {
    async fn next_batch(&mut self) -> Option<Vec<Job>> {
        loop {
            if self.shutdown.is_cancelled() {
                return None;
            }
            if self.drained {
                let notified = tokio::select! {
                    biased;
                    () = self.shutdown.cancelled() => return None,
                    () = self.wake.notified() => true,
                    () = tokio::time::sleep(self.config.poll_interval) => false,
                };
                // Woken by one commit while others are under way: a moment's wait lets one
                // claim take them all (at a steady low rate, a claim, a publish and a settle
                // per commit are most of what the bridge spends).
                if notified && !self.config.linger.is_zero() {
                    tokio::select! {
                        biased;
                        () = self.shutdown.cancelled() => return None,
                        () = tokio::time::sleep(self.config.linger) => {}
                    }
                }
            } else if std::mem::take(&mut self.pacing) {
                // Writers skip their NOTIFY while the stream is busy: it comes back for
                // their changes after the linger itself.
                tokio::select! {
                    biased;
                    () = self.shutdown.cancelled() => return None,
                    () = tokio::time::sleep(self.config.linger) => {}
                }
            }
            if Instant::now() >= self.next_housekeeping {
                self.next_housekeeping = Instant::now() + self.config.poll_interval;
                if let Err(error) = self.housekeeping().await {
                    self.failed(error).await;
                    continue;
                }
            }
            match self.outbox.claim(self.config.batch_size).await {
                Ok(jobs) => {
                    self.failures = 0;
                    self.recorder.record(StreamEvent::Claimed(&jobs));
                    let full = jobs.len() >= self.config.batch_size;
                    // A trickle: some jobs, fewer than a batch. With adaptive NOTIFY the
                    // stream stays busy and claims again after the linger, so a steady low
                    // rate costs writers no NOTIFY (the commit-time lock) and the bridge no
                    // wake-up per commit; the first empty claim ends it.
                    let trickle = !full
                        && jobs.len() >= TRICKLE
                        && self.presence.is_some()
                        && !self.config.linger.is_zero();
                    self.drained = !full && !trickle;
                    self.pacing = trickle;
                    if full || trickle {
                        self.mark_busy().await;
                    } else if self.mark_idle().await {
                        // Writers that read "busy" before the idle mark may have committed
                        // since this claim: one more claim finds them (see `Presence`).
                        self.drained = false;
                    }
                    if jobs.is_empty() {
                        continue;
                    }
                    if self.shutdown.is_cancelled() {
                        self.give_back(&jobs).await;
                        return None;
                    }
                    return Some(jobs);
                }
                Err(error) => self.failed(error).await,
            }
        }
    }

    /// Reclaims expired leases.
    async fn housekeeping(&mut self) -> Result<()> {
        const RECLAIM_LIMIT: usize = 1000;
        let reclaimed = self.outbox.reclaim_expired(RECLAIM_LIMIT).await?;
        if !reclaimed.is_empty() {
            tracing::warn!(
                count = reclaimed.len(),
                first = reclaimed.first(),
                "reclaimed jobs whose lease expired (a bridge died or stalled)"
            );
            self.recorder
                .record(StreamEvent::Reclaimed(reclaimed.len()));
            // They are pending again: claim them now, not at the next tick.
            self.drained = false;
        }
        Ok(())
    }

    /// Records an error and waits out the backoff (or the shutdown).
    async fn failed(&mut self, error: Error) {
        self.recorder.record(StreamEvent::Unreachable(&error));
        let delay = self.config.reconnect.delay(self.failures);
        tracing::warn!(%error, retry_in = ?delay, "job stream cannot reach the outbox");
        self.failures = self.failures.saturating_add(1);
        // After the outage, sweep at once.
        self.drained = false;
        tokio::select! {
            () = self.shutdown.cancelled() => {}
            () = tokio::time::sleep(delay) => {}
        }
    }

    async fn give_back(&self, jobs: &[Job]) {
        let reports: Vec<(i64, Outcome)> = jobs.iter().map(|j| (j.id, Outcome::Released)).collect();
        match self.outbox.settle(&reports).await {
            Ok(settled) => tracing::info!(
                released = settled.changed.len(),
                "shutting down: gave claimed jobs back"
            ),
            Err(error) => tracing::warn!(
                %error,
                count = reports.len(),
                "shutting down: could not give claimed jobs back; they return when their lease expires"
            ),
        }
    }
}
