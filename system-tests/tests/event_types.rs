//! Event types by configuration, through the stock binaries as separate processes against the
//! real stack: the shipped example file (listings and inventory items) run side by side, a
//! bridge that leaves another table's jobs alone, and the errors of a file or a table that
//! cannot work. Each test has its own schema, virtual host and indices.

mod binaries;
#[path = "../../benalsam-events/tests/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use benalsam_events::consume::DeadLetterQueue;
use benalsam_events::{Envelope, EventType};
use binaries::{bridge_binary, consumer_binary, run_bounded, stop};
use lapin::options::BasicPublishOptions;
use serde_json::json;
use support::{TestIndex, TestSchema, TestVhost, database_url, free_port, search_url, unique_name};

const PATIENCE: Duration = Duration::from_secs(120);
const EXAMPLE: &str = include_str!("../../examples/config/benalsam.toml");
const INVENTORY_SQL: &str = include_str!("../../examples/new_event_type/inventory_items.sql");
const INVENTORY_TOML: &str = include_str!("../../examples/new_event_type/inventory_items.toml");

/// A deployment of the binaries on a test's schema and vhost, with an event-type file.
struct Deployment {
    schema: String,
    vhost: benalsam_events::config::AmqpUrl,
}

impl Deployment {
    fn command(&self, binary: PathBuf, config: Option<&Path>) -> Command {
        let mut command = Command::new(binary);
        command
            .env("DATABASE_URL", database_url().expose())
            .env("BENALSAM_SCHEMA", &self.schema)
            .env("RABBITMQ_URL", self.vhost.expose())
            .env("ELASTICSEARCH_URL", search_url().expose())
            .env("BENALSAM_POLL_INTERVAL", "200ms")
            .env("BENALSAM_HEALTH_ADDR", format!("127.0.0.1:{}", free_port()))
            .env("RUST_LOG", "warn")
            .env_remove("BENALSAM_CONFIG");
        if let Some(config) = config {
            command.env("BENALSAM_CONFIG", config);
        }
        command
    }

    /// Starts a binary serving its health endpoints on `port`.
    fn start(&self, binary: PathBuf, config: Option<&Path>, port: u16) -> binaries::Guarded {
        self.command(binary, config)
            .env("BENALSAM_HEALTH_ADDR", format!("127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the binary starts")
            .into()
    }

    /// Runs a command of a binary to its end.
    fn run(&self, binary: PathBuf, config: Option<&Path>, args: &[&str]) -> Output {
        self.command(binary, config)
            .args(args)
            .output()
            .expect("the binary runs")
    }
}

/// Writes `text` to a file of the test's own.
fn write_config(text: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("{}.toml", unique_name("benalsam")));
    std::fs::write(&path, text).expect("write the event-type file");
    path
}

/// The shipped example with the test's own index aliases.
fn example_config(listings: &str, inventory: &str) -> String {
    let text = EXAMPLE.replace(
        "alias = \"benalsam_listings\"",
        &format!("alias = \"{listings}\""),
    );
    assert_ne!(text, EXAMPLE, "the example names the listings alias");
    format!("{text}\n[event_type.index]\nalias = \"{inventory}\"\n")
}

