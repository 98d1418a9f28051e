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
pub use crate::outbox::stream_record::JobStreamStatus;
use crate::outbox::stream_record::{StreamEvent, StreamMetrics, StreamRecorder};
use crate::outbox::{Job, Outbox, Outcome, Settle};
use crate::{Error, Result};

/// The NOTIFY channel the trigger uses unless given `channel=`.
pub(crate) const DEFAULT_CHANNEL: &str = "benalsam_sync_queue";

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
    /// Delays between attempts while PostgreSQL is unreachable.
    pub reconnect: Backoff,
    /// Adaptive NOTIFY (`BENALSAM_ADAPTIVE_NOTIFY`, with [`Wake::Listen`] only): while its
    /// claims come back full, the stream marks itself busy in `benalsam_listeners` (a small
    /// write every few seconds), and the triggers of its tables skip the NOTIFY, so writers
    /// no longer commit one at a time. The price: a change committed in the instant the
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
    /// The last claim came back short: wait for a wake-up before claiming again.
    drained: bool,
    next_housekeeping: Instant,
    /// What writers were told about this stream; `None` without adaptive NOTIFY.
    presence: Option<Presence>,
}

/// How long a busy mark lasts unless renewed. It bounds how long the writers of a bridge
/// that died while busy skip their NOTIFY (the other bridges poll meanwhile, and the row is
/// dropped on the next idle mark of any bridge); renewed once less than half of it is left,
/// so a draining bridge writes its row every few seconds, not once per batch.
const BUSY_LEASE: Duration = Duration::from_secs(5);

/// After a busy or idle mark fails (a schema without migration 4, a role that may not write
/// `benalsam_listeners`), how long the stream goes without marking: writers keep notifying
/// meanwhile, and the warning comes twice a minute, not once per batch.
const PRESENCE_PAUSE: Duration = Duration::from_secs(30);

/// Adaptive NOTIFY: the stream's row in `benalsam_listeners`, as far as it knows.
///
/// ```text
///  claim full ──► busy (row: busy_until = now + lease) ──► claim full … (renew at half)
///                                                            │
///                                                      claim short
///                                                            ▼
///                          idle (row deleted) ──► claim once more ──► wait: NOTIFY or poll
///
///  writer:  INSERT + trigger reads the row ─────────────── COMMIT
///           read "busy" → no NOTIFY       read "idle" → NOTIFY
/// ```
///
/// A writer skips its NOTIFY only when it read the row before the idle mark committed. If it
/// commits before the last claim starts, that claim takes its job; if it commits after, no
/// one is told: its job waits for the next writer that notifies, or for the poll, at most one
/// poll interval (the rare race this design accepts instead of making every writer lock
/// something the bridge waits on). A stream that claims only some tables marks only those;
/// the writers of other tables keep waking idle bridges. Idle bridges of the same tables are
/// not woken while one is busy: they join at their next poll, and stay while their own
/// claims come back full.
#[derive(Debug, Default)]
struct Presence {
    /// Until when the row says busy, by this process's clock: never later than the
    /// database's, which adds the lease after this instant. `None`: no row (idle).
    busy_until: Option<Instant>,
    /// No marking before this, after a failure.
    paused_until: Option<Instant>,
}

impl Claimer {
    async fn next_batch(&mut self) -> Option<Vec<Job>> {
        loop {
            if self.shutdown.is_cancelled() {
                return None;
            }
            if self.drained {
                tokio::select! {
                    biased;
                    () = self.shutdown.cancelled() => return None,
                    () = self.wake.notified() => {}
                    () = tokio::time::sleep(self.config.poll_interval) => {}
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
                    self.drained = !full;
                    if full {
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

    /// More work waits: tells writers not to notify for a while (renewing the mark once
    /// half of it is gone).
    async fn mark_busy(&mut self) {
        let Some(presence) = self.presence.as_mut() else {
            return;
        };
        let now = Instant::now();
        if presence.paused_until.is_some_and(|t| now < t)
            || presence
                .busy_until
                .is_some_and(|t| t.saturating_duration_since(now) >= BUSY_LEASE / 2)
        {
            return;
        }
        match self.outbox.mark_busy(BUSY_LEASE).await {
            Ok(()) => {
                if presence.busy_until.is_none() {
                    tracing::debug!("draining: marked busy, writers skip NOTIFY");
                }
                presence.busy_until = Some(now + BUSY_LEASE);
                presence.paused_until = None;
                self.recorder.record(StreamEvent::Draining(true));
            }
            Err(error) => {
                presence.busy_until = None;
                presence.paused_until = Some(now + PRESENCE_PAUSE);
                self.recorder.record(StreamEvent::Draining(false));
                self.recorder.record(StreamEvent::Error(&error));
                tracing::warn!(
                    %error,
                    retry_in = ?PRESENCE_PAUSE,
                    "cannot mark the bridge busy; writers keep sending NOTIFY meanwhile"
                );
            }
        }
    }

    /// The queue is drained: when writers were told not to notify, tells them to again.
    /// True when it did (then one more claim is due before waiting).
    async fn mark_idle(&mut self) -> bool {
        let Some(presence) = self.presence.as_mut() else {
            return false;
        };
        if presence.busy_until.take().is_none() {
            return false;
        }
        self.recorder.record(StreamEvent::Draining(false));
        // Forgotten whether or not the mark works: a failed one must not make the stream
        // claim again and again without waiting. The row's lease runs out on its own.
        tracing::debug!("drained: marking idle, writers notify again");
        if let Err(error) = self.outbox.mark_idle().await {
            presence.paused_until = Some(Instant::now() + PRESENCE_PAUSE);
            self.recorder.record(StreamEvent::Error(&error));
            tracing::warn!(
                %error,
                lease = ?BUSY_LEASE,
                "cannot mark the bridge idle; writers skip NOTIFY until its busy mark runs out"
            );
        }
        true
    }

    /// The stream ends: a busy mark goes, so writers notify the remaining bridges at once.
    async fn leave(&mut self) {
        if self
            .presence
            .as_ref()
            .is_some_and(|p| p.busy_until.is_some())
        {
            self.mark_idle().await;
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

/// Counts the backlog on a timer of its own, every poll interval until shutdown.
///
/// Not in the claimer's loop: that loop runs only while someone pulls batches, and a
/// publisher waiting for its broker pulls none. Counted there, the figures froze at the last
/// count for the whole outage (one pending job while thousands waited), and the backlog alert
/// could not fire during the very outage it is meant for. The database answers whatever the
/// broker does.
struct Census {
    outbox: Outbox,
    recorder: StreamRecorder,
    every: Duration,
}

impl Census {
    fn spawn(self, shutdown: CancellationToken) -> CensusTask {
        CensusTask(tokio::spawn(async move {
            loop {
                if let Err(error) = self.count().await {
                    // The claimer reports the outage (health, metrics, a warning); this only
                    // keeps the last figures until the database answers again.
                    tracing::debug!(%error, "cannot count the backlog");
                }
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(self.every) => {}
                }
            }
        }))
    }

    async fn count(&self) -> Result<()> {
        let backlog = self.outbox.backlog().await?;
        let by_table = self.outbox.pending_by_table().await?;
        self.recorder
            .record(StreamEvent::Counted { backlog, by_table });
        Ok(())
    }
}

/// The census task, stopped with its stream.
struct CensusTask(tokio::task::JoinHandle<()>);

impl Drop for CensusTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}
