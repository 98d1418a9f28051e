//! [`JobStream`]: the outbox as a `Stream` of claimed batches of jobs.
//!
//! The stream claims when woken: by a notification from the trigger (LISTEN mode), by the
//! poll interval (always), at start and after every reconnect (a sweep: whatever was committed
//! while nobody listened is found then). It claims again at once while batches come back
//! full, so a backlog drains at the speed of the consumer of the stream.
//!
//! Stopping: cancel the [`CancellationToken`] given to [`JobStream::new`]. The stream then
//! ends after handing out nothing more; a batch it claimed but had not handed out is given
//! back to `pending`. Batches already handed out belong to the caller, who reports what became
//! of them ([`Settle`](crate::outbox::Settle)); whatever the caller drops unreported comes back
//! when its lease expires.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use futures::Stream;
use futures::stream::BoxStream;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::config::{require_positive, validate_identifier};
use crate::ops::Live;
use crate::ops::metrics::{self, Metrics, StreamMetrics};
use crate::outbox::listener::Listener;
use crate::outbox::{Backlog, ClaimKind, Job, Outbox, Outcome, Settle};
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
        }
    }
}

/// What a job stream has been doing, for health checks.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct JobStreamStatus {
    /// Whether the LISTEN connection is up; `None` in poll-only mode.
    pub listening: Option<bool>,
    /// Whether the last claim (or reclaim) reached PostgreSQL.
    pub connected: bool,
    /// When a claim last succeeded (whether or not it found jobs).
    pub last_claim_at: Option<SystemTime>,
    /// When a claim last found jobs.
    pub last_job_at: Option<SystemTime>,
    /// The backlog, counted at most once per poll interval.
    pub backlog: Option<Backlog>,
    /// Pending jobs by table, every table (a table nobody routes keeps its jobs here),
    /// counted with the backlog.
    pub pending_by_table: Vec<(String, i64)>,
    /// Jobs claimed in all.
    pub claimed: u64,
    /// Of those, retries of failed jobs.
    pub retried: u64,
    /// Jobs given back to `pending` because their lease expired.
    pub reclaimed: u64,
    /// Errors talking to PostgreSQL.
    pub errors: u64,
    /// The last of those errors, and when.
    pub last_error: Option<(SystemTime, String)>,
}

impl Live<JobStreamStatus> {
    pub(crate) fn set_listening(&self, up: bool) {
        self.lock().listening = Some(up);
    }

    pub(crate) fn record_error(&self, error: &Error) {
        let mut s = self.lock();
        s.errors += 1;
        s.last_error = Some((SystemTime::now(), error.to_string()));
    }

    fn record_claim(&self, jobs: &[Job]) {
        let now = SystemTime::now();
        let mut s = self.lock();
        s.connected = true;
        s.last_claim_at = Some(now);
        if !jobs.is_empty() {
            s.last_job_at = Some(now);
            s.claimed += jobs.len() as u64;
            s.retried += jobs.iter().filter(|j| j.claim == ClaimKind::Retry).count() as u64;
        }
    }
}

/// The outbox as a stream of claimed batches: woken by `NOTIFY` (or polling), claiming under
/// a lease, ending when its shutdown token is cancelled.
pub struct JobStream {
    batches: BoxStream<'static, Vec<Job>>,
    status: Live<JobStreamStatus>,
    metrics: StreamMetrics,
    _listener: Option<Listener>,
}

