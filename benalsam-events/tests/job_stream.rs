//! Checks the job stream and the outbox's state changes against a real PostgreSQL: nothing
//! written is lost, nothing is claimed twice, and leases, retries and reconnects work.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use benalsam_events::outbox::Wake;
use benalsam_events::{
    Backoff, Job, JobStream, JobStreamConfig, Outbox, OutboxConfig, Outcome, Settle,
};
use futures::StreamExt;
use support::{TestSchema, reports, unique_name};
use tokio_util::sync::CancellationToken;

const PATIENCE: Duration = Duration::from_secs(20);

fn listen(channel: &str) -> JobStreamConfig {
    {
        let mut c = JobStreamConfig::default();
        c.wake = Wake::Listen {
            channel: channel.to_owned(),
        };
        c
    }
}

async fn next_batch(stream: &mut JobStream) -> Vec<Job> {
    tokio::time::timeout(PATIENCE, stream.next())
        .await
        .expect("a batch in time")
        .expect("the stream goes on")
}

/// Collects batches until `n` jobs arrived.
async fn take_jobs(stream: &mut JobStream, n: usize) -> Vec<Job> {
    let mut jobs = Vec::new();
    while jobs.len() < n {
        jobs.extend(next_batch(stream).await);
    }
    jobs
}

fn ids(jobs: &[Job]) -> Vec<i64> {
    jobs.iter().map(|j| j.id).collect()
}

#[tokio::test]
async fn jobs_written_while_nobody_listens_are_delivered() {
    let db = TestSchema::new().await;
    let channel = unique_name("ch");
    db.use_channel(&channel).await;
    db.insert_listings(7).await;

    let outbox = db.outbox(OutboxConfig::default());
    let mut stream =
        JobStream::new(outbox, listen(&channel), CancellationToken::new()).expect("stream");
    let jobs = take_jobs(&mut stream, 7).await;
    assert_eq!(jobs.len(), 7);
    assert!(
        jobs.iter()
            .all(|j| j.table_name == "listings" && !j.is_retry())
    );
    assert!(db.statuses().await.iter().all(|(_, s)| s == "processing"));
    db.drop().await;
}

