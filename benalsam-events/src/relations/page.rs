//! One related-row change being fanned out: where it is (which related row, after which
//! document key), and its three moves, each one round trip or one transaction:
//!
//! * `page`: one page of REBUILD jobs, its progress recorded in the job and its lease
//!   renewed in the same transaction (a crash resumes after the last committed page);
//! * `wait`: while the documents' table has too many REBUILD jobs not yet indexed (a page
//!   after the first only tops them up to one page), only the lease is renewed
//!   (every quarter lease);
//! * `record`: the page counted in the status and the metrics.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use serde_json::{Value, json};

use crate::event_type::Relation;
use crate::outbox::{Job, Operation, Outbox};
use crate::relations::sql::FanOutSql;
use crate::relations::status::{FanOutEvent, FanOutRecorder};
use crate::{error::Error, error::Result};

/// One relation, ready to fan out.
#[derive(Debug, Clone)]
pub(super) struct Plan {
    /// The documents' table as their jobs name it.
    pub(super) documents: String,
    pub(super) relation: Relation,
    pub(super) sql: FanOutSql,
}

/// What every change's moves share: the outbox they write to, the page size and the
/// fan-out's record.
pub(super) struct Pager {
    pub(super) outbox: Outbox,
    /// Documents per page.
    pub(super) page: i64,
    /// Its status and metrics, written only through its events.
    pub(super) recorder: FanOutRecorder,
}

/// What one turn of a change did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
    /// It wrote a page and has more to write.
    Wrote,
    /// Its table had too many REBUILD jobs not yet indexed; it wrote nothing.
    Waiting,
    /// Its last page is written.
    Finished,
    /// Its lease went to another bridge (it ran out): the job is not this bridge's any more.
    Lost,
}

/// A change in progress.
pub(super) struct Change {
    pub(super) job: Job,
    /// Its relation's plan.
    plan: Arc<Plan>,
    /// The related rows it touches (one, or the old and the new one when the row moved).
    rows: Vec<Value>,
    /// Which of `rows` is being paged, and after which document key.
    tuple: usize,
    after: Option<String>,
    /// When its lease was last renewed.
    renewed: Instant,
    /// Documents paged so far by this bridge.
    pub(super) documents: u64,
    /// Whether this bridge wrote a page of it yet.
    started: bool,
    trace_id: Option<String>,
}

impl Change {
    pub(super) fn new(job: Job, plan: Arc<Plan>) -> Self {
        let rows = related_rows(&job, &plan.relation);
        let (tuple, after) = progress_of(&job.change_data);
        let trace_id = job
            .traceparent
            .as_deref()
            .and_then(crate::event_type::trace_id_of)
            .map(str::to_owned);
        Self {
            job,
            plan,
            rows,
            tuple,
            after,
            renewed: Instant::now(),
            documents: 0,
            started: false,
            trace_id,
        }
    }

    /// Whether an earlier claim of the job wrote pages already.
    pub(super) fn resumed(&self) -> bool {
        self.tuple > 0 || self.after.is_some()
    }

    /// One turn: a page when the documents' table has room for one, or when it is the
    /// change's first (`outstanding` caches the table's REBUILD jobs not yet indexed for
    /// this round, and counts the pages written in it), else a wait.
    pub(super) async fn step(
        &mut self,
        pager: &Pager,
        conn: &mut tokio_postgres::Client,
        outstanding: &mut HashMap<String, i64>,
    ) -> Result<Step> {
        if self.tuple >= self.rows.len() {
            return Ok(Step::Finished);
        }
        let plan = Arc::clone(&self.plan);
        let plan = plan.as_ref();
        let queued = match outstanding.get(&plan.documents) {
            Some(n) => *n,
            None => {
                let n = not_yet_indexed(conn, plan).await?;
                outstanding.insert(plan.documents.clone(), n);
                n
            }
        };
        // A change's first page is a whole page and does not wait for the table's room: a
        // small change (one page) then queues behind at most what is already out, not behind
        // the room that must first be made. Still bounded: one page per change in progress.
        let size = if self.started {
            match top_up(pager.page, queued) {
                Some(size) => size,
                None => return self.wait(pager, plan, conn).await,
            }
        } else {
            pager.page
        };
        let Some((found, kept, added)) = self.page(pager, plan, conn, size).await? else {
            return Ok(Step::Lost);
        };
        *outstanding.entry(plan.documents.clone()).or_default() += added;
        self.record(pager, found, kept, added);
        Ok(if self.tuple >= self.rows.len() {
            Step::Finished
        } else {
            Step::Wrote
        })
    }

