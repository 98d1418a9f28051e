//! `benalsam-bridge backfill` as an operator runs it, against the real stack: a finished
//! backfill run again is a new run (after a TRUNCATE of a related table, say), the final line
//! says what this run really enqueued, and `--where` aims it at some rows.

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
    Command::new(bridge_binary())
        .env("DATABASE_URL", database_url().expose())
        .env("BENALSAM_SCHEMA", &db.name)
        .env("BENALSAM_CONFIG", config)
        .env("RUST_LOG", "warn")
        .args(args)
        .output()
        .expect("the bridge runs")
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
        stdout.contains("where warehouse = 'izmir': backfill complete, 12 rows enqueued in this run"),
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
