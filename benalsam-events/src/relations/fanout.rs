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
//! Bounded: one page of keys at a time is all it holds (the pages are `INSERT … SELECT`,
//! nothing is read into the bridge), and it waits while more than two pages of REBUILD jobs
//! of the table are not yet indexed (pending, claimed or sent), so neither the outbox nor
//! RabbitMQ ever holds more of them than that, and the table's other changes pass between
//! pages (BENCHMARKS.md, "Joined documents"). A document that already has a REBUILD
//! job waiting is skipped: that job is read after this change committed.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::event_type::{EventType, Relation};
use crate::ops::Live;
use crate::ops::metrics::{Metrics, RelationLabel};
use crate::outbox::{
    Job, JobStream, JobStreamConfig, Operation, Outbox, OutboxConfig, Outcome, Settle,
};
use crate::relations::sql::FanOutSql;
use crate::{DatabaseUrl, Error, Result};

/// Documents per page of a fan-out, by default (`BENALSAM_FANOUT_PAGE`).
pub(crate) const DEFAULT_FANOUT_PAGE: usize = 500;

/// What the fan-out has been doing, for health checks.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct FanOutStatus {
    /// Related-row changes fanned out completely.
    pub jobs_done: u64,
    /// REBUILD jobs written.
    pub documents_queued: u64,
    /// Documents skipped because a REBUILD job of theirs was already waiting.
    pub documents_coalesced: u64,
    /// The change being fanned out now: its job id, relation and documents so far.
    pub current: Option<(i64, String, u64)>,
    /// When a page was last written or a fan-out finished.
    pub last_progress_at: Option<SystemTime>,
    /// Errors, and the last one with its time.
    pub errors: u64,
    /// The last error.
    pub last_error: Option<(SystemTime, String)>,
}

/// The fan-out's metric families.
#[derive(Debug, Clone, Default)]
pub(crate) struct FanOutMetrics {
    documents: prometheus_client::metrics::family::Family<
        RelationLabel,
        prometheus_client::metrics::counter::Counter,
    >,
    coalesced: prometheus_client::metrics::family::Family<
        RelationLabel,
        prometheus_client::metrics::counter::Counter,
    >,
    changes: prometheus_client::metrics::family::Family<
        RelationLabel,
        prometheus_client::metrics::counter::Counter,
    >,
}

impl FanOutMetrics {
    fn register(&self, metrics: &Metrics, relations: &[String]) {
        for relation in relations {
            let label = RelationLabel {
                relation: relation.clone(),
            };
            let _ = self.documents.get_or_create(&label);
            let _ = self.coalesced.get_or_create(&label);
            let _ = self.changes.get_or_create(&label);
        }
        metrics.register(
            "fanout_documents",
            "REBUILD jobs written by the fan-out of related-row changes, by relation",
            None,
            self.documents.clone(),
        );
        metrics.register(
            "fanout_coalesced_documents",
            "Documents a fan-out skipped because a REBUILD job of theirs was already waiting",
            None,
            self.coalesced.clone(),
        );
        metrics.register(
            "fanout_changes",
            "Related-row changes fanned out completely, by relation",
            None,
            self.changes.clone(),
        );
    }
}

/// One relation, ready to fan out.
#[derive(Debug, Clone)]
struct Plan {
    /// The documents' table as their jobs name it.
    documents: String,
    relation: Relation,
    sql: FanOutSql,
}

/// Claims the jobs of related-row changes and fans each out; see the module documentation.
pub(crate) struct FanOut {
    stream: JobStream,
    worker: Worker,
}

