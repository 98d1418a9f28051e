//! Syncing another table: `inventory_items`, with its own trigger options, routing prefix,
//! exchange, document builder and index.
//!
//! # When to copy this
//!
//! Copy it to add an event type — any table whose rows should be searchable. The five things
//! to write are marked 1 to 5 below; rename them for your table and keep the rest:
//!
//! 1. the table's trigger (`key=` its key column, `ignore=` columns whose changes alone must
//!    not cause a job, such as counters);
//! 2. an [`EventType`]: table → exchange and routing prefix (`inventory_item.insert`, …);
//! 3. the topology: its exchange, bound to `elasticsearch.sync` with `inventory_item.#`;
//! 4. a [`DocumentBuilder`]: row → search document (or a delete);
//! 5. the index mapping of its documents.
//!
//! ```text
//! scripts/stack up
//! cargo run --example new_event_type      # Ctrl-C to stop
//! psql "$DATABASE_URL" -c "INSERT INTO inventory_items (sku, name, quantity) VALUES ('SKU-1', 'Çay bardağı', 12)"
//! curl 'http://127.0.0.1:9200/benalsam_inventory/_search?q=name:bardak'
//! ```

use benalsam_events::bridge::{self, BridgeSettings};
use benalsam_events::consumer::{self, ConsumerSettings};
use benalsam_events::index::{BuildError, IndexConfig, ListingDocuments, listings_index_body};
use benalsam_events::outbox::Operation;
use benalsam_events::publish::TopologyConfig;
use benalsam_events::{
    Action, AmqpUrl, DatabaseUrl, DocumentBuilder, Documents, Envelope, EventType, OutboxConfig,
    Routes, SearchUrl, Topology, connect,
};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// Step 1, the table and its trigger. `add_to_sync_queue()` comes with the library's migrations.
pub const INVENTORY_SQL: &str = "
CREATE TABLE IF NOT EXISTS inventory_items (
    sku         text PRIMARY KEY,
    name        text NOT NULL,
    description text NOT NULL DEFAULT '',
    quantity    integer NOT NULL DEFAULT 0,
    warehouse   text,
    scan_count  integer NOT NULL DEFAULT 0,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
DROP TRIGGER IF EXISTS inventory_items_sync_queue ON inventory_items;
CREATE TRIGGER inventory_items_sync_queue
    AFTER INSERT OR UPDATE OR DELETE ON inventory_items
    FOR EACH ROW EXECUTE FUNCTION add_to_sync_queue('key=sku', 'ignore=scan_count');
";

/// Step 2, where its messages go. No status column: every UPDATE is `inventory_item.update`.
pub fn inventory_event_type() -> EventType {
    EventType::new("inventory_items", "inventory_item", "benalsam.inventory")
}

/// Step 4, row → document: a deleted row, or one stocked in no warehouse, leaves the index.
#[derive(Debug, Clone)]
pub struct InventoryDocuments {
    pub index: String,
}

impl DocumentBuilder for InventoryDocuments {
    fn build(&self, envelope: &Envelope<'_>) -> Result<Action, BuildError> {
        let row = envelope.current_row();
        let id = envelope.record_id.to_string();
        if envelope.operation == Operation::Delete || row["warehouse"].is_null() {
            return Ok(Action::Delete {
                index: self.index.clone(),
                id,
            });
        }
        let quantity = row["quantity"]
            .as_i64()
            .ok_or_else(|| BuildError(format!("item {id}: quantity is not a number")))?;
        Ok(Action::Index {
            index: self.index.clone(),
            id: id.clone(),
            document: json!({
                "sku": id,
                "name": row["name"],
                "description": row["description"],
                "quantity": quantity,
                "in_stock": quantity > 0,
                "warehouse": row["warehouse"],
                "updated_at": row["updated_at"],
            }),
        })
    }
}

/// Step 5, its index: the same Turkish analysis as the listings, its own fields.
pub fn inventory_index_body(config: &IndexConfig) -> Value {
    let listings = listings_index_body(config);
    json!({
        "settings": listings["settings"],
        "mappings": {
            "dynamic": "strict",
            "properties": {
                "sku": { "type": "keyword" },
                "name": { "type": "text", "analyzer": "benalsam_turkish" },
                "description": { "type": "text", "analyzer": "benalsam_turkish" },
                "quantity": { "type": "integer" },
                "in_stock": { "type": "boolean" },
                "warehouse": { "type": "keyword" },
                "updated_at": { "type": "date" }
            }
        }
    })
}

/// Where everything is.
#[derive(Debug, Clone)]
pub struct Settings {
    pub database_url: DatabaseUrl,
    pub schema: String,
    pub rabbitmq_url: AmqpUrl,
    pub elasticsearch_url: SearchUrl,
    pub listings_index: String,
    pub inventory_index: String,
}

impl Settings {
    pub fn from_env() -> Result<Self, benalsam_events::Error> {
        Ok(Self {
            database_url: DatabaseUrl::from_env()?,
            schema: std::env::var("BENALSAM_SCHEMA").unwrap_or_else(|_| "public".to_owned()),
            rabbitmq_url: AmqpUrl::from_env()?,
            elasticsearch_url: SearchUrl::from_env()?,
            listings_index: "benalsam_listings".to_owned(),
            inventory_index: "benalsam_inventory".to_owned(),
        })
    }
}

/// Runs bridge and consumer for listings and inventory items until `shutdown`.
pub async fn run(
    settings: Settings,
    shutdown: CancellationToken,
) -> Result<(), benalsam_events::Error> {
    let mut client = connect::postgres(&settings.database_url).await?;
    benalsam_events::outbox::migrate(&mut client, &settings.schema).await?;
    client
        .batch_execute(&format!(
            "SET search_path TO {}; {INVENTORY_SQL}",
            settings.schema
        ))
        .await
        .map_err(|e| {
            benalsam_events::Error::config(
                "inventory_items",
                format!("cannot create the table and its trigger: {e:?}"),
            )
        })?;

    // Step 3, the topology with the new exchange and binding.
    let inventory = inventory_event_type();
    let topology = Topology::benalsam(&TopologyConfig::default()).with_event_type(&inventory);
    let mut bridge =
        BridgeSettings::new(settings.database_url.clone(), settings.rabbitmq_url.clone());
    bridge.outbox = OutboxConfig::in_schema(&settings.schema);
    bridge.routes = Routes::new(vec![EventType::listings(), inventory]);
    bridge.topology = topology.clone();

    let mut consumer = ConsumerSettings::new(
        settings.database_url,
        settings.rabbitmq_url,
        settings.elasticsearch_url,
    );
    consumer.outbox = OutboxConfig::in_schema(&settings.schema);
    consumer.topology = topology;
    let mut listings_index = IndexConfig::default();
    listings_index.alias = settings.listings_index.clone();
    let body = listings_index_body(&listings_index);
    consumer.index = Some((listings_index, body));
    consumer.documents = Documents::new()
        .with("listings", ListingDocuments::new(&settings.listings_index))
        .with(
            "inventory_items",
            InventoryDocuments {
                index: settings.inventory_index.clone(),
            },
        );
    let mut inventory_index = IndexConfig::default();
    inventory_index.alias = settings.inventory_index.clone();
    let search = benalsam_events::index::client(&consumer.search_url, consumer.search_timeout)?;
    benalsam_events::index::ensure_index(
        &search,
        &inventory_index,
        &inventory_index_body(&inventory_index),
    )
    .await?;

    let (bridge, consumer) = tokio::join!(
        bridge::run(bridge, shutdown.clone()),
        consumer::run(consumer, shutdown)
    );
    bridge.and(consumer)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let settings = Settings::from_env()?;
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        stop.cancel();
    });
    println!("syncing listings and inventory_items; Ctrl-C stops");
    run(settings, shutdown).await?;
    Ok(())
}
