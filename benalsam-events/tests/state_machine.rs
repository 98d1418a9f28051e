//! The job state machine against a real PostgreSQL: the race the fault campaign found, made
//! deterministic, and a model test that drives the outbox through random interleavings of
//! every actor (two bridges, a consumer, the reclaimer, the resender, an operator) and checks
//! each job against an independent model after every step, then that nothing is stuck.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use benalsam_events::outbox::JobSelection;
use benalsam_events::{Backoff, Outbox, OutboxConfig, Outcome, Settle};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use support::TestSchema;

/// The most attempts a job gets in these tests.
const MAX_ATTEMPTS: u32 = 3;

/// An outbox acting as bridge `worker`; leases and backoffs are long, so only the test's own
/// steps expire or elapse them.
fn outbox(db: &TestSchema, worker: &str) -> Outbox {
    db.outbox({
        let mut c = OutboxConfig::default();
        c.worker_id = worker.to_owned();
        c.lease = Duration::from_secs(3600);
        c.max_attempts = MAX_ATTEMPTS;
        c.retry_backoff = Backoff::new(Duration::from_secs(3600), Duration::from_secs(3600));
        c
    })
}

fn dead_lettered() -> Outcome {
    Outcome::DeadLettered {
        error: "mapping refused the document".to_owned(),
    }
}

async fn status(db: &TestSchema, job: i64) -> String {
    db.client
        .query_one(
            "SELECT status FROM elasticsearch_sync_queue WHERE id = $1",
            &[&job],
        )
        .await
        .expect("the job")
        .get(0)
}

/// Claims every pending job (ten at most) as `bridge`: their ids.
async fn claimed_ids(bridge: &Outbox) -> Vec<i64> {
    let jobs = bridge.claim(10).await.expect("claim");
    jobs.iter().map(|j| j.id).collect()
}

#[tokio::test]
async fn a_confirm_recorded_while_another_transaction_holds_the_job_waits_and_marks_it_sent() {
    let db = TestSchema::new().await;
    db.insert_listings(3).await;
    let bridge = outbox(&db, "bridge");
    let jobs = claimed_ids(&bridge).await;
    // Another bridge's claim read the middle job as pending before this claim committed: it
    // keeps the row locked until its own transaction ends.
    let mut other = support::database_url()
        .connect()
        .await
        .expect("second connection");
    let other_tx = other.transaction().await.expect("begin");
    other_tx
        .execute(
            &format!(
                "SELECT 1 FROM {}.elasticsearch_sync_queue WHERE id = $1 FOR UPDATE",
                db.name
            ),
            &[&jobs[1]],
        )
        .await
        .expect("lock the row");

    let report = {
        let bridge = bridge.clone();
        let reports: Vec<(i64, Outcome)> = jobs.iter().map(|id| (*id, Outcome::Sent)).collect();
        tokio::spawn(async move { bridge.settle(&reports).await })
    };
    // The mark waits for the lock (rather than skipping the job and leaving it processing).
    let started = std::time::Instant::now();
    loop {
        let waiting: i64 = db
            .client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE wait_event_type = 'Lock'
                   AND query LIKE '%' || $1 || '%elasticsearch_sync_queue%'",
                &[&db.name],
            )
            .await
            .expect("activity")
            .get(0);
        if waiting > 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the mark waits for the lock"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    other_tx
        .rollback()
        .await
        .expect("end the other transaction");
    let settled = report.await.expect("no panic").expect("settled");
    let mut changed = settled.changed.clone();
    changed.sort_unstable();
    assert_eq!(changed, jobs, "every job reported sent");
    for job in jobs {
        assert_eq!(status(&db, job).await, "sent");
    }
    db.drop().await;
}

#[tokio::test]
async fn a_confirm_recorded_after_the_consumer_failed_the_job_leaves_it_failed() {
    let db = TestSchema::new().await;
    db.insert_listings(1).await;
    let (bridge, consumer) = (outbox(&db, "bridge"), outbox(&db, "consumer"));
    let job = bridge.claim(10).await.expect("claim")[0].id;

    // The consumer is faster than the bridge's bookkeeping: it refused the document and
    // dead-lettered it before the broker's confirm was recorded.
    let refused = consumer
        .settle(&[(job, dead_lettered())])
        .await
        .expect("dead-lettered");
    assert_eq!(refused.changed, vec![job]);
    let confirm = bridge
        .settle(&[(job, Outcome::Sent)])
        .await
        .expect("the late confirm");
    assert_eq!(
        confirm.unchanged,
        vec![job],
        "the late confirm changes nothing"
    );
    assert_eq!(status(&db, job).await, "failed");

    // So the operator sees it, and retrying it works.
    let retried = bridge
        .retry_failed(&JobSelection::All)
        .await
        .expect("retry-failed");
    assert_eq!(retried, vec![job]);
    assert_eq!(status(&db, job).await, "pending");
    db.drop().await;
}

