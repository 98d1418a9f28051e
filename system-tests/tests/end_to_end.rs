//! End to end through the real binaries, as separate processes, against the real stack:
//! 5,000 listings written by concurrent writers with inserts, edits, status changes and
//! deletes; when the queue has drained, the index equals the searchable view of the table,
//! every job is completed and the DLQ is empty. Then the same with each binary killed
//! (SIGKILL) and restarted once mid-run.

mod binaries;
#[path = "../../benalsam-events/tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use benalsam_events::consume::DeadLetterQueue;
use binaries::{bridge_binary, consumer_binary, stop};
use serde_json::json;
use support::{TestIndex, TestSchema, TestVhost, database_url, free_port, search_url};

const LISTINGS: usize = 5_000;
const WRITERS: usize = 4;
const PATIENCE: Duration = Duration::from_secs(180);

struct Deployment {
    db_schema: String,
    vhost: benalsam_events::config::AmqpUrl,
    index: String,
}

impl Deployment {
    fn bridge(&self) -> binaries::Guarded {
        self.spawn(bridge_binary(), &[("BENALSAM_LEASE", "3s")])
    }

    fn consumer(&self) -> binaries::Guarded {
        self.spawn(
            consumer_binary(),
            &[
                ("ELASTICSEARCH_URL", search_url().expose()),
                ("BENALSAM_INDEX", &self.index),
            ],
        )
    }

    fn spawn(&self, binary: PathBuf, extra: &[(&str, &str)]) -> binaries::Guarded {
        let mut command = Command::new(binary);
        command
            .env("DATABASE_URL", database_url().expose())
            .env("BENALSAM_SCHEMA", &self.db_schema)
            .env("RABBITMQ_URL", self.vhost.expose())
            .env("BENALSAM_HEALTH_ADDR", format!("127.0.0.1:{}", free_port()))
            .env("BENALSAM_POLL_INTERVAL", "200ms")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for (k, v) in extra {
            command.env(k, v);
        }
        command.spawn().expect("the binary starts").into()
    }
}

/// One writer: inserts its share of listings in small transactions and, as it goes, edits,
/// changes the status of and deletes some of them.
async fn writer(schema: String, seed: u64, count: usize) {
    let client = database_url().connect().await.expect("writer connects");
    client
        .batch_execute(&format!("SET search_path TO {schema}"))
        .await
        .expect("search_path");
    let mut rng = fastrand::Rng::with_seed(seed);
    let statuses = [
        "active",
        "active",
        "active",
        "pending_approval",
        "sold",
        "draft",
        "inactive",
    ];
    let mut mine: Vec<String> = Vec::new();
    for n in 0..count {
        let status = statuses[rng.usize(..statuses.len())];
        let id: String = client
            .query_one(
                "INSERT INTO listings (user_id, title, description, category, status, latitude, longitude)
                 VALUES (gen_random_uuid(), $1, 'İlk açıklama', 'genel', $2, 41.0, 29.0)
                 RETURNING id::text",
                &[&format!("İlan {seed}-{n}"), &status],
            )
            .await
            .expect("insert")
            .get(0);
        mine.push(id);
        if n % 3 == 0 {
            let target = &mine[rng.usize(..mine.len())];
            client
                .execute(
                    "UPDATE listings SET description = 'Düzenlendi ' || $2, updated_at = now() WHERE id::text = $1",
                    &[target, &n.to_string()],
                )
                .await
                .expect("edit");
        }
        if n % 4 == 0 {
            let target = &mine[rng.usize(..mine.len())];
            let status = statuses[rng.usize(..statuses.len())];
            client
                .execute(
                    "UPDATE listings SET status = $2 WHERE id::text = $1",
                    &[target, &status],
                )
                .await
                .expect("status change");
        }
        if n % 10 == 0 && mine.len() > 1 {
            let target = mine.swap_remove(rng.usize(..mine.len()));
            client
                .execute("DELETE FROM listings WHERE id::text = $1", &[&target])
                .await
                .expect("delete");
        }
    }
}

