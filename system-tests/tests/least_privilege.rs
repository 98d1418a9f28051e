//! Least privilege in PostgreSQL, through the real binaries: the outbox is migrated by its
//! owner; the bridge and the consumer run as roles holding exactly the grants of
//! `OutboxConfig::grants` (what `benalsam-bridge grants` prints), and the
//! application as a role that may write its tables and nothing of the outbox. Rows the
//! application writes reach the index, every job completes, and neither binary logs a refused
//! privilege. Once with the seed's listings, once with joined documents (the consumer reads
//! the related tables, the bridge's fan-out writes REBUILD jobs).
//! The start-up log also says which connections are plaintext.

mod binaries;
#[path = "../../benalsam-events/tests/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use benalsam_events::{EventType, OutboxConfig};
use binaries::{bridge_binary, consumer_binary, stop};
use serde_json::Value;
use support::roles::TestRole;
use support::{TestIndex, TestSchema, TestVhost, free_port, search_url, unique_name};

const PATIENCE: Duration = Duration::from_secs(120);
const MARKETPLACE_SQL: &str = include_str!("../../examples/joined_documents/marketplace.sql");
const JOINED_TOML: &str = include_str!("../../examples/joined_documents/listings.toml");

struct Setup {
    db: TestSchema,
    vhost: TestVhost,
    index: TestIndex,
    /// The event-type file, when not the seed's listings.
    config: Option<PathBuf>,
    bridge: TestRole,
    consumer: TestRole,
    writer: TestRole,
    logs: PathBuf,
}

impl Setup {
    async fn new(joined: bool) -> Self {
        let mut db = TestSchema::new().await;
        let vhost = TestVhost::new().await;
        let alias = unique_name("t");
        let logs = std::env::temp_dir().join(unique_name("logs"));
        std::fs::create_dir_all(&logs).expect("log folder");
        let (config, event_types) = if joined {
            db.client
                .batch_execute(MARKETPLACE_SQL)
                .await
                .expect("the marketplace tables");
            let file = logs.join("joined.toml");
            std::fs::write(
                &file,
                JOINED_TOML.replace("benalsam_listings_joined", &alias),
            )
            .expect("the event-type file");
            let types = EventType::from_file(&file).expect("the joined example is valid");
            (Some(file), types)
        } else {
            (None, vec![TestIndex::listings(&alias)])
        };
        // The owner migrates (and attaches the relation triggers).
        OutboxConfig::in_schema(&db.name)
            .migrate(&mut db.client, &event_types)
            .await
            .expect("the owner migrates");
        let index = TestIndex {
            alias,
            client: search_url()
                .client(Duration::from_secs(30))
                .expect("search client"),
        };
        let (bridge, consumer, writer) = (
            TestRole::new("b").await,
            TestRole::new("c").await,
            TestRole::new("w").await,
        );
        let grants = OutboxConfig::in_schema(&db.name)
            .grants(&event_types, Some(&bridge.name), Some(&consumer.name))
            .expect("grants");
        let tables = if joined {
            "listings, users, categories, listing_images"
        } else {
            "listings"
        };
        db.client
            .batch_execute(&format!(
                "{grants}
                 GRANT USAGE ON SCHEMA {schema} TO {w};
                 GRANT SELECT, INSERT, UPDATE, DELETE ON {tables} TO {w};",
                schema = db.name,
                w = writer.name
            ))
            .await
            .expect("grants");
        Self {
            db,
            vhost,
            index,
            config,
            bridge,
            consumer,
            writer,
            logs,
        }
    }

