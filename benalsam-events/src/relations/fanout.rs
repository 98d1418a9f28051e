//! The fan-out: a changed related row becomes one REBUILD job per document that contains it.
//!
//! A relation's trigger records `<event type table>#<relation>` jobs (a seller renamed, an
//! image added). A bridge claims them like any job, under a lease, and for each one pages
//! through the documents whose joined columns match the related row, old and new (an image
//! moved to another listing changes both listings):
//!
//! ```text
//! claim `listings#seller` job ──► page: INSERT REBUILD jobs for ≤ page listings
//!        ▲                              WHERE user_id = <the user> AND id > <last key>
//!        │                              + record the last key in the job, renew its lease
//!        └──── more pages ─────────────  (one transaction: a crash resumes after the page)
//!                                       last page ──► the job is completed
//! ```
//!
//! Fair: a bridge fans out up to [`MOST_ACTIVE`] changes at once, in rounds of one page per
//! change, so a seller of 100 listings renamed during the rename of one with 100,000 waits
//! for a page of the big one, not for all of it. A change that wrote goes to the back of the
//! round; one that could not write keeps its place (`page.rs` has one change's moves).
//!
//! Bounded: one page of keys at a time is all it holds (pages are `INSERT … SELECT`), and
//! after its first page a change only tops its table's REBUILD jobs not yet indexed (pending,
//! claimed or sent) up to one page, so neither the outbox nor RabbitMQ holds more of them
//! than that and one first page per change in progress (`page.rs`, `top_up`; BENCHMARKS.md,
//! "Fair fan-out"). A document that already has a REBUILD job waiting is skipped: that job
//! is read after this change committed; so is a document the status policy keeps out of the
//! index (`sql.rs` says why that is safe).
//!
//! Stopping: the changes in progress, and those claimed but not started, are given back
//! (`pending`, their last page kept), so another bridge resumes them at once. Logs: a line
//! per change at debug; at info, a summary every minute with work (`status.rs`).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::Fuse;
use futures::{FutureExt, StreamExt};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::event_type::EventType;
use crate::ops::Live;
use crate::ops::metrics::Metrics;
use crate::outbox::{Job, JobStream, JobStreamConfig, Outbox, OutboxConfig, Outcome, Settle};
use crate::relations::page::{Change, Pager, Plan, Step};
use crate::relations::sql::FanOutSql;
use crate::relations::status::{FanOutEvent, FanOutRecorder, FanOutStatus, Summary};
use crate::{config::DatabaseUrl, error::Error, error::Result};

/// Documents per page of a fan-out, by default (`BENALSAM_FANOUT_PAGE`).
pub(crate) const DEFAULT_FANOUT_PAGE: usize = 500;

/// Most changes one bridge fans out at once. Each holds one claimed job and a few hundred
/// bytes; more would only hold leases other bridges could use.
const MOST_ACTIVE: usize = 32;

/// Changes claimed at a time (a claim is taken only while there is room for a full one).
const CLAIM: usize = 8;

/// How long a round in which no change could write waits before the next (unless a new
/// change arrives first).
const IDLE_ROUND: Duration = Duration::from_millis(100);

/// Claims the jobs of related-row changes and fans them out; see the module documentation.
pub(crate) struct FanOut {
    stream: JobStream,
    worker: Worker,
}

/// The claimed changes, ending once after shutdown (fused: polled again, it stays ended).
type Claims = Fuse<JobStream>;

/// What fans out the changes (everything but the stream, which is not `Sync`).
pub(super) struct Worker {
    url: DatabaseUrl,
    plans: HashMap<String, Arc<Plan>>,
    pager: Pager,
}

impl FanOut {
    /// The fan-out of the relations of `event_types` (`None` when they have none); `stream`
    /// are the bridge's stream settings (its poll interval and wake-up).
    pub(crate) fn new(
        url: &DatabaseUrl,
        outbox: &OutboxConfig,
        stream: &JobStreamConfig,
        event_types: &[EventType],
        page: usize,
        shutdown: &CancellationToken,
    ) -> Result<Option<Self>> {
        let mut plans = HashMap::new();
        for event_type in event_types {
            // Every relation of the tree, each with the path that joins it back.
            for chain in crate::event_type::chains(&event_type.relations) {
                let Some(relation) = chain.last() else {
                    continue;
                };
                plans.insert(
                    relation.job_table(event_type.job_table()),
                    Arc::new(Plan {
                        documents: event_type.job_table().to_owned(),
                        relation: (*relation).clone(),
                        sql: FanOutSql::new(&outbox.schema, event_type, &chain),
                    }),
                );
            }
        }
        if plans.is_empty() {
            return Ok(None);
        }
        if page == 0 {
            return Err(Error::config(
                "BridgeSettings::fanout_page",
                "must be at least 1",
            ));
        }
        let mut config = outbox.clone();
        config.tables = Some(plans.keys().cloned().collect());
        let claims = Outbox::new(url.clone(), config)?;
        // A few changes at a time: each may be many pages. Writers of related tables always
        // notify (the fan-out never marks itself busy).
        let mut stream_config = stream.clone();
        stream_config.batch_size = CLAIM;
        stream_config.adaptive_notify = false;
        let stream = JobStream::new(claims.clone(), stream_config, shutdown.clone())?;
        Ok(Some(Self {
            stream,
            worker: Worker {
                url: url.clone(),
                plans,
                pager: Pager {
                    outbox: claims,
                    page: i64::try_from(page).unwrap_or(i64::MAX),
                    recorder: FanOutRecorder::default(),
                },
            },
        }))
    }

