//! Checks what the add_to_sync_queue() trigger records and notifies, against a real PostgreSQL.

mod support;

use std::time::Duration;

use futures::StreamExt;
use serde_json::Value;
use support::{TestSchema, database_url, unique_name};
use tokio_postgres::{AsyncMessage, NoTls};

async fn jobs(db: &TestSchema) -> Vec<(String, String, Value)> {
    db.client
        .query(
            "SELECT operation, record_id, change_data FROM elasticsearch_sync_queue ORDER BY id",
            &[],
        )
        .await
        .expect("read jobs")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

#[tokio::test]
async fn every_real_change_is_a_job_and_nothing_else_is() {
    let db = TestSchema::new().await;
    let id = db.insert_listings(1).await.remove(0);
    let q = |sql: &str| sql.replace("$ID", &format!("'{id}'"));

    // A no-op update and an update of an ignored column only: nothing.
    db.client
        .batch_execute(&q(
            "UPDATE listings SET title = title WHERE id = $ID;
                           UPDATE listings SET view_count = view_count + 1 WHERE id = $ID;",
        ))
        .await
        .expect("updates");
    assert_eq!(jobs(&db).await.len(), 1, "only the insert so far");

    // A content edit of an active listing: a job with old and new rows.
    db.client
        .batch_execute(&q(
            "UPDATE listings SET description = 'Yeni açıklama' WHERE id = $ID",
        ))
        .await
        .expect("edit");
    // A delete: a job with the old row.
    db.client
        .batch_execute(&q("DELETE FROM listings WHERE id = $ID"))
        .await
        .expect("delete");

    let all = jobs(&db).await;
    assert_eq!(all.len(), 3, "{all:?}");
    let (op, rec, data) = &all[0];
    assert_eq!((op.as_str(), rec.as_str()), ("INSERT", id.as_str()));
    assert_eq!(data["status"], "active");
    let (op, rec, data) = &all[1];
    assert_eq!((op.as_str(), rec.as_str()), ("UPDATE", id.as_str()));
    assert_eq!(data["old"]["description"], "Açıklama 1");
    assert_eq!(data["new"]["description"], "Yeni açıklama");
    let (op, rec, data) = &all[2];
    assert_eq!((op.as_str(), rec.as_str()), ("DELETE", id.as_str()));
    assert_eq!(data["id"], id.as_str());
    assert_eq!(data["description"], "Yeni açıklama");
    db.drop().await;
}

#[tokio::test]
async fn the_writers_trace_context_is_kept_with_the_job() {
    let db = TestSchema::new().await;
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    db.client
        .batch_execute(&format!(
            "BEGIN;
             SET LOCAL benalsam.traceparent = '{parent}';
             INSERT INTO listings (user_id, title, category) VALUES (gen_random_uuid(), 'x', 'y');
             COMMIT;
             BEGIN;
             SET LOCAL benalsam.traceparent = 'not a traceparent';
             INSERT INTO listings (user_id, title, category) VALUES (gen_random_uuid(), 'z', 'y');
             COMMIT;"
        ))
        .await
        .expect("writes");
    let rows = db
        .client
        .query(
            "SELECT trace_id, traceparent FROM elasticsearch_sync_queue ORDER BY id",
            &[],
        )
        .await
        .expect("read");
    assert_eq!(
        rows[0].get::<_, Option<String>>(0).as_deref(),
        Some("4bf92f3577b34da6a3ce929d0e0e4736")
    );
    assert_eq!(rows[0].get::<_, Option<String>>(1).as_deref(), Some(parent));
    assert_eq!(
        rows[1].get::<_, Option<String>>(1),
        None,
        "a malformed value is dropped, the write goes through"
    );
    db.drop().await;
}

#[tokio::test]
async fn keys_that_are_not_uuids_and_unknown_options() {
    let db = TestSchema::new().await;
    db.client
        .batch_execute(
            "CREATE TABLE inventory_items (sku text PRIMARY KEY, qty int, scans int DEFAULT 0);
             CREATE TRIGGER inventory_sync AFTER INSERT OR UPDATE OR DELETE ON inventory_items
                 FOR EACH ROW EXECUTE FUNCTION add_to_sync_queue('key=sku', 'ignore=scans');
             INSERT INTO inventory_items VALUES ('SKU-42', 3);
             UPDATE inventory_items SET scans = 9;",
        )
        .await
        .expect("second table");
    let all = jobs(&db).await;
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].1, "SKU-42");

    db.client
        .batch_execute(
            "CREATE TABLE typo_items (id int PRIMARY KEY);
             CREATE TRIGGER typo_sync AFTER INSERT ON typo_items
                 FOR EACH ROW EXECUTE FUNCTION add_to_sync_queue('ignored=x');",
        )
        .await
        .expect("trigger is created");
    let err = db
        .client
        .batch_execute("INSERT INTO typo_items VALUES (1)")
        .await
        .expect_err("an unknown option fails loudly");
    let message = err
        .as_db_error()
        .map(|e| e.message().to_owned())
        .unwrap_or_default();
    assert!(
        message.contains("unknown option \"ignored=x\""),
        "{message}"
    );
    db.drop().await;
}