#[tokio::test]
async fn a_completed_job_is_final_and_a_consumer_may_complete_before_the_sent_mark() {
    let db = TestSchema::new().await;
    db.insert_listings(1).await;
    let (bridge, consumer) = (outbox(&db, "bridge"), outbox(&db, "consumer"));
    let job = bridge.claim(10).await.expect("claim")[0].id;
    let done = consumer
        .settle(&[(job, Outcome::Completed)])
        .await
        .expect("completed while still processing");
    assert_eq!(done.changed, vec![job]);
    for late in [
        Outcome::Sent,
        Outcome::Released,
        Outcome::Failed {
            error: "x".into(),
            retry: true,
        },
        dead_lettered(),
    ] {
        let settled = bridge.settle(&[(job, late)]).await.expect("settle");
        assert_eq!(settled.unchanged, vec![job]);
    }
    assert_eq!(status(&db, job).await, "completed");
    db.drop().await;
}

#[tokio::test]
async fn a_completed_job_keeps_no_payload_and_a_failed_one_keeps_it_for_its_retry() {
    let db = TestSchema::new().await;
    db.insert_listings(2).await;
    let bridge = outbox(&db, "bridge");
    let jobs = claimed_ids(&bridge).await;
    let (done, refused) = (jobs[0], jobs[1]);
    bridge
        .settle(&[(done, Outcome::Completed), (refused, dead_lettered())])
        .await
        .expect("settle");
    let payload = |job: i64| {
        let client = &db.client;
        async move {
            client
                .query_one(
                    "SELECT change_data FROM elasticsearch_sync_queue WHERE id = $1",
                    &[&job],
                )
                .await
                .expect("the job")
                .get::<_, serde_json::Value>(0)
        }
    };
    assert_eq!(payload(done).await, serde_json::json!({}));
    assert!(payload(refused).await["title"].is_string());

    // Retried, the failed job is published with its row again.
    bridge
        .retry_failed(&JobSelection::Jobs(vec![refused]))
        .await
        .expect("retry-failed");
    let again = bridge.claim(10).await.expect("claim again");
    assert_eq!(again.len(), 1);
    assert!(again[0].change_data["title"].is_string());
    db.drop().await;
}

