//! A person's mistakes in an event-type file, against a real PostgreSQL (scripts/stack up):
//! every column the file names is checked at `migrate`, the refusal names the file, the line
//! and the key, and a refused `migrate` leaves nothing behind (no migration, no trigger).

mod support;

use std::path::PathBuf;

use benalsam_events::connect::postgres as connect;
use benalsam_events::{EventType, OutboxConfig};
use support::{TestSchema, database_url, unique_name};

/// The application's tables: companies (state, not status; views, a counter) and their job
/// posts.
pub const TABLES: &str = "
    CREATE TABLE companies (id bigint PRIMARY KEY, name text NOT NULL, state text NOT NULL,
                            views integer NOT NULL DEFAULT 0, lat double precision,
                            lon double precision);
    CREATE TABLE job_posts (id bigint PRIMARY KEY, company_id bigint NOT NULL,
                            title text NOT NULL, position integer NOT NULL DEFAULT 0);";

/// A file that works with [`TABLES`].
pub const FILE: &str = r#"[[event_type]]
name = "companies"
key = "id"
status_column = "state"
ignore = ["views"]

[event_type.document]
searchable_statuses = ["open"]

[event_type.document.fields]
name = { type = "text" }
label = { type = "keyword", column = "name" }
geo = { type = "geo_point", lat = "lat", lon = "lon" }

[event_type.relations.posts]
table = "job_posts"
kind = "children"
foreign_key = ["company_id"]
order_by = "position"
fields.title = { type = "text" }
"#;

/// Each mistake: what it replaces in [`FILE`], with what, and the key the refusal names.
pub const MISTAKES: &[(&str, &str, &str)] = &[
    ("key = \"id\"", "key = \"idd\"", "key = \"idd\""),
    (
        "status_column = \"state\"",
        "status_column = \"status\"",
        "status_column = \"status\"",
    ),
    ("[\"views\"]", "[\"view\"]", "ignore = \"view\""),
    (
        "column = \"name\"",
        "column = \"nmae\"",
        "document.fields.label.column = \"nmae\"",
    ),
    (
        "lat = \"lat\"",
        "lat = \"latitude\"",
        "document.fields.geo.lat = \"latitude\"",
    ),
    (
        "order_by = \"position\"",
        "order_by = \"postion\"",
        "relations.posts.order_by = \"postion\"",
    ),
    (
        "foreign_key = [\"company_id\"]",
        "foreign_key = [\"company\"]",
        "relations.posts.foreign_key = \"company\"",
    ),
    (
        "fields.title = { type = \"text\" }",
        "fields.titel = { type = \"text\" }",
        "relations.posts.fields.titel = \"titel\"",
    ),
];

/// [`FILE`] with one mistake, written to a file of its own; the file and the mistake's line.
pub fn with_mistake(from: &str, to: &str) -> (PathBuf, usize) {
    assert!(FILE.contains(from), "{from}");
    let text = FILE.replacen(from, to, 1);
    let at = text.find(to).expect("the mistake is in the text");
    let line = text[..at].matches('\n').count() + 1;
    let path = std::env::temp_dir().join(format!("{}.toml", unique_name("mistake")));
    std::fs::write(&path, text).expect("write the event-type file");
    (path, line)
}

#[tokio::test]
async fn every_column_a_file_names_is_checked_at_migrate_naming_the_file_the_line_and_the_key() {
    let db = TestSchema::new().await;
    db.client
        .batch_execute(&format!("SET search_path TO {}; {TABLES}", db.name))
        .await
        .expect("the application's tables");
    let mut client = connect(&database_url()).await.expect("PostgreSQL answers");
    let outbox = OutboxConfig::in_schema(&db.name);
    let (good, _) = with_mistake("", "");
    let types = EventType::from_file(&good).expect("the file parses");
    benalsam_events::outbox::migrate(&mut client, &outbox, &types)
        .await
        .expect("the file without a mistake migrates");
    for (from, to, key) in MISTAKES {
        let (path, line) = with_mistake(from, to);
        let types = EventType::from_file(&path).expect("a mistake of a column parses");
        let error = benalsam_events::outbox::migrate(&mut client, &outbox, &types)
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
    let mut client = connect(&database_url()).await.expect("PostgreSQL answers");
    let mut listings = EventType::listings();
    listings.status_column = Some("state".to_owned());
    let error = benalsam_events::outbox::migrate(
        &mut client,
        &OutboxConfig::in_schema(&db.name),
        &[listings],
    )
    .await
    .expect_err("the listings table has no column state");
    let text = error.to_string();
    assert!(
        text.contains("event type \"listings\", status_column = \"state\"")
            && text.contains(&format!("table {}.listings has no column \"state\"", db.name)),
        "{text}"
    );
    db.drop().await;
}

#[tokio::test]
async fn a_refused_migrate_commits_nothing_neither_migrations_nor_triggers() {
    let schema = unique_name("t_atomic");
    let mut client = connect(&database_url()).await.expect("PostgreSQL answers");
    client
        .batch_execute(&format!(
            "CREATE SCHEMA {schema}; SET search_path TO {schema}; {TABLES}; RESET search_path"
        ))
        .await
        .expect("the application's tables");
    // The relation's table is missing: the companies' own trigger must not stay attached.
    let (path, line) = with_mistake("table = \"job_posts\"", "table = \"job_post\"");
    let types = EventType::from_file(&path).expect("parses");
    let error = benalsam_events::outbox::migrate(
        &mut client,
        &OutboxConfig::in_schema(&schema),
        &types,
    )
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
    assert!(!migrated, "the migrations were rolled back with the triggers");
    let _ = std::fs::remove_file(path);
    client
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .expect("cleanup");
}
