//! One table, two event types: the public joined listings index and an internal admin index
//! with other fields, every status and a relation of the same name on the same table, fed
//! by one bridge and one consumer process. Each index must equal its SQL view exactly.

mod support;

use std::time::Duration;

use benalsam_events::bridge::BridgeSettings;
use benalsam_events::event_type::{DocumentSpec, FieldType, Relation};
use benalsam_events::{EventType, OutboxConfig};
use support::{
    Running, TestIndex, TestSchema, TestVhost, against_sql, consumer_settings, database_url,
    eventually, search_url, unique_name,
};

const PATIENCE: Duration = Duration::from_secs(180);
const MARKETPLACE_SQL: &str = include_str!("../../examples/joined_documents/marketplace.sql");
const JOINED_TOML: &str = include_str!("../../examples/joined_documents/listings.toml");

fn index(alias: &str) -> TestIndex {
    TestIndex {
        alias: alias.to_owned(),
        client: search_url()
            .client(Duration::from_secs(30))
            .expect("search client"),
    }
}

/// The public listings of the joined example (active ones only, seller's name and rating).
fn public(alias: &str) -> EventType {
    let file = std::env::temp_dir().join(format!("{alias}.toml"));
    std::fs::write(
        &file,
        JOINED_TOML.replace("benalsam_listings_joined", alias),
    )
    .expect("write the event-type file");
    let mut types = EventType::from_file(&file).expect("the joined example is valid");
    let _ = std::fs::remove_file(&file);
    types.remove(0)
}

/// The admin's listings: every status, other fields, and a relation also called `seller`
/// taking another column of users (the email); its jobs under a name of their own.
fn admin(alias: &str) -> EventType {
    let keyword = || FieldType::Keyword {
        normalizer: None,
        indexed: true,
    };
    let mut admin = EventType::new("listings_admin", "listings").with_relation(
        Relation::parent("seller", "users", &["user_id"], &["id"]).field("email", keyword()),
    );
    admin.jobs_as = Some("listings@listings_admin".to_owned());
    admin.status_column = Some("status".to_owned());
    admin.document = DocumentSpec::default()
        .field("title", keyword())
        .field("status", keyword());
    admin.index.alias = alias.to_owned();
    admin
}

async fn exec(db: &TestSchema, sql: impl AsRef<str>) {
    let sql = sql.as_ref();
    db.client.batch_execute(sql).await.expect(sql);
}

async fn value(db: &TestSchema, sql: &str) -> String {
    db.client.query_one(sql, &[]).await.expect(sql).get(0)
}

/// Waits until the index of `event_type` equals its SQL view: 0 missing, 0 extra, 0 stale.
async fn converged(db: &TestSchema, event_type: &EventType, what: &str) {
    let outbox = db.outbox(OutboxConfig::in_schema(&db.name));
    let index = index(&event_type.index.alias);
    eventually(PATIENCE, what, || async {
        let found = against_sql(&outbox, &db.client, event_type, &index).await;
        let documents = index.documents().await.len();
        if found.is_none() && documents > 0 {
            Ok(())
        } else {
            Err(format!("{documents} documents, {found:?}"))
        }
    })
    .await;
}

