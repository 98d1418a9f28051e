//! Runs the `embedded` and `custom_document` examples — the very files users copy — against
//! the real stack, each in a schema, virtual host and indices of its own.

mod support;

#[allow(dead_code)] // its `main` is for `cargo run --example`
#[path = "../../examples/embedded.rs"]
mod embedded;

#[allow(dead_code)]
#[path = "../../examples/custom_document.rs"]
mod custom_document;

use std::time::{Duration, Instant};

use serde_json::json;
use support::{TestIndex, TestSchema, TestVhost, search_url};
use tokio_util::sync::CancellationToken;

const PATIENCE: Duration = Duration::from_secs(60);

async fn wait_completed(db: &TestSchema, n: usize) {
    let started = Instant::now();
    loop {
        let statuses = db.statuses().await;
        if statuses.len() >= n && statuses.iter().all(|(_, s)| s == "completed") {
            return;
        }
        assert!(started.elapsed() < PATIENCE, "jobs completed: {statuses:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn the_embedded_example_syncs_listings_in_one_process() {
    let (db, vhost, index) = (
        TestSchema::new().await,
        TestVhost::new().await,
        TestIndex::new().await,
    );
    let settings = embedded::Settings {
        database_url: support::database_url(),
        schema: db.name.clone(),
        rabbitmq_url: vhost.url.clone(),
        elasticsearch_url: search_url(),
        index: index.alias.clone(),
    };
    let shutdown = CancellationToken::new();
    let service = tokio::spawn(embedded::run(settings, shutdown.clone()));
    let ids = db.insert_listings(20).await;
    wait_completed(&db, 20).await;
    shutdown.cancel();
    tokio::time::timeout(PATIENCE, service)
        .await
        .expect("stops")
        .expect("no panic")
        .expect("no error");

    let mut expected = ids;
    expected.sort();
    assert_eq!(index.search(json!({"match_all": {}})).await, expected);
    db.drop().await;
    vhost.drop().await;
    index.drop().await;
}

#[tokio::test]
async fn the_custom_document_example_syncs_inventory_items_beside_the_listings() {
    let (db, vhost, listings) = (
        TestSchema::new().await,
        TestVhost::new().await,
        TestIndex::new().await,
    );
    let inventory_alias = format!("{}_inventory", listings.alias);
    let settings = custom_document::Settings {
        database_url: support::database_url(),
        schema: db.name.clone(),
        rabbitmq_url: vhost.url.clone(),
        elasticsearch_url: search_url(),
        listings_index: listings.alias.clone(),
        inventory_index: inventory_alias.clone(),
    };
    let shutdown = CancellationToken::new();
    let service = tokio::spawn(custom_document::run(settings, shutdown.clone()));
    // The example creates the table and the bridge's migration attaches the trigger.
    let started = Instant::now();
    while !db
        .client
        .query_one(
            "SELECT EXISTS (SELECT FROM pg_trigger WHERE tgname = 'benalsam_sync_insert'
                                AND tgrelid = to_regclass('inventory_items'))",
            &[],
        )
        .await
        .expect("query")
        .get::<_, bool>(0)
    {
        assert!(
            started.elapsed() < PATIENCE,
            "the example creates inventory_items and attaches the trigger"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    db.client
        .batch_execute(
            "INSERT INTO inventory_items (sku, name, quantity, warehouse) VALUES
                 ('SKU-1', 'Çay bardakları', 12, 'İzmir'),
                 ('SKU-2', 'Demlik', 0, 'Ankara'),
                 ('SKU-3', 'Kaşık', 5, NULL);
             UPDATE inventory_items SET scan_count = scan_count + 1;   -- ignored column: no job
             UPDATE inventory_items SET quantity = 3 WHERE sku = 'SKU-2';
             DELETE FROM inventory_items WHERE sku = 'SKU-1';",
        )
        .await
        .expect("inventory changes");
    db.insert_listings(2).await;
    wait_completed(&db, 7).await;
    shutdown.cancel();
    tokio::time::timeout(PATIENCE, service)
        .await
        .expect("stops")
        .expect("no panic")
        .expect("no error");

    assert_eq!(
        db.statuses().await.len(),
        7,
        "3 inserts + 1 quantity update + 1 delete + 2 listings; the scan update made none"
    );

    let inventory = TestIndex {
        alias: inventory_alias.clone(),
        client: listings.client.clone(),
    };
    assert_eq!(
        inventory.search(json!({"match_all": {}})).await,
        vec!["SKU-2".to_owned()]
    );
    let demlik = inventory.get("SKU-2").await.expect("indexed");
    assert_eq!(demlik["_source"]["quantity"], 3);
    assert_eq!(demlik["_source"]["in_stock"], true);
    assert_eq!(
        listings.search(json!({"match_all": {}})).await.len(),
        2,
        "listings still sync"
    );
    inventory.drop().await;
    db.drop().await;
    vhost.drop().await;
    listings.drop().await;
}
