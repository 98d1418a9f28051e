//! Operator commands of `benalsam-bridge` as an operator runs them, against the real stack:
//! a finished backfill run again is a new run (after a TRUNCATE of a related table, say), the
//! final line says what this run really enqueued, and `--where` aims it at some rows; `purge
//! --failed-of` removes the failed jobs of a table no event type routes any more.

mod binaries;
#[path = "../../benalsam-events/tests/support/mod.rs"]
mod support;

use std::process::{Command, Output};

use binaries::bridge_binary;
use support::{TestSchema, database_url, unique_name};

const INVENTORY_SQL: &str = include_str!("../../examples/new_event_type/inventory_items.sql");
const INVENTORY_TOML: &str = include_str!("../../examples/new_event_type/inventory_items.toml");

/// Runs `benalsam-bridge --config <config> <args>` on the test's schema.
fn bridge(db: &TestSchema, config: &std::path::Path, args: &[&str]) -> Output {
    let mut command = Command::new(bridge_binary());
    command
        .env("DATABASE_URL", database_url().expose())
        .env("BENALSAM_SCHEMA", &db.name)
        .env("BENALSAM_CONFIG", config)
        .env("RUST_LOG", "warn")
        .args(args);
    if config.as_os_str().is_empty() {
        command.env_remove("BENALSAM_CONFIG");
    }
    command.output().expect("the bridge runs")
}

/// The jobs of the inventory items.
async fn jobs(db: &TestSchema) -> i64 {
    db.client
        .query_one(
            "SELECT count(*) FROM elasticsearch_sync_queue WHERE table_name = 'inventory_items'",
            &[],
        )
        .await
        .expect("count jobs")
        .get(0)
}

#[tokio::test]
async fn a_finished_backfill_runs_again_says_what_it_enqueued_and_where_aims_it() {
    let db = TestSchema::new().await;
    db.client
        .batch_execute(&format!(
            "{INVENTORY_SQL};
             INSERT INTO inventory_items (sku, name, warehouse)
             SELECT 'SKU-' || i, 'Ürün ' || i, CASE WHEN i % 10 = 0 THEN 'izmir' ELSE 'ankara' END
               FROM generate_series(1, 120) AS i;"
        ))
        .await
        .expect("rows that predate the trigger");
    let config = std::env::temp_dir().join(format!("{}.toml", unique_name("backfill")));
    std::fs::write(&config, INVENTORY_TOML).expect("write the event-type file");
    assert!(bridge(&db, &config, &["migrate"]).status.success());

    let backfill = |args: &[&str]| {
        let mut all = vec!["backfill", "--type", "inventory", "--batch", "50"];
        all.extend_from_slice(args);
        let out = bridge(&db, &config, &all);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.success(), stdout, stderr)
    };
    let (ok, stdout, stderr) = backfill(&[]);
    assert!(ok, "{stdout}{stderr}");
    assert!(
        stdout.contains("backfill complete, 120 rows enqueued in this run"),
        "{stdout}"
    );
    assert_eq!(jobs(&db).await, 120);

    // Run again (the documents were lost, a related table truncated): a new run, every row.
    let (ok, stdout, stderr) = backfill(&[]);
    assert!(ok, "{stdout}{stderr}");
    assert!(
        stdout.contains("backfill complete, 120 rows enqueued in this run"),
        "a finished backfill starts over, and says so: {stdout}"
    );
    assert_eq!(jobs(&db).await, 240, "every row enqueued again");

    let (ok, stdout, stderr) = backfill(&["--where", "warehouse = 'izmir'"]);
    assert!(ok, "{stdout}{stderr}");
    assert!(
        stdout
            .contains("where warehouse = 'izmir': backfill complete, 12 rows enqueued in this run"),
        "{stdout}"
    );
    assert_eq!(jobs(&db).await, 252, "only the rows the condition selects");

    let (ok, stdout, stderr) = backfill(&["--where", "warehous = 'izmir'"]);
    assert!(!ok, "a condition on a column that does not exist: {stdout}");
    assert!(
        stderr.contains("--where") && stderr.contains("warehous"),
        "{stderr}"
    );
    assert_eq!(jobs(&db).await, 252);
    let _ = std::fs::remove_file(config);
    db.drop().await;
}

#[tokio::test]
async fn purge_failed_of_removes_the_failed_jobs_of_a_table_no_longer_configured_only() {
    let db = TestSchema::new().await;
    db.client
        .batch_execute(
            "INSERT INTO elasticsearch_sync_queue (table_name, operation, record_id, change_data, status)
             VALUES ('orders', 'INSERT', '1', '{}', 'failed'), ('orders', 'INSERT', '2', '{}', 'failed'),
                    ('orders', 'INSERT', '3', '{}', 'completed'),
                    ('listings', 'INSERT', '4', '{}', 'failed');",
        )
        .await
        .expect("jobs of a removed event type");
    let count = async |table: &str, status: &str| -> i64 {
        db.client
            .query_one(
                "SELECT count(*) FROM elasticsearch_sync_queue WHERE table_name = $1 AND status = $2",
                &[&table, &status],
            )
            .await
            .expect("count")
            .get(0)
    };
    // Without a file the bridge routes the seed's listings only.
    let none = std::path::Path::new("");
    let out = bridge(&db, none, &["purge", "--failed-of", "orders"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("deleted 2 failed jobs of orders"),
        "{stdout}"
    );
    assert_eq!(count("orders", "failed").await, 0);
    assert_eq!(count("orders", "completed").await, 1, "only failed jobs");

    let out = bridge(&db, none, &["purge", "--failed-of", "listings"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a configured table is refused");
    assert!(
        stderr.contains("still routes listings") && stderr.contains("retry-failed"),
        "{stderr}"
    );
    assert_eq!(count("listings", "failed").await, 1);
    let help = bridge(&db, none, &["purge", "--help"]);
    assert!(
        String::from_utf8_lossy(&help.stdout).contains("--failed-of"),
        "--help says how"
    );
    db.drop().await;
}