/// What fans out one change (everything but the stream, which is not `Sync`).
struct Worker {
    url: DatabaseUrl,
    outbox: Outbox,
    plans: HashMap<String, Plan>,
    page: i64,
    status: Live<FanOutStatus>,
    metrics: FanOutMetrics,
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
            for relation in &event_type.relations {
                plans.insert(
                    relation.job_table(&event_type.table),
                    Plan {
                        documents: event_type.table.clone(),
                        relation: relation.clone(),
                        sql: FanOutSql::new(&outbox.schema, event_type, relation),
                    },
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
        stream_config.batch_size = 8;
        stream_config.adaptive_notify = false;
        let stream = JobStream::new(claims.clone(), stream_config, shutdown.clone())?;
        Ok(Some(Self {
            stream,
            worker: Worker {
                url: url.clone(),
                outbox: claims,
                plans,
                page: i64::try_from(page).unwrap_or(i64::MAX),
                status: Live::default(),
                metrics: FanOutMetrics::default(),
            },
        }))
    }

    pub(crate) fn with_metrics(self, metrics: &Metrics) -> Self {
        let relations: Vec<String> = self.worker.plans.keys().cloned().collect();
        self.worker.metrics.register(metrics, &relations);
        self
    }

    pub(crate) fn status(&self) -> Live<FanOutStatus> {
        self.worker.status.clone()
    }

    /// Fans out claimed changes until `shutdown`; a change in progress then keeps its page
    /// mark and returns to the queue when its lease expires (or is finished by another
    /// bridge).
    pub(crate) async fn run(self, shutdown: CancellationToken) {
        let Self { mut stream, worker } = self;
        worker.run(&mut stream, &shutdown).await;
    }
}

impl Worker {
    async fn run(&self, stream: &mut JobStream, shutdown: &CancellationToken) {
        let mut client: Option<tokio_postgres::Client> = None;
        while let Some(batch) = stream.next().await {
            for job in batch {
                if shutdown.is_cancelled() {
                    return;
                }
                let outcome = self.fan_out(&mut client, &job, shutdown).await;
                let report = match outcome {
                    Ok(true) => Outcome::Completed,
                    // Shutdown or a lost lease: the job is someone else's now, or will be.
                    Ok(false) => continue,
                    Err(error) => {
                        tracing::warn!(job = job.id, table = %job.table_name, %error, "fan-out failed; retrying after backoff");
                        let mut s = self.status.lock();
                        s.errors += 1;
                        s.last_error = Some((SystemTime::now(), error.to_string()));
                        Outcome::Failed {
                            error: error.to_string(),
                            retry: true,
                        }
                    }
                };
                if let Err(error) = self.outbox.settle(&[(job.id, report)]).await {
                    tracing::warn!(job = job.id, %error, "cannot record the fan-out's outcome; it runs again after its lease");
                }
            }
        }
    }

    /// Fans out one change; `Ok(false)` when it stopped before the end (shutdown, or the
    /// lease went to another bridge).
    async fn fan_out(
        &self,
        client: &mut Option<tokio_postgres::Client>,
        job: &Job,
        shutdown: &CancellationToken,
    ) -> Result<bool> {
        let Some(plan) = self.plans.get(&job.table_name) else {
            return Err(Error::config(
                "relations",
                format!("no relation records jobs as {:?}", job.table_name),
            ));
        };
        let rows = related_rows(job, &plan.relation);
        let (mut tuple, mut after) = progress_of(&job.change_data);
        let label = RelationLabel {
            relation: job.table_name.clone(),
        };
        self.status.lock().current = Some((job.id, job.table_name.clone(), 0));
        if after.is_some() || tuple > 0 {
            tracing::info!(job = job.id, relation = %job.table_name, after = ?after, "fan-out resumed where its last page ended");
        } else {
            tracing::info!(job = job.id, relation = %job.table_name, record = %job.record_id, "fan-out started");
        }
        let lease = self.outbox.config().lease.as_secs_f64();
        let worker = &self.outbox.config().worker_id;
        let trace_id = job
            .traceparent
            .as_deref()
            .and_then(|t| t.get(3..35))
            .map(str::to_owned);
        let mut renewed = std::time::Instant::now();
        while tuple < rows.len() {
            if shutdown.is_cancelled() {
                return Ok(false);
            }
            let conn = match client.take() {
                Some(c) if !c.is_closed() => c,
                _ => crate::connect::postgres_as(&self.url, "benalsam-fanout").await?,
            };
            let conn = client.insert(conn);
            if self.outstanding(conn, plan).await? > 2 * self.page {
                // Let the table's REBUILD jobs reach the index first; keep the lease
                // meanwhile (renewed every quarter lease, not at every wait).
                if renewed.elapsed() > self.outbox.config().lease / 4 {
                    let progress = json!({ "tuple": tuple, "after": after });
                    let held = conn
                        .execute(&plan.sql.progress, &[&job.id, &progress, &lease, worker])
                        .await
                        .map_err(|e| Error::postgres("renewing a fan-out's lease", e))?;
                    if held == 0 {
                        return Ok(false);
                    }
                    renewed = std::time::Instant::now();
                }
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(false),
                    () = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
                continue;
            }
            let fail = |e| Error::postgres(format!("fanning out job {}", job.id), e);
            let tx = conn.transaction().await.map_err(fail)?;
            let page = match &after {
                None => {
                    tx.query_one(
                        &plan.sql.first,
                        &[
                            &rows[tuple],
                            &self.page,
                            &plan.documents,
                            &trace_id,
                            &job.traceparent,
                        ],
                    )
                    .await
                }
                Some(last) => {
                    tx.query_one(
                        &plan.sql.next,
                        &[
                            &rows[tuple],
                            &self.page,
                            &plan.documents,
                            &trace_id,
                            &job.traceparent,
                            last,
                        ],
                    )
                    .await
                }
            }
            .map_err(fail)?;
            let (found, added, last): (i64, i64, Option<String>) =
                (page.get(0), page.get(1), page.get(2));
            let (next_tuple, next_after) = if found < self.page {
                (tuple + 1, None)
            } else {
                (tuple, last)
            };
            let progress = json!({ "tuple": next_tuple, "after": next_after });
            let held = tx
                .execute(&plan.sql.progress, &[&job.id, &progress, &lease, worker])
                .await
                .map_err(fail)?;
            if held == 0 {
                // The lease ran out and another bridge has the job: undo this page.
                return Ok(false);
            }
            if added > 0 {
                tx.execute(
                    "SELECT pg_notify($1, '')",
                    &[&self.outbox.config().notify_channel],
                )
                .await
                .map_err(fail)?;
            }
            tx.commit().await.map_err(fail)?;
            renewed = std::time::Instant::now();
            let (found, added) = (found.unsigned_abs(), added.unsigned_abs());
            self.metrics.documents.get_or_create(&label).inc_by(added);
            self.metrics
                .coalesced
                .get_or_create(&label)
                .inc_by(found - added.min(found));
            {
                let mut s = self.status.lock();
                s.documents_queued += added;
                s.documents_coalesced += found - added.min(found);
                s.last_progress_at = Some(SystemTime::now());
                if let Some((_, _, so_far)) = &mut s.current {
                    *so_far += found;
                }
            }
            (tuple, after) = (next_tuple, next_after);
        }
        self.metrics.changes.get_or_create(&label).inc();
        let mut s = self.status.lock();
        let documents = s.current.as_ref().map_or(0, |(_, _, n)| *n);
        tracing::info!(job = job.id, relation = %job.table_name, documents, "fan-out finished");
        s.jobs_done += 1;
        s.current = None;
        s.last_progress_at = Some(SystemTime::now());
        Ok(true)
    }