    /// Keeps the lease while the table's REBUILD jobs reach the index (renewed every quarter
    /// lease, not at every turn).
    async fn wait(
        &mut self,
        pager: &Pager,
        plan: &Plan,
        conn: &tokio_postgres::Client,
    ) -> Result<Step> {
        let config = pager.outbox.config();
        if self.renewed.elapsed() <= config.lease / 4 {
            return Ok(Step::Waiting);
        }
        let progress = json!({ "tuple": self.tuple, "after": self.after });
        let held = renew(conn, pager, plan, self.job.id, &progress)
            .await
            .map_err(|e| Error::postgres("renewing a fan-out's lease", e))?;
        if held == 0 {
            return Ok(Step::Lost);
        }
        self.renewed = Instant::now();
        Ok(Step::Waiting)
    }

    /// Writes one page in one transaction: its REBUILD jobs, the progress and the lease.
    /// `None` (the page undone) when the lease ran out and another bridge has the job;
    /// otherwise the documents of the page, those the status policy keeps, and the jobs
    /// added (the other kept ones had one waiting).
    async fn page(
        &mut self,
        pager: &Pager,
        plan: &Plan,
        conn: &mut tokio_postgres::Client,
        size: i64,
    ) -> Result<Option<(i64, i64, i64)>> {
        let config = pager.outbox.config();
        let job = &self.job;
        let fail = |e| Error::postgres(format!("fanning out job {}", job.id), e);
        let tx = conn.transaction().await.map_err(fail)?;
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 6] = [
            &self.rows[self.tuple],
            &size,
            &plan.documents,
            &self.trace_id,
            &job.traceparent,
            &job.created_at,
        ];
        // A TRUNCATE of the related table pages through every document that could have
        // joined one of its rows; a row change through those that join the row.
        let (first, next) = if job.operation == Operation::Truncate {
            (&plan.sql.all_first, &plan.sql.all_next)
        } else {
            (&plan.sql.first, &plan.sql.next)
        };
        let page = match &self.after {
            None => tx.query_one(first, &params).await,
            Some(last) => {
                let mut rest = params.to_vec();
                rest.push(last);
                tx.query_one(next, &rest).await
            }
        }
        .map_err(fail)?;
        let (found, added, last, kept): (i64, i64, Option<String>, i64) =
            (page.get(0), page.get(1), page.get(2), page.get(3));
        let (tuple, after) = if found < size {
            (self.tuple + 1, None)
        } else {
            (self.tuple, last)
        };
        let progress = json!({ "tuple": tuple, "after": after });
        let held = renew(&tx, pager, plan, job.id, &progress)
            .await
            .map_err(fail)?;
        if held == 0 {
            // Dropping the transaction rolls the page back.
            return Ok(None);
        }
        if added > 0 {
            tx.execute("SELECT pg_notify($1, '')", &[&config.notify_channel])
                .await
                .map_err(fail)?;
        }
        tx.commit().await.map_err(fail)?;
        (self.tuple, self.after) = (tuple, after);
        self.renewed = Instant::now();
        self.started = true;
        Ok(Some((found, kept, added)))
    }

    /// Counts a written page in the fan-out's status and metrics.
    fn record(&mut self, pager: &Pager, found: i64, kept: i64, added: i64) {
        let (found, kept, added) = (
            found.unsigned_abs(),
            kept.unsigned_abs(),
            added.unsigned_abs(),
        );
        let coalesced = kept - added.min(kept);
        self.documents += found;
        pager.recorder.record(FanOutEvent::Page {
            relation: &self.job.table_name,
            job: self.job.id,
            added,
            coalesced,
            documents: self.documents,
        });
    }
}

