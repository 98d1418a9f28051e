//! WAL capture against a real PostgreSQL (`wal_level = logical`, as scripts/stack runs it):
//! its jobs are the trigger's jobs; the switch from triggers and a capture killed anywhere
//! record every change exactly once, in commit order; its changes reach the index; and what
//! cannot work is refused by name.

mod support;

use std::time::{Duration, Instant};

use benalsam_events::bridge::BridgeSettings;
use benalsam_events::{EventType, OutboxConfig};
use support::{
    Running, TestIndex, TestSchema, TestVhost, consumer_settings, database_url, unique_name,
};

/// A test's schema, vhost and slot name; `finish` drops the three (the slot and its
/// publication outlive the schema).
struct Trial {
    db: TestSchema,
    vhost: TestVhost,
    slot: String,
}

impl Trial {
    async fn new() -> Self {
        Self {
            db: TestSchema::new().await,
            vhost: TestVhost::new().await,
            slot: unique_name("s"),
        }
    }

    /// Migrates the schema for capture through the slot, as `migrate` with the setting does.
    async fn migrate(&self, event_types: &[EventType]) -> Result<(), benalsam_events::Error> {
        let mut config = OutboxConfig::in_schema(&self.db.name);
        config.capture_slot = Some(self.slot.clone());
        let mut client = database_url().connect().await.expect("connects");
        config.migrate(&mut client, event_types).await.map(drop)
    }

    async fn finish(self) {
        drop_capture(&self.db, &self.slot).await;
        self.vhost.drop().await;
        self.db.drop().await;
    }
}

/// A bridge that captures `slot` for `event_types` in `db`, migrating first.
fn capturing(
    db: &TestSchema,
    vhost: &TestVhost,
    slot: &str,
    event_types: Vec<EventType>,
) -> BridgeSettings {
    let mut settings = BridgeSettings::new(database_url(), vhost.url.clone());
    settings.outbox = OutboxConfig::in_schema(&db.name);
    settings.outbox.capture_slot = Some(slot.to_owned());
    settings.event_types = event_types;
    settings.migrate = true;
    settings.heartbeat_interval = None;
    settings
}

/// Drops the slot and its publication (they outlive the test's schema).
async fn drop_capture(db: &TestSchema, slot: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        // A killed capture's connection may hold the slot a moment longer.
        let dropped = db
            .client
            .batch_execute(&format!(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
                  WHERE slot_name = '{slot}';
                 DROP PUBLICATION IF EXISTS {slot};"
            ))
            .await;
        match dropped {
            Ok(()) => return,
            Err(e) if Instant::now() < deadline => {
                eprintln!("dropping slot {slot}: {e}; again");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("dropping slot {slot}: {e}"),
        }
    }
}

/// Waits until `sql` (one bigint) says `want`; panics with the last answer after a minute.
async fn wait_for(db: &TestSchema, sql: &str, want: i64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let got: i64 = db.client.query_one(sql, &[]).await.expect(sql).get(0);
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "{sql}: {got}, waited for {want}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn jobs_of_sql(table: &str) -> String {
    format!("SELECT count(*) FROM elasticsearch_sync_queue WHERE table_name = '{table}'")
}

