//! Checks the migrations and the outbox trigger against a real PostgreSQL (scripts/stack up).

mod support;

use benalsam_events::outbox::MigrationReport;
use benalsam_events::{EventType, OutboxConfig};
use support::{LISTINGS_SQL, database_url, unique_name};

/// Migrates `schema` for the listings event type.
async fn migrate(
    client: &mut tokio_postgres::Client,
    schema: &str,
) -> benalsam_events::Result<MigrationReport> {
    OutboxConfig::in_schema(schema)
        .migrate(client, &[EventType::listings()])
        .await
}

/// Creates `schema` with the application's own listings table, as an application that
/// adopts the library has it.
async fn with_listings(client: &tokio_postgres::Client, schema: &str) {
    client
        .batch_execute(&format!(
            "CREATE SCHEMA {schema}; SET search_path TO {schema}; {LISTINGS_SQL}; RESET search_path"
        ))
        .await
        .expect("the application's listings table");
}

/// Every migration of this build: what a fresh schema gets.
async fn all_versions() -> Vec<i32> {
    let schema = unique_name("t_pg");
    let mut client = database_url().connect().await.expect("PostgreSQL answers");
    with_listings(&client, &schema).await;
    let report = migrate(&mut client, &schema).await.expect("migrations");
    client
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .expect("cleanup");
    assert!(!report.applied.is_empty() && report.already_applied.is_empty());
    report.applied
}

#[tokio::test]
async fn migrations_apply_once_beside_the_applications_own_table_and_the_trigger_records_an_insert()
{
    let url = database_url();
    let schema = unique_name("t_pg");
    let mut client = url.connect().await.expect("PostgreSQL answers");
    with_listings(&client, &schema).await;

    let first = migrate(&mut client, &schema)
        .await
        .expect("the library's migrations beside the application's listings table");
    assert_eq!(first.applied, all_versions().await);
    assert_eq!(first.triggers, vec!["listings".to_owned()]);
    let second = migrate(&mut client, &schema)
        .await
        .expect("second migration");
    assert!(second.applied.is_empty());
    assert_eq!(second.already_applied, first.applied);
    assert_eq!(
        second.triggers, first.triggers,
        "attaching again is harmless"
    );

    // A real round trip: write a listing as an application would, read the job it caused.
    client
        .batch_execute(&format!("SET search_path TO {schema}"))
        .await
        .expect("search_path");
    let row = client
        .query_one(
            "INSERT INTO listings (user_id, title, category, status)
             VALUES (gen_random_uuid(), 'Satılık bisiklet', 'spor', 'active')
             RETURNING id::text",
            &[],
        )
        .await
        .expect("insert listing");
    let id: String = row.get(0);
    let job = client
        .query_one(
            "SELECT table_name, operation, record_id, status, change_data ->> 'title'
             FROM elasticsearch_sync_queue",
            &[],
        )
        .await
        .expect("exactly one job");
    assert_eq!(job.get::<_, String>(0), "listings");
    assert_eq!(job.get::<_, String>(1), "INSERT");
    assert_eq!(job.get::<_, String>(2), id);
    assert_eq!(job.get::<_, String>(3), "pending");
    assert_eq!(job.get::<_, String>(4), "Satılık bisiklet");

    client
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .expect("cleanup");
}