/// How many documents a change that is under way may page now, its table having `queued`
/// REBUILD jobs not yet indexed: what tops them up to one page, or `None` (it waits) while
/// that is less than a fifth of a page.
///
/// Why one page: everything not yet indexed is ahead of a new change's first page in the
/// broker's queue, so it is the wait of every small change that arrives during a big one.
/// Topped up in pieces, one page keeps the consumer's prefetch fed while holding that wait to
/// a page (BENCHMARKS.md, "Fair fan-out", compares it with one and a half and two pages).
fn top_up(page: i64, queued: i64) -> Option<i64> {
    let room = page - queued;
    (room >= (page / 5).max(1)).then_some(room)
}

/// Records a change's progress and renews its lease, alone or inside a page's transaction:
/// the rows it held (0: the lease ran out and another bridge has the job).
async fn renew(
    conn: &impl tokio_postgres::GenericClient,
    pager: &Pager,
    plan: &Plan,
    job: i64,
    progress: &Value,
) -> std::result::Result<u64, tokio_postgres::Error> {
    let config = pager.outbox.config();
    let lease = config.lease.as_secs_f64();
    conn.execute(
        plan.sql.progress.as_str(),
        &[&job, progress, &lease, &config.worker_id],
    )
    .await
}

/// REBUILD jobs of the plan's documents not yet indexed: pending, claimed or sent. Counting
/// only the pending ones let the bridge move a fan-out into RabbitMQ faster than the consumer
/// indexes it, and every other change of the table queued behind it there (BENCHMARKS.md,
/// "Edits of other listings while the fan-out runs", has the figures). Three counts rather
/// than `status IN (…)`: each is answered from its state's partial index, and the `IN` form
/// cost PostgreSQL more CPU per page when it was measured.
async fn not_yet_indexed(client: &tokio_postgres::Client, plan: &Plan) -> Result<i64> {
    Ok(client
        .query_one(&plan.sql.outstanding, &[&plan.documents])
        .await
        .map_err(|e| Error::postgres("counting the REBUILD jobs not yet indexed", e))?
        .get(0))
}

/// The related rows a change touches: the row (insert, delete), or the new one and, when its
/// joined columns changed, the old one too. A TRUNCATE has one, `{}` (its pages need none).
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
        Operation::Truncate => vec![json!({})],
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
    use std::time::SystemTime;

    use super::*;
    use crate::event_type::{EventType, FieldType};

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
    fn a_change_under_way_tops_its_table_up_to_one_page() {
        assert_eq!(top_up(500, 0), Some(500));
        assert_eq!(top_up(500, 150), Some(350));
        assert_eq!(
            top_up(500, 400),
            Some(100),
            "a fifth of a page is worth a write"
        );
        assert_eq!(top_up(500, 401), None, "less is not");
        assert_eq!(top_up(500, 5000), None);
        assert_eq!(top_up(1, 0), Some(1), "a page of one still moves");
        assert_eq!(top_up(1, 1), None);
    }

    proptest::proptest! {
        #[test]
        fn a_top_up_never_passes_the_ceiling_nor_a_page(page in 1i64..5000, queued in 0i64..20000) {
            if let Some(size) = top_up(page, queued) {
                proptest::prop_assert!(size >= 1 && size <= page);
                proptest::prop_assert!(queued + size <= page);
            }
        }
    }

    #[test]
    fn progress_resumes_where_the_last_page_ended() {
        assert_eq!(progress_of(&json!({"id": 1})), (0, None));
        assert_eq!(
            progress_of(&json!({"fanout": {"tuple": 1, "after": "42"}})),
            (1, Some("42".to_owned()))
        );
        let relation = Relation::children("images", "listing_images", &["listing_id"], &["id"]);
        let listings = EventType::new("listings", "listings").with_relation(relation.clone());
        let plan = Plan {
            documents: "listings".to_owned(),
            sql: FanOutSql::new("public", &listings, &[&relation]),
            relation,
        };
        let resumed = Change::new(
            job(
                Operation::Insert,
                json!({"listing_id": 3, "fanout": {"tuple": 0, "after": "7"}}),
            ),
            Arc::new(plan),
        );
        assert!(resumed.resumed());
    }
}