    fn spawn(&self, binary: PathBuf, role: &TestRole, log: &str) -> binaries::Guarded {
        let mut command = Command::new(binary);
        command
            .env("DATABASE_URL", role.url().expose())
            .env("BENALSAM_SCHEMA", &self.db.name)
            .env("RABBITMQ_URL", self.vhost.url.expose())
            .env("ELASTICSEARCH_URL", search_url().expose())
            .env("BENALSAM_HEALTH_ADDR", format!("127.0.0.1:{}", free_port()))
            .env("BENALSAM_POLL_INTERVAL", "200ms")
            // Every claim that finds a job comes back full: the bridge marks itself busy
            // (adaptive NOTIFY), so writing benalsam_listeners is exercised too.
            .env("BENALSAM_BATCH_SIZE", "1")
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.logs.join(log)).expect("log file"));
        match &self.config {
            Some(config) => command.env("BENALSAM_CONFIG", config),
            None => command.env("BENALSAM_INDEX", &self.index.alias),
        };
        command.spawn().expect("the binary starts").into()
    }

    /// Waits until every job is completed (none failed), with `least` jobs at least.
    async fn settled(&self, least: i64) {
        let started = Instant::now();
        loop {
            let row = self
                .db
                .client
                .query_one(
                    "SELECT count(*) FILTER (WHERE status = 'completed'), count(*)
                       FROM elasticsearch_sync_queue",
                    &[],
                )
                .await
                .expect("count");
            let (completed, all): (i64, i64) = (row.get(0), row.get(1));
            if completed == all && all >= least {
                return;
            }
            assert!(
                started.elapsed() < PATIENCE,
                "{completed} of {all} jobs completed; statuses: {:?}; logs: {}",
                self.db.statuses().await,
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A document's source, once it satisfies `ok`.
    async fn doc_until(&self, id: &str, ok: impl Fn(&Value) -> bool) -> Value {
        let started = Instant::now();
        loop {
            let doc = self.index.get(id).await.map(|d| d["_source"].clone());
            if let Some(doc) = doc.filter(|d| ok(d)) {
                return doc;
            }
            assert!(
                started.elapsed() < PATIENCE,
                "document {id} not as expected; logs: {}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn log_text(&self) -> String {
        log_text(&self.logs)
    }

    async fn drop(self) {
        for role in [self.bridge, self.consumer, self.writer] {
            role.drop().await;
        }
        self.index.drop().await;
        self.vhost.drop().await;
        self.db.drop().await;
        let _ = std::fs::remove_dir_all(&self.logs);
    }
}

fn log_text(dir: &Path) -> String {
    let mut text = String::new();
    for name in ["bridge.log", "consumer.log"] {
        let log = std::fs::read_to_string(dir.join(name)).unwrap_or_default();
        text.push_str(&format!("\n--- {name}\n{log}"));
    }
    text
}

/// No line of either binary says a privilege was missing.
fn assert_no_refusal(setup: &Setup) {
    let text = setup.log_text();
    assert!(
        !text.contains("permission denied") && !text.contains("42501"),
        "a privilege is missing: {text}"
    );
}

#[tokio::test]
async fn the_binaries_run_as_least_privilege_roles_and_an_application_roles_rows_reach_the_index() {
    let setup = Setup::new(false).await;
    let bridge = setup.spawn(bridge_binary(), &setup.bridge, "bridge.log");
    let consumer = setup.spawn(consumer_binary(), &setup.consumer, "consumer.log");
    let app = setup.writer.connect(&setup.db.name).await;
    let id: String = app
        .query_one(
            "INSERT INTO listings (user_id, title, description, category, status)
             VALUES (gen_random_uuid(), 'Bisiklet', 'Az kullanılmış', 'spor', 'active')
             RETURNING id::text",
            &[],
        )
        .await
        .expect("the application inserts")
        .get(0);
    setup.doc_until(&id, |d| d["title"] == "Bisiklet").await;
    app.execute(
        "UPDATE listings SET title = 'Yarış bisikleti' WHERE id::text = $1",
        &[&id],
    )
    .await
    .expect("the application updates");
    setup
        .doc_until(&id, |d| d["title"] == "Yarış bisikleti")
        .await;
    app.execute("DELETE FROM listings WHERE id::text = $1", &[&id])
        .await
        .expect("the application deletes");
    setup.settled(3).await;
    assert_eq!(
        setup.index.get(&id).await,
        None,
        "the delete reached the index"
    );
    drop(app);
    stop(bridge);
    stop(consumer);
    assert_no_refusal(&setup);

    // The stack's URLs are plaintext (amqp://, http://) or leave TLS to the server
    // (sslmode=prefer): the start-up log says so for each connection.
    let bridge_log = std::fs::read_to_string(setup.logs.join("bridge.log")).expect("log");
    let consumer_log = std::fs::read_to_string(setup.logs.join("consumer.log")).expect("log");
    for (log, expected) in [
        (
            &bridge_log,
            "PostgreSQL connections: plaintext when the server offers no TLS",
        ),
        (&bridge_log, "RabbitMQ connection: plaintext"),
        (
            &consumer_log,
            "PostgreSQL connections: plaintext when the server offers no TLS",
        ),
        (&consumer_log, "RabbitMQ connection: plaintext"),
        (&consumer_log, "search connections: plaintext"),
    ] {
        assert!(log.contains(expected), "{expected:?} missing in {log}");
    }
    setup.drop().await;
}

#[tokio::test]
async fn joined_documents_work_with_least_privilege_roles_too() {
    let setup = Setup::new(true).await;
    let bridge = setup.spawn(bridge_binary(), &setup.bridge, "bridge.log");
    let consumer = setup.spawn(consumer_binary(), &setup.consumer, "consumer.log");
    let app = setup.writer.connect(&setup.db.name).await;
    app.batch_execute("INSERT INTO categories VALUES ('elektronik', 'Elektronik', 'Electronics')")
        .await
        .expect("a category");
    let user: String = app
        .query_one(
            "INSERT INTO users (display_name, rating) VALUES ('Ayşe', 4.5) RETURNING id::text",
            &[],
        )
        .await
        .expect("a user")
        .get(0);
    let listing: String = app
        .query_one(
            "INSERT INTO listings (user_id, title, category, status)
             VALUES ($1::text::uuid, 'Telefon', 'elektronik', 'active') RETURNING id::text",
            &[&user],
        )
        .await
        .expect("a listing")
        .get(0);
    app.execute(
        "INSERT INTO listing_images (listing_id, url) VALUES ($1::text::uuid, 'https://img/1.jpg')",
        &[&listing],
    )
    .await
    .expect("a photo");
    setup
        .doc_until(&listing, |d| {
            d["seller"]["display_name"] == "Ayşe" && d["photos"][0]["url"] == "https://img/1.jpg"
        })
        .await;
    // A related row's change: the bridge's fan-out writes a REBUILD job, the consumer reads
    // the document again.
    app.execute(
        "UPDATE users SET display_name = 'Ayşe Yılmaz' WHERE id::text = $1",
        &[&user],
    )
    .await
    .expect("the seller renamed");
    setup
        .doc_until(&listing, |d| d["seller"]["display_name"] == "Ayşe Yılmaz")
        .await;
    setup.settled(4).await;
    let rebuilds: i64 = setup
        .db
        .client
        .query_one(
            "SELECT count(*) FROM elasticsearch_sync_queue WHERE operation = 'REBUILD'",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert!(rebuilds >= 1, "the fan-out wrote its REBUILD job");
    drop(app);
    stop(bridge);
    stop(consumer);
    assert_no_refusal(&setup);
    setup.drop().await;
}

/// `benalsam-consumer reindex`, run by the outbox's owner as the operator commands are, while
/// the binaries run as least-privilege roles: the roles' grants carry the reindex (the
/// consumer reads the reindexes under way with every batch and writes to both indexes, the
/// bridge claims the rebuild jobs), the alias moves to the new version with every document,
/// and a write after it reaches the new index.
#[tokio::test]
async fn a_reindex_by_the_owner_runs_through_least_privilege_binaries() {
    let setup = Setup::new(false).await;
    let bridge = setup.spawn(bridge_binary(), &setup.bridge, "bridge.log");
    let consumer = setup.spawn(consumer_binary(), &setup.consumer, "consumer.log");
    let app = setup.writer.connect(&setup.db.name).await;
    let insert = "INSERT INTO listings (user_id, title, description, category, status)
                  VALUES (gen_random_uuid(), $1, 'ikinci el', 'spor', 'active') RETURNING id::text";
    let mut ids = Vec::new();
    for title in ["Kayak", "Kask", "Baton"] {
        let id: String = app
            .query_one(insert, &[&title])
            .await
            .expect("the application inserts")
            .get(0);
        ids.push((id, title));
    }
    for (id, title) in &ids {
        setup.doc_until(id, |d| d["title"] == *title).await;
    }

    // Bounded: a reindex waiting on jobs a missing grant keeps from completing would hang.
    let (status, stderr) = binaries::run_bounded(
        Command::new(consumer_binary())
            .args(["reindex", "--type", "listings"])
            .env("DATABASE_URL", support::database_url().expose())
            .env("BENALSAM_SCHEMA", &setup.db.name)
            .env("RABBITMQ_URL", setup.vhost.url.expose())
            .env("ELASTICSEARCH_URL", search_url().expose())
            .env("BENALSAM_INDEX", &setup.index.alias)
            .env("RUST_LOG", "warn"),
    );
    assert!(
        status.is_some_and(|s| s.success()),
        "reindex failed or ran over a minute ({status:?}): {stderr}; logs: {}",
        setup.log_text()
    );
    let new_index = format!("{}_v2", setup.index.alias);
    assert!(
        stderr.contains(&format!("{} now points at {new_index}", setup.index.alias)),
        "{stderr}"
    );
    assert_eq!(
        setup.index.behind_alias().await,
        vec![new_index],
        "the alias moved to the new index"
    );
    for (id, title) in &ids {
        setup.doc_until(id, |d| d["title"] == *title).await;
    }
    let after: String = app
        .query_one(insert, &[&"Kızak"])
        .await
        .expect("the application inserts after the reindex")
        .get(0);
    setup.doc_until(&after, |d| d["title"] == "Kızak").await;
    setup.settled(4).await;
    drop(app);
    stop(bridge);
    stop(consumer);
    assert_no_refusal(&setup);
    setup.drop().await;
}