#[tokio::test]
async fn a_notification_wakes_the_stream_long_before_the_poll_interval() {
    let db = TestSchema::new().await;
    let channel = unique_name("ch");
    db.use_channel(&channel).await;
    let config = {
        let mut c = listen(&channel);
        c.poll_interval = Duration::from_secs(3600);
        c
    };
    let mut stream = JobStream::new(
        db.outbox(OutboxConfig::default()),
        config,
        CancellationToken::new(),
    )
    .expect("stream");
    // Wait until the listener is up, so the write below is seen through NOTIFY.
    let status = stream.status();
    tokio::time::timeout(PATIENCE, async {
        while status.snapshot().listening != Some(true) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("listening");
    db.insert_listings(1).await;
    assert_eq!(next_batch(&mut stream).await.len(), 1);
    db.drop().await;
}

#[tokio::test]
async fn poll_only_mode_finds_jobs_without_notifications() {
    let db = TestSchema::new().await;
    let config = {
        let mut c = JobStreamConfig::default();
        c.wake = Wake::PollOnly;
        c.poll_interval = Duration::from_millis(100);
        c
    };
    let mut stream = JobStream::new(
        db.outbox(OutboxConfig::default()),
        config,
        CancellationToken::new(),
    )
    .expect("stream");
    db.insert_listings(3).await;
    assert_eq!(take_jobs(&mut stream, 3).await.len(), 3);
    assert_eq!(stream.status().snapshot().listening, None);
    db.drop().await;
}

#[tokio::test]
async fn two_streams_claim_ten_thousand_jobs_exactly_once() {
    let db = TestSchema::new().await;
    let channel = unique_name("ch");
    db.use_channel(&channel).await;
    db.insert_listings(10_000).await;

    let shared = &db;
    let consume = |outbox: Outbox| {
        let channel = channel.clone();
        async move {
            let stream = JobStream::new(outbox.clone(), listen(&channel), CancellationToken::new())
                .expect("stream");
            let mut stream = stream;
            let mut seen = Vec::new();
            loop {
                let batch = tokio::select! {
                    batch = stream.next() => batch.expect("stream goes on"),
                    // Both streams drain the queue: stop once no job is left to claim.
                    () = tokio::time::sleep(Duration::from_millis(200)) => {
                        if shared.count("pending").await + shared.count("processing").await == 0 {
                            break;
                        }
                        continue;
                    }
                };
                let batch_ids = ids(&batch);
                let sent = outbox
                    .settle(&reports(&batch_ids, Outcome::Sent))
                    .await
                    .expect("report sent");
                assert_eq!(sent.changed, batch_ids, "each claimer reports its own jobs");
                seen.extend(batch_ids);
            }
            seen
        }
    };
    let (a, b) = tokio::join!(
        consume(db.outbox(OutboxConfig::default())),
        consume(db.outbox(OutboxConfig::default()))
    );
    assert!(
        !a.is_empty() && !b.is_empty(),
        "both streams took part: {} / {}",
        a.len(),
        b.len()
    );
    let mut all: Vec<i64> = a.iter().chain(&b).copied().collect();
    let unique: HashSet<i64> = all.iter().copied().collect();
    assert_eq!(unique.len(), all.len(), "no job was claimed twice");
    all.sort_unstable();
    let expected: Vec<i64> = db.statuses().await.into_iter().map(|(id, _)| id).collect();
    assert_eq!(all, expected, "every job was claimed");
    assert!(db.statuses().await.iter().all(|(_, s)| s == "sent"));
    db.drop().await;
}

#[tokio::test]
async fn jobs_of_a_dropped_stream_come_back_after_the_lease() {
    let db = TestSchema::new().await;
    db.insert_listings(5).await;
    let short_lease = {
        let mut c = OutboxConfig::default();
        c.lease = Duration::from_secs(1);
        c
    };
    let poll_fast = {
        let mut c = JobStreamConfig::default();
        c.wake = Wake::PollOnly;
        c.poll_interval = Duration::from_millis(200);
        c
    };

    let mut first = JobStream::new(
        db.outbox(short_lease.clone()),
        poll_fast.clone(),
        CancellationToken::new(),
    )
    .expect("stream");
    let taken = ids(&take_jobs(&mut first, 5).await);
    drop(first); // a bridge that dies without marking anything

    let mut second = JobStream::new(db.outbox(short_lease), poll_fast, CancellationToken::new())
        .expect("stream");
    let again = take_jobs(&mut second, 5).await;
    assert_eq!(ids(&again), taken);
    assert!(second.status().snapshot().reclaimed >= 5);
    db.drop().await;
}

#[tokio::test]
async fn the_stream_survives_its_connections_being_killed() {
    let db = TestSchema::new().await;
    let channel = unique_name("ch");
    db.use_channel(&channel).await;
    // Polling is so rare that a job can only arrive through LISTEN or a reconnect sweep.
    let config = {
        let mut c = listen(&channel);
        c.poll_interval = Duration::from_secs(3600);
        c.reconnect = Backoff::new(Duration::from_millis(50), Duration::from_millis(200));
        c
    };
    let mut stream = JobStream::new(
        db.outbox(OutboxConfig::default()),
        config,
        CancellationToken::new(),
    )
    .expect("stream");
    db.insert_listings(1).await;
    next_batch(&mut stream).await;

    let killed: i64 = db
        .client
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE query LIKE $1 OR query LIKE $2",
            &[
                &format!("LISTEN \"{channel}\"%"),
                &format!("%\"{}\".elasticsearch_sync_queue%", db.name),
            ],
        )
        .await
        .expect("terminate")
        .get(0);
    assert!(killed >= 1, "found the stream's backends");

    db.insert_listings(2).await;
    let jobs = take_jobs(&mut stream, 2).await;
    assert_eq!(jobs.len(), 2);
    let status = stream.status();
    tokio::time::timeout(PATIENCE, async {
        while status.snapshot().listening != Some(true) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("listening again");
    db.drop().await;
}

#[tokio::test]
async fn a_failed_job_is_retried_after_its_backoff_and_stops_at_the_maximum() {
    let db = TestSchema::new().await;
    db.insert_listings(1).await;
    let outbox = db.outbox({
        let mut c = OutboxConfig::default();
        c.max_attempts = 3;
        c.retry_backoff = Backoff::new(Duration::from_millis(300), Duration::from_millis(600));
        c
    });
    let config = {
        let mut c = JobStreamConfig::default();
        c.wake = Wake::PollOnly;
        c.poll_interval = Duration::from_millis(50);
        c
    };
    let mut stream =
        JobStream::new(outbox.clone(), config, CancellationToken::new()).expect("stream");

    let mut failed_at: Option<std::time::Instant> = None;
    for attempt in 1..=3 {
        let job = next_batch(&mut stream).await.remove(0);
        if let Some(at) = failed_at {
            // The delay is at least half of 300 ms × 2^(failures before this one).
            let min = Duration::from_millis(150) * 2u32.pow((attempt - 2) as u32);
            assert!(
                at.elapsed() >= min,
                "attempt {attempt} waited out its backoff"
            );
        }
        assert_eq!(job.is_retry(), attempt > 1, "attempt {attempt}");
        assert_eq!(job.retry_count, attempt - 1);
        let marked = outbox
            .settle(&[(
                job.id,
                Outcome::Failed {
                    error: format!("broker unreachable (attempt {attempt})"),
                    retry: true,
                },
            )])
            .await
            .expect("report failed");
        assert_eq!(marked.changed, vec![job.id]);
        failed_at = Some(std::time::Instant::now());
    }
    // Three failures: no more attempts. The job stays failed with its last error.
    let quiet = tokio::time::timeout(Duration::from_millis(1500), stream.next()).await;
    assert!(quiet.is_err(), "no fourth attempt: {quiet:?}");
    let row = db
        .client
        .query_one(
            "SELECT status, retry_count, error_message, next_attempt_at IS NULL, processed_at IS NOT NULL
             FROM elasticsearch_sync_queue",
            &[],
        )
        .await
        .expect("read");
    assert_eq!(row.get::<_, String>(0), "failed");
    assert_eq!(row.get::<_, i32>(1), 3);
    assert_eq!(row.get::<_, String>(2), "broker unreachable (attempt 3)");
    assert!(row.get::<_, bool>(3));
    assert!(row.get::<_, bool>(4), "processed_at is set on failure");
    db.drop().await;
}

#[tokio::test]
async fn state_changes_are_batched_and_completed_is_final() {
    let db = TestSchema::new().await;
    db.insert_listings(4).await;
    let outbox = db.outbox(OutboxConfig::default());
    let jobs = outbox.claim(10).await.expect("claim");
    let all = ids(&jobs);
    assert_eq!(all.len(), 4);

    let sent = outbox
        .settle(&reports(&all, Outcome::Sent))
        .await
        .expect("sent");
    assert_eq!(sent.changed, all);
    let done = outbox
        .settle(&reports(&all[..2], Outcome::Completed))
        .await
        .expect("completed");
    assert_eq!(done.changed, all[..2].to_vec());

    // Out of completed there is no way back (and sent jobs are already sent).
    let again = outbox
        .settle(&reports(&all, Outcome::Sent))
        .await
        .expect("sent again");
    assert!(again.changed.is_empty(), "{again:?}");
    assert_eq!(again.unchanged, all);
    let failed = outbox
        .settle(&[
            (
                all[0],
                Outcome::Failed {
                    error: "late failure".into(),
                    retry: true,
                },
            ),
            (
                all[2],
                Outcome::DeadLettered {
                    error: "mapping error".into(),
                },
            ),
        ])
        .await
        .expect("failed");
    assert_eq!(failed.changed, vec![all[2]]);
    assert_eq!(failed.unchanged, vec![all[0]]);
    let released = outbox
        .settle(&reports(&all, Outcome::Released))
        .await
        .expect("release");
    assert!(
        released.changed.is_empty(),
        "only processing jobs can be given back"
    );

    let rows = db
        .client
        .query(
            "SELECT status, processed_at IS NOT NULL, next_attempt_at IS NULL
             FROM elasticsearch_sync_queue ORDER BY id",
            &[],
        )
        .await
        .expect("read");
    let got: Vec<(String, bool, bool)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        got,
        vec![
            ("completed".into(), true, true),
            ("completed".into(), true, true),
            ("failed".into(), true, true), // not retryable: stays failed
            ("sent".into(), false, true),
        ]
    );
    // The architecture document's monitoring queries work as written.
    let by_status = db
        .client
        .query(
            "SELECT status, count(*) FROM elasticsearch_sync_queue GROUP BY status ORDER BY status",
            &[],
        )
        .await
        .expect("monitoring query 1");
    assert_eq!(by_status.len(), 3);
    db.client
        .query(
            "SELECT status, avg(EXTRACT(EPOCH FROM (processed_at - created_at))) as avg_processing_time
             FROM elasticsearch_sync_queue GROUP BY status",
            &[],
        )
        .await
        .expect("monitoring query 2");
    db.drop().await;
}

#[tokio::test]
async fn cancelling_ends_the_stream_and_hands_out_nothing_more() {
    let db = TestSchema::new().await;
    db.insert_listings(3).await;
    let shutdown = CancellationToken::new();
    let config = {
        let mut c = JobStreamConfig::default();
        c.wake = Wake::PollOnly;
        c.batch_size = 1;
        c
    };
    let mut stream = JobStream::new(db.outbox(OutboxConfig::default()), config, shutdown.clone())
        .expect("stream");
    let first = next_batch(&mut stream).await;
    shutdown.cancel();
    let end = tokio::time::timeout(PATIENCE, stream.next())
        .await
        .expect("ends in time");
    assert!(end.is_none(), "the stream ended");
    let statuses = db.statuses().await;
    let processing: Vec<i64> = statuses
        .iter()
        .filter(|(_, s)| s == "processing")
        .map(|(id, _)| *id)
        .collect();
    assert_eq!(
        processing,
        ids(&first),
        "only the batch handed out is claimed"
    );
    db.drop().await;
}

#[tokio::test]
async fn old_completed_jobs_are_purged_in_batches() {
    let db = TestSchema::new().await;
    db.insert_listings(30).await;
    db.client
        .batch_execute(
            "UPDATE elasticsearch_sync_queue SET status = 'completed', completed_at = now() - interval '8 days'
             WHERE id IN (SELECT id FROM elasticsearch_sync_queue ORDER BY id LIMIT 25);
             UPDATE elasticsearch_sync_queue SET status = 'completed', completed_at = now()
             WHERE id IN (SELECT id FROM elasticsearch_sync_queue ORDER BY id DESC LIMIT 2);",
        )
        .await
        .expect("age jobs");
    let outbox = db.outbox(OutboxConfig::default());
    let mut seen = Vec::new();
    let purged = outbox
        .purge_completed(Duration::from_secs(7 * 24 * 3600), 10, |done, total| {
            seen.push((done, total));
        })
        .await
        .expect("purge");
    assert_eq!(purged, 25);
    assert_eq!(
        seen,
        vec![(10, 25), (20, 25), (25, 25)],
        "progress after each batch"
    );
    let left = db.statuses().await;
    assert_eq!(left.len(), 5, "recent completed and pending jobs stay");
    let backlog = outbox.backlog().await.expect("backlog");
    assert_eq!(backlog.pending, 3);
    assert!(backlog.oldest_pending_age.is_some());
    db.drop().await;
}

#[tokio::test]
async fn commits_made_while_an_idle_stream_lingers_are_claimed_together() {
    let db = TestSchema::new().await;
    let channel = unique_name("ch");
    db.use_channel(&channel).await;
    let mut config = listen(&channel);
    config.poll_interval = Duration::from_secs(3600);
    // Long enough that five single-row commits in a row fall inside it even on a loaded
    // machine (they take milliseconds); the test waits this long once.
    config.linger = Duration::from_secs(10);
    let outbox = db.outbox(OutboxConfig::default());
    let mut stream = JobStream::new(outbox, config, CancellationToken::new()).expect("stream");
    db.insert_listings(1).await;
    assert_eq!(next_batch(&mut stream).await.len(), 1);

    // The stream is drained and waits; the first of these commits wakes it, and it claims
    // once the linger is over: all five in one batch, not one claim per commit.
    let waiting = tokio::spawn(async move { next_batch(&mut stream).await.len() });
    for _ in 0..5 {
        db.insert_listings(1).await;
    }
    assert_eq!(waiting.await.expect("the claim"), 5);
    db.drop().await;
}

#[tokio::test]
async fn a_linger_longer_than_the_poll_interval_is_refused() {
    let db = TestSchema::new().await;
    let mut config = JobStreamConfig::default();
    config.poll_interval = Duration::from_millis(100);
    config.linger = Duration::from_millis(200);
    let refused = JobStream::new(
        db.outbox(OutboxConfig::default()),
        config,
        CancellationToken::new(),
    )
    .expect_err("refused");
    assert!(
        refused.to_string().contains("JobStreamConfig::linger"),
        "{refused}"
    );
    db.drop().await;
}