#[tokio::test]
async fn captured_jobs_are_the_statement_trigger_s_jobs() {
    let trial = Trial::new().await;
    let (db, vhost, slot) = (&trial.db, &trial.vhost, &trial.slot);
    db.client
        .batch_execute("CREATE TABLE listings_wal (LIKE listings INCLUDING ALL)")
        .await
        .expect("a copy of listings");
    let mut wal = EventType::new("listings_wal", "listings_wal");
    wal.ignore = vec!["view_count".to_owned()];
    let bridge = Running::bridge(capturing(db, vhost, slot, vec![wal]));
    // The bridge has switched once the copy has no sync trigger and a slot exists.
    wait_for(
        db,
        &format!(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}'
              AND NOT EXISTS (SELECT FROM pg_trigger WHERE tgrelid = 'listings_wal'::regclass
                                 AND tgname LIKE 'benalsam_sync%')"
        ),
        1,
    )
    .await;

    // A description far beyond TOAST's threshold that does not compress: an update of
    // another column leaves it out of the WAL's new row.
    let long = "(SELECT string_agg(md5(g::text), '') FROM generate_series(1, 300) g)";
    let statements = [
        "INSERT INTO T (id, user_id, title, category, status)
         SELECT md5('r' || i)::uuid, md5('u' || i)::uuid, 'T' || i, 'c', 'active'
           FROM generate_series(1, 20) i",
        "UPDATE T SET description = 'd2' WHERE title IN ('T1', 'T2', 'T3', 'T4', 'T5')",
        &format!("UPDATE T SET description = {long} WHERE title = 'T13'"),
        "UPDATE T SET status = 'sold' WHERE title IN ('T5', 'T6', 'T13')",
        "UPDATE T SET view_count = view_count + 1",
        "UPDATE T SET title = title",
        "UPDATE T SET id = md5('moved')::uuid WHERE title = 'T7'",
        "INSERT INTO T (id, user_id, title, category, description, attributes, images, budget)
         VALUES (md5('r8')::uuid, md5('u8')::uuid, 'T8', 'c', 'upserted', '{\"a\": [1, \"x\"]}', '{p,\"q r\"}', 12.50),
                (md5('r9')::uuid, md5('u9')::uuid, 'T9', 'c', '', '{}', '{}', NULL),
                (md5('r99')::uuid, md5('u99')::uuid, 'T99', 'c', 'quote \" back \\ slash', '{}', '{}', 0)
         ON CONFLICT (id) DO UPDATE SET description = EXCLUDED.description,
                                        attributes = EXCLUDED.attributes, images = EXCLUDED.images",
        "DELETE FROM T WHERE title IN ('T10', 'T11', 'T12', 'T7', 'T13')",
        "TRUNCATE T ",
        "INSERT INTO T (id, user_id, title, category) VALUES (md5('after')::uuid, md5('u')::uuid, 'after', 'c')",
    ];
    for statement in statements {
        // Each statement on both tables in one transaction, as the application would.
        db.client
            .batch_execute(&format!(
                "BEGIN; {}; {}; COMMIT;",
                statement.replace(" T ", " listings "),
                statement.replace(" T ", " listings_wal "),
            ))
            .await
            .expect(statement);
    }
    let by_trigger: i64 = db
        .client
        .query_one(&jobs_of_sql("listings"), &[])
        .await
        .expect("count")
        .get(0);
    wait_for(db, &jobs_of_sql("listings_wal"), by_trigger).await;

    let (captured, triggered) = (
        db.jobs_by_record("listings_wal").await,
        db.jobs_by_record("listings").await,
    );
    let count = |op: &str| captured.iter().filter(|j| j.0 == op).count();
    // Inserts: 20, the moved key, the upsert's new row, the one after the truncation.
    // Updates: 5 descriptions, the long one, 3 statuses, the upsert that changed T8 (T9's
    // changed nothing). Deletes: the moved key's old one and 5.
    assert_eq!(
        (
            count("INSERT"),
            count("UPDATE"),
            count("DELETE"),
            count("TRUNCATE")
        ),
        (23, 10, 6, 1),
        "{captured:#?}"
    );
    assert_eq!(captured, triggered);
    // The TOASTed description came through the update that left it out.
    let status_of_t13 = captured
        .iter()
        .find(|(op, _, data)| {
            op == "UPDATE" && data["new"]["status"] == "sold" && data["new"]["title"] == "T13"
        })
        .expect("T13's status change");
    assert_eq!(
        status_of_t13.2["new"]["description"].as_str().map(str::len),
        Some(9600)
    );
    // The truncation mark is the captured TRUNCATE's job.
    wait_for(
        db,
        "SELECT count(*) FROM benalsam_truncations t JOIN elasticsearch_sync_queue q
             ON q.id = t.job_id AND q.operation = 'TRUNCATE' WHERE t.table_name = 'listings_wal'",
        1,
    )
    .await;
    bridge.stop().await;
    trial.finish().await;
}