/// The page of each job (the block of its row's current version), by id.
async fn pages(db: &TestSchema) -> BTreeMap<i64, String> {
    db.client
        .query(
            "SELECT id, split_part(ctid::text, ',', 1) FROM elasticsearch_sync_queue",
            &[],
        )
        .await
        .expect("read pages")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[tokio::test]
async fn a_claim_writes_each_jobs_new_version_on_its_own_page() {
    // The queue's fillfactor keeps room on every page for a second version of each of its
    // jobs, so a claim (a batch, in one transaction) never moves a job to another page,
    // where PostgreSQL would log the whole row instead of the bytes that changed.
    let db = TestSchema::new().await;
    db.insert_listings(60).await;
    let before = pages(&db).await;
    let claimed = outbox(&db, "bridge").claim(100).await.expect("claim");
    assert_eq!(claimed.len(), 60);
    assert_eq!(pages(&db).await, before);
    let distinct: std::collections::BTreeSet<&String> = before.values().collect();
    assert!(distinct.len() > 1, "the jobs fill more than one page");
    db.drop().await;
}

/// Who may do what, to one of the jobs (by index) or to all of them.
#[derive(Debug, Clone)]
enum Step {
    /// Bridge `0` or `1` claims everything claimable.
    Claim(usize),
    /// A bridge reports an outcome of a job: sent, released, failed (retryable).
    Report(usize, usize, Reported),
    /// The consumer indexed the job.
    Complete(usize),
    /// The consumer refused it.
    DeadLetter(usize),
    /// The job's lease runs out, and the reclaimer runs.
    Expire(usize),
    /// The job has been `sent` for long, and the resender runs.
    Resend(usize),
    /// The job's retry backoff is over.
    Elapse(usize),
    /// An operator retries the job.
    RetryFailed(usize),
}

impl Step {
    /// The job a step is about (none for a claim, which takes every claimable job).
    fn job(&self) -> Option<usize> {
        match *self {
            Step::Claim(_) => None,
            Step::Report(_, j, _)
            | Step::Complete(j)
            | Step::DeadLetter(j)
            | Step::Expire(j)
            | Step::Resend(j)
            | Step::Elapse(j)
            | Step::RetryFailed(j) => Some(j),
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Reported {
    Sent,
    Released,
    Failed,
}

/// One job as the model has it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Model {
    status: &'static str,
    holder: Option<usize>,
    retries: u32,
    /// A retry is scheduled (`next_attempt_at` set) ...
    scheduled: bool,
    /// ... and its time has come.
    due: bool,
}

impl Model {
    fn new() -> Self {
        Self {
            status: "pending",
            holder: None,
            retries: 0,
            scheduled: false,
            due: false,
        }
    }

    fn claimable(&self) -> bool {
        self.status == "pending" || (self.status == "failed" && self.scheduled && self.due)
    }

    fn to(&mut self, status: &'static str) {
        self.status = status;
        self.holder = None;
    }

    fn fail(&mut self, retry: bool) {
        self.to("failed");
        self.retries += 1;
        self.scheduled = retry && self.retries < MAX_ATTEMPTS;
        self.due = false;
    }

    /// Applies `step` to this job; returns whether its state changed.
    fn apply(&mut self, step: &Step) -> bool {
        let held_by = |m: &Model, w: usize| m.status == "processing" && m.holder == Some(w);
        match *step {
            Step::Claim(w) if self.claimable() => {
                self.to("processing");
                self.holder = Some(w);
                true
            }
            Step::Report(w, _, reported) if held_by(self, w) => {
                match reported {
                    Reported::Sent => {
                        self.to("sent");
                        self.scheduled = false;
                    }
                    Reported::Released => self.to("pending"),
                    Reported::Failed => self.fail(true),
                }
                true
            }
            Step::Complete(_) if self.status != "completed" => {
                self.to("completed");
                self.scheduled = false;
                true
            }
            Step::DeadLetter(_) if ["processing", "sent", "failed"].contains(&self.status) => {
                self.fail(false);
                true
            }
            Step::Expire(_) if self.status == "processing" => {
                self.to("pending");
                true
            }
            Step::Resend(_) if self.status == "sent" => {
                self.to("pending");
                true
            }
            Step::Elapse(_) if self.status == "failed" && self.scheduled => {
                self.due = true;
                false
            }
            Step::RetryFailed(_) if self.status == "failed" => {
                self.to("pending");
                self.retries = 0;
                self.scheduled = false;
                true
            }
            _ => false,
        }
    }
}

fn step(jobs: usize) -> impl Strategy<Value = Step> {
    let job = 0..jobs;
    let reported = prop_oneof![
        Just(Reported::Sent),
        Just(Reported::Released),
        Just(Reported::Failed)
    ];
    prop_oneof![
        3 => (0..2usize).prop_map(Step::Claim),
        4 => (0..2usize, job.clone(), reported).prop_map(|(w, j, r)| Step::Report(w, j, r)),
        2 => job.clone().prop_map(Step::Complete),
        2 => job.clone().prop_map(Step::DeadLetter),
        1 => job.clone().prop_map(Step::Expire),
        1 => job.clone().prop_map(Step::Resend),
        1 => job.clone().prop_map(Step::Elapse),
        1 => job.prop_map(Step::RetryFailed),
    ]
}

/// The jobs of the schema as they are: id → (status, retry count, holder).
async fn actual(db: &TestSchema) -> BTreeMap<i64, (String, i32, Option<String>)> {
    db.client
        .query(
            "SELECT id, status, retry_count, locked_by FROM elasticsearch_sync_queue",
            &[],
        )
        .await
        .expect("read jobs")
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3))))
        .collect()
}

const WORKERS: [&str; 2] = ["bridge-a", "bridge-b"];

