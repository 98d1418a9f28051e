//! Checks the migrations and the outbox trigger against a real PostgreSQL (scripts/stack up).

mod support;

use benalsam_events::connect::postgres as connect;
use benalsam_events::outbox::migrate;
use support::{database_url, unique_name};

/// Every migration of this build: what a fresh schema gets.
async fn all_versions() -> Vec<i32> {
    let schema = unique_name("t_pg");
    let mut client = connect(&database_url()).await.expect("PostgreSQL answers");
    let report = migrate(&mut client, &schema).await.expect("migrations");
    client
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .expect("cleanup");
    assert!(!report.applied.is_empty() && report.already_applied.is_empty());
    report.applied
}

#[tokio::test]
async fn migrations_apply_once_and_the_trigger_records_an_insert() {
    let url = database_url();
    let schema = unique_name("t_pg");
    let mut client = connect(&url).await.expect("PostgreSQL answers");

    let first = migrate(&mut client, &schema)
        .await
        .expect("first migration");
    assert_eq!(first.applied, all_versions().await);
    let second = migrate(&mut client, &schema)
        .await
        .expect("second migration");
    assert!(second.applied.is_empty());
    assert_eq!(second.already_applied, first.applied);

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
    let mut a = connect(&url).await.expect("PostgreSQL answers");
    let mut b = connect(&url).await.expect("PostgreSQL answers");

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
    let mut client = connect(&database_url()).await.expect("PostgreSQL answers");
    let err = migrate(&mut client, "x; DROP TABLE listings")
        .await
        .expect_err("not an identifier");
    assert!(err.to_string().contains("BENALSAM_SCHEMA"), "{err}");
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