/// Writers write throughout: first with the triggers, then across `migrate`'s switch to the
/// WAL, then while the capturing bridge is killed again and again. Every change is one job,
/// and each record's jobs follow its commits.
#[tokio::test]
async fn the_switch_and_a_capture_killed_anywhere_record_every_change_once() {
    let trial = Trial::new().await;
    let (db, vhost, slot) = (&trial.db, &trial.vhost, &trial.slot);
    let listings = EventType::listings();
    let seeded = db.insert_listings(200).await.len() as i64;

    let writer = {
        let client = database_url().connect().await.expect("writer connects");
        client
            .batch_execute(&format!("SET search_path TO {}", db.name))
            .await
            .expect("search_path");
        tokio::spawn(async move {
            let mut changes = 0u64;
            for k in 0..300 {
                let sql = match k % 3 {
                    0 => "INSERT INTO listings (user_id, title, category, status)
                          SELECT gen_random_uuid(), 'w' || i, 'c', 'active' FROM generate_series(1, 20) i"
                        .to_owned(),
                    1 => format!(
                        "UPDATE listings SET description = 'v{k}'
                          WHERE id IN (SELECT id FROM listings ORDER BY md5(id::text || '{k}') LIMIT 30)"
                    ),
                    _ => format!(
                        "DELETE FROM listings
                          WHERE id IN (SELECT id FROM listings ORDER BY md5(id::text || '{k}') LIMIT 5)"
                    ),
                };
                changes += client.execute(&sql, &[]).await.expect("a write");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            changes
        })
    };
    // Some writes go through the triggers first.
    wait_for(
        db,
        "SELECT least(count(*), 300) FROM elasticsearch_sync_queue",
        300,
    )
    .await;
    // Every bridge migrates first: a kill may land in the middle of the switch itself.
    let settings = capturing(db, vhost, slot, vec![listings]);
    let mut bridge = Running::bridge(settings.clone());
    for round in 0..8u64 {
        tokio::time::sleep(Duration::from_millis(150 + fastrand::u64(0..500))).await;
        bridge.kill().await;
        eprintln!("killed the capturing bridge ({round})");
        bridge = Running::bridge(settings.clone());
    }
    let changes = writer.await.expect("the writer") as i64;
    wait_for(
        db,
        &format!(
            "SELECT least(count(*), {}) FROM elasticsearch_sync_queue",
            seeded + changes
        ),
        seeded + changes,
    )
    .await;
    // Nothing twice: every update wrote its own description, every insert its own key.
    let twice: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM (SELECT record_id, operation, change_data
                                     FROM elasticsearch_sync_queue
                                    GROUP BY 1, 2, 3 HAVING count(*) > 1) d",
            &[],
        )
        .await
        .expect("duplicates")
        .get(0);
    assert_eq!(twice, 0);
    let jobs: i64 = db
        .client
        .query_one("SELECT count(*) FROM elasticsearch_sync_queue", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(jobs, seeded + changes);
    // Each record's jobs follow its commits: its insert first, its delete last, its
    // updates in the writer's order.
    let out_of_order: i64 = db
        .client
        .query_one(
            "WITH j AS (SELECT record_id, operation,
                               coalesce((change_data -> 'new' ->> 'description'), '') AS d,
                               row_number() OVER (PARTITION BY record_id ORDER BY id) AS n,
                               count(*) OVER (PARTITION BY record_id) AS total,
                               lag(change_data -> 'new' ->> 'description')
                                   OVER (PARTITION BY record_id ORDER BY id) AS before
                          FROM elasticsearch_sync_queue)
             SELECT count(*) FROM j
              WHERE (operation = 'INSERT' AND n <> 1)
                 OR (operation = 'DELETE' AND n <> total)
                 OR (operation = 'UPDATE' AND before LIKE 'v%'
                     AND substr(before, 2)::int >= substr(d, 2)::int)",
            &[],
        )
        .await
        .expect("order")
        .get(0);
    assert_eq!(out_of_order, 0);
    bridge.stop().await;
    trial.finish().await;
}

/// A capture that committed its jobs and stopped before it moved the slot finds those
/// changes again: the position written with the jobs makes it skip them. Staged here by
/// setting the position past changes no capture wrote.
#[tokio::test]
async fn a_capture_skips_what_its_position_says_it_wrote() {
    let trial = Trial::new().await;
    let (db, vhost, slot) = (&trial.db, &trial.vhost, &trial.slot);
    let listings = EventType::listings();
    trial
        .migrate(std::slice::from_ref(&listings))
        .await
        .expect("migrated for capture");
    let skipped = db.insert_listings(7).await;
    db.client
        .batch_execute(
            "UPDATE benalsam_capture SET position = pg_current_wal_lsn();
             UPDATE listings SET title = 'after the position'",
        )
        .await
        .expect("the position past the first rows");
    let bridge = Running::bridge(capturing(db, vhost, slot, vec![listings]));
    wait_for(db, "SELECT count(*) FROM elasticsearch_sync_queue", 7).await;
    let operations: Vec<String> = db
        .client
        .query(
            "SELECT DISTINCT operation FROM elasticsearch_sync_queue WHERE record_id = ANY ($1)",
            &[&skipped],
        )
        .await
        .expect("jobs")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(operations, ["UPDATE"]);
    bridge.stop().await;
    trial.finish().await;
}