/// Does `step` to the real table; returns the jobs whose state it changed, ascending.
async fn perform(db: &TestSchema, outboxes: &[Outbox; 2], ids: &[i64], step: &Step) -> Vec<i64> {
    let id = step.job().map(|j| ids[j]);
    let settle = |w: usize, outcome: Outcome| {
        let outbox = outboxes[w].clone();
        let id = id.expect("a job");
        async move {
            outbox
                .settle(&[(id, outcome)])
                .await
                .expect("settle")
                .changed
        }
    };
    let sql = |statement: &'static str| {
        let id = id.expect("a job");
        async move {
            db.client
                .execute(statement, &[&id])
                .await
                .expect("time passes");
        }
    };
    match *step {
        Step::Claim(w) => {
            let mut claimed: Vec<i64> = outboxes[w]
                .claim(100)
                .await
                .expect("claim")
                .iter()
                .map(|j| j.id)
                .collect();
            claimed.sort_unstable();
            claimed
        }
        Step::Report(w, _, Reported::Sent) => settle(w, Outcome::Sent).await,
        Step::Report(w, _, Reported::Released) => settle(w, Outcome::Released).await,
        Step::Report(w, _, Reported::Failed) => {
            let error = "the broker refused it".to_owned();
            settle(w, Outcome::Failed { error, retry: true }).await
        }
        Step::Complete(_) => settle(0, Outcome::Completed).await,
        Step::DeadLetter(_) => settle(1, dead_lettered()).await,
        Step::Expire(_) => {
            sql(
                "UPDATE elasticsearch_sync_queue SET locked_until = now() - interval '1 second'
                 WHERE id = $1 AND status = 'processing'",
            )
            .await;
            outboxes[0].reclaim_expired(100).await.expect("reclaim")
        }
        Step::Resend(_) => {
            sql(
                "UPDATE elasticsearch_sync_queue SET sent_at = now() - interval '1 hour'
                 WHERE id = $1 AND status = 'sent'",
            )
            .await;
            outboxes[1]
                .resend_stale_sent(Duration::from_secs(1800), 100)
                .await
                .expect("resend")
        }
        Step::Elapse(_) => {
            sql(
                "UPDATE elasticsearch_sync_queue SET next_attempt_at = now() - interval '1 second'
                 WHERE id = $1 AND status = 'failed' AND next_attempt_at IS NOT NULL",
            )
            .await;
            Vec::new()
        }
        Step::RetryFailed(_) => outboxes[0]
            .retry_failed(&JobSelection::Jobs(vec![id.expect("a job")]))
            .await
            .expect("retry-failed"),
    }
}

/// Runs `steps` on `jobs` fresh jobs, checking every job against the model after each step.
async fn run(db: &TestSchema, outboxes: &[Outbox; 2], jobs: usize, steps: &[Step]) {
    db.client
        .batch_execute("TRUNCATE elasticsearch_sync_queue")
        .await
        .expect("reset");
    db.insert_listings(jobs as i64).await;
    let ids: Vec<i64> = actual(db).await.keys().copied().collect();
    let mut model = vec![Model::new(); jobs];
    for (n, step) in steps.iter().enumerate() {
        let targets: Vec<usize> = match step.job() {
            Some(j) => vec![j],
            None => (0..jobs).collect(),
        };
        let expected: Vec<i64> = targets
            .into_iter()
            .filter(|t| model[*t].apply(step))
            .map(|t| ids[t])
            .collect();
        let changed = perform(db, outboxes, &ids, step).await;
        assert_eq!(changed, expected, "step {n} {step:?} of {steps:?}");
        let now = actual(db).await;
        for (m, id) in model.iter().zip(&ids) {
            let (status, retries, holder) = &now[id];
            let held = m.holder.map(|w| WORKERS[w].to_owned());
            assert_eq!(
                (
                    status.as_str(),
                    u32::try_from(*retries).ok(),
                    holder.clone()
                ),
                (m.status, Some(m.retries), held),
                "job {id} after step {n} {step:?} of {steps:?}"
            );
        }
    }
}

/// What an operator and the pipeline do to end every job: retry the failed, expire the
/// leases, resend the sent, then claim, confirm and complete all.
fn recovery(jobs: usize) -> Vec<Step> {
    let mut steps = Vec::new();
    for j in 0..jobs {
        steps.extend([Step::RetryFailed(j), Step::Expire(j), Step::Resend(j)]);
    }
    steps.push(Step::Claim(0));
    for j in 0..jobs {
        steps.push(Step::Report(0, j, Reported::Sent));
    }
    steps.extend((0..jobs).map(Step::Complete));
    steps
}

#[test]
fn every_interleaving_of_every_actor_keeps_each_job_in_the_state_the_model_says_and_none_stuck() {
    const JOBS: usize = 4;
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let db = rt.block_on(TestSchema::new());
    let outboxes = [outbox(&db, WORKERS[0]), outbox(&db, WORKERS[1])];
    let mut runner = TestRunner::new(Config {
        cases: 48,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(
        &proptest::collection::vec(step(JOBS), 1..40),
        |mut steps| {
            steps.extend(recovery(JOBS));
            rt.block_on(async {
                run(&db, &outboxes, JOBS, &steps).await;
                let states: Vec<String> =
                    actual(&db).await.into_values().map(|(s, _, _)| s).collect();
                assert_eq!(
                    states,
                    vec!["completed"; JOBS],
                    "nothing stuck after {steps:?}"
                );
            });
            Ok(())
        },
    );
    rt.block_on(db.drop());
    if let Err(failure) = result {
        panic!("{failure}");
    }
}
