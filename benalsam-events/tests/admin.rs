//! Checks the operating functions against a real PostgreSQL: the status summary, retrying
//! failed jobs, and a backfill that is interrupted and continued.

mod support;

use std::collections::HashSet;

use benalsam_events::admin::{self, Selection};
use benalsam_events::{Failure, OutboxConfig};
use support::TestSchema;

#[tokio::test]
async fn summary_and_retry_of_failed_jobs() {
    let db = TestSchema::new().await;
    db.insert_listings(4).await;
    let outbox = db.outbox(OutboxConfig::default());
    let ids: Vec<i64> = outbox
        .claim(10)
        .await
        .expect("claim")
        .iter()
        .map(|j| j.id)
        .collect();
    outbox.mark_sent(&ids).await.expect("sent");
    outbox.mark_completed(&ids[..2]).await.expect("completed");
    let failures: Vec<Failure> = ids[2..]
        .iter()
        .map(|id| Failure {
            id: *id,
            error: "mapping".into(),
            retry: false,
        })
        .collect();
    outbox.mark_failed(&failures).await.expect("failed");

    let summary = admin::summary(&db.client, &db.name).await.expect("summary");
    let lines: Vec<(String, i64, bool)> = summary
        .by_status
        .iter()
        .map(|l| (l.status.clone(), l.jobs, l.avg_processing_seconds.is_some()))
        .collect();
    assert_eq!(
        lines,
        vec![("completed".into(), 2, true), ("failed".into(), 2, true)]
    );
    assert_eq!(summary.oldest_pending, None);

    let retried = admin::retry_failed(&db.client, &db.name, &Selection::Ids(vec![ids[2], ids[0]]))
        .await
        .expect("retry one");
    assert_eq!(retried, vec![ids[2]], "only failed jobs are retried");
    let retried = admin::retry_failed(&db.client, &db.name, &Selection::All)
        .await
        .expect("retry all");
    assert_eq!(retried, vec![ids[3]]);
    let again = outbox.claim(10).await.expect("claim again");
    assert_eq!(
        again
            .iter()
            .map(|j| (j.id, j.retry_count))
            .collect::<Vec<_>>(),
        vec![(ids[2], 0), (ids[3], 0)]
    );
    db.drop().await;
}

#[tokio::test]
async fn an_interrupted_backfill_continues_and_enqueues_every_row_once() {
    let db = TestSchema::new().await;
    // Rows that predate the trigger.
    db.client
        .batch_execute("ALTER TABLE listings DISABLE TRIGGER listings_sync_queue")
        .await
        .expect("disable");
    let ids: HashSet<String> = db.insert_listings(25).await.into_iter().collect();
    db.client
        .batch_execute("ALTER TABLE listings ENABLE TRIGGER listings_sync_queue")
        .await
        .expect("enable");
    assert!(db.statuses().await.is_empty());

    let mut client = benalsam_events::postgres::connect(&support::database_url())
        .await
        .expect("connect");
    let mut calls = 0;
    let first = admin::backfill(&mut client, &db.name, "listings", "id", 10, false, |_| {
        calls += 1;
        false // interrupted after the first batch
    })
    .await
    .expect("first batch");
    assert_eq!((calls, first.rows, first.finished), (1, 10, false));

    let mut seen = Vec::new();
    let done = admin::backfill(&mut client, &db.name, "listings", "id", 10, false, |p| {
        seen.push(p.rows);
        true
    })
    .await
    .expect("continued");
    assert!(done.finished);
    assert_eq!(done.rows, 25);
    assert_eq!(seen, vec![20, 25], "continued after the first ten");

    let queued: Vec<String> = db
        .client
        .query(
            "SELECT record_id FROM elasticsearch_sync_queue WHERE operation = 'INSERT'",
            &[],
        )
        .await
        .expect("jobs")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(queued.len(), 25, "each row once");
    assert_eq!(queued.into_iter().collect::<HashSet<_>>(), ids);

    let again = admin::backfill(&mut client, &db.name, "listings", "id", 10, false, |_| true)
        .await
        .expect("finished already");
    assert!(again.finished);
    assert_eq!(
        db.statuses().await.len(),
        25,
        "a finished backfill enqueues nothing more"
    );
    let err = admin::backfill(&mut client, &db.name, "listings", "nope", 10, true, |_| {
        true
    })
    .await
    .expect_err("unknown key column");
    assert!(err.to_string().contains("no column nope"), "{err}");
    db.drop().await;
}
