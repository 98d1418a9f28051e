//! The outbox is written by the trigger only, against the real PostgreSQL: a role that may
//! write one synced table (and nothing of the outbox) writes it as usual and its changes
//! become jobs, but it cannot create a job of another table in any way: no insert, update or
//! delete of job rows, no trigger of its own with the library's function, no temporary table
//! standing in for the job table, no write to the truncation marks or the bridges' busy marks.

mod support;

use support::TestSchema;
use support::roles::TestRole;

/// Whether `result` is PostgreSQL's "permission denied" (SQLSTATE 42501).
fn denied<T: std::fmt::Debug>(what: &str, result: Result<T, tokio_postgres::Error>) {
    match result {
        Err(error) => assert_eq!(
            error.code(),
            Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
            "{what}: {error:?}"
        ),
        Ok(value) => panic!("{what} was allowed: {value:?}"),
    }
}

#[tokio::test]
async fn a_writer_of_one_table_creates_its_jobs_and_no_job_of_another_table() {
    let db = TestSchema::new().await;
    let schema = &db.name;
    // A second synced table, with the sync trigger the library attaches (its key is `sku`).
    db.client
        .batch_execute(
            "CREATE TABLE inventory_items (sku text PRIMARY KEY, quantity integer NOT NULL);
             CREATE TRIGGER benalsam_sync_insert AFTER INSERT ON inventory_items
                 REFERENCING NEW TABLE AS new_rows
                 FOR EACH STATEMENT EXECUTE FUNCTION add_to_sync_queue_statement('key=sku');
             CREATE TRIGGER benalsam_sync_update AFTER UPDATE ON inventory_items
                 REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
                 FOR EACH STATEMENT EXECUTE FUNCTION add_to_sync_queue_statement('key=sku');
             CREATE TRIGGER benalsam_sync_delete AFTER DELETE ON inventory_items
                 REFERENCING OLD TABLE AS old_rows
                 FOR EACH STATEMENT EXECUTE FUNCTION add_to_sync_queue_statement('key=sku');
             CREATE TRIGGER benalsam_sync_truncate
                 AFTER TRUNCATE ON inventory_items
                 FOR EACH STATEMENT EXECUTE FUNCTION add_to_sync_queue('key=sku');",
        )
        .await
        .expect("inventory_items");
    // The writer may do everything to inventory_items (TRIGGER included), nothing else.
    let writer = TestRole::new("w").await;
    db.client
        .batch_execute(&format!(
            "GRANT USAGE ON SCHEMA {schema} TO {w};
             GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE, TRIGGER ON inventory_items TO {w};",
            w = writer.name
        ))
        .await
        .expect("grants");
    let session = writer.connect(schema).await;

    // Its own writes work, and each is a job of inventory_items.
    session
        .batch_execute(
            "INSERT INTO inventory_items VALUES ('a-1', 5), ('a-2', 7);
             UPDATE inventory_items SET quantity = 6 WHERE sku = 'a-1';
             DELETE FROM inventory_items WHERE sku = 'a-2';
             TRUNCATE inventory_items;",
        )
        .await
        .expect("the writer writes its table (the trigger records the jobs)");
    let jobs: Vec<(String, String, String)> = db
        .client
        .query(
            "SELECT table_name, operation, record_id FROM elasticsearch_sync_queue ORDER BY id",
            &[],
        )
        .await
        .expect("jobs")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let expected: Vec<(String, String, String)> = [
        ("INSERT", "a-1"),
        ("INSERT", "a-2"),
        ("UPDATE", "a-1"),
        ("DELETE", "a-2"),
        ("TRUNCATE", "*"),
    ]
    .iter()
    .map(|(op, key)| {
        (
            "inventory_items".to_owned(),
            (*op).to_owned(),
            (*key).to_owned(),
        )
    })
    .collect();
    assert_eq!(jobs, expected);

    // A job row of listings, written directly: refused.
    denied(
        "INSERT of a listings job",
        session
            .execute(
                "INSERT INTO elasticsearch_sync_queue (table_name, operation, record_id, change_data)
                 VALUES ('listings', 'INSERT', 'forged', '{\"id\": \"forged\", \"status\": \"active\"}')",
                &[],
            )
            .await,
    );
    // Turning its own jobs into listings jobs, or erasing jobs: refused.
    denied(
        "UPDATE of a job",
        session
            .execute(
                "UPDATE elasticsearch_sync_queue SET table_name = 'listings'",
                &[],
            )
            .await,
    );
    denied(
        "DELETE of jobs",
        session
            .execute("DELETE FROM elasticsearch_sync_queue", &[])
            .await,
    );
    // The truncation marks (a forged one would hide listings' changes) and the bridges' busy
    // marks (a forged one would silence every NOTIFY): refused.
    denied(
        "INSERT of a truncation mark",
        session
            .execute(
                "INSERT INTO benalsam_truncations VALUES ('listings', 9223372036854775807)",
                &[],
            )
            .await,
    );
    denied(
        "INSERT of a busy mark",
        session
            .execute(
                "INSERT INTO benalsam_listeners (listener, busy_until) VALUES ('x', 'infinity')",
                &[],
            )
            .await,
    );
    // A trigger of its own on its table, recording its rows as listings: refused, the
    // function is not the writer's to attach.
    denied(
        "a trigger with as=listings",
        session
            .execute(
                &format!(
                    "CREATE TRIGGER forge AFTER INSERT ON inventory_items
                     FOR EACH ROW EXECUTE FUNCTION {schema}.add_to_sync_queue('key=sku', 'as=listings')"
                ),
                &[],
            )
            .await,
    );
    denied(
        "a statement trigger with as=listings",
        session
            .execute(
                &format!(
                    "CREATE TRIGGER forge AFTER INSERT ON inventory_items
                     REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT
                     EXECUTE FUNCTION {schema}.add_to_sync_queue_statement('key=sku', 'as=listings')"
                ),
                &[],
            )
            .await,
    );
    // A temporary table named like the job table: the trigger still writes the real one.
    session
        .batch_execute(
            "CREATE TEMPORARY TABLE elasticsearch_sync_queue (
                 id bigint GENERATED ALWAYS AS IDENTITY, table_name text, operation text,
                 record_id text, change_data jsonb, trace_id text, traceparent text);
             SET search_path TO pg_temp, public;",
        )
        .await
        .expect("a temporary table of the writer");
    session
        .execute(
            &format!("INSERT INTO {schema}.inventory_items VALUES ('b-1', 1)"),
            &[],
        )
        .await
        .expect("the writer writes its table");

    let tables: Vec<(String, i64)> = db
        .client
        .query(
            "SELECT table_name, count(*) FROM elasticsearch_sync_queue GROUP BY 1 ORDER BY 1",
            &[],
        )
        .await
        .expect("jobs")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(tables, vec![("inventory_items".to_owned(), 6)]);
    let marks: Vec<String> = db
        .client
        .query("SELECT table_name FROM benalsam_truncations", &[])
        .await
        .expect("truncation marks")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(marks, vec!["inventory_items".to_owned()]);

    drop(session);
    writer.drop().await;
    db.drop().await;
}

#[tokio::test]
async fn the_trigger_function_runs_as_the_outbox_owner_with_a_fixed_search_path() {
    let db = TestSchema::new().await;
    for function in ["add_to_sync_queue()", "add_to_sync_queue_statement()"] {
        let row = db
            .client
            .query_one(
                "SELECT p.prosecdef, p.proconfig::text, pg_get_userbyid(p.proowner)::text = current_user,
                        has_function_privilege('public', p.oid, 'EXECUTE')
                   FROM pg_proc p WHERE p.oid = $1::text::regprocedure",
                &[&function],
            )
            .await
            .expect("the function");
        let (definer, config, owned, public): (bool, String, bool, bool) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        assert!(definer, "{function}: SECURITY DEFINER");
        assert_eq!(
            config,
            format!("{{\"search_path=pg_catalog, {}, pg_temp\"}}", db.name),
            "{function}"
        );
        assert!(owned, "{function}: owned by the role that migrated");
        assert!(!public, "{function}: PUBLIC may not attach it");
    }
    db.drop().await;
}
