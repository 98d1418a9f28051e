//! A `benalsam-bridge` process stopped with SIGTERM in the middle of a long fan-out gives
//! back every claim it holds, and the next bridge finishes the fan-out at once, where the
//! first one's last page ended, instead of waiting for the lease.

#[path = "../../benalsam-events/tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use benalsam_events::{EventType, OutboxConfig};
use support::{TestSchema, TestVhost, database_url, free_port, terminate, wait_exit};

const MARKETPLACE_SQL: &str = include_str!("../../examples/joined_documents/marketplace.sql");
const JOINED: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../examples/joined_documents/listings.toml"
);
/// Listings of the renamed seller: 20 pages of 100.
const LISTINGS: i64 = 2_000;
/// Far longer than the test may take: a fan-out finished in time was not waiting for it.
const LEASE: &str = "600s";
const PATIENCE: Duration = Duration::from_secs(120);

fn bridge(db: &TestSchema, vhost: &TestVhost) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_benalsam-bridge"))
        .arg("--config")
        .arg(JOINED)
        .env("DATABASE_URL", database_url().expose())
        .env("BENALSAM_SCHEMA", &db.name)
        .env("RABBITMQ_URL", vhost.url.expose())
        .env("BENALSAM_HEALTH_ADDR", format!("127.0.0.1:{}", free_port()))
        .env("BENALSAM_LEASE", LEASE)
        .env("BENALSAM_POLL_INTERVAL", "200ms")
        .env("BENALSAM_FANOUT_PAGE", "100")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the bridge")
}

/// The seller's fan-out job: its status and whether a page of it was written.
async fn fan_out(db: &TestSchema) -> (String, bool) {
    let row = db
        .client
        .query_one(
            "SELECT status, change_data ? 'fanout' FROM elasticsearch_sync_queue
             WHERE table_name = 'listings#seller'",
            &[],
        )
        .await
        .expect("the fan-out job");
    (row.get(0), row.get(1))
}

async fn count(db: &TestSchema, sql: &str) -> i64 {
    db.client.query_one(sql, &[]).await.expect(sql).get(0)
}

/// What a consumer does with the REBUILD jobs the bridge sent: completes them. The fan-out
/// writes a page only while at most two pages of them wait for the index.
async fn index_sent(db: &TestSchema) {
    db.client
        .execute(
            "UPDATE elasticsearch_sync_queue SET status = 'completed', processed_at = now()
             WHERE operation = 'REBUILD' AND status = 'sent'",
            &[],
        )
        .await
        .expect("complete the sent REBUILD jobs");
}

#[tokio::test]
async fn sigterm_mid_fan_out_gives_the_claims_back_and_the_next_bridge_finishes_at_once() {
    let (mut db, vhost) = (TestSchema::new().await, TestVhost::new().await);
    db.client
        .batch_execute(MARKETPLACE_SQL)
        .await
        .expect("the marketplace tables");
    let joined = EventType::from_file(Path::new(JOINED)).expect("the joined example");
    let config = OutboxConfig::in_schema(&db.name);
    config
        .migrate(&mut db.client, &joined)
        .await
        .expect("the relations' triggers");
    let user: String = db
        .client
        .query_one(
            "INSERT INTO users (display_name, rating) VALUES ('Deniz', 4.0) RETURNING id::text",
            &[],
        )
        .await
        .expect("a seller")
        .get(0);
    db.client
        .execute(
            "INSERT INTO listings (user_id, title, category, status)
             SELECT $1::text::uuid, 'İlan ' || i, 'elektronik', 'active' FROM generate_series(1, $2::bigint) i",
            &[&user, &LISTINGS],
        )
        .await
        .expect("the seller's listings");
    // Only the rename's fan-out is of interest here.
    db.client
        .batch_execute(&format!(
            "DELETE FROM elasticsearch_sync_queue;
             UPDATE users SET display_name = 'Deniz Bey' WHERE id = '{user}'"
        ))
        .await
        .expect("rename the seller");

    // Nothing indexes: the first bridge writes its first pages, then waits for the index.
    let mut first = bridge(&db, &vhost);
    let started = Instant::now();
    while fan_out(&db).await != ("processing".to_owned(), true) {
        assert!(started.elapsed() < PATIENCE, "the fan-out under way");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    terminate(&first);
    assert!(wait_exit(&mut first).await.success(), "a clean stop");
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM elasticsearch_sync_queue WHERE status = 'processing'"
        )
        .await,
        0,
        "no job left claimed by the stopped bridge"
    );
    assert_eq!(
        fan_out(&db).await,
        ("pending".to_owned(), true),
        "the fan-out waits for the next bridge, its last page kept"
    );
    let written = count(
        &db,
        "SELECT count(*) FROM elasticsearch_sync_queue WHERE operation = 'REBUILD'",
    )
    .await;
    assert!(written < LISTINGS, "stopped mid-way ({written} written)");

    let mut second = bridge(&db, &vhost);
    let started = Instant::now();
    while fan_out(&db).await.0 != "completed" {
        assert!(
            started.elapsed() < PATIENCE,
            "the next bridge finishes the fan-out long before the {LEASE} lease"
        );
        index_sent(&db).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        count(
            &db,
            "SELECT count(DISTINCT record_id) FROM elasticsearch_sync_queue WHERE operation = 'REBUILD'"
        )
        .await,
        LISTINGS,
        "every listing rebuilt"
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM elasticsearch_sync_queue WHERE operation = 'REBUILD'"
        )
        .await,
        LISTINGS,
        "resumed after the first bridge's last page: no page written twice"
    );
    terminate(&second);
    assert!(wait_exit(&mut second).await.success());
    vhost.drop().await;
    db.drop().await;
}
