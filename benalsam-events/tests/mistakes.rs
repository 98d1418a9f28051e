//! A person's mistakes in an event-type file, against a real PostgreSQL (scripts/stack up):
//! every column the file names is checked at `migrate`, the refusal names the file, the line
//! and the key, and a refused `migrate` leaves nothing behind (no migration, no trigger).

#[path = "cases/mistakes.rs"]
mod cases;
mod support;

use benalsam_events::{EventType, OutboxConfig};
use cases::{MISTAKES, TABLES, with_mistake};
use support::{TestSchema, database_url, unique_name};

#[tokio::test]
async fn every_column_a_file_names_is_checked_at_migrate_naming_the_file_the_line_and_the_key() {
    let db = TestSchema::new().await;
    db.client
        .batch_execute(&format!("SET search_path TO {}; {TABLES}", db.name))
        .await
        .expect("the application's tables");
    let mut client = database_url().connect().await.expect("PostgreSQL answers");
    let outbox = OutboxConfig::in_schema(&db.name);
    let (good, _) = with_mistake("", "");
    let types = EventType::from_file(&good).expect("the file parses");
    outbox
        .migrate(&mut client, &types)
        .await
        .expect("the file without a mistake migrates");
    for (from, to, key) in MISTAKES {
        let (path, line) = with_mistake(from, to);
        let types = EventType::from_file(&path).expect("a mistake of a column parses");
        let error = outbox
            .migrate(&mut client, &types)
            .await
            .expect_err("a column that does not exist is refused");
        let text = error.to_string();
        assert!(error.is_config(), "{text}");
        assert!(
            text.contains(&format!("{}:{line}: ", path.display())) && text.contains(key),
            "{key}: the file, line {line} and the key: {text}"
        );
        assert!(text.contains("has no column"), "{text}");
        let _ = std::fs::remove_file(path);
    }
    let _ = std::fs::remove_file(good);
    db.drop().await;
}

#[tokio::test]
async fn an_event_type_built_in_code_is_named_by_its_name_and_key() {
    let db = TestSchema::new().await;
    let mut client = database_url().connect().await.expect("PostgreSQL answers");
    let mut listings = EventType::listings();
    listings.status_column = Some("state".to_owned());
    let error = OutboxConfig::in_schema(&db.name)
        .migrate(&mut client, &[listings])
        .await
        .expect_err("the listings table has no column state");
    let text = error.to_string();
    assert!(
        text.contains("event type \"listings\", status_column = \"state\"")
            && text.contains(&format!(
                "table {}.listings has no column \"state\"",
                db.name
            )),
        "{text}"
    );
    db.drop().await;
}

#[tokio::test]
async fn a_refused_migrate_commits_nothing_neither_migrations_nor_triggers() {
    let schema = unique_name("t_atomic");
    let mut client = database_url().connect().await.expect("PostgreSQL answers");
    client
        .batch_execute(&format!(
            "CREATE SCHEMA {schema}; SET search_path TO {schema}; {TABLES}; RESET search_path"
        ))
        .await
        .expect("the application's tables");
    // The relation's table is missing: the companies' own trigger must not stay attached.
    let (path, line) = with_mistake("table = \"job_posts\"", "table = \"job_post\"");
    let types = EventType::from_file(&path).expect("parses");
    let error = OutboxConfig::in_schema(&schema)
        .migrate(&mut client, &types)
        .await
        .expect_err("a relation's table that does not exist");
    let text = error.to_string();
    assert!(
        text.contains(&format!("{}:{line}: ", path.display()))
            && text.contains("relations.posts.table")
            && text.contains("does not exist"),
        "{text}"
    );
    let triggers: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
               JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = $1 AND NOT t.tgisinternal",
            &[&schema],
        )
        .await
        .expect("count triggers")
        .get(0);
    assert_eq!(triggers, 0, "no trigger left attached");
    let migrated: bool = client
        .query_one(
            "SELECT to_regclass($1) IS NOT NULL",
            &[&format!("{schema}.benalsam_schema_migrations")],
        )
        .await
        .expect("look up the migrations table")
        .get(0);
    assert!(
        !migrated,
        "the migrations were rolled back with the triggers"
    );
    let _ = std::fs::remove_file(path);
    client
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .expect("cleanup");
}
