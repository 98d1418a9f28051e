//! Least privilege on the broker, against the real RabbitMQ and the other services: the
//! bridge and the consumer run with the users `scripts/stack` creates (`benalsam-bridge`,
//! `benalsam-consumer`), holding exactly the permissions `Topology::permissions` derives
//! (the file docker/ ships), on a vhost of the test's own; the whole path works, dead letters
//! and heartbeats included, and the consumer's user cannot publish an event.

mod support;

use std::time::{Duration, Instant};

use benalsam_events::bridge::{self, BridgeSettings};
use benalsam_events::consume::{DeadLetterQueue, ReplayReport};
use benalsam_events::consumer::{self, ConsumerSettings};
use benalsam_events::outbox::JobSelection;
use benalsam_events::publish::TopologyConfig;
use benalsam_events::{
    AmqpUrl, Envelope, EventType, OutboxConfig, Outcome, Settle, Topology, lapin,
};
use serde_json::json;
use support::{TestIndex, TestSchema, TestVhost, database_url, management, publish, search_url};
use tokio_util::sync::CancellationToken;

const PATIENCE: Duration = Duration::from_secs(90);
/// The password `scripts/stack` gives the component users.
const PASSWORD: &str = "benalsam123";

/// Gives `user` exactly `configure`, `write` and `read` on `vhost`; returns its URL there.
async fn grant(vhost: &TestVhost, user: &str, configure: &str, write: &str, read: &str) -> AmqpUrl {
    let (http, base, admin, password) = management();
    let granted = http
        .put(format!("{base}/api/permissions/{}/{user}", vhost.name))
        .basic_auth(&admin, Some(&password))
        .json(&json!({ "configure": configure, "write": write, "read": read }))
        .send()
        .await
        .expect("management API");
    assert!(
        granted.status().is_success(),
        "permissions of {user} (does scripts/stack create it?): {}",
        granted.status()
    );
    let mut url = vhost.url.url().clone();
    url.set_username(user).expect("user");
    url.set_password(Some(PASSWORD)).expect("password");
    url.as_str().parse().expect("url")
}

#[test]
fn the_shipped_permissions_are_the_ones_the_topology_derives() {
    let shipped: String = include_str!("../../docker/rabbitmq/permissions.tsv")
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(
        shipped,
        Topology::benalsam(&TopologyConfig::default()).permissions(),
        "docker/rabbitmq/permissions.tsv is stale: regenerate its lines with \
         `benalsam-bridge topology --permissions`"
    );
}