    /// REBUILD jobs of the plan's documents not yet indexed: pending, claimed or sent. Counting only the
    /// pending ones let the bridge move a fan-out into RabbitMQ faster than the consumer
    /// indexes it, and every other change of the table queued behind it there (measured:
    /// edits of other listings took 25 s at p50 during a 100,000-document fan-out, 1.8 s
    /// counting all three). Three counts rather than `status IN (…)`: each is answered from
    /// its state's partial index (the `IN` form cost PostgreSQL three times the CPU).
    async fn outstanding(&self, client: &tokio_postgres::Client, plan: &Plan) -> Result<i64> {
        Ok(client
            .query_one(&plan.sql.outstanding, &[&plan.documents])
            .await
            .map_err(|e| Error::postgres("counting the REBUILD jobs not yet indexed", e))?
            .get(0))
    }
}

/// The related rows a change touches: the row (insert, delete), or the new one and, when its
/// joined columns changed, the old one too.
fn related_rows(job: &Job, relation: &Relation) -> Vec<Value> {
    match job.operation {
        Operation::Update => {
            let (old, new) = (&job.change_data["old"], &job.change_data["new"]);
            let moved = relation.related_columns.iter().any(|c| old[c] != new[c]);
            if moved {
                vec![new.clone(), old.clone()]
            } else {
                vec![new.clone()]
            }
        }
        _ => vec![job.change_data.clone()],
    }
}

/// Where a fan-out resumes: which related row, after which document key.
fn progress_of(change_data: &Value) -> (usize, Option<String>) {
    let progress = &change_data["fanout"];
    let tuple = progress["tuple"]
        .as_u64()
        .and_then(|t| usize::try_from(t).ok())
        .unwrap_or(0);
    let after = progress["after"].as_str().map(str::to_owned);
    (tuple, after)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event_type::FieldType;

    fn job(operation: Operation, change_data: Value) -> Job {
        Job {
            id: 1,
            table_name: "listings#images".into(),
            operation,
            record_id: "9".into(),
            change_data,
            retry_count: 0,
            created_at: SystemTime::UNIX_EPOCH,
            traceparent: None,
            claim: crate::outbox::ClaimKind::Fresh,
        }
    }

    #[test]
    fn a_moved_child_rebuilds_both_documents_and_an_edit_one() {
        let images = Relation::children("images", "listing_images", &["listing_id"], &["id"])
            .field("url", FieldType::Long);
        let moved = job(
            Operation::Update,
            json!({"old": {"listing_id": 1, "url": "a"}, "new": {"listing_id": 2, "url": "a"}}),
        );
        assert_eq!(related_rows(&moved, &images).len(), 2);
        let edited = job(
            Operation::Update,
            json!({"old": {"listing_id": 1, "url": "a"}, "new": {"listing_id": 1, "url": "b"}}),
        );
        assert_eq!(
            related_rows(&edited, &images),
            vec![json!({"listing_id": 1, "url": "b"})]
        );
        let added = job(Operation::Insert, json!({"listing_id": 3}));
        assert_eq!(
            related_rows(&added, &images),
            vec![json!({"listing_id": 3})]
        );
    }

    #[test]
    fn progress_resumes_where_the_last_page_ended() {
        assert_eq!(progress_of(&json!({"id": 1})), (0, None));
        assert_eq!(
            progress_of(&json!({"fanout": {"tuple": 1, "after": "42"}})),
            (1, Some("42".to_owned()))
        );
    }
}
