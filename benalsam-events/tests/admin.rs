//! Checks the operating functions against a real PostgreSQL: the status summary, retrying
//! failed jobs, and a backfill that is interrupted and continued.

mod support;

use std::collections::HashSet;

use benalsam_events::outbox::JobSelection;
use benalsam_events::{OutboxConfig, Outcome, Settle};
use support::{TestSchema, reports};

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
    outbox
        .settle(&reports(&ids, Outcome::Sent))
        .await
        .expect("sent");
    outbox
        .settle(&reports(&ids[..2], Outcome::Completed))
        .await
        .expect("completed");
    let refused = Outcome::DeadLettered {
        error: "mapping".into(),
    };
    outbox
        .settle(&reports(&ids[2..], refused))
        .await
        .expect("failed");

    let summary = outbox.summary().await.expect("summary");
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

    let retried = outbox
        .retry_failed(&JobSelection::Jobs(vec![ids[2], ids[0]]))
        .await
        .expect("retry one");
    assert_eq!(retried, vec![ids[2]], "only failed jobs are retried");
    let retried = outbox
        .retry_failed(&JobSelection::All)
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
        .batch_execute("ALTER TABLE listings DISABLE TRIGGER benalsam_sync_insert")
        .await
        .expect("disable");
    let ids: HashSet<String> = db.insert_listings(25).await.into_iter().collect();
    db.client
        .batch_execute("ALTER TABLE listings ENABLE TRIGGER benalsam_sync_insert")
        .await
        .expect("enable");
    assert!(db.statuses().await.is_empty());

    let outbox = db.outbox(OutboxConfig::default());
    let mut calls = 0;
    let first = outbox
        .backfill("listings", "id", 10, false, None, |_| {
            calls += 1;
            false // interrupted after the first batch
        })
        .await
        .expect("first batch");
    assert_eq!((calls, first.rows, first.finished), (1, 10, false));
    assert_eq!(first.this_run, 10);

    let mut seen = Vec::new();
    let done = outbox
        .backfill("listings", "id", 10, false, None, |p| {
            seen.push(p.rows);
            true
        })
        .await
        .expect("continued");
    assert!(done.finished);
    assert_eq!(done.rows, 25);
    assert_eq!(done.this_run, 15, "what this run enqueued");
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

    // After a TRUNCATE of a related table, say: asked again, a finished backfill is a new run.
    let again = outbox
        .backfill("listings", "id", 10, false, None, |_| true)
        .await
        .expect("a new run");
    assert!(again.finished);
    assert_eq!((again.rows, again.this_run), (25, 25), "{again:?}");
    assert_eq!(db.statuses().await.len(), 50, "every row again");
    let err = outbox
        .backfill("listings", "nope", 10, true, None, |_| true)
        .await
        .expect_err("unknown key column");
    assert!(err.to_string().contains("no column nope"), "{err}");
    db.drop().await;
}

#[tokio::test]
async fn a_backfill_where_a_condition_holds_enqueues_only_those_rows_and_a_bad_one_is_refused() {
    let db = TestSchema::new().await;
    db.client
        .batch_execute("ALTER TABLE listings DISABLE TRIGGER benalsam_sync_insert")
        .await
        .expect("disable");
    let ids = db.insert_listings(30).await;
    db.client
        .batch_execute("ALTER TABLE listings ENABLE TRIGGER benalsam_sync_insert")
        .await
        .expect("enable");
    let outbox = db.outbox(OutboxConfig::default());
    let condition = "title IN ('İlan 3', 'İlan 17') OR description = 'Açıklama 29'";
    let done = outbox
        .backfill("listings", "id", 2, false, Some(condition), |_| true)
        .await
        .expect("a filtered backfill");
    assert_eq!(
        (done.rows, done.this_run, done.total),
        (3, 3, 3),
        "{done:?}"
    );
    let queued: HashSet<String> = db
        .client
        .query("SELECT record_id FROM elasticsearch_sync_queue", &[])
        .await
        .expect("jobs")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let expected: HashSet<String> = [2, 16, 28].iter().map(|i| ids[*i].clone()).collect();
    assert_eq!(
        queued, expected,
        "the rows the condition selects, and only them"
    );
    // The unfiltered backfill keeps its own progress: every row.
    let all = outbox
        .backfill("listings", "id", 100, false, None, |_| true)
        .await
        .expect("every row");
    assert_eq!(all.this_run, 30);
    let err = outbox
        .backfill("listings", "id", 10, false, Some("nope = 1"), |_| true)
        .await
        .expect_err("a column that does not exist");
    let text = err.to_string();
    assert!(err.is_config(), "{text}");
    assert!(text.contains("--where") && text.contains("nope"), "{text}");
    db.drop().await;
}