#[tokio::test]
async fn a_thousand_rows_in_one_transaction_give_a_thousand_jobs_and_one_notification() {
    let db = TestSchema::new().await;
    let channel = unique_name("ch");
    db.use_channel(&channel).await;

    let (listener, mut connection) = tokio_postgres::connect(database_url().expose(), NoTls)
        .await
        .expect("listener connects");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
    tokio::spawn(async move {
        while let Some(Ok(message)) = messages.next().await {
            if let AsyncMessage::Notification(n) = message {
                let _ = tx.send(n);
            }
        }
    });
    listener
        .batch_execute(&format!("LISTEN {channel}"))
        .await
        .expect("LISTEN");

    db.insert_listings(1000).await;
    assert_eq!(jobs(&db).await.len(), 1000);

    let first = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("a notification within 10 s")
        .expect("listener alive");
    assert_eq!(first.channel(), channel);
    assert_eq!(first.payload(), "", "notifications carry no data");
    // Anything else would have been sent at the same commit.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        rx.try_recv().is_err(),
        "at most one notification per transaction"
    );
    db.drop().await;
}

/// The statement triggers `migrate` attaches write the jobs the row trigger writes: the same
/// statements on `listings` (statement triggers) and on a copy with the row trigger, in one
/// transaction, give equal jobs record by record: multi-row inserts, content and status
/// updates, updates of an ignored column only, no-op updates, a key change, an upsert that
/// inserts, updates and changes nothing, deletes.
#[tokio::test]
async fn the_statement_triggers_write_the_jobs_the_row_trigger_writes() {
    let db = TestSchema::new().await;
    db.client
        .batch_execute(
            "CREATE TABLE listings_rows (LIKE listings INCLUDING ALL);
             CREATE TRIGGER benalsam_sync_queue AFTER INSERT OR UPDATE OR DELETE ON listings_rows
                 FOR EACH ROW EXECUTE FUNCTION add_to_sync_queue('key=id', 'ignore=view_count');",
        )
        .await
        .expect("a copy with the row trigger");
    let statements = [
        "INSERT INTO T (id, user_id, title, category, status)
         SELECT md5('r' || i)::uuid, md5('u' || i)::uuid, 'T' || i, 'c', 'active'
           FROM generate_series(1, 20) i",
        "UPDATE T SET description = 'd2' WHERE title IN ('T1', 'T2', 'T3', 'T4', 'T5')",
        "UPDATE T SET status = 'sold' WHERE title IN ('T5', 'T6')",
        "UPDATE T SET view_count = view_count + 1",
        "UPDATE T SET title = title",
        "UPDATE T SET id = md5('moved')::uuid WHERE title = 'T7'",
        "INSERT INTO T (id, user_id, title, category, description)
         VALUES (md5('r8')::uuid, md5('u8')::uuid, 'T8', 'c', 'upserted'),
                (md5('r9')::uuid, md5('u9')::uuid, 'T9', 'c', ''),
                (md5('r99')::uuid, md5('u99')::uuid, 'T99', 'c', 'new')
         ON CONFLICT (id) DO UPDATE SET description = EXCLUDED.description",
        "DELETE FROM T WHERE title IN ('T10', 'T11', 'T12', 'T7')",
    ];
    let mut script = String::from("BEGIN;");
    for statement in statements {
        for table in ["listings", "listings_rows"] {
            script.push_str(&statement.replace(" T ", &format!(" {table} ")));
            script.push(';');
        }
    }
    script.push_str("COMMIT;");
    db.client
        .batch_execute(&script)
        .await
        .expect("the statements");

    let (by_statement, by_row) = (
        db.jobs_by_record("listings").await,
        db.jobs_by_record("listings_rows").await,
    );
    let count = |op: &str| by_statement.iter().filter(|j| j.0 == op).count();
    // Inserts: 20, the moved key's new one, the upsert's new row. Updates: 5 descriptions,
    // 2 statuses, the upsert's one real change. Deletes: the moved key's old one and 4.
    assert_eq!(
        (count("INSERT"), count("UPDATE"), count("DELETE")),
        (22, 8, 5),
        "{by_statement:#?}"
    );
    assert_eq!(by_statement, by_row);
    db.drop().await;
}