    pub(crate) fn with_metrics(self, metrics: &Metrics) -> Self {
        let relations: Vec<String> = self.worker.plans.keys().cloned().collect();
        self.worker
            .pager
            .recorder
            .metrics()
            .register(metrics, &relations);
        self
    }

    pub(crate) fn status(&self) -> Live<FanOutStatus> {
        self.worker.pager.recorder.status().clone()
    }

    /// Fans out claimed changes until `shutdown`, then gives back every change it holds:
    /// each keeps its last page, and the next bridge resumes it at once.
    pub(crate) async fn run(self, shutdown: CancellationToken) {
        let Self { stream, worker } = self;
        let mut claims = stream.fuse();
        let active = worker.run(&mut claims, &shutdown).await;
        worker.release(active, &mut claims).await;
    }
}

impl Worker {
    /// Rounds of pages until shutdown; returns the changes still in progress.
    async fn run(&self, claims: &mut Claims, shutdown: &CancellationToken) -> VecDeque<Change> {
        let mut active = VecDeque::new();
        let mut client: Option<tokio_postgres::Client> = None;
        let mut summary = Summary::new(Instant::now());
        // Failed connection attempts in a row: the wait between them grows (the shared
        // backoff), and only the first of an outage is logged and counted.
        let mut outage = 0u32;
        loop {
            if !self.admit(claims, &mut active).await || shutdown.is_cancelled() {
                return active;
            }
            let wrote = match self.connection(&mut client).await {
                Ok(conn) => {
                    outage = 0;
                    self.round(conn, &mut active, &mut summary).await
                }
                Err(error) => {
                    if outage == 0 {
                        self.failed(None, &error);
                    } else {
                        tracing::debug!(%error, attempt = outage, "fan-out: PostgreSQL still away");
                    }
                    tokio::select! {
                        () = shutdown.cancelled() => {}
                        () = tokio::time::sleep(Backoff::default().delay(outage)) => {}
                    }
                    outage = outage.saturating_add(1);
                    false
                }
            };
            if active.is_empty() {
                self.pager.recorder.record(FanOutEvent::Idle);
            }
            summary.log_if_due(Instant::now(), active.len());
            if !wrote {
                self.pause(claims, &mut active, shutdown).await;
            }
        }
    }

    /// Takes claimed changes: waits for some when none is in progress, else takes only what
    /// the stream has ready, while there is room. False when the stream ended (shutdown).
    async fn admit(&self, claims: &mut Claims, active: &mut VecDeque<Change>) -> bool {
        if active.is_empty() {
            match claims.next().await {
                Some(batch) => self.start(batch, active).await,
                None => return false,
            }
        }
        while active.len() + CLAIM <= MOST_ACTIVE {
            match claims.next().now_or_never() {
                Some(Some(batch)) => self.start(batch, active).await,
                Some(None) => return false,
                None => break,
            }
        }
        true
    }