impl std::fmt::Debug for JobStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobStream")
            .field("status", &self.status.snapshot())
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
            return Err(Error::config("BENALSAM_BATCH_SIZE", "must be at least 1"));
        }
        require_positive("BENALSAM_POLL_INTERVAL", config.poll_interval)?;
        let status = Live::<JobStreamStatus>::default();
        let metrics = StreamMetrics::default();
        // The series of the tables it claims exist from the start, at zero.
        for table in outbox.config().tables.iter().flatten() {
            let _ = metrics.pending_by_table.get_or_create(&metrics::Table {
                table: table.clone(),
            });
        }
        let wake = Arc::new(Notify::new());
        let listener = match &config.wake {
            Wake::Listen { channel } => {
                validate_identifier("NOTIFY channel", channel)?;
                status.set_listening(false);
                Some(Listener::spawn(
                    outbox.database_url().clone(),
                    channel.clone(),
                    Arc::clone(&wake),
                    status.clone(),
                    config.reconnect,
                ))
            }
            Wake::PollOnly => None,
        };
        let claimer = Claimer {
            outbox,
            config,
            wake,
            shutdown,
            status: status.clone(),
            metrics: metrics.clone(),
            failures: 0,
            drained: false,
            next_housekeeping: Instant::now(),
        };
        let batches = futures::stream::unfold(claimer, |mut claimer| async move {
            claimer.next_batch().await.map(|batch| (batch, claimer))
        });
        Ok(Self {
            batches: Box::pin(batches),
            status,
            metrics,
            _listener: listener,
        })
    }

    /// Records claims, reclaims and the sampled backlog in `metrics`.
    pub fn with_metrics(self, metrics: &Metrics) -> Self {
        self.metrics.register(metrics);
        self
    }

    /// The live status, for health checks.
    pub fn status(&self) -> Live<JobStreamStatus> {
        self.status.clone()
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
    status: Live<JobStreamStatus>,
    metrics: StreamMetrics,
    /// Consecutive failed attempts, for the reconnect backoff.
    failures: u32,
    /// The last claim came back short: wait for a wake-up before claiming again.
    drained: bool,
    next_housekeeping: Instant,
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
                    self.status.record_claim(&jobs);
                    let retries =
                        jobs.iter().filter(|j| j.claim == ClaimKind::Retry).count() as u64;
                    let claimed = &self.metrics.jobs_claimed;
                    claimed
                        .get_or_create(&metrics::Kind { kind: "fresh" })
                        .inc_by(jobs.len() as u64 - retries);
                    claimed
                        .get_or_create(&metrics::Kind { kind: "retry" })
                        .inc_by(retries);
                    self.drained = jobs.len() < self.config.batch_size;
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

    /// Reclaims expired leases and counts the backlog.
    async fn housekeeping(&mut self) -> Result<()> {
        const RECLAIM_LIMIT: usize = 1000;
        let reclaimed = self.outbox.reclaim_expired(RECLAIM_LIMIT).await?;
        if !reclaimed.is_empty() {
            tracing::warn!(
                count = reclaimed.len(),
                first = reclaimed.first(),
                "reclaimed jobs whose lease expired (a bridge died or stalled)"
            );
            self.status.lock().reclaimed += reclaimed.len() as u64;
            self.metrics.jobs_reclaimed.inc_by(reclaimed.len() as u64);
            // They are pending again: claim them now, not at the next tick.
            self.drained = false;
        }
        let backlog = self.outbox.backlog().await?;
        let by_table = self.outbox.pending_by_table().await?;
        for (table, jobs) in &by_table {
            self.metrics
                .pending_by_table
                .get_or_create(&metrics::Table {
                    table: table.clone(),
                })
                .set(*jobs);
        }
        {
            let mut s = self.status.lock();
            // A table whose jobs all went is counted at zero, not left at its last count.
            for (table, _) in &s.pending_by_table {
                if !by_table.iter().any(|(t, _)| t == table) {
                    self.metrics
                        .pending_by_table
                        .get_or_create(&metrics::Table {
                            table: table.clone(),
                        })
                        .set(0);
                }
            }
            s.backlog = Some(backlog);
            s.pending_by_table = by_table;
        }
        let m = &self.metrics;
        for (status, jobs) in [
            ("pending", backlog.pending),
            ("processing", backlog.processing),
            ("sent", backlog.sent),
            ("retrying", backlog.retrying),
        ] {
            m.queue_jobs
                .get_or_create(&metrics::Status { status })
                .set(jobs);
        }
        let seconds = |d: Option<Duration>| d.map_or(0.0, |d| d.as_secs_f64());
        m.oldest_pending_age
            .set(seconds(backlog.oldest_pending_age));
        m.oldest_sent_age.set(seconds(backlog.oldest_sent_age));
        Ok(())
    }

    /// Records an error and waits out the backoff (or the shutdown).
    async fn failed(&mut self, error: Error) {
        self.status.lock().connected = false;
        self.status.record_error(&error);
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