/// A deployment of today (one event type on listings, its triggers `benalsam_sync_*`,
/// jobs named `listings`, some waiting) gains a second event type on the same table: the
/// waiting jobs reach the first index, the second is backfilled, and from then on inserts,
/// edits, status changes, deletes and related-row changes reach both indexes exactly, each
/// by its own jobs. Before, the second event type was refused at start.
#[tokio::test]
async fn one_table_feeds_two_event_types_each_exactly() {
    // Today's deployment: the schema's listings trigger records `listings` jobs.
    let db = TestSchema::new().await;
    db.client
        .batch_execute(MARKETPLACE_SQL)
        .await
        .expect("the marketplace tables");
    let vhost = TestVhost::new().await;
    let (public, admin) = (public(&unique_name("p")), admin(&unique_name("a")));
    exec(
        &db,
        "INSERT INTO categories VALUES ('elektronik', 'Elektronik', 'Electronics')".to_owned(),
    )
    .await;
    let user = value(
        &db,
        "INSERT INTO users (display_name, rating, email) VALUES ('Irmak', 4.0, 'i@example.com') RETURNING id::text",
    )
    .await;
    let listing = |title: &str, status: &str| {
        format!(
            "INSERT INTO listings (user_id, title, category, status) VALUES ('{user}', '{title}', 'elektronik', '{status}')"
        )
    };
    exec(&db, listing("Eski 1", "active")).await;
    exec(&db, listing("Eski 2", "draft")).await;
    let waiting = value(
        &db,
        "SELECT count(*)::text FROM elasticsearch_sync_queue WHERE table_name = 'listings' AND status = 'pending'",
    )
    .await;
    assert_eq!(waiting, "2", "jobs of today's trigger wait for the upgrade");

    let types = vec![public.clone(), admin.clone()];
    let mut settings = BridgeSettings::new(database_url(), vhost.url.clone());
    settings.outbox = OutboxConfig::in_schema(&db.name);
    settings.event_types = types.clone();
    settings.migrate = true;
    settings.heartbeat_interval = None;
    let bridge = Running::bridge(settings);
    let consumer = Running::consumer(consumer_settings(&db, &vhost.url, types.clone()));

    // The waiting jobs reach the public index; the admin's index is filled by a backfill of
    // its own (its trigger did not exist when those rows were written).
    converged(&db, &public, "the waiting jobs indexed").await;
    eventually(PATIENCE, "the admin's trigger attached", || async {
        let n = value(
            &db,
            "SELECT count(*)::text FROM pg_trigger WHERE tgname LIKE 'benalsam_sync_%:listings@listings_admin'",
        )
        .await;
        if n == "4" { Ok(()) } else { Err(n) }
    })
    .await;
    db.outbox(OutboxConfig::in_schema(&db.name))
        .backfill_type(&admin, 100, false, None, |_| true)
        .await
        .expect("the admin's backfill");
    converged(&db, &admin, "the admin's index backfilled").await;

    // Changes of every kind, then both indexes exactly as their SQL views.
    exec(&db, listing("Yeni", "active")).await;
    exec(&db, listing("Taslak", "draft")).await;
    exec(
        &db,
        "UPDATE listings SET title = 'Eski 1 (düzeltildi)' WHERE title = 'Eski 1'".to_owned(),
    )
    .await;
    exec(
        &db,
        "UPDATE listings SET status = 'active' WHERE title = 'Eski 2'".to_owned(),
    )
    .await;
    exec(
        &db,
        "UPDATE listings SET status = 'sold' WHERE title = 'Yeni'".to_owned(),
    )
    .await;
    exec(
        &db,
        "DELETE FROM listings WHERE title = 'Taslak'".to_owned(),
    )
    .await;
    exec(
        &db,
        format!("UPDATE users SET display_name = 'Irmak Y.' WHERE id = '{user}'"),
    )
    .await;
    exec(
        &db,
        format!("UPDATE users SET email = 'irmak@example.com' WHERE id = '{user}'"),
    )
    .await;
    exec(&db, listing("Son", "draft")).await;
    converged(&db, &public, "the public index equals its SQL view").await;
    converged(&db, &admin, "the admin index equals its SQL view").await;
    let admin_index = index(&admin.index.alias).documents().await;
    assert!(
        admin_index
            .values()
            .any(|d| d["seller"]["email"] == "irmak@example.com" && d["status"] == "draft"),
        "the admin sees drafts and the seller's new email: {admin_index:?}"
    );

    // Each change is a job of each event type; the relations of one name stay apart.
    let jobs = |name: &str| {
        let db = &db;
        let name = name.to_owned();
        async move {
            value(
                db,
                &format!(
                    "SELECT count(*)::text FROM elasticsearch_sync_queue WHERE table_name = '{name}'"
                ),
            )
            .await
        }
    };
    assert_eq!(jobs("listings#seller").await, "1", "the rename only");
    assert_eq!(
        jobs("listings@listings_admin#seller").await,
        "1",
        "the email only"
    );
    let own = jobs("listings@listings_admin").await;
    assert!(own.parse::<i64>().unwrap_or(0) >= 7, "{own}");
    // A TRUNCATE of the table is each event type's own job: both indexes are emptied, and
    // what is written after it reaches both.
    exec(&db, "TRUNCATE listings").await;
    exec(&db, listing("Sonra", "active")).await;
    converged(&db, &public, "the public index after the truncate").await;
    converged(&db, &admin, "the admin index after the truncate").await;
    for (event_type, n) in [(&public, 1), (&admin, 1)] {
        let documents = index(&event_type.index.alias).documents().await.len();
        assert_eq!(
            documents, n,
            "{}: only the row written after it",
            event_type.name
        );
    }
    assert_eq!(
        jobs("listings@listings_admin")
            .await
            .parse::<i64>()
            .unwrap_or(0)
            - own.parse::<i64>().unwrap_or(0),
        2,
        "the admin's TRUNCATE and INSERT"
    );
    eventually(PATIENCE, "every job completed", || async {
        let live = value(
            &db,
            "SELECT count(*)::text FROM elasticsearch_sync_queue WHERE status <> 'completed'",
        )
        .await;
        if live == "0" { Ok(()) } else { Err(live) }
    })
    .await;

    consumer.stop().await;
    bridge.stop().await;
    index(&public.index.alias).drop().await;
    index(&admin.index.alias).drop().await;
    vhost.drop().await;
    db.drop().await;
}