#[tokio::test]
async fn the_components_work_with_least_privilege_and_the_consumer_cannot_publish_events() {
    let (db, vhost, index) = (
        TestSchema::new().await,
        TestVhost::new().await,
        TestIndex::new().await,
    );
    let listings = index.event_type();
    let topology =
        Topology::for_event_types(std::slice::from_ref(&listings), &TopologyConfig::default());
    let permissions = topology.permissions();
    let mut urls = Vec::new();
    for line in permissions.lines() {
        let fields: Vec<&str> = line.split('\t').collect();
        urls.push(grant(&vhost, fields[0], fields[1], fields[2], fields[3]).await);
    }
    let (bridge_url, consumer_url) = (urls[0].clone(), urls[1].clone());

    let shutdown = CancellationToken::new();
    let mut bridge_settings = BridgeSettings::new(database_url(), bridge_url);
    bridge_settings.outbox = OutboxConfig::in_schema(&db.name);
    bridge_settings.event_types = vec![listings.clone()];
    bridge_settings.heartbeat_interval = Some(Duration::from_millis(200));
    let mut consumer_settings =
        ConsumerSettings::new(database_url(), consumer_url.clone(), search_url());
    consumer_settings.outbox = OutboxConfig::in_schema(&db.name);
    consumer_settings.event_types = vec![listings];
    consumer_settings.heartbeat_interval = Some(Duration::from_millis(200));
    let bridge = tokio::spawn(bridge::run(bridge_settings, shutdown.clone()));
    let consumer = tokio::spawn(consumer::run(consumer_settings, shutdown.clone()));

    let ids = db.insert_listings(5).await;
    // A forged message (published by the administrator), which the consumer dead-letters.
    let forged = Envelope::decode(
        json!({
            "messageId": "job_424242", "jobId": 424242, "schemaVersion": 1,
            "routingKey": "listing.insert", "table": "listings", "operation": "INSERT",
            "recordId": "nobody", "changeData": { "id": "nobody" },
            "occurredAt": "2026-11-28T00:00:00Z"
        })
        .to_string()
        .as_bytes(),
    )
    .expect("well-formed");
    let (started, mut forged_sent) = (Instant::now(), false);
    loop {
        let done = db.count("completed").await == 5;
        if done && !forged_sent {
            // The topology is declared by now: send the forgery, once.
            publish(&vhost.url, &forged)
                .await
                .expect("the administrator may publish");
            forged_sent = true;
        }
        let letters = benalsam_events::consume::DeadLetterQueue::new(
            vhost.url.clone(),
            "elasticsearch.sync.dlq",
        )
        .list(5)
        .await
        .map(|l| l.len())
        .unwrap_or(0);
        if done && letters == 1 {
            break;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "{} completed, {letters} dead letters",
            db.count("completed").await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut expected = ids;
    expected.sort();
    assert_eq!(index.search(json!({"match_all": {}})).await, expected);

    // Both heartbeats arrived, so both users may write to benalsam.system.
    let beats = support::drain_queue(&vhost.url, "system.health").await;
    let routing_keys: std::collections::BTreeSet<String> =
        beats.iter().map(|b| b.routing_key.to_string()).collect();
    assert!(
        routing_keys.contains("health.bridge") && routing_keys.contains("health.consumer"),
        "{routing_keys:?}"
    );

    // The consumer's user cannot publish an event.
    let refused = publish(&consumer_url, &forged).await.expect_err("refused");
    assert!(
        refused.contains("ACCESS_REFUSED") || refused.contains("403"),
        "{refused}"
    );

    shutdown.cancel();
    for task in [bridge, consumer] {
        tokio::time::timeout(PATIENCE, task)
            .await
            .expect("stops in time")
            .expect("no panic")
            .expect("ran without error");
    }
    db.drop().await;
    vhost.drop().await;
    index.drop().await;
}

#[tokio::test]
async fn the_compose_setup_script_loads_the_topology_and_grants_the_shipped_permissions() {
    let vhost = TestVhost::new().await;
    let dir = std::env::temp_dir().join(support::unique_name("setup"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docker/rabbitmq");
    for file in ["setup.sh", "permissions.tsv"] {
        std::fs::copy(shipped.join(file), dir.join(file)).expect("copy");
    }
    let definitions = Topology::benalsam(&TopologyConfig::default()).definitions(&vhost.name);
    std::fs::write(dir.join("definitions.json"), definitions.to_string()).expect("definitions");
    let (http, base, admin, password) = management();
    let run = std::process::Command::new("sh")
        .arg(dir.join("setup.sh"))
        .env("RABBITMQ_API", format!("{base}/api"))
        .env("RABBITMQ_ADMIN", format!("{admin}:{password}"))
        .env("RABBITMQ_VHOST", &vhost.name)
        .output()
        .expect("sh runs");
    assert!(
        run.status.success(),
        "{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    let queue = http
        .get(format!(
            "{base}/api/queues/{}/elasticsearch.sync",
            vhost.name
        ))
        .basic_auth(&admin, Some(&password))
        .send()
        .await
        .expect("management API");
    assert!(queue.status().is_success(), "the topology is loaded");
    for line in Topology::benalsam(&TopologyConfig::default())
        .permissions()
        .lines()
    {
        let fields: Vec<&str> = line.split('\t').collect();
        let granted: serde_json::Value = http
            .get(format!(
                "{base}/api/permissions/{}/{}",
                vhost.name, fields[0]
            ))
            .basic_auth(&admin, Some(&password))
            .send()
            .await
            .expect("management API")
            .json()
            .await
            .expect("JSON");
        assert_eq!(
            [&granted["configure"], &granted["write"], &granted["read"]],
            [fields[1], fields[2], fields[3]],
            "{}",
            fields[0]
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    vhost.drop().await;
}

/// Publishes `body` with `headers` to `exchange` as the user of `url`, confirmed.
async fn plant(
    url: &AmqpUrl,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    headers: &[(&str, lapin::types::AMQPValue)],
) {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    let connection = url.connect("planter").await.expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let mut table = lapin::types::FieldTable::default();
    for (key, value) in headers {
        table.insert((*key).into(), value.clone());
    }
    let confirm = channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions::default(),
            body,
            lapin::BasicProperties::default().with_headers(table),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert!(confirm.is_ack(), "{confirm:?}");
    let _ = connection.close(200, "ok".into()).await;
}

#[tokio::test]
async fn a_dead_letter_planted_by_the_consumers_user_is_never_replayed_into_another_exchange() {
    use lapin::types::{AMQPValue, LongString};
    let (db, vhost) = (TestSchema::new().await, TestVhost::new().await);
    let listings = EventType::listings();
    let inventory = EventType::new("inventory", "inventory_items");
    let event_types = vec![listings.clone(), inventory.clone()];
    let topology = Topology::for_event_types(&event_types, &TopologyConfig::default());
    let admin = vhost.url.connect("admin").await.expect("connect");
    topology.declare(&admin).await.expect("declare");
    let _ = admin.close(200, "ok".into()).await;
    let consumer_line = topology
        .permissions()
        .lines()
        .nth(1)
        .expect("consumer")
        .to_owned();
    let fields: Vec<&str> = consumer_line.split('\t').collect();
    let consumer_url = grant(&vhost, fields[0], fields[1], fields[2], fields[3]).await;

    // A real listing whose job the consumer dead-lettered: the operator will replay it.
    let id = db.insert_listings(1).await.remove(0);
    let outbox = db.outbox(OutboxConfig::default());
    let job = outbox.claim(1).await.expect("claim").remove(0);
    outbox
        .settle(&[(
            job.id,
            Outcome::DeadLettered {
                error: "mapper_parsing_exception".into(),
            },
        )])
        .await
        .expect("failed");

    // The consumer's user plants two letters naming that job and the inventory exchange:
    // an invented inventory change, and the listing with a spam title.
    let headers = |routing_key: &str| {
        vec![
            (
                "x-original-exchange",
                AMQPValue::LongString(LongString::from(inventory.exchange.as_str())),
            ),
            (
                "x-original-routing-key",
                AMQPValue::LongString(LongString::from(routing_key)),
            ),
            ("x-job-id", AMQPValue::LongLongInt(job.id)),
            (
                "x-dead-letter-kind",
                AMQPValue::LongString(LongString::from("rejected")),
            ),
        ]
    };
    let invented = json!({
        "messageId": format!("job_{}", job.id), "jobId": job.id, "schemaVersion": 1,
        "routingKey": "inventory.insert", "table": "inventory_items", "operation": "INSERT",
        "recordId": "SKU-1", "changeData": { "sku": "SKU-1", "name": "Sahte ürün" },
        "occurredAt": "2026-11-28T00:00:00Z"
    });
    let mut spam = Envelope::of(&job, &listings).to_bytes();
    spam = String::from_utf8(spam)
        .expect("utf-8")
        .replace("İlan 1", "Bedava telefon")
        .into_bytes();
    for (body, key) in [
        (invented.to_string().into_bytes(), "inventory.insert"),
        (spam, "inventory.update"),
    ] {
        plant(
            &consumer_url,
            &listings.dead_letter_exchange,
            key,
            &body,
            &headers(key),
        )
        .await;
    }
    let started = Instant::now();
    while DeadLetterQueue::new(vhost.url.clone(), &listings.dead_letter_queue)
        .list(10)
        .await
        .expect("dlq")
        .len()
        < 2
    {
        assert!(
            started.elapsed() < PATIENCE,
            "the planted letters are in the DLQ"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The administrator replays the job.
    let report = replay_job(
        &vhost,
        &db,
        &event_types,
        &listings.dead_letter_queue,
        job.id,
    )
    .await;
    let into_inventory = support::drain_queue(&vhost.url, &inventory.queue).await;
    assert!(
        into_inventory.is_empty(),
        "nothing reached the inventory exchange: {report:?}"
    );
    // The genuine job went where the configuration routes it, as the outbox has it; the
    // invented change was refused and left in the DLQ.
    let into_listings = support::drain_queue(&vhost.url, &listings.queue).await;
    assert_eq!(into_listings.len(), 1, "{report:?}");
    assert_eq!(into_listings[0].routing_key.as_str(), "listing.insert");
    let replayed = Envelope::decode(&into_listings[0].data).expect("an envelope");
    assert_eq!(replayed.change_data["title"], "İlan 1");
    assert_eq!(replayed.record_id, id);
    let left = DeadLetterQueue::new(vhost.url.clone(), &listings.dead_letter_queue)
        .list(10)
        .await
        .expect("dlq");
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(left[0].body.contains("inventory_items"), "{left:?}");
    assert_eq!(report.replayed, 1);
    assert_eq!(report.refused.len(), 1, "{report:?}");
    assert!(
        report.refused[0].reason.contains("inventory_items"),
        "the refusal says why: {report:?}"
    );
    db.drop().await;
    vhost.drop().await;
}

/// `dlq replay --job <job>` as the administrator.
async fn replay_job(
    vhost: &TestVhost,
    db: &TestSchema,
    event_types: &[EventType],
    queue: &str,
    job: i64,
) -> ReplayReport {
    DeadLetterQueue::new(vhost.url.clone(), queue)
        .replay(
            &db.outbox(OutboxConfig::default()),
            event_types,
            &JobSelection::Jobs(vec![job]),
            |_, _| {},
        )
        .await
        .expect("replay")
}