    /// Waits a little after a round that wrote nothing (its tables' REBUILD jobs are on
    /// their way to the index), or until a new change comes, or shutdown.
    async fn pause(
        &self,
        claims: &mut Claims,
        active: &mut VecDeque<Change>,
        shutdown: &CancellationToken,
    ) {
        let room = active.len() + CLAIM <= MOST_ACTIVE;
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = tokio::time::sleep(IDLE_ROUND) => {}
            Some(batch) = claims.next(), if room => self.start(batch, active).await,
        }
    }

    /// Adds claimed changes to the round, at its end.
    async fn start(&self, batch: Vec<Job>, active: &mut VecDeque<Change>) {
        for job in batch {
            let Some(plan) = self.plans.get(&job.table_name) else {
                let error = Error::config(
                    "relations",
                    format!("no relation records jobs as {:?}", job.table_name),
                );
                self.failed(Some(&job), &error);
                self.settle(&[(job.id, retry(&error))]).await;
                continue;
            };
            let change = Change::new(job, Arc::clone(plan));
            let job = &change.job;
            if change.resumed() {
                tracing::debug!(job = job.id, relation = %job.table_name, "fan-out resumed where its last page ended");
            } else {
                tracing::debug!(job = job.id, relation = %job.table_name, record = %job.record_id, "fan-out started");
            }
            active.push_back(change);
        }
    }

    /// One turn for every change in progress: a page each where its table has room. A change
    /// that wrote goes to the back, so the next round starts with those that could not (a
    /// small change is not kept behind a big one of the same table, whose pages use up the
    /// table's room). True when a page was written.
    async fn round(
        &self,
        conn: &mut tokio_postgres::Client,
        active: &mut VecDeque<Change>,
        summary: &mut Summary,
    ) -> bool {
        let mut outstanding = HashMap::new();
        let (mut waiting, mut wrote, mut settled) = (Vec::new(), Vec::new(), Vec::new());
        while let Some(mut change) = active.pop_front() {
            let before = change.documents;
            match change.step(&self.pager, conn, &mut outstanding).await {
                Ok(Step::Wrote) => {
                    summary.documents(change.documents - before);
                    wrote.push(change);
                }
                Ok(Step::Waiting) => waiting.push(change),
                Ok(Step::Finished) => {
                    summary.finished(change.documents - before);
                    self.finished(&change);
                    settled.push((change.job.id, Outcome::Completed));
                }
                // The job is another bridge's now.
                Ok(Step::Lost) => {}
                // PostgreSQL went away: every change keeps its place and its lease until
                // the connection is back.
                Err(error) if conn.is_closed() => {
                    self.failed(None, &error);
                    waiting.push(change);
                    waiting.extend(active.drain(..));
                }
                Err(error) => {
                    self.failed(Some(&change.job), &error);
                    settled.push((change.job.id, retry(&error)));
                }
            }
        }
        let progressed = !wrote.is_empty();
        active.extend(waiting);
        active.extend(wrote);
        self.settle(&settled).await;
        progressed
    }

    fn finished(&self, change: &Change) {
        let job = &change.job;
        tracing::debug!(job = job.id, relation = %job.table_name, documents = change.documents, "fan-out finished");
        self.pager.recorder.record(FanOutEvent::Finished {
            relation: &job.table_name,
        });
    }

    /// Records an error (of `job`'s fan-out, or of the connection).
    fn failed(&self, job: Option<&Job>, error: &Error) {
        match job {
            Some(job) => {
                tracing::warn!(job = job.id, table = %job.table_name, %error, "fan-out failed; retrying after backoff");
            }
            None => {
                tracing::warn!(%error, "fan-out cannot reach PostgreSQL; its changes keep their place");
            }
        }
        self.pager
            .recorder
            .record(FanOutEvent::Error(&error.to_string()));
    }

    async fn settle(&self, reports: &[(i64, Outcome)]) {
        if reports.is_empty() {
            return;
        }
        if let Err(error) = self.pager.outbox.settle(reports).await {
            tracing::warn!(%error, jobs = reports.len(), "cannot record the fan-outs' outcome; they run again after their lease");
        }
    }

    /// Gives back every change it holds, and what the stream claimed as it ended: `pending`
    /// again with the progress of their last page, for the next bridge to take at once.
    async fn release(&self, active: VecDeque<Change>, claims: &mut Claims) {
        let mut reports: Vec<(i64, Outcome)> = active
            .iter()
            .map(|c| (c.job.id, Outcome::Released))
            .collect();
        while let Some(batch) = claims.next().await {
            reports.extend(batch.iter().map(|j| (j.id, Outcome::Released)));
        }
        if reports.is_empty() {
            return;
        }
        // Bounded, as every step of a stop: PostgreSQL away or stalled must not keep the
        // bridge from exiting; what is not given back returns with its lease.
        let given_back =
            tokio::time::timeout(Duration::from_secs(5), self.pager.outbox.settle(&reports)).await;
        match given_back {
            Ok(Ok(settled)) => tracing::info!(
                released = settled.changed.len(),
                "shutting down: gave the fan-outs in progress back; the next bridge resumes them where their last page ended"
            ),
            Ok(Err(error)) => tracing::warn!(
                %error,
                count = reports.len(),
                "shutting down: could not give the fan-outs in progress back; they return when their lease expires"
            ),
            Err(_) => tracing::warn!(
                count = reports.len(),
                "shutting down: PostgreSQL did not answer in 5 s to take the fan-outs in progress back; they return when their lease expires"
            ),
        }
    }

    /// The fan-out's connection, opened again when it broke.
    async fn connection<'c>(
        &self,
        client: &'c mut Option<tokio_postgres::Client>,
    ) -> Result<&'c mut tokio_postgres::Client> {
        let conn = match client.take() {
            Some(c) if !c.is_closed() => c,
            _ => crate::connect::postgres_as(&self.url, "benalsam-fanout").await?,
        };
        Ok(client.insert(conn))
    }
}

/// A failed fan-out: retried after its backoff.
fn retry(error: &Error) -> Outcome {
    Outcome::Failed {
        error: error.to_string(),
        retry: true,
    }
}