/// A row the admin's document cannot hold (its `title` is a number there) is dead-lettered
/// for the admin only: the public index takes it, the public job completes, and the admin's
/// job fails into the admin's dead-letter queue alone.
#[tokio::test]
async fn a_refusal_of_one_event_type_leaves_the_other_untouched() {
    let db = TestSchema::new().await;
    let vhost = TestVhost::new().await;
    let public = TestIndex::listings(&unique_name("p"));
    let mut admin = EventType::new("listings_admin", "listings");
    admin.jobs_as = Some("listings@listings_admin".to_owned());
    admin.document = DocumentSpec::default().field("title", FieldType::Long);
    admin.index.alias = unique_name("a");
    let types = vec![public.clone(), admin.clone()];
    let mut settings = BridgeSettings::new(database_url(), vhost.url.clone());
    settings.outbox = OutboxConfig::in_schema(&db.name);
    settings.event_types = types.clone();
    settings.migrate = true;
    settings.heartbeat_interval = None;
    let bridge = Running::bridge(settings);
    let consumer = Running::consumer(consumer_settings(&db, &vhost.url, types));
    eventually(PATIENCE, "the admin's trigger attached", || async {
        let n = value(
            &db,
            "SELECT count(*)::text FROM pg_trigger WHERE tgname = 'benalsam_sync_insert:listings@listings_admin'",
        )
        .await;
        if n == "1" { Ok(()) } else { Err(n) }
    })
    .await;

    let id = value(
        &db,
        "INSERT INTO listings (user_id, title, category, status)
         VALUES (gen_random_uuid(), 'Bisiklet', 'spor', 'active') RETURNING id::text",
    )
    .await;
    let status = |table: &'static str| {
        let db = &db;
        async move {
            value(
                db,
                &format!(
                    "SELECT coalesce(string_agg(status, ','), '') FROM elasticsearch_sync_queue WHERE table_name = '{table}'"
                ),
            )
            .await
        }
    };
    eventually(
        PATIENCE,
        "the public job completed, the admin's failed",
        || async {
            let (p, a) = (
                status("listings").await,
                status("listings@listings_admin").await,
            );
            if p == "completed" && a == "failed" {
                Ok(())
            } else {
                Err(format!("public {p:?}, admin {a:?}"))
            }
        },
    )
    .await;
    let public_index = index(&public.index.alias);
    assert!(
        public_index.get(&id).await.is_some(),
        "the public index has it"
    );
    assert!(index(&admin.index.alias).get(&id).await.is_none());
    let dead = support::drain_queue(&vhost.url, &admin.dead_letter_queue).await;
    assert_eq!(dead.len(), 1, "the admin's dead letter");
    let public_dead = support::drain_queue(&vhost.url, &public.dead_letter_queue).await;
    assert!(
        public_dead.is_empty(),
        "nothing in the public dead-letter queue"
    );

    consumer.stop().await;
    bridge.stop().await;
    public_index.drop().await;
    index(&admin.index.alias).drop().await;
    vhost.drop().await;
    db.drop().await;
}