async fn wait_for(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let started = Instant::now();
    while !done().await {
        assert!(started.elapsed() < PATIENCE, "waited too long for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether a service on `port` answers /readyz with 200.
async fn ready(port: u16) -> bool {
    reqwest::get(format!("http://127.0.0.1:{port}/readyz"))
        .await
        .is_ok_and(|r| r.status() == 200)
}

/// Jobs of `table` by status.
async fn jobs(db: &TestSchema, table: &str, status: &str) -> i64 {
    db.client
        .query_one(
            "SELECT count(*) FROM elasticsearch_sync_queue WHERE table_name = $1 AND status = $2",
            &[&table, &status],
        )
        .await
        .expect("count")
        .get(0)
}

/// Publishes a message no job of the outbox stands behind, as a client with write access to
/// the exchange could.
async fn forge(url: &benalsam_events::config::AmqpUrl, event_type: &EventType, record: &str) {
    let body = json!({
        "messageId": "job_999999999", "jobId": 999_999_999, "schemaVersion": 1,
        "routingKey": format!("{}.insert", event_type.routing_prefix),
        "table": event_type.table, "operation": "INSERT", "recordId": record,
        "changeData": { "id": record, "sku": record, "name": "Sahte", "title": "Sahte",
                        "status": "active", "state": "stocked", "quantity": 1 },
        "occurredAt": "2026-11-28T00:00:00Z"
    });
    let envelope = Envelope::decode(body.to_string().as_bytes()).expect("a well-formed envelope");
    let connection = url.connect("forger").await.expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .basic_publish(
            event_type.exchange.as_str().into(),
            envelope.routing_key.as_ref().into(),
            BasicPublishOptions::default(),
            &envelope.to_bytes(),
            envelope.properties("forger", None),
        )
        .await
        .expect("publish");
    let _ = connection.close(200, "ok".into()).await;
}

#[tokio::test]
async fn the_example_file_runs_listings_and_inventory_side_by_side_each_with_its_own_dlq() {
    let (db, vhost, listings) = (
        TestSchema::new().await,
        TestVhost::new().await,
        TestIndex::new().await,
    );
    db.client
        .batch_execute(INVENTORY_SQL)
        .await
        .expect("the application's second table");
    let inventory = TestIndex {
        alias: format!("{}_inventory", listings.alias),
        client: listings.client.clone(),
    };
    let config = write_config(&example_config(&listings.alias, &inventory.alias));
    let types = EventType::from_file(&config).expect("the example file");
    let deployment = Deployment {
        schema: db.name.clone(),
        vhost: vhost.url.clone(),
    };

    let migrated = deployment.run(bridge_binary(), Some(&config), &["migrate"]);
    let out = String::from_utf8_lossy(&migrated.stdout);
    assert!(
        migrated.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&migrated.stderr)
    );
    assert!(out.contains("trigger attached to listings"), "{out}");
    assert!(out.contains("trigger attached to inventory_items"), "{out}");

    let (bridge_port, consumer_port) = (free_port(), free_port());
    let bridge = deployment.start(bridge_binary(), Some(&config), bridge_port);
    let consumer = deployment.start(consumer_binary(), Some(&config), consumer_port);
    // Ready: the topology is declared (the forged messages below have queues to go to).
    for port in [bridge_port, consumer_port] {
        wait_for("ready", async || ready(port).await).await;
    }
    let listing_ids = db.insert_listings(6).await;
    db.client
        .batch_execute(
            "INSERT INTO inventory_items (sku, name, quantity, state, warehouse) VALUES
                 ('SKU-1', 'Demlik', 2, 'stocked', 'Gebze'),
                 ('SKU-2', 'Çay bardakları', 0, 'backorder', 'İzmir'),
                 ('SKU-3', 'Kaşık', 5, 'discontinued', 'Ankara'),
                 ('SKU-4', 'Tabak', 9, 'stocked', 'Gebze');
             UPDATE inventory_items SET scan_count = scan_count + 1;  -- ignored: no job
             UPDATE inventory_items SET sku = 'SKU-5' WHERE sku = 'SKU-4';  -- a key change
             DELETE FROM inventory_items WHERE sku = 'SKU-1';",
        )
        .await
        .expect("inventory changes");
    forge(&vhost.url, &types[0], "forged-listing").await;
    forge(&vhost.url, &types[1], "FORGED-SKU").await;

    wait_for("every job completed", async || {
        jobs(&db, "listings", "completed").await == 6
            && jobs(&db, "inventory_items", "completed").await == 7
    })
    .await;
    let letters = async |queue: &str| {
        DeadLetterQueue::new(vhost.url.clone(), queue)
            .list(10)
            .await
            .expect("dlq")
    };
    wait_for("both forgeries dead-lettered", async || {
        letters("elasticsearch.sync.dlq").await.len() == 1
            && letters("inventory.sync.dlq").await.len() == 1
    })
    .await;
    stop(bridge);
    stop(consumer);

    let mut expected = listing_ids;
    expected.sort();
    assert_eq!(listings.search(json!({"match_all": {}})).await, expected);
    assert_eq!(
        inventory.search(json!({"match_all": {}})).await,
        vec!["SKU-2".to_owned(), "SKU-5".to_owned()],
        "deleted, renamed and unsearchable items left; forged items never came"
    );
    assert_eq!(
        inventory.search(json!({"match": {"name": "bardak"}})).await,
        vec!["SKU-2".to_owned()],
        "the Turkish analyzer of the file"
    );
    let item = inventory.get("SKU-5").await.expect("indexed");
    assert_eq!(item["_source"]["stored_in"], "Gebze", "a renamed column");
    for (queue, prefix, record) in [
        ("elasticsearch.sync.dlq", "listing.", "forged-listing"),
        ("inventory.sync.dlq", "inventory.", "FORGED-SKU"),
    ] {
        let letter = &letters(queue).await[0];
        assert!(
            letter.routing_key.starts_with(prefix),
            "{queue}: {letter:?}"
        );
        assert!(letter.body.contains(record), "{queue}: {letter:?}");
        assert_eq!(letter.kind.as_deref(), Some("unverified"), "{letter:?}");
    }
    let _ = std::fs::remove_file(&config);
    inventory.drop().await;
    listings.drop().await;
    db.drop().await;
    vhost.drop().await;
}

#[tokio::test]
async fn a_bridge_leaves_the_jobs_of_tables_it_does_not_route_and_a_second_one_takes_them() {
    let (db, vhost) = (TestSchema::new().await, TestVhost::new().await);
    db.client
        .batch_execute(INVENTORY_SQL)
        .await
        .expect("the application's second table");
    let inventory_only = write_config(INVENTORY_TOML);
    let deployment = Deployment {
        schema: db.name.clone(),
        vhost: vhost.url.clone(),
    };
    let migrated = deployment.run(bridge_binary(), Some(&inventory_only), &["migrate"]);
    assert!(migrated.status.success());

    // The listings bridge: no file, the built-in listings only.
    let port = free_port();
    let listings_bridge = deployment.start(bridge_binary(), None, port);
    db.insert_listings(5).await;
    db.client
        .batch_execute(
            "INSERT INTO inventory_items (sku, name, warehouse) VALUES ('A', 'Bardak', 'X'), ('B', 'Tabak', 'Y')",
        )
        .await
        .expect("inventory");
    wait_for("the listings published", async || {
        jobs(&db, "listings", "sent").await == 5
    })
    .await;
    wait_for(
        "the unrouted jobs reported in health and metrics",
        async || {
            let Ok(response) = reqwest::get(format!(
                "http://127.0.0.1:{port}/api/v1/health/database-trigger-bridge"
            ))
            .await
            else {
                return false;
            };
            let body: serde_json::Value = response.json().await.unwrap_or_default();
            let scrape = support::scrape(port).await;
            body["healthy"] == true
                && body["details"]["unroutedPending"]["inventory_items"] == 2
                && support::sample(
                    &scrape,
                    "benalsam_queue_pending_jobs",
                    &[("table", "inventory_items")],
                ) == 2.0
        },
    )
    .await;
    assert_eq!(
        jobs(&db, "inventory_items", "pending").await,
        2,
        "never claimed, never failed"
    );
    let status = deployment.run(bridge_binary(), None, &["status"]);
    let out = String::from_utf8_lossy(&status.stdout);
    assert!(out.contains("pending in inventory_items: 2"), "{out}");

    // A bridge for the inventory drains them; the listings bridge still leaves them.
    let inventory_bridge = deployment.start(bridge_binary(), Some(&inventory_only), free_port());
    wait_for("the inventory published", async || {
        jobs(&db, "inventory_items", "sent").await == 2
    })
    .await;
    stop(listings_bridge);
    stop(inventory_bridge);
    let _ = std::fs::remove_file(&inventory_only);
    db.drop().await;
    vhost.drop().await;
}

#[tokio::test]
async fn a_file_with_a_typo_or_a_table_that_does_not_exist_stops_with_a_clear_error() {
    let (db, vhost) = (TestSchema::new().await, TestVhost::new().await);
    let deployment = Deployment {
        schema: db.name.clone(),
        vhost: vhost.url.clone(),
    };
    let typo = write_config(&INVENTORY_TOML.replace("ignore =", "ignroe ="));
    for binary in [bridge_binary(), consumer_binary()] {
        let out = deployment.run(binary, Some(&typo), &["run"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            err.contains(typo.to_str().expect("utf-8"))
                && err.contains("ignroe")
                && err.contains("line 5"),
            "{err}"
        );
    }

    // inventory_items was never created in this schema.
    let missing = write_config(INVENTORY_TOML);
    let out = deployment.run(bridge_binary(), Some(&missing), &["migrate"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("inventory_items") && err.contains("does not exist"),
        "{err}"
    );
    let out = deployment.run(bridge_binary(), Some(&missing), &["run"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the bridge refuses to run without the table"
    );
    assert!(
        err.contains("inventory_items") && err.contains("does not exist"),
        "{err}"
    );
    for file in [typo, missing] {
        let _ = std::fs::remove_file(file);
    }
    db.drop().await;
    vhost.drop().await;
}

#[tokio::test]
async fn an_index_alias_of_all_or_shared_by_two_event_types_stops_start_naming_the_key() {
    let (db, vhost) = (TestSchema::new().await, TestVhost::new().await);
    let deployment = Deployment {
        schema: db.name.clone(),
        vhost: vhost.url.clone(),
    };
    // `_all` would make the consumer put its mapping on every index of the cluster.
    for alias in ["_all", "benalsam_*", "a,b", "Listings"] {
        let file = write_config(&format!(
            "{INVENTORY_TOML}\n[event_type.index]\nalias = \"{alias}\"\n"
        ));
        for binary in [consumer_binary(), bridge_binary()] {
            let (status, err) = run_bounded(deployment.command(binary, Some(&file)).arg("run"));
            assert!(
                status.is_some_and(|s| !s.success()),
                "{alias}: refused at start, not run ({status:?}): {err}"
            );
            assert!(
                err.contains(&format!("{}:1:", file.display()))
                    && err.contains("index.alias")
                    && err.contains(alias),
                "{alias}: {err}"
            );
        }
        let _ = std::fs::remove_file(file);
    }
    // Two event types behind one alias would write each other's documents.
    let shared = write_config(&example_config("shared_alias", "shared_alias"));
    let (status, err) = run_bounded(
        deployment
            .command(consumer_binary(), Some(&shared))
            .arg("run"),
    );
    assert!(status.is_some_and(|s| !s.success()), "{err}");
    assert!(
        err.contains("index.alias") && err.contains("shared_alias") && err.contains("own alias"),
        "{err}"
    );
    let _ = std::fs::remove_file(shared);
    db.drop().await;
    vhost.drop().await;
}

#[tokio::test]
async fn backfill_by_event_type_enqueues_the_rows_that_predate_the_trigger_with_progress() {
    let (db, vhost) = (TestSchema::new().await, TestVhost::new().await);
    db.client
        .batch_execute(&format!(
            "{INVENTORY_SQL};
             INSERT INTO inventory_items (sku, name)
             SELECT 'SKU-' || i, 'Ürün ' || i FROM generate_series(1, 250) AS i;"
        ))
        .await
        .expect("rows that predate the trigger");
    let config = write_config(INVENTORY_TOML);
    let deployment = Deployment {
        schema: db.name.clone(),
        vhost: vhost.url.clone(),
    };
    assert!(
        deployment
            .run(bridge_binary(), Some(&config), &["migrate"])
            .status
            .success()
    );
    let out = deployment.run(
        bridge_binary(),
        Some(&config),
        &["backfill", "--type", "inventory", "--batch", "100"],
    );
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stderr.contains("250/250 rows (100%)"),
        "progress with the total: {stderr}"
    );
    assert!(
        stdout.contains("backfill complete, 250 rows enqueued"),
        "{stdout}"
    );
    assert_eq!(jobs(&db, "inventory_items", "pending").await, 250);
    let _ = std::fs::remove_file(&config);
    db.drop().await;
    vhost.drop().await;
}