/// A partitioned table keeps the row trigger (a statement trigger would not fire for a
/// statement that names a partition), and a write to a partition is recorded under the event
/// type's table.
#[tokio::test]
async fn a_partitioned_table_keeps_the_row_trigger() {
    let mut db = TestSchema::new().await;
    db.client
        .batch_execute(
            "CREATE TABLE readings (id bigint, region text, value int, PRIMARY KEY (id, region))
                 PARTITION BY LIST (region);
             CREATE TABLE readings_eu PARTITION OF readings FOR VALUES IN ('eu');
             CREATE TABLE readings_us PARTITION OF readings FOR VALUES IN ('us');",
        )
        .await
        .expect("a partitioned table");
    let mut readings = benalsam_events::EventType::new("readings", "readings");
    readings.index.alias = unique_name("readings");
    let schema = db.name.clone();
    benalsam_events::OutboxConfig::in_schema(&schema)
        .migrate(
            &mut db.client,
            &[benalsam_events::EventType::listings(), readings],
        )
        .await
        .expect("migrate");
    let triggers: Vec<String> = db
        .client
        .query(
            "SELECT tgname::text FROM pg_trigger
              WHERE tgrelid = 'readings'::regclass AND NOT tgisinternal ORDER BY 1",
            &[],
        )
        .await
        .expect("triggers")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(triggers, ["benalsam_sync_queue", "benalsam_sync_truncate"]);
    db.client
        .batch_execute(
            "INSERT INTO readings VALUES (1, 'eu', 5), (2, 'us', 6);
             UPDATE readings_eu SET value = 7;
             DELETE FROM readings_us;",
        )
        .await
        .expect("writes");
    let jobs: Vec<(String, String)> = db
        .client
        .query(
            "SELECT table_name, operation FROM elasticsearch_sync_queue
              WHERE table_name <> 'listings' ORDER BY id",
            &[],
        )
        .await
        .expect("jobs")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let expected: Vec<(String, String)> = ["INSERT", "INSERT", "UPDATE", "DELETE"]
        .iter()
        .map(|op| ("readings".to_owned(), (*op).to_owned()))
        .collect();
    assert_eq!(jobs, expected);
    db.drop().await;
}

/// The statement function fails a write whose key column is missing, naming the column, as
/// the row function does.
#[tokio::test]
async fn a_missing_key_fails_the_statement_loudly() {
    let db = TestSchema::new().await;
    db.client
        .batch_execute(
            "CREATE TABLE keyless (code text);
             CREATE TRIGGER keyless_sync AFTER INSERT ON keyless
                 REFERENCING NEW TABLE AS new_rows
                 FOR EACH STATEMENT EXECUTE FUNCTION add_to_sync_queue_statement('key=id');",
        )
        .await
        .expect("a table without the key column");
    let error = db
        .client
        .batch_execute("INSERT INTO keyless VALUES ('a'), ('b')")
        .await
        .expect_err("no key, no write");
    let message = error
        .as_db_error()
        .map(|e| e.message().to_owned())
        .unwrap_or_default();
    assert!(
        message.contains("key column \"id\" is missing or NULL"),
        "{message}"
    );
    assert!(jobs(&db).await.is_empty());
    db.drop().await;
}

/// An event type removed from a shared table leaves its triggers: `migrate` reports each
/// with its job name and waiting jobs, and drops none (another deployment may own them).
#[tokio::test]
async fn migrate_reports_the_triggers_no_event_type_declares_and_keeps_them() {
    let mut db = TestSchema::new().await;
    let mut admin = benalsam_events::EventType::listings();
    admin.name = "listings_admin".to_owned();
    admin.index.alias = unique_name("admin");
    admin.jobs_as = Some("listings@listings_admin".to_owned());
    let config = benalsam_events::OutboxConfig::in_schema(&db.name);
    let both = [benalsam_events::EventType::listings(), admin];
    let report = config.migrate(&mut db.client, &both).await.expect("both");
    assert!(report.undeclared_triggers.is_empty(), "{report:?}");
    db.insert_listings(2).await;

    let report = config
        .migrate(&mut db.client, &[benalsam_events::EventType::listings()])
        .await
        .expect("the public one alone");
    let schema = &db.name;
    let expected: Vec<String> = ["delete", "insert", "truncate", "update"]
        .iter()
        .map(|t| {
            format!(
                "{schema}.listings.benalsam_sync_{t}:listings@listings_admin \
                 (jobs listings@listings_admin, 2 waiting)"
            )
        })
        .collect();
    assert_eq!(report.undeclared_triggers, expected);
    db.insert_listings(1).await;
    let admin_jobs: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM elasticsearch_sync_queue WHERE table_name = 'listings@listings_admin'",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(admin_jobs, 3, "its triggers still record");
    db.drop().await;
}
