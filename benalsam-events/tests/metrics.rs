//! The consumer's metrics, as an operator scrapes them from `/metrics`, against the real
//! services: two event types in one consumer, each counted under its own `event_type`
//! label.

mod support;

use std::time::Duration;

use benalsam_events::bridge::{self, BridgeSettings};
use benalsam_events::consumer::{self, ConsumerSettings};
use benalsam_events::{Envelope, EventType, OutboxConfig};
use serde_json::json;
use support::{
    TestIndex, TestSchema, TestVhost, database_url, eventually, free_port, publish, sample, scrape,
    search_url,
};
use tokio_util::sync::CancellationToken;

const PATIENCE: Duration = Duration::from_secs(90);

/// A figure of the scrape: family, other labels, and its value for listings and for offers.
type Figure<'a> = (&'a str, &'a [(&'a str, &'a str)], f64, f64);

/// A second event type beside the listings: `offers`, a table shaped like `listings`, on the
/// same exchange with its own routing keys, queue, dead-letter queue and index.
fn offers(alias: &str) -> EventType {
    let mut offers = TestIndex::listings(alias);
    offers.name = "offers".to_owned();
    offers.table = "offers".to_owned();
    offers.routing_prefix = "offer".to_owned();
    offers.queue = "offers.sync".to_owned();
    offers.dead_letter_exchange = "offers.sync.dlx".to_owned();
    offers.dead_letter_queue = "offers.sync.dlq".to_owned();
    offers.status_queue = None;
    offers
}

/// A well-formed offer message whose job the outbox does not have (a forgery): the consumer
/// dead-letters it as unverified.
fn forged_offer(job: i64) -> Envelope<'static> {
    let body = json!({
        "messageId": format!("job_{job}"), "jobId": job, "schemaVersion": 1,
        "routingKey": "offer.insert", "table": "offers", "operation": "INSERT",
        "recordId": "ghost",
        "changeData": { "id": "ghost", "title": "Sahte teklif", "status": "active",
                        "user_id": "00000000-0000-0000-0000-000000000000", "category": "x" },
        "occurredAt": "2026-11-28T00:00:00Z"
    });
    Envelope::decode(body.to_string().as_bytes()).expect("well-formed")
}

#[tokio::test]
async fn each_event_type_is_counted_under_its_own_label() {
    let db = TestSchema::new().await;
    db.client
        .batch_execute("CREATE TABLE offers (LIKE listings INCLUDING ALL)")
        .await
        .expect("the offers table");
    let vhost = TestVhost::new().await;
    let (listings_index, offers_index) = (TestIndex::new().await, TestIndex::new().await);
    let types = vec![listings_index.event_type(), offers(&offers_index.alias)];
    let mut client = database_url().connect().await.expect("PostgreSQL answers");
    OutboxConfig::in_schema(&db.name)
        .migrate(&mut client, &types)
        .await
        .expect("both triggers attached");

    let mut bridge_settings = BridgeSettings::new(database_url(), vhost.url.clone());
    bridge_settings.outbox = OutboxConfig::in_schema(&db.name);
    bridge_settings.event_types = types.clone();
    bridge_settings.heartbeat_interval = None;
    let stop_bridge = CancellationToken::new();
    let bridge = tokio::spawn(bridge::run(bridge_settings, stop_bridge.clone()));

    let mut settings = ConsumerSettings::new(database_url(), vhost.url.clone(), search_url());
    settings.outbox = OutboxConfig::in_schema(&db.name);
    settings.event_types = types;
    settings.heartbeat_interval = None;
    let port = free_port();
    settings.health_addr = Some(([127, 0, 0, 1], port).into());
    let stop_consumer = CancellationToken::new();
    let consumer = tokio::spawn(consumer::run(settings, stop_consumer.clone()));

    db.insert_listings(3).await;
    db.client
        .batch_execute(
            "INSERT INTO offers (user_id, title, category, status)
             SELECT gen_random_uuid(), 'Teklif ' || i, 'elektronik', 'active'
             FROM generate_series(1, 2) AS i",
        )
        .await
        .expect("insert offers");
    eventually(PATIENCE, "every job completed", || async {
        let statuses = db.statuses().await;
        if statuses.iter().all(|(_, s)| s == "completed") {
            Ok(())
        } else {
            Err(format!("{statuses:?}"))
        }
    })
    .await;
    publish(&vhost.url, &forged_offer(777_777))
        .await
        .expect("published");

    // Every figure follows its outcome (recorded in the outbox first, acked last): wait
    // until all have arrived, then check that none went further.
    let expected: [Figure<'_>; 6] = [
        ("benalsam_deliveries_received_total", &[], 3.0, 3.0),
        ("benalsam_jobs_completed_total", &[], 3.0, 2.0),
        (
            "benalsam_bulk_items_total",
            &[("kind", "applied")],
            3.0,
            2.0,
        ),
        ("benalsam_end_to_end_latency_seconds", &[], 3.0, 2.0),
        (
            "benalsam_deliveries_dead_lettered_total",
            &[("kind", "unverified")],
            0.0,
            1.0,
        ),
        ("benalsam_deliveries_acked_total", &[], 3.0, 3.0),
    ];
    let by_type = |m: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]| {
        let of = |event_type| {
            let mut labels = labels.to_vec();
            labels.push(("event_type", event_type));
            sample(m, name, &labels)
        };
        (of("listings"), of("offers"))
    };
    let metrics = eventually(PATIENCE, "every figure by event type", || async {
        let m = scrape(port).await;
        for (name, labels, listings, offers) in &expected {
            let (l, o) = by_type(&m, name, labels);
            if l < *listings || o < *offers {
                return Err(format!(
                    "{name} {labels:?}: listings {l}, offers {o} (want {listings}, {offers})"
                ));
            }
        }
        Ok(m)
    })
    .await;
    for (name, labels, listings, offers) in expected {
        assert_eq!(
            by_type(&metrics, name, labels),
            (listings, offers),
            "{name} {labels:?} by event type"
        );
    }

    stop_consumer.cancel();
    stop_bridge.cancel();
    consumer
        .await
        .expect("consumer task")
        .expect("consumer stops cleanly");
    bridge
        .await
        .expect("bridge task")
        .expect("bridge stops cleanly");
    db.drop().await;
    vhost.drop().await;
    listings_index.drop().await;
    offers_index.drop().await;
}
