//! Checks the consumer side against real RabbitMQ, Elasticsearch (OpenSearch) and PostgreSQL:
//! the index converges on the table whatever order or how often messages arrive, and no
//! outage, malformed message or rejected document loses a job or stalls the queue. Each test
//! has its own schema, virtual host and index alias.

mod support;

use std::time::{Duration, Instant};

use benalsam_events::consume::{self, DeadLetterQueue, IndexerStatus};
use benalsam_events::ops::Live;
use benalsam_events::outbox::JobSelection;
use benalsam_events::publish::TopologyConfig;
use benalsam_events::search::SearchNodes;
use benalsam_events::{Action, BuildError, DocumentBuilder};
use benalsam_events::{
    AmqpUrl, Backoff, Envelope, EventType, Indexer, IndexerConfig, Outbox, OutboxConfig, SearchUrl,
    Settle, Topology,
};
use lapin::options::BasicPublishOptions;
use serde_json::json;
use support::{
    Relay, TestIndex, TestSchema, TestVhost, amqp_list, dead_amqp, dead_search, publish,
    search_list, search_url, spawn_bridge, until,
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const PATIENCE: Duration = Duration::from_secs(90);
const DLQ: &str = "elasticsearch.sync.dlq";
const LISTINGS_EXCHANGE: &str = "benalsam.listings";

/// The bridge and the consumer, in-process, on the test's schema, vhost and index.
struct Pipeline {
    stop_bridge: CancellationToken,
    bridge: JoinHandle<Result<(), benalsam_events::Error>>,
    stop_consumer: CancellationToken,
    consumer: JoinHandle<()>,
    indexer: Live<IndexerStatus>,
}

impl Pipeline {
    fn start(db: &TestSchema, vhost: &TestVhost, index: &TestIndex, search: &SearchUrl) -> Self {
        Self::start_with(db, vhost, index, search, IndexerConfig::default())
    }

    fn start_with(
        db: &TestSchema,
        vhost: &TestVhost,
        index: &TestIndex,
        search: &SearchUrl,
        config: IndexerConfig,
    ) -> Self {
        Self::start_consuming_from(db, vhost, index, search, &vhost.url, config)
    }

    /// The bridge publishes to the vhost; the consumer consumes through `consume_from`
    /// (relays, a list of addresses).
    fn start_consuming_from(
        db: &TestSchema,
        vhost: &TestVhost,
        index: &TestIndex,
        search: &SearchUrl,
        consume_from: &AmqpUrl,
        config: IndexerConfig,
    ) -> Self {
        let (stop_bridge, bridge) = spawn_bridge(db, &vhost.url);
        let outbox = db.outbox(OutboxConfig::default());
        let indexer = consumer(consume_from, search, outbox, index, {
            let mut c = config;
            c.circuit = Backoff::new(Duration::from_millis(200), Duration::from_secs(1));
            c.retry = Backoff::new(Duration::from_millis(100), Duration::from_millis(500));
            c
        });
        let status = indexer.status();
        let stop_consumer = CancellationToken::new();
        let consumer = tokio::spawn(indexer.run(stop_consumer.clone()));
        Self {
            stop_bridge,
            bridge,
            stop_consumer,
            consumer,
            indexer: status,
        }
    }

    async fn stop(self) {
        self.stop_bridge.cancel();
        self.stop_consumer.cancel();
        let bridge = tokio::time::timeout(PATIENCE, self.bridge)
            .await
            .expect("bridge stops in time");
        bridge.expect("no panic").expect("bridge drained");
        tokio::time::timeout(PATIENCE, self.consumer)
            .await
            .expect("consumer stops in time")
            .expect("no panic");
    }
}

fn consumer(
    url: &AmqpUrl,
    search: &SearchUrl,
    outbox: Outbox,
    index: &TestIndex,
    config: IndexerConfig,
) -> Indexer {
    let nodes = SearchNodes::new(search, Duration::from_secs(10)).expect("a client per node");
    Indexer::new(url.clone(), nodes, outbox, vec![index.event_type()], config)
        .expect("valid settings")
}

async fn declare(vhost: &TestVhost) {
    let connection = vhost.url.connect("test").await.expect("connect");
    Topology::for_event_types(&[EventType::listings()], &TopologyConfig::default())
        .declare(&connection)
        .await
        .expect("declare");
    let _ = connection.close(200, "ok".into()).await;
}

async fn setup() -> (TestSchema, TestVhost, TestIndex) {
    let (db, vhost, index) = (
        TestSchema::new().await,
        TestVhost::new().await,
        TestIndex::new().await,
    );
    declare(&vhost).await;
    (db, vhost, index)
}

async fn teardown(db: TestSchema, vhost: TestVhost, index: TestIndex) {
    db.drop().await;
    vhost.drop().await;
    index.drop().await;
}

/// Waits until every job is completed or failed; returns (completed, failed).
async fn wait_done(db: &TestSchema) -> (usize, usize) {
    let started = Instant::now();
    loop {
        let statuses = db.statuses().await;
        let completed = statuses.iter().filter(|(_, s)| s == "completed").count();
        let failed = statuses.iter().filter(|(_, s)| s == "failed").count();
        if completed + failed == statuses.len() {
            return (completed, failed);
        }
        assert!(
            started.elapsed() < PATIENCE,
            "jobs did not finish: {completed} completed, {failed} failed of {}",
            statuses.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Ids of the listings that must be searchable: the searchable view of the table.
async fn searchable_ids(db: &TestSchema) -> Vec<String> {
    db.client
        .query(
            "SELECT id::text FROM listings WHERE status = 'active' ORDER BY 1",
            &[],
        )
        .await
        .expect("read listings")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test]
async fn every_kind_of_change_shows_up_in_the_index() {
    let (db, vhost, index) = setup().await;
    let pipeline = Pipeline::start(&db, &vhost, &index, &search_url());
    let ids = db.insert_listings(6).await;
    db.client
        .batch_execute(&format!(
            "UPDATE listings SET title = 'Kırmızı bisikletler', description = 'Yeni gibi' WHERE id = '{0}';
             UPDATE listings SET status = 'sold' WHERE id = '{1}';
             UPDATE listings SET status = 'draft' WHERE id = '{2}';
             UPDATE listings SET status = 'pending_approval' WHERE id = '{3}';
             UPDATE listings SET status = 'inactive' WHERE id = '{4}';
             UPDATE listings SET status = 'active' WHERE id = '{4}';
             DELETE FROM listings WHERE id = '{5}';
             INSERT INTO listings (user_id, title, category, status) VALUES (gen_random_uuid(), 'Taslak', 'x', 'draft');",
            ids[0], ids[1], ids[2], ids[3], ids[4], ids[5]
        ))
        .await
        .expect("changes");
    let (completed, failed) = wait_done(&db).await;
    pipeline.stop().await;
    assert_eq!((completed, failed), (14, 0));

    assert_eq!(
        index.search(json!({"match_all": {}})).await,
        searchable_ids(&db).await
    );
    assert_eq!(index.search(json!({"match_all": {}})).await, {
        let mut v = vec![ids[0].clone(), ids[4].clone()];
        v.sort();
        v
    });
    // The content edit is there, and found through Turkish stemming ("bisiklet" ~
    // "bisikletler"), which needs analysis-common; without it (built-in `standard` analysis),
    // through the word as written.
    let word = if support::has_analysis_common() {
        "bisiklet"
    } else {
        "bisikletler"
    };
    assert_eq!(
        index.search(json!({"match": {"search_text": word}})).await,
        vec![ids[0].clone()]
    );
    let doc = index.get(&ids[0]).await.expect("indexed");
    assert_eq!(doc["_source"]["description"], "Yeni gibi");
    teardown(db, vhost, index).await;
}

#[tokio::test]
async fn an_older_or_repeated_change_never_overwrites_a_newer_one() {
    let (db, vhost, index) = setup().await;
    let id = db.insert_listings(1).await.remove(0);
    db.client
        .batch_execute(&format!(
            "UPDATE listings SET title = 'En yeni başlık' WHERE id = '{id}'"
        ))
        .await
        .expect("edit");
    let outbox = db.outbox(OutboxConfig::default());
    let jobs = outbox.claim(10).await.expect("claim both jobs");
    assert_eq!(jobs.len(), 2);
    let envelopes: Vec<Envelope<'_>> = jobs
        .iter()
        .map(|j| Envelope::of(j, &EventType::listings()))
        .collect();
    // Newest first, then the older one, then the newest again.
    publish(&vhost.url, &envelopes[1]).await.expect("published");
    publish(&vhost.url, &envelopes[0]).await.expect("published");
    publish(&vhost.url, &envelopes[1]).await.expect("published");

    let indexer = consumer(
        &vhost.url,
        &search_url(),
        outbox,
        &index,
        IndexerConfig::default(),
    );
    let status = indexer.status();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(indexer.run(shutdown.clone()));
    let started = Instant::now();
    while status.snapshot().received < 3
        || status.snapshot().indexed + status.snapshot().superseded < 3
    {
        assert!(
            started.elapsed() < PATIENCE,
            "three deliveries handled: {:?}",
            status.snapshot()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shutdown.cancel();
    task.await.expect("no panic");

    let doc = index.get(&id).await.expect("indexed");
    assert_eq!(doc["_source"]["title"], "En yeni başlık");
    assert_eq!(
        doc["_version"], jobs[1].id,
        "the version is the newest job id"
    );
    assert_eq!(
        status.snapshot().superseded,
        2,
        "the older and the repeated one were refused as stale"
    );
    let (completed, failed) = wait_done(&db).await;
    assert_eq!((completed, failed), (2, 0));
    teardown(db, vhost, index).await;
}

#[tokio::test]
async fn an_elasticsearch_outage_fails_no_job_and_loses_nothing() {
    let (db, vhost, index) = setup().await;
    let (relay, relayed) = Relay::search().await;
    let pipeline = Pipeline::start(&db, &vhost, &index, &relayed);
    for _ in 0..3 {
        db.insert_listings(1000).await;
    }
    let live = &pipeline.indexer;
    until(
        "indexing starts",
        || live.snapshot().indexed >= 200,
        || live.snapshot(),
    )
    .await;
    relay.set_up(false); // Elasticsearch goes away mid-run
    until(
        "the circuit opens",
        || live.snapshot().circuit_open_since.is_some(),
        || live.snapshot(),
    )
    .await;
    let during = pipeline.indexer.snapshot();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = pipeline.indexer.snapshot();
    assert!(
        after.bulk_requests - during.bulk_requests <= 10,
        "probes back off, no hot loop: {}",
        after.bulk_requests - during.bulk_requests
    );
    assert!(
        db.statuses().await.iter().all(|(_, s)| s != "failed"),
        "an outage fails no job"
    );
    relay.set_up(true);

    let (completed, failed) = wait_done(&db).await;
    pipeline.stop().await;
    assert_eq!((completed, failed), (3000, 0));
    assert_eq!(index.search(json!({"match_all": {}})).await.len(), 3000);
    assert!(
        DeadLetterQueue::new(vhost.url.clone(), DLQ)
            .list(10)
            .await
            .expect("dlq")
            .is_empty()
    );
    teardown(db, vhost, index).await;
}

#[tokio::test]
async fn answers_slower_than_the_target_shrink_the_requests_and_every_job_still_completes() {
    let (db, vhost, index) = setup().await;
    // Every answer is slower than a nanosecond: each one shrinks the next requests by a
    // quarter, 100 → 75 → 56 → … → the floor of 10 after eight answers. 600 jobs need more
    // requests than that, whatever the batches' timing.
    let mut config = IndexerConfig::default();
    config.batch_size = 100;
    config.bulk_target = Duration::from_nanos(1);
    let pipeline = Pipeline::start_with(&db, &vhost, &index, &search_url(), config);
    assert_eq!(
        pipeline.indexer.snapshot().bulk_limit,
        100,
        "starts at the configured size"
    );
    db.insert_listings(600).await;
    let (completed, failed) = wait_done(&db).await;
    let status = pipeline.indexer.snapshot();
    pipeline.stop().await;
    assert_eq!((completed, failed), (600, 0));
    assert_eq!(status.bulk_limit, 10, "shrunk to the floor: {status:?}");
    assert!(status.bulk_requests >= 9, "{status:?}");
    assert_eq!(index.search(json!({"match_all": {}})).await.len(), 600);
    teardown(db, vhost, index).await;
}

#[tokio::test]
async fn a_malformed_message_is_dead_lettered_with_its_reason_and_the_rest_goes_on() {
    let (db, vhost, index) = setup().await;
    let connection = vhost.url.connect("test").await.expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    for body in [&b"{not json"[..], br#"{"schemaVersion": 1, "jobId": 5}"#] {
        channel
            .basic_publish(
                LISTINGS_EXCHANGE.into(),
                "listing.insert".into(),
                BasicPublishOptions::default(),
                body,
                Default::default(),
            )
            .await
            .expect("publish")
            .await
            .expect("sent");
    }
    let pipeline = Pipeline::start(&db, &vhost, &index, &search_url());
    db.insert_listings(5).await;
    let (completed, failed) = wait_done(&db).await;
    pipeline.stop().await;
    assert_eq!((completed, failed), (5, 0), "valid jobs went through");

    let letters = DeadLetterQueue::new(vhost.url.clone(), DLQ)
        .list(10)
        .await
        .expect("dlq");
    assert_eq!(letters.len(), 2, "{letters:?}");
    assert!(
        letters
            .iter()
            .all(|l| l.kind.as_deref() == Some("malformed"))
    );
    assert!(
        letters[0]
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("not a valid envelope"),
        "{letters:?}"
    );
    assert!(
        letters[1]
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("missing field"),
        "{letters:?}"
    );
    assert_eq!(letters[0].routing_key, "listing.insert");
    teardown(db, vhost, index).await;
}

#[tokio::test]
async fn a_forged_ten_mib_delivery_is_dead_lettered_unread_naming_the_limit() {
    let (db, vhost, index) = setup().await;
    let connection = vhost.url.connect("test").await.expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    // A well-formed envelope, but 10 MiB: over the consumer's limit (1 MiB by default).
    let mut huge = forged(1, "huge");
    huge.change_data = std::borrow::Cow::Owned(
        json!({ "id": "huge", "description": "x".repeat(10 * 1024 * 1024) }),
    );
    channel
        .basic_publish(
            LISTINGS_EXCHANGE.into(),
            "listing.insert".into(),
            BasicPublishOptions::default(),
            &huge.to_bytes(),
            Default::default(),
        )
        .await
        .expect("publish")
        .await
        .expect("sent");
    let pipeline = Pipeline::start(&db, &vhost, &index, &search_url());
    db.insert_listings(5).await;
    let (completed, failed) = wait_done(&db).await;
    assert_eq!((completed, failed), (5, 0), "the consumer kept going");
    let started = Instant::now();
    let letters = loop {
        let letters = DeadLetterQueue::new(vhost.url.clone(), DLQ)
            .list(10)
            .await
            .expect("dlq");
        if !letters.is_empty() {
            break letters;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "the oversized delivery is dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    pipeline.stop().await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    let reason = letters[0].reason.as_deref().unwrap_or("");
    assert_eq!(letters[0].kind.as_deref(), Some("malformed"), "{reason}");
    assert!(
        reason.contains("1048576-byte limit") && reason.contains("BENALSAM_MAX_MESSAGE_BYTES"),
        "{reason}"
    );
    assert!(index.get("huge").await.is_none());
    teardown(db, vhost, index).await;
}

#[tokio::test]
async fn a_rejected_document_fails_alone_and_completes_when_replayed_after_the_fix() {
    let (db, vhost, index) = setup().await;
    // Room for no new field: a listing bringing a new attribute is refused by the index.
    index
        .put_settings(json!({"index.mapping.total_fields.limit": 1}))
        .await;
    let pipeline = Pipeline::start(&db, &vhost, &index, &search_url());
    let ids = db.insert_listings(10).await;
    let odd = db
        .client
        .query_one(
            "INSERT INTO listings (user_id, title, category, status, attributes)
             VALUES (gen_random_uuid(), 'Garip', 'x', 'active', '{\"yeni_alan\": \"değer\", \"başka\": 1}')
             RETURNING id::text",
            &[],
        )
        .await
        .expect("odd listing")
        .get::<_, String>(0);
    let (completed, failed) = wait_done(&db).await;
    assert_eq!((completed, failed), (10, 1), "only the odd one failed");
    let error: String = db
        .client
        .query_one(
            "SELECT error_message FROM elasticsearch_sync_queue WHERE status = 'failed'",
            &[],
        )
        .await
        .expect("failed job")
        .get(0);
    assert!(
        error.contains("Limit of total fields"),
        "a clear error: {error}"
    );
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(index.search(json!({"match_all": {}})).await, expected);

    // The operator fixes the cause and replays the message.
    index
        .put_settings(json!({"index.mapping.total_fields.limit": 1000}))
        .await;
    let letters = DeadLetterQueue::new(vhost.url.clone(), DLQ)
        .list(10)
        .await
        .expect("dlq");
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].kind.as_deref(), Some("rejected"));
    let job = letters[0].job_id.expect("job id");
    let report = DeadLetterQueue::new(vhost.url.clone(), DLQ)
        .replay(
            &db.outbox(OutboxConfig::default()),
            &[index.event_type()],
            &JobSelection::Jobs(vec![job]),
            |_, _| {},
        )
        .await
        .expect("replay");
    assert_eq!(report.replayed, 1);
    let started = Instant::now();
    while db.statuses().await.iter().any(|(_, s)| s != "completed") {
        assert!(started.elapsed() < PATIENCE, "the replayed job completes");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    pipeline.stop().await;
    assert!(index.get(&odd).await.is_some());
    teardown(db, vhost, index).await;
}

/// Listings, except that a title containing "UZUN" gets a document id too long for the index.
#[derive(Debug)]
struct LongIds(EventType);

impl DocumentBuilder for LongIds {
    fn build(&self, envelope: &Envelope<'_>) -> Result<Action, BuildError> {
        let action = self.0.action(envelope)?;
        match action {
            Action::Index {
                index, document, ..
            } if document["title"]
                .as_str()
                .is_some_and(|t| t.contains("UZUN")) =>
            {
                Ok(Action::Index {
                    index,
                    id: "x".repeat(600),
                    document,
                })
            }
            other => Ok(other),
        }
    }
}

#[tokio::test]
async fn a_request_refused_as_a_whole_is_split_and_only_the_culprit_fails() {
    let (db, vhost, index) = setup().await;
    let (stop_bridge, bridge) = spawn_bridge(&db, &vhost.url);
    let client = search_url()
        .client(Duration::from_secs(10))
        .expect("client");
    let indexer = Indexer::new(
        vhost.url.clone(),
        client,
        db.outbox(OutboxConfig::default()),
        vec![index.event_type().with_builder(
            LongIds(index.event_type()),
            index.event_type().document.properties(),
        )],
        {
            let mut c = IndexerConfig::default();
            c.linger = Duration::from_millis(500);
            c
        },
    )
    .expect("valid settings");
    let stop = CancellationToken::new();
    let consumer = tokio::spawn(indexer.run(stop.clone()));
    let mut ids = db.insert_listings(5).await;
    db.client
        .batch_execute("INSERT INTO listings (user_id, title, category, status) VALUES (gen_random_uuid(), 'UZUN kimlik', 'x', 'active')")
        .await
        .expect("the odd one");
    let (completed, failed) = wait_done(&db).await;
    stop_bridge.cancel();
    stop.cancel();
    bridge.await.expect("no panic").expect("drained");
    consumer.await.expect("no panic");
    assert_eq!(
        (completed, failed),
        (5, 1),
        "the queue went on; only the culprit failed"
    );
    ids.sort();
    assert_eq!(index.search(json!({"match_all": {}})).await, ids);
    let letters = DeadLetterQueue::new(vhost.url.clone(), DLQ)
        .list(5)
        .await
        .expect("dlq");
    assert_eq!(letters.len(), 1);
    assert!(
        letters[0]
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("bulk request answered 400"),
        "{letters:?}"
    );
    teardown(db, vhost, index).await;
}

/// Waits until no job is `pending` or `processing`: everything published.
async fn wait_published(db: &TestSchema) {
    let started = Instant::now();
    while db.count("pending").await + db.count("processing").await > 0 {
        assert!(
            started.elapsed() < PATIENCE,
            "the bridge publishes every job"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Rows written, a TRUNCATE, rows written after it; all published before the consumer
/// starts, and delivered to it in `order` (the queue's order, or reversed). The index must
/// end with exactly the rows written after the truncate.
async fn truncate_with_older_messages_in_flight(reverse: bool) {
    let (db, vhost, index) = setup().await;
    let (stop_bridge, bridge) = spawn_bridge(&db, &vhost.url);
    let older = db.insert_listings(20).await;
    db.client
        .batch_execute(&format!(
            "UPDATE listings SET title = 'Eski düzenleme' WHERE id = '{}'",
            older[0]
        ))
        .await
        .expect("an older edit");
    wait_published(&db).await;
    db.client
        .batch_execute("TRUNCATE listings")
        .await
        .expect("truncate");
    let mut newer = db.insert_listings(5).await;
    db.client
        .batch_execute(&format!(
            "UPDATE listings SET status = 'sold' WHERE id = '{}'",
            newer[0]
        ))
        .await
        .expect("a newer status change");
    wait_published(&db).await;
    stop_bridge.cancel();
    bridge.await.expect("no panic").expect("drained");

    // 21 older messages, the truncation, 6 newer ones: delivered in the chosen order.
    let mut deliveries = support::drain_queue(&vhost.url, "elasticsearch.sync").await;
    assert_eq!(deliveries.len(), 28);
    if reverse {
        deliveries.reverse();
    }
    let connection = vhost.url.connect("test replay").await.expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    for delivery in &deliveries {
        channel
            .basic_publish(
                LISTINGS_EXCHANGE.into(),
                delivery.routing_key.as_str().into(),
                BasicPublishOptions::default(),
                &delivery.data,
                delivery.properties.clone(),
            )
            .await
            .expect("publish")
            .await
            .expect("sent");
    }
    let _ = connection.close(200, "ok".into()).await;

    let outbox = db.outbox(OutboxConfig::default());
    let indexer = consumer(
        &vhost.url,
        &search_url(),
        outbox,
        &index,
        IndexerConfig::default(),
    );
    let stop = CancellationToken::new();
    let running = tokio::spawn(indexer.run(stop.clone()));
    let (completed, failed) = wait_done(&db).await;
    stop.cancel();
    running.await.expect("no panic");
    assert_eq!((completed, failed), (28, 0), "every job completed");
    newer.remove(0); // sold: not searchable
    newer.sort();
    assert_eq!(
        index.search(json!({"match_all": {}})).await,
        newer,
        "exactly the searchable rows written after the truncate"
    );
    assert_eq!(
        index.search(json!({"match_all": {}})).await,
        searchable_ids(&db).await
    );
    teardown(db, vhost, index).await;
}

#[tokio::test]
async fn after_a_truncate_the_index_holds_exactly_the_newer_rows_in_queue_order() {
    truncate_with_older_messages_in_flight(false).await;
}

#[tokio::test]
async fn after_a_truncate_the_index_holds_exactly_the_newer_rows_when_older_messages_come_last() {
    truncate_with_older_messages_in_flight(true).await;
}

#[tokio::test]
async fn a_key_change_moves_the_document_to_the_new_key() {
    let (db, vhost, index) = setup().await;
    let pipeline = Pipeline::start(&db, &vhost, &index, &search_url());
    let ids = db.insert_listings(2).await;
    let renamed: String = db
        .client
        .query_one(
            "UPDATE listings SET id = gen_random_uuid(), title = 'Yeni anahtar' WHERE id::text = $1
             RETURNING id::text",
            &[&ids[0]],
        )
        .await
        .expect("a key change")
        .get(0);
    let (completed, failed) = wait_done(&db).await;
    pipeline.stop().await;
    assert_eq!(
        (completed, failed),
        (4, 0),
        "two inserts, the old key's delete, the new key's insert"
    );
    let mut expected = vec![renamed.clone(), ids[1].clone()];
    expected.sort();
    assert_eq!(index.search(json!({"match_all": {}})).await, expected);
    assert!(
        index.get(&ids[0]).await.is_none(),
        "the old key left the index"
    );
    let doc = index.get(&renamed).await.expect("the new key is indexed");
    assert_eq!(doc["_source"]["title"], "Yeni anahtar");
    teardown(db, vhost, index).await;
}

/// A well-formed envelope for `job` and `record`, as any client with write access to the
/// exchange could publish it.
fn forged(job: i64, record: &str) -> Envelope<'static> {
    let body = json!({
        "messageId": format!("job_{job}"), "jobId": job, "schemaVersion": 1,
        "routingKey": "listing.insert", "table": "listings", "operation": "INSERT",
        "recordId": record,
        "changeData": { "id": record, "title": "Sahte ilan", "status": "active",
                        "user_id": "00000000-0000-0000-0000-000000000000", "category": "x" },
        "occurredAt": "2026-11-28T00:00:00Z"
    });
    Envelope::decode(body.to_string().as_bytes()).expect("well-formed")
}

#[tokio::test]
async fn forged_messages_are_dead_lettered_and_touch_neither_the_index_nor_any_job() {
    let (db, vhost, index) = setup().await;
    let outbox = db.outbox(OutboxConfig::default());
    let indexer = consumer(
        &vhost.url,
        &search_url(),
        outbox,
        &index,
        IndexerConfig::default(),
    );
    let stop = CancellationToken::new();
    let running = tokio::spawn(indexer.run(stop.clone()));
    // A real listing whose job waits for the bridge (not running yet).
    let real = db.insert_listings(1).await.remove(0);
    let (pending_job,) = (db.statuses().await[0].0,);

    // A job id from the future for the real listing (it would freeze its document); the
    // pending job's id with another record (it would complete a job never published); an
    // invented job for a listing that does not exist.
    for envelope in [
        forged(9_000_000_000_000_000_000, &real),
        forged(pending_job, "someone-else"),
        forged(777_777, "ghost"),
    ] {
        publish(&vhost.url, &envelope).await.expect("published");
    }
    let started = Instant::now();
    let letters = loop {
        let letters = DeadLetterQueue::new(vhost.url.clone(), DLQ)
            .list(10)
            .await
            .expect("dlq");
        if letters.len() == 3 {
            break letters;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "three dead letters: {letters:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for letter in &letters {
        assert_eq!(letter.kind.as_deref(), Some("unverified"), "{letter:?}");
        assert!(
            letter
                .reason
                .as_deref()
                .unwrap_or("")
                .contains("unknown or mismatched job"),
            "{letter:?}"
        );
    }
    assert_eq!(
        db.statuses().await,
        vec![(pending_job, "pending".to_owned())]
    );
    assert!(index.search(json!({"match_all": {}})).await.is_empty());

    // The real changes go through as if nothing happened, the later edit included.
    let (stop_bridge, bridge) = spawn_bridge(&db, &vhost.url);
    wait_done(&db).await;
    db.client
        .batch_execute(&format!(
            "UPDATE listings SET title = 'Gerçek başlık' WHERE id = '{real}'"
        ))
        .await
        .expect("a real edit");
    let (completed, failed) = wait_done(&db).await;
    stop_bridge.cancel();
    stop.cancel();
    bridge.await.expect("no panic").expect("drained");
    running.await.expect("no panic");
    assert_eq!((completed, failed), (2, 0));
    assert_eq!(
        index.search(json!({"match_all": {}})).await,
        vec![real.clone()]
    );
    let doc = index.get(&real).await.expect("indexed");
    assert_eq!(
        doc["_source"]["title"], "Gerçek başlık",
        "not frozen by the forged job id"
    );
    teardown(db, vhost, index).await;
}

/// The title forgeries give a listing, to look for in the index.
const SPAM: &str = "Bedava telefon, hemen tıkla";

/// An UPDATE of `record` under `job` that approves it with a spam title: well-formed, as a
/// client with write on the exchange (the bridge's own user suffices) could publish it.
fn forged_approval(job: i64, record: &str) -> Envelope<'static> {
    let row = |title: &str, status: &str| {
        json!({ "id": record, "title": title, "status": status, "description": "",
                "user_id": "00000000-0000-0000-0000-000000000000", "category": "elektronik" })
    };
    let body = json!({
        "messageId": format!("job_{job}"), "jobId": job, "schemaVersion": 1,
        "routingKey": "listing.status.active", "table": "listings", "operation": "UPDATE",
        "recordId": record,
        "changeData": { "old": row("Onay bekliyor", "pending_approval"), "new": row(SPAM, "active") },
        "status": "active", "previousStatus": "pending_approval",
        "occurredAt": "2026-11-28T00:00:00Z"
    });
    Envelope::decode(body.to_string().as_bytes()).expect("well-formed")
}

/// A listing waiting for approval, as the application writes it; its id.
async fn insert_pending_listing(db: &TestSchema) -> String {
    db.client
        .query_one(
            "INSERT INTO listings (user_id, title, category, status)
             VALUES (gen_random_uuid(), 'Onay bekliyor', 'elektronik', 'pending_approval')
             RETURNING id::text",
            &[],
        )
        .await
        .expect("a pending listing")
        .get(0)
}

/// The application's edit of one listing.
async fn edit(db: &TestSchema, id: &str, set: &str) {
    db.client
        .batch_execute(&format!("UPDATE listings SET {set} WHERE id = '{id}'"))
        .await
        .expect("an edit");
}

/// The newest job id so far.
async fn last_job(db: &TestSchema) -> i64 {
    db.client
        .query_one(
            "SELECT coalesce(max(id), 0) FROM elasticsearch_sync_queue",
            &[],
        )
        .await
        .expect("last job")
        .get(0)
}

/// Waits until `job` is in `status`.
async fn wait_status(db: &TestSchema, job: i64, status: &str) {
    let started = Instant::now();
    loop {
        let statuses = db.statuses().await;
        if statuses.iter().any(|(id, s)| *id == job && s == status) {
            return;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "job {job} never became {status}: {statuses:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The title and status the index holds for `id`, `None` without a document.
async fn indexed(index: &TestIndex, id: &str) -> Option<(String, String)> {
    let doc = index.get(id).await?;
    let field = |name: &str| doc["_source"][name].as_str().unwrap_or("").to_owned();
    Some((field("title"), field("status")))
}

#[tokio::test]
async fn forgeries_queued_ahead_for_the_next_job_ids_index_only_what_the_outbox_has() {
    let (db, vhost, index) = setup().await;
    let (stop_bridge, bridge) = spawn_bridge(&db, &vhost.url);
    let id = insert_pending_listing(&db).await;
    wait_published(&db).await;
    // While the consumer lags, forged approvals for the next three job ids wait in the queue
    // ahead of anything real.
    let next = last_job(&db).await + 1;
    for job in next..next + 3 {
        publish(&vhost.url, &forged_approval(job, &id))
            .await
            .expect("published");
    }
    // The application's next edits get those ids: a new title (still waiting for
    // approval), then the approval.
    edit(&db, &id, "title = 'Gerçek başlık'").await;
    edit(&db, &id, "status = 'active'").await;
    assert_eq!(
        last_job(&db).await,
        next + 1,
        "the edits got the forged ids"
    );
    wait_published(&db).await;

    let indexer = consumer(
        &vhost.url,
        &search_url(),
        db.outbox(OutboxConfig::default()),
        &index,
        IndexerConfig::default(),
    );
    let stop = CancellationToken::new();
    let running = tokio::spawn(indexer.run(stop.clone()));
    assert_eq!(wait_done(&db).await, (3, 0));
    // The forgery for a job id nobody has yet is dead-lettered as unknown.
    let letters = eventually_letters(&vhost, 1).await;
    assert_eq!(
        letters[0].kind.as_deref(),
        Some("unverified"),
        "{letters:?}"
    );
    stop_bridge.cancel();
    stop.cancel();
    bridge.await.expect("no panic").expect("drained");
    running.await.expect("no panic");
    assert_eq!(
        indexed(&index, &id).await,
        Some(("Gerçek başlık".to_owned(), "active".to_owned())),
        "the index holds the row as the application wrote it, not the forgery"
    );
    teardown(db, vhost, index).await;
}

/// Waits until the DLQ holds `n` letters; returns them.
async fn eventually_letters(vhost: &TestVhost, n: usize) -> Vec<consume::DeadLetter> {
    let started = Instant::now();
    loop {
        let letters = DeadLetterQueue::new(vhost.url.clone(), DLQ)
            .list(n + 10)
            .await
            .expect("dlq");
        if letters.len() >= n {
            return letters;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "{n} dead letters: {letters:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_forged_copy_delivered_before_the_genuine_one_indexes_the_outbox_content() {
    let (db, vhost, index) = setup().await;
    let indexer = consumer(
        &vhost.url,
        &search_url(),
        db.outbox(OutboxConfig::default()),
        &index,
        IndexerConfig::default(),
    );
    let stop = CancellationToken::new();
    let running = tokio::spawn(indexer.run(stop.clone()));
    let id = insert_pending_listing(&db).await;
    edit(&db, &id, "status = 'active'").await;
    // A bridge's claim: both jobs are in flight (`processing`), their messages not yet
    // published when the forgeries come.
    let outbox = db.outbox(OutboxConfig::default());
    let jobs = outbox.claim(10).await.expect("claim");
    assert_eq!(jobs.len(), 2);
    let approval = jobs[1].id;
    publish(&vhost.url, &forged_approval(approval, &id))
        .await
        .expect("published");
    wait_status(&db, approval, "completed").await;
    // Then the genuine messages, as the bridge publishes them, and more forgeries.
    for job in &jobs {
        publish(&vhost.url, &Envelope::of(job, &EventType::listings()))
            .await
            .expect("published");
    }
    outbox
        .settle(&support::reports(
            &jobs.iter().map(|j| j.id).collect::<Vec<_>>(),
            benalsam_events::Outcome::Sent,
        ))
        .await
        .expect("sent");
    publish(&vhost.url, &forged_approval(approval, &id))
        .await
        .expect("published");
    assert_eq!(wait_done(&db).await, (2, 0));
    assert_eq!(
        indexed(&index, &id).await,
        Some(("Onay bekliyor".to_owned(), "active".to_owned())),
        "the index holds the row as the application wrote it, not the forgery"
    );

    // A job whose publish failed for good is not completed with invented content either.
    edit(&db, &id, "title = 'Yeni başlık'").await;
    let failed = outbox.claim(10).await.expect("claim").remove(0).id;
    outbox
        .settle(&[(
            failed,
            benalsam_events::Outcome::Failed {
                error: "refused".to_owned(),
                retry: false,
            },
        )])
        .await
        .expect("failed");
    wait_status(&db, failed, "failed").await;
    let mut forged = forged_approval(failed, &id);
    forged.routing_key = "listing.update".into();
    publish(&vhost.url, &forged).await.expect("published");
    wait_status(&db, failed, "completed").await;
    stop.cancel();
    running.await.expect("no panic");
    assert_eq!(
        indexed(&index, &id).await,
        Some(("Yeni başlık".to_owned(), "active".to_owned())),
        "a failed job's forgery indexes the outbox's row"
    );
    teardown(db, vhost, index).await;
}

#[tokio::test]
async fn a_genuine_message_taken_from_the_queue_and_replaced_by_a_forgery_indexes_the_outbox_content()
 {
    let (db, vhost, index) = setup().await;
    let (stop_bridge, bridge) = spawn_bridge(&db, &vhost.url);
    let id = insert_pending_listing(&db).await;
    edit(&db, &id, "status = 'active'").await;
    wait_published(&db).await;
    stop_bridge.cancel();
    bridge.await.expect("no panic").expect("drained");
    // Someone who may consume the queue takes the genuine messages and puts a forgery in
    // the approval's place.
    let taken = support::drain_queue(&vhost.url, "elasticsearch.sync").await;
    assert_eq!(taken.len(), 2);
    let approval = last_job(&db).await;
    publish(&vhost.url, &forged_approval(approval, &id))
        .await
        .expect("published");

    let indexer = consumer(
        &vhost.url,
        &search_url(),
        db.outbox(OutboxConfig::default()),
        &index,
        IndexerConfig::default(),
    );
    let stop = CancellationToken::new();
    let running = tokio::spawn(indexer.run(stop.clone()));
    wait_status(&db, approval, "completed").await;
    assert_eq!(
        indexed(&index, &id).await,
        Some(("Onay bekliyor".to_owned(), "active".to_owned())),
        "the index holds the row as the application wrote it, not the forgery"
    );
    // The stolen insert is only late: the resender (here without its wait) publishes it
    // again, and it completes.
    let outbox = db.outbox(OutboxConfig::default());
    let resent = outbox
        .resend_stale_sent(Duration::ZERO, 10)
        .await
        .expect("resend");
    assert_eq!(resent, vec![approval - 1]);
    let (stop_bridge, bridge) = spawn_bridge(&db, &vhost.url);
    assert_eq!(wait_done(&db).await, (2, 0));
    stop_bridge.cancel();
    stop.cancel();
    bridge.await.expect("no panic").expect("drained");
    running.await.expect("no panic");
    teardown(db, vhost, index).await;
}

#[tokio::test]
async fn a_dead_first_broker_address_is_passed_over_for_the_next() {
    let (db, vhost, index) = setup().await;
    let listed = amqp_list(&[&dead_amqp(&vhost.url), &vhost.url]);
    let pipeline = Pipeline::start_consuming_from(
        &db,
        &vhost,
        &index,
        &search_url(),
        &listed,
        IndexerConfig::default(),
    );
    db.insert_listings(20).await;
    assert_eq!(wait_done(&db).await, (20, 0));
    let snapshot = pipeline.indexer.snapshot();
    assert!(snapshot.connected, "{snapshot:?}");
    assert_eq!(snapshot.broker, Some(vhost.url.redacted()), "{snapshot:?}");
    pipeline.stop().await;
    teardown(db, vhost, index).await;
}

#[tokio::test]
async fn losing_one_broker_node_moves_the_consumer_to_the_next_and_every_job_completes() {
    let (db, vhost, index) = setup().await;
    // Two relays to the one broker stand for two nodes of a cluster.
    let (first, first_url) = Relay::amqp(&vhost.url).await;
    let (_second, second_url) = Relay::amqp(&vhost.url).await;
    let pipeline = Pipeline::start_consuming_from(
        &db,
        &vhost,
        &index,
        &search_url(),
        &amqp_list(&[&first_url, &second_url]),
        IndexerConfig::default(),
    );
    let status = pipeline.indexer.clone();

    db.insert_listings(2000).await;
    until(
        "consuming goes on",
        || status.snapshot().received >= 200,
        || status.snapshot(),
    )
    .await;
    assert_eq!(status.snapshot().broker, Some(first_url.redacted()));
    // The first node goes away for good; deliveries it handed over without an ack come
    // again through the second.
    first.set_up(false);
    assert_eq!(wait_done(&db).await, (2000, 0));
    // Every job may be done before the loss is noticed: wait for the move itself.
    let moved = Some(second_url.redacted());
    until(
        "the consumer moves to the second broker",
        || status.snapshot().broker == moved,
        || status.snapshot(),
    )
    .await;
    pipeline.stop().await;
    teardown(db, vhost, index).await;
}

/// Every job completed, none failed, the DLQ empty, and the index holding exactly the
/// searchable rows, each with the title the table has now.
async fn assert_index_matches_the_table(db: &TestSchema, vhost: &TestVhost, index: &TestIndex) {
    let statuses = db.statuses().await;
    assert!(
        statuses.iter().all(|(_, s)| s == "completed"),
        "every job completed: {} of {}",
        statuses.iter().filter(|(_, s)| s == "completed").count(),
        statuses.len()
    );
    let titles: std::collections::BTreeMap<String, String> = db
        .client
        .query(
            "SELECT id::text, title FROM listings WHERE status = 'active'",
            &[],
        )
        .await
        .expect("read listings")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let documents = index.documents().await;
    assert_eq!(
        documents.keys().collect::<Vec<_>>(),
        titles.keys().collect::<Vec<_>>(),
        "the index holds exactly the searchable rows"
    );
    for (id, title) in &titles {
        assert_eq!(
            documents[id]["title"], *title,
            "document {id} has the row's title"
        );
    }
    assert!(
        DeadLetterQueue::new(vhost.url.clone(), DLQ)
            .list(10)
            .await
            .expect("dlq")
            .is_empty()
    );
}

#[tokio::test]
async fn a_dead_first_search_node_is_passed_over_for_the_next() {
    let (db, vhost, index) = setup().await;
    let listed = search_list(&[&dead_search(), &search_url()]);
    let pipeline = Pipeline::start(&db, &vhost, &index, &listed);
    db.insert_listings(300).await;
    assert_eq!(wait_done(&db).await, (300, 0));
    let status = pipeline.indexer.snapshot();
    pipeline.stop().await;
    assert_eq!(
        status.search_node,
        Some(search_url().redacted()),
        "{status:?}"
    );
    assert_eq!(
        (status.circuit_failures, status.errors),
        (0, 0),
        "the dead node was passed over, the cluster never counted down: {status:?}"
    );
    assert_index_matches_the_table(&db, &vhost, &index).await;
    teardown(db, vhost, index).await;
}

#[tokio::test]
async fn losing_one_search_node_mid_stream_moves_the_consumer_to_the_next_and_every_job_completes()
{
    let (db, vhost, index) = setup().await;
    // Two relays to the one search node stand for two nodes of a cluster.
    let (first, first_url) = Relay::search().await;
    let (_second, second_url) = Relay::search().await;
    let pipeline = Pipeline::start(
        &db,
        &vhost,
        &index,
        &search_list(&[&first_url, &second_url]),
    );
    let status = pipeline.indexer.clone();
    for _ in 0..3 {
        db.insert_listings(1000).await;
    }
    until(
        "indexing starts on the first node",
        || status.snapshot().indexed >= 300,
        || status.snapshot(),
    )
    .await;
    assert_eq!(status.snapshot().search_node, Some(first_url.redacted()));
    // The first node goes away for good, requests in flight included; then every listing
    // changes, so documents written through the first node are rewritten through the second.
    drop(first);
    db.client
        .execute("UPDATE listings SET title = title || ' (yeni)'", &[])
        .await
        .expect("update every listing");
    assert_eq!(wait_done(&db).await, (6000, 0));
    let after = status.snapshot();
    pipeline.stop().await;
    assert_eq!(after.search_node, Some(second_url.redacted()), "{after:?}");
    assert_eq!(
        (after.circuit_failures, after.errors),
        (0, 0),
        "the second node took over within the requests: the circuit never opened: {after:?}"
    );
    assert_index_matches_the_table(&db, &vhost, &index).await;
    teardown(db, vhost, index).await;
}

#[tokio::test]
async fn with_every_search_node_down_the_circuit_opens_and_one_node_back_closes_it() {
    let (db, vhost, index) = setup().await;
    let (first, first_url) = Relay::search().await;
    let (second, second_url) = Relay::search().await;
    let pipeline = Pipeline::start(
        &db,
        &vhost,
        &index,
        &search_list(&[&first_url, &second_url]),
    );
    let status = pipeline.indexer.clone();
    db.insert_listings(1000).await;
    until(
        "indexing starts",
        || status.snapshot().indexed >= 100,
        || status.snapshot(),
    )
    .await;
    first.set_up(false);
    second.set_up(false);
    until(
        "the circuit opens once every node failed",
        || status.snapshot().circuit_open_since.is_some(),
        || status.snapshot(),
    )
    .await;
    // More work arrives while the cluster is away.
    db.insert_listings(1000).await;
    assert!(
        db.statuses().await.iter().all(|(_, s)| s != "failed"),
        "an outage fails no job"
    );
    // The node not in use comes back: the probes must go round to find it.
    let (back, back_url) = if status.snapshot().search_node == Some(first_url.redacted()) {
        (&second, &second_url)
    } else {
        (&first, &first_url)
    };
    back.set_up(true);
    assert_eq!(wait_done(&db).await, (2000, 0));
    let after = status.snapshot();
    pipeline.stop().await;
    assert_eq!(after.search_node, Some(back_url.redacted()), "{after:?}");
    assert!(
        after.circuit_open_since.is_none(),
        "closed again: {after:?}"
    );
    assert_index_matches_the_table(&db, &vhost, &index).await;
    teardown(db, vhost, index).await;
}
