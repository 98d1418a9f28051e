//! The Rust variant of `examples/new_event_type/`: the same `inventory_items` table, with a
//! document that configuration cannot describe, written by a [`DocumentBuilder`] of your own.
//!
//! # When to copy this
//!
//! Copy it when a table's document needs code: computed fields (`in_stock` from the
//! quantity), rows that leave the index for a reason of your own (no warehouse), or a check
//! that refuses a row. For anything a mapping from columns to fields covers, the TOML entry of
//! `examples/new_event_type/` is enough and no code is needed.
//!
//! What is yours: the event type (names derived from `inventory`, trigger options), the
//! builder, and the mapping of the fields it writes. The library adds `id`, `job_id`,
//! `indexed_at`, the analyzers it defines and the delete protection to the index.
//!
//! ```text
//! scripts/stack up
//! cargo run --example custom_document      # Ctrl-C to stop
//! psql "$DATABASE_URL" -c "INSERT INTO inventory_items (sku, name, quantity, warehouse) VALUES ('SKU-1', 'Çay bardağı', 12, 'Gebze')"
//! curl 'http://127.0.0.1:9200/benalsam_inventory/_search?q=name:bardak'
//! ```

use benalsam_events::BuildError;
use benalsam_events::bridge::{self, BridgeSettings};
use benalsam_events::consumer::{self, ConsumerSettings};
use benalsam_events::outbox::Operation;
use benalsam_events::{
    Action, AmqpUrl, DatabaseUrl, DocumentBuilder, Envelope, EventType, OutboxConfig, SearchUrl,
};
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// The application's table (the same as `examples/new_event_type/inventory_items.sql`).
pub const INVENTORY_SQL: &str = include_str!("new_event_type/inventory_items.sql");

/// Row → document: a deleted row, or one stocked in no warehouse, leaves the index.
#[derive(Debug, Clone)]
pub struct InventoryDocuments {
    /// The index alias the actions write to.
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
            id,
            document: json!({
                "name": row["name"],
                "quantity": quantity,
                "in_stock": quantity > 0,
                "warehouse": row["warehouse"],
            }),
        })
    }
}

/// The event type: names derived from `inventory`, the trigger's options, the builder with
/// the mapping of its fields.
pub fn inventory(alias: &str) -> EventType {
    let mut inventory = EventType::new("inventory", "inventory_items");
    inventory.key = "sku".to_owned();
    inventory.ignore = vec!["scan_count".to_owned()];
    inventory.index.alias = alias.to_owned();
    let builder = InventoryDocuments {
        index: alias.to_owned(),
    };
    inventory.with_builder(
        builder,
        json!({
            "name": { "type": "text", "analyzer": "benalsam_turkish" },
            "quantity": { "type": "long" },
            "in_stock": { "type": "boolean" },
            "warehouse": { "type": "keyword" }
        }),
    )
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
    // The application's table; in a real service its own migrations create it.
    let client = settings.database_url.connect().await?;
    client
        .batch_execute(&format!(
            "SET search_path TO {}; {INVENTORY_SQL}",
            settings.schema
        ))
        .await
        .map_err(|e| {
            benalsam_events::Error::config("inventory_items", format!("cannot create it: {e}"))
        })?;

    let mut listings = EventType::listings();
    listings.index.alias = settings.listings_index;
    let event_types = vec![listings, inventory(&settings.inventory_index)];

    let mut bridge =
        BridgeSettings::new(settings.database_url.clone(), settings.rabbitmq_url.clone());
    bridge.outbox = OutboxConfig::in_schema(&settings.schema);
    bridge.event_types = event_types.clone();
    bridge.migrate = true;

    let mut consumer = ConsumerSettings::new(
        settings.database_url,
        settings.rabbitmq_url,
        settings.elasticsearch_url,
    );
    consumer.outbox = OutboxConfig::in_schema(&settings.schema);
    consumer.event_types = event_types;

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
