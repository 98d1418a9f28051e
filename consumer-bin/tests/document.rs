//! `benalsam-consumer document`, against a real PostgreSQL: what one row becomes in the index
//! (with its relations), the alias it goes to, whether the status policy keeps it, and why
//! the index would not hold it or its job would be dead-lettered.

#[path = "../../benalsam-events/tests/cases/mistakes.rs"]
mod cases;
#[path = "../../benalsam-events/tests/support/mod.rs"]
mod support;

use std::process::Command;

use cases::{TABLES, with_mistake};
use support::{TestSchema, database_url};

/// Runs `benalsam-consumer document <args>`: success, stdout, stderr.
fn document(db: &TestSchema, config: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_benalsam-consumer"))
        .env("DATABASE_URL", database_url().expose())
        .env("BENALSAM_SCHEMA", &db.name)
        .env("BENALSAM_CONFIG", config)
        .env("RUST_LOG", "warn")
        .arg("document")
        .args(args)
        .output()
        .expect("the consumer runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn document_prints_the_row_s_document_its_alias_and_the_status_policy_s_verdict() {
    let db = TestSchema::new().await;
    db.client
        .batch_execute(&format!(
            "SET search_path TO {}; {TABLES};
             INSERT INTO companies (id, name, state, lat, lon) VALUES
                 (1, 'Acme', 'open', 40.56, 29.1),
                 (2, 'Kapalı', 'closed', NULL, NULL),
                 (3, 'Yarım', 'open', 40.56, NULL);
             INSERT INTO job_posts (id, company_id, title, position) VALUES
                 (10, 1, 'Rust developer', 2), (11, 1, 'Operator', 1), (12, 2, 'Other', 1);",
            db.name
        ))
        .await
        .expect("the application's rows");
    let (config, _) = with_mistake("", "");

    let (ok, stdout, stderr) = document(&db, &config, &["1"]);
    assert!(ok, "{stdout}{stderr}");
    assert!(
        stdout.contains("index: benalsam_companies (alias)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("kept: state = \"open\" is a searchable status (open)"),
        "{stdout}"
    );
    let json = &stdout[stdout.find('{').expect("a JSON document")..];
    let printed: serde_json::Value = serde_json::from_str(json).expect("the document is JSON");
    assert_eq!(printed["id"], "1");
    assert_eq!(printed["label"], "Acme");
    assert_eq!(
        printed["geo"],
        serde_json::json!({"lat": 40.56, "lon": 29.1})
    );
    assert_eq!(
        printed["posts"],
        serde_json::json!([{"title": "Operator"}, {"title": "Rust developer"}]),
        "its relation, in order_by order"
    );

    let (ok, stdout, _) = document(&db, &config, &["--type", "companies", "2"]);
    assert!(ok);
    assert!(
        stdout.contains("not in the index")
            && stdout.contains("state = \"closed\" is not a searchable status (searchable: open)"),
        "{stdout}"
    );
    let (ok, stdout, _) = document(&db, &config, &["99"]);
    assert!(ok);
    assert!(stdout.contains("has no row with id = \"99\""), "{stdout}");

    let (ok, stdout, stderr) = document(&db, &config, &["3"]);
    assert!(!ok, "a row that cannot become a document: {stdout}");
    assert!(
        stderr.contains("columns lat = 40.56, lon = NULL are not a pair of numbers"),
        "{stderr}"
    );
    let _ = std::fs::remove_file(config);
    db.drop().await;
}

/// Without an event-type file, `document` sees the built-in listings as `run` has them: the
/// alias of `BENALSAM_INDEX` and the statuses of `BENALSAM_SEARCHABLE_STATUSES` (it used the
/// defaults, `benalsam_listings` and `active`, whatever the consumer ran with).
#[tokio::test]
async fn document_of_the_built_in_listings_follows_the_consumer_s_settings() {
    let db = TestSchema::new().await;
    let id: String = db
        .client
        .query_one(
            &format!(
                "INSERT INTO {}.listings (user_id, title, description, category, status)
                 VALUES (gen_random_uuid(), 'Bisiklet', 'satıldı', 'spor', 'sold')
                 RETURNING id::text",
                db.name
            ),
            &[],
        )
        .await
        .expect("a sold listing")
        .get(0);
    let out = Command::new(env!("CARGO_BIN_EXE_benalsam-consumer"))
        .env("DATABASE_URL", database_url().expose())
        .env("BENALSAM_SCHEMA", &db.name)
        .env("BENALSAM_INDEX", "vitrin_ilanlar")
        .env("BENALSAM_SEARCHABLE_STATUSES", "active,sold")
        .env_remove("BENALSAM_CONFIG")
        .env("RUST_LOG", "warn")
        .args(["document", &id])
        .output()
        .expect("the consumer runs");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("index: vitrin_ilanlar (alias)"), "{stdout}");
    assert!(
        stdout.contains("kept: status = \"sold\" is a searchable status"),
        "{stdout}"
    );
    db.drop().await;
}