#[tokio::test]
async fn captured_changes_reach_the_index() {
    let trial = Trial::new().await;
    let (db, vhost, slot) = (&trial.db, &trial.vhost, &trial.slot);
    let index = TestIndex::new().await;
    let listings = index.event_type();
    let bridge = Running::bridge(capturing(db, vhost, slot, vec![listings.clone()]));
    let consumer = Running::consumer(consumer_settings(db, &vhost.url, vec![listings]));
    wait_for(
        db,
        &format!("SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}'"),
        1,
    )
    .await;
    let ids = db.insert_listings(50).await;
    db.client
        .batch_execute(&format!(
            "UPDATE listings SET title = 'renamed' WHERE id = '{}';
             DELETE FROM listings WHERE id = '{}';",
            ids[0], ids[1]
        ))
        .await
        .expect("changes");
    wait_for(
        db,
        "SELECT count(*) FROM elasticsearch_sync_queue WHERE status = 'completed'",
        52,
    )
    .await;
    let documents = index.documents().await;
    assert_eq!(documents.len(), 49);
    assert_eq!(documents[&ids[0]]["title"], "renamed");
    assert!(!documents.contains_key(&ids[1]));
    consumer.stop().await;
    bridge.stop().await;
    index.drop().await;
    trial.finish().await;
}

#[tokio::test]
async fn what_cannot_work_is_refused_by_name() {
    let trial = Trial::new().await;
    let (db, vhost, slot) = (&trial.db, &trial.vhost, &trial.slot);
    let listings = EventType::listings();

    let mut bad = OutboxConfig::in_schema(&db.name);
    bad.capture_slot = Some("Not-A-Slot".to_owned());
    let error = bad.validate().expect_err("an invalid slot name");
    assert_eq!(error.setting(), Some("OutboxConfig::capture_slot"));

    // Capture on a database migrated for triggers: the bridge stops, naming what to run.
    let mut unprepared = capturing(db, vhost, slot, vec![listings.clone()]);
    unprepared.migrate = false;
    let error = benalsam_events::bridge::run(unprepared, Default::default())
        .await
        .expect_err("no slot yet");
    assert!(error.is_config(), "{error}");
    assert!(error.to_string().contains("migrate"), "{error}");

    // Migrated for capture, a migrate without the slot would record every change twice.
    trial
        .migrate(std::slice::from_ref(&listings))
        .await
        .expect("migrated for capture");
    let mut client = database_url().connect().await.expect("connects");
    let error = OutboxConfig::in_schema(&db.name)
        .migrate(&mut client, std::slice::from_ref(&listings))
        .await
        .expect_err("triggers beside a capture");
    assert_eq!(error.setting(), Some("OutboxConfig::capture_slot"));
    assert!(error.to_string().contains(slot.as_str()), "{error}");

    // A second slot on a captured outbox would record every change twice.
    let mut other = OutboxConfig::in_schema(&db.name);
    other.capture_slot = Some(unique_name("s"));
    let error = other
        .migrate(&mut client, std::slice::from_ref(&listings))
        .await
        .expect_err("a second slot");
    assert!(error.to_string().contains(slot.as_str()), "{error}");

    // A generated column added after the setup: pgoutput does not send it.
    db.client
        .batch_execute(
            "ALTER TABLE listings ADD COLUMN title_length int GENERATED ALWAYS AS (length(title)) STORED",
        )
        .await
        .expect("a generated column");
    let mut settings = capturing(db, vhost, slot, vec![listings]);
    settings.migrate = false;
    let error = benalsam_events::bridge::run(settings, Default::default())
        .await
        .expect_err("a generated column");
    assert!(error.to_string().contains("generated columns"), "{error}");
    trial.finish().await;
}