async fn write_workload(schema: &str) {
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| tokio::spawn(writer(schema.to_owned(), w as u64 + 1, LISTINGS / WRITERS)))
        .collect();
    for w in writers {
        w.await.expect("writer finished");
    }
}

async fn wait_drained(db: &TestSchema) {
    let started = Instant::now();
    loop {
        let open: i64 = db
            .client
            .query_one(
                "SELECT count(*) FROM elasticsearch_sync_queue WHERE status <> 'completed'",
                &[],
            )
            .await
            .expect("count")
            .get(0);
        if open == 0 {
            return;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "{open} jobs still not completed"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The index must be the searchable view of the table, with the latest content.
async fn assert_converged(db: &TestSchema, index: &TestIndex, vhost: &TestVhost) {
    let expected: BTreeMap<String, String> = db
        .client
        .query(
            "SELECT id::text, description FROM listings WHERE status = 'active'",
            &[],
        )
        .await
        .expect("read table")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let ids = index.search(json!({"match_all": {}})).await;
    assert_eq!(
        ids.len(),
        expected.len(),
        "as many documents as searchable listings"
    );
    assert!(ids.iter().eq(expected.keys()), "the same ids");
    for (id, description) in expected.iter().step_by(97) {
        let doc = index.get(id).await.expect("indexed");
        assert_eq!(
            doc["_source"]["description"],
            description.as_str(),
            "latest content of {id}"
        );
    }
    let failed: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM elasticsearch_sync_queue WHERE status <> 'completed'",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(failed, 0, "every job completed");
    assert!(
        DeadLetterQueue::new(vhost.url.clone(), "elasticsearch.sync.dlq")
            .list(5)
            .await
            .expect("dlq")
            .is_empty(),
        "nothing in the DLQ"
    );
}

async fn setup() -> (TestSchema, TestVhost, TestIndex, Deployment) {
    let (db, vhost, index) = (
        TestSchema::new().await,
        TestVhost::new().await,
        TestIndex::new().await,
    );
    let deployment = Deployment {
        db_schema: db.name.clone(),
        vhost: vhost.url.clone(),
        index: index.alias.clone(),
    };
    (db, vhost, index, deployment)
}

#[tokio::test]
async fn five_thousand_listings_from_concurrent_writers_reach_the_index() {
    let (db, vhost, index, deployment) = setup().await;
    let (bridge, consumer) = (deployment.bridge(), deployment.consumer());
    write_workload(&db.name).await;
    wait_drained(&db).await;
    stop(bridge);
    stop(consumer);
    assert_converged(&db, &index, &vhost).await;
    db.drop().await;
    vhost.drop().await;
    index.drop().await;
}

#[tokio::test]
async fn killing_each_binary_mid_run_changes_nothing_in_the_end() {
    let (db, vhost, index, deployment) = setup().await;
    let (mut bridge, mut consumer) = (deployment.bridge(), deployment.consumer());
    let writing = tokio::spawn({
        let schema = db.name.clone();
        async move { write_workload(&schema).await }
    });
    // Kill each once while work flows, then start it again.
    let started = Instant::now();
    while db
        .client
        .query_one(
            "SELECT count(*) FROM elasticsearch_sync_queue WHERE status = 'completed'",
            &[],
        )
        .await
        .expect("count")
        .get::<_, i64>(0)
        < 500
    {
        assert!(started.elapsed() < PATIENCE, "work flows");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bridge.kill().expect("SIGKILL the bridge");
    bridge.wait().expect("reaped");
    tokio::time::sleep(Duration::from_millis(300)).await;
    bridge = deployment.bridge();
    consumer.kill().expect("SIGKILL the consumer");
    consumer.wait().expect("reaped");
    tokio::time::sleep(Duration::from_millis(300)).await;
    consumer = deployment.consumer();

    writing.await.expect("writers finished");
    wait_drained(&db).await;
    stop(bridge);
    stop(consumer);
    assert_converged(&db, &index, &vhost).await;
    db.drop().await;
    vhost.drop().await;
    index.drop().await;
}