#[tokio::test]
async fn concurrent_migrators_apply_each_migration_once() {
    let url = database_url();
    let schema = unique_name("t_pg");
    let mut a = url.connect().await.expect("PostgreSQL answers");
    let mut b = url.connect().await.expect("PostgreSQL answers");
    with_listings(&a, &schema).await;

    let (ra, rb) = tokio::join!(migrate(&mut a, &schema), migrate(&mut b, &schema));
    let (ra, rb) = (ra.expect("migrator a"), rb.expect("migrator b"));
    let mut applied = [ra.applied, rb.applied].concat();
    applied.sort_unstable();
    assert_eq!(
        applied,
        all_versions().await,
        "every migration applied by exactly one migrator"
    );

    let count: i64 = a
        .query_one(
            &format!("SELECT count(*) FROM {schema}.benalsam_schema_migrations"),
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(count, i64::try_from(applied.len()).expect("small"));
    a.batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .expect("cleanup");
}

#[tokio::test]
async fn a_bad_schema_name_is_refused_before_touching_the_database() {
    let mut client = database_url().connect().await.expect("PostgreSQL answers");
    let err = migrate(&mut client, "x; DROP TABLE listings")
        .await
        .expect_err("not an identifier");
    assert!(err.to_string().contains("OutboxConfig::schema"), "{err}");
}

#[tokio::test]
async fn a_schema_that_was_never_migrated_is_reported_with_what_to_do() {
    let outbox = benalsam_events::Outbox::new(database_url(), {
        let mut c = benalsam_events::OutboxConfig::default();
        c.schema = unique_name("t_never");
        c
    })
    .expect("config");
    let err = outbox.claim(1).await.expect_err("no queue table");
    let text = err.to_string();
    assert!(text.contains("does not exist"), "{text}");
    assert!(text.contains("benalsam-bridge migrate"), "{text}");
    assert!(!err.is_retryable(), "retrying will not create the table");
}

#[tokio::test]
async fn a_configured_table_that_does_not_exist_is_refused_and_nothing_is_attached() {
    let schema = unique_name("t_pg");
    let mut client = database_url().connect().await.expect("PostgreSQL answers");
    with_listings(&client, &schema).await;
    let error = OutboxConfig::in_schema(&schema)
        .migrate(
            &mut client,
            &[EventType::listings(), EventType::new("orders", "orders")],
        )
        .await
        .expect_err("all or nothing");
    let text = error.to_string();
    assert!(
        text.contains("event type \"orders\", table") && text.contains("does not exist"),
        "{text}"
    );
    let report = migrate(&mut client, &schema)
        .await
        .expect("nothing was committed: the migrations apply again");
    assert_eq!(report.triggers, vec!["listings".to_owned()]);
    assert!(report.already_applied.is_empty(), "{report:?}");
    client
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .expect("cleanup");
}

#[tokio::test]
async fn a_table_in_another_schema_is_recorded_by_its_qualified_name_with_its_options() {
    let schema = unique_name("t_pg");
    let shop = unique_name("t_shop");
    let mut client = database_url().connect().await.expect("PostgreSQL answers");
    client
        .batch_execute(&format!(
            "CREATE SCHEMA {shop};
             CREATE TABLE {shop}.orders (sku text PRIMARY KEY, qty int NOT NULL, hits int NOT NULL DEFAULT 0)"
        ))
        .await
        .expect("the application's table");
    let mut orders = EventType::new("orders", &format!("{shop}.orders"));
    orders.key = "sku".to_owned();
    orders.ignore = vec!["hits".to_owned()];
    let report = OutboxConfig::in_schema(&schema)
        .migrate(&mut client, std::slice::from_ref(&orders))
        .await
        .expect("migrations");
    assert_eq!(report.triggers, vec![format!("{shop}.orders")]);
    client
        .batch_execute(&format!(
            "INSERT INTO {shop}.orders (sku, qty) VALUES ('A-1', 1);
             UPDATE {shop}.orders SET hits = hits + 1;
             UPDATE {shop}.orders SET sku = 'A-2';
             TRUNCATE {shop}.orders;"
        ))
        .await
        .expect("changes");
    let jobs: Vec<(String, String, String)> = client
        .query(
            &format!(
                "SELECT table_name, operation, record_id FROM {schema}.elasticsearch_sync_queue ORDER BY id"
            ),
            &[],
        )
        .await
        .expect("jobs")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let table = format!("{shop}.orders");
    let job = |op: &str, key: &str| (table.clone(), op.to_owned(), key.to_owned());
    assert_eq!(
        jobs,
        vec![
            job("INSERT", "A-1"),
            // the ignored column alone: no job; the key change: the old key leaves, the new comes
            job("DELETE", "A-1"),
            job("INSERT", "A-2"),
            job("TRUNCATE", "*"),
        ]
    );
    let truncated: i64 = client
        .query_one(
            &format!("SELECT job_id FROM {schema}.benalsam_truncations WHERE table_name = $1"),
            &[&table],
        )
        .await
        .expect("the truncation is recorded")
        .get(0);
    let last: i64 = client
        .query_one(
            &format!("SELECT max(id) FROM {schema}.elasticsearch_sync_queue"),
            &[],
        )
        .await
        .expect("max")
        .get(0);
    assert_eq!(truncated, last);
    client
        .batch_execute(&format!(
            "DROP SCHEMA {schema} CASCADE; DROP SCHEMA {shop} CASCADE"
        ))
        .await
        .expect("cleanup");
}
