//! Quorum queues against the real RabbitMQ of the stack (one node: quorum queues declare and
//! work there, with one replica): the whole pipeline, dead letters kept until the DLQ took
//! them, a consumer that dies holding a message, a full queue, and a queue of the other type.
//! Each test has its own virtual host (and schema, index).

mod support;

use std::collections::HashSet;
use std::time::Duration;

use benalsam_events::consume::DeadLetterQueue;
use benalsam_events::publish::{QueueType, TopologyConfig};
use benalsam_events::{
    Backoff, Envelope, EventType, Indexer, IndexerConfig, JobStream, JobStreamConfig, OutboxConfig,
    Publisher, PublisherConfig, Topology,
};
use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicRejectOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use serde_json::json;
use support::{TestIndex, TestSchema, TestVhost, drain_queue, management, search_url, until};
use tokio_util::sync::CancellationToken;

const PATIENCE: Duration = Duration::from_secs(90);
const SYNC_QUEUE: &str = "elasticsearch.sync";
const DLQ: &str = "elasticsearch.sync.dlq";
const EXCHANGE: &str = "benalsam.listings";

fn config(queue_type: QueueType) -> TopologyConfig {
    let mut config = TopologyConfig::default();
    config.queue_type = queue_type;
    config
}

async fn declare(vhost: &TestVhost, queue_type: QueueType) -> benalsam_events::Result<()> {
    let connection = vhost.url.connect("test topology").await.expect("connect");
    let declared = Topology::benalsam(&config(queue_type))
        .declare(&connection)
        .await;
    let _ = connection.close(200, "ok".into()).await;
    declared
}

/// A queue as the management API describes it.
async fn queue_info(vhost: &TestVhost, queue: &str) -> serde_json::Value {
    let (http, base, user, password) = management();
    http.get(format!("{base}/api/queues/{}/{queue}", vhost.name))
        .basic_auth(&user, Some(&password))
        .send()
        .await
        .expect("management API answers")
        .json()
        .await
        .expect("queue as JSON")
}

/// Messages in `queue`, asked passively (exact, unlike the management API's sampled counts).
async fn depth(vhost: &TestVhost, queue: &str) -> u32 {
    let connection = vhost.url.connect("test depth").await.expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    let declared = channel
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("the queue exists");
    let _ = connection.close(200, "ok".into()).await;
    declared.message_count()
}

async fn publish_raw(vhost: &TestVhost, body: &[u8]) {
    assert!(
        try_publish(vhost, body).await,
        "the broker acked the publish"
    );
}

/// Publishes with a confirm; whether the broker acked.
async fn try_publish(vhost: &TestVhost, body: &[u8]) -> bool {
    let connection = vhost.url.connect("test publish").await.expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let confirm = channel
        .basic_publish(
            EXCHANGE.into(),
            "listing.insert".into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            body,
            lapin::BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    let _ = connection.close(200, "ok".into()).await;
    confirm.is_ack()
}

/// A header of a delivery, when present.
fn header<'a>(properties: &'a lapin::BasicProperties, name: &str) -> Option<&'a AMQPValue> {
    properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(name))
}

/// The bridge in-process with quick retries of failed jobs.
fn bridge(
    db: &TestSchema,
    vhost: &TestVhost,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<benalsam_events::Result<()>>,
) {
    let shutdown = CancellationToken::new();
    let mut outbox = OutboxConfig::default();
    outbox.retry_backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(1));
    // Retried for as long as a test waits, as the default backoff (up to 10 min) would.
    outbox.max_attempts = 1000;
    let outbox = db.outbox(outbox);
    let mut stream = JobStreamConfig::default();
    stream.wake = benalsam_events::outbox::Wake::PollOnly;
    stream.poll_interval = Duration::from_millis(100);
    let jobs = JobStream::new(outbox.clone(), stream, shutdown.clone()).expect("stream");
    let publisher = Publisher::new(
        vhost.url.clone(),
        outbox,
        vec![EventType::listings()],
        PublisherConfig::default(),
    );
    let task = tokio::spawn(
        jobs.flat_map(futures::stream::iter)
            .map(Ok)
            .forward(publisher),
    );
    (shutdown, task)
}

async fn stop(
    (shutdown, task): (
        CancellationToken,
        tokio::task::JoinHandle<benalsam_events::Result<()>>,
    ),
) {
    shutdown.cancel();
    tokio::time::timeout(PATIENCE, task)
        .await
        .expect("stops in time")
        .expect("no panic")
        .expect("no error");
}

/// Waits until `check` holds on the job counts by status.
async fn wait_counts(db: &TestSchema, what: &str, check: impl Fn(i64, i64, i64) -> bool) {
    let started = std::time::Instant::now();
    loop {
        let (sent, failed, done) = (
            db.count("sent").await,
            db.count("failed").await,
            db.count("completed").await,
        );
        if check(sent, failed, done) {
            return;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "{what}: sent {sent}, failed {failed}, completed {done}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_whole_pipeline_runs_on_quorum_queues() {
    let (db, vhost, index) = (
        TestSchema::new().await,
        TestVhost::new().await,
        TestIndex::new().await,
    );
    declare(&vhost, QueueType::Quorum).await.expect("declare");
    declare(&vhost, QueueType::Quorum)
        .await
        .expect("declaring again changes nothing");
    for queue in [SYNC_QUEUE, DLQ, "listing.status.changes", "system.health"] {
        let info = queue_info(&vhost, queue).await;
        assert_eq!(info["type"], "quorum", "{queue}: {info}");
    }
    let info = queue_info(&vhost, SYNC_QUEUE).await;
    assert_eq!(info["arguments"]["x-dead-letter-strategy"], "at-least-once");
    assert_eq!(info["arguments"]["x-overflow"], "reject-publish");

    let bridge = bridge(&db, &vhost);
    let indexer = Indexer::new(
        vhost.url.clone(),
        search_url()
            .client(Duration::from_secs(10))
            .expect("client"),
        db.outbox(OutboxConfig::default()),
        vec![index.event_type()],
        IndexerConfig::default(),
    )
    .expect("indexer");
    let stop_consumer = CancellationToken::new();
    let consumer = tokio::spawn(indexer.run(stop_consumer.clone()));

    let ids = db.insert_listings(30).await;
    db.client
        .execute(
            "UPDATE listings SET status = 'sold' WHERE id::text = $1",
            &[&ids[0]],
        )
        .await
        .expect("a status change");
    db.client
        .execute("DELETE FROM listings WHERE id::text = $1", &[&ids[1]])
        .await
        .expect("a delete");
    wait_counts(&db, "every job completes", |sent, failed, _| {
        sent == 0 && failed == 0
    })
    .await;
    wait_counts(&db, "every job completes", |_, _, done| done == 32).await;
    stop(bridge).await;
    stop_consumer.cancel();
    tokio::time::timeout(PATIENCE, consumer)
        .await
        .expect("consumer stops")
        .expect("no panic");

    let mut expected: Vec<String> = ids[2..].to_vec();
    expected.sort();
    assert_eq!(index.search(json!({"match_all": {}})).await, expected);
    assert_eq!(depth(&vhost, SYNC_QUEUE).await, 0);
    assert_eq!(depth(&vhost, DLQ).await, 0, "nothing dead-lettered");
    assert_eq!(
        depth(&vhost, "listing.status.changes").await,
        1,
        "the status change"
    );
    db.drop().await;
    vhost.drop().await;
    index.drop().await;
}

#[tokio::test]
async fn dead_letters_of_the_consumer_and_of_the_broker_reach_the_dlq_with_their_reasons() {
    let (db, vhost, index) = (
        TestSchema::new().await,
        TestVhost::new().await,
        TestIndex::new().await,
    );
    declare(&vhost, QueueType::Quorum).await.expect("declare");

    // The broker's own dead-lettering (at-least-once): a consumer rejects a message.
    publish_raw(&vhost, br#"{"poison": true}"#).await;
    let connection = vhost.url.connect("test reject").await.expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    let got = channel
        .basic_get(SYNC_QUEUE.into(), BasicGetOptions { no_ack: false })
        .await
        .expect("basic.get")
        .expect("the message");
    got.delivery
        .reject(BasicRejectOptions { requeue: false })
        .await
        .expect("reject");
    let _ = connection.close(200, "ok".into()).await;
    let mut in_dlq = 0;
    let started = std::time::Instant::now();
    while in_dlq < 1 {
        assert!(
            started.elapsed() < PATIENCE,
            "the rejected message reaches the DLQ"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        in_dlq = depth(&vhost, DLQ).await;
    }

    // The consumer's dead-lettering: a message that is no envelope.
    publish_raw(&vhost, b"{not json").await;
    let indexer = Indexer::new(
        vhost.url.clone(),
        search_url()
            .client(Duration::from_secs(10))
            .expect("client"),
        db.outbox(OutboxConfig::default()),
        vec![index.event_type()],
        IndexerConfig::default(),
    )
    .expect("indexer");
    let status = indexer.status();
    let stop_consumer = CancellationToken::new();
    let consumer = tokio::spawn(indexer.run(stop_consumer.clone()));
    until(
        "the malformed message is dead-lettered",
        || status.snapshot().dead_lettered >= 1,
        || status.snapshot(),
    )
    .await;
    stop_consumer.cancel();
    tokio::time::timeout(PATIENCE, consumer)
        .await
        .expect("consumer stops")
        .expect("no panic");

    let letters = DeadLetterQueue::new(vhost.url.clone(), DLQ)
        .list(10)
        .await
        .expect("list the DLQ");
    let kinds: Vec<Option<&str>> = letters.iter().map(|l| l.kind.as_deref()).collect();
    assert_eq!(kinds, [Some("rejected"), Some("malformed")], "{letters:?}");

    let messages = drain_queue(&vhost.url, DLQ).await;
    assert_eq!(messages.len(), 2, "listing took nothing away");
    let broker = &messages[0];
    assert_eq!(broker.data, br#"{"poison": true}"#);
    let Some(AMQPValue::FieldArray(deaths)) = header(&broker.properties, "x-death") else {
        panic!(
            "the broker's dead letter has x-death: {:?}",
            broker.properties
        );
    };
    let Some(AMQPValue::FieldTable(death)) = deaths.as_slice().first() else {
        panic!("one death: {deaths:?}");
    };
    let text = |key: &str| match death.inner().get(key) {
        Some(AMQPValue::LongString(s)) => s.to_string(),
        other => format!("{other:?}"),
    };
    assert_eq!(text("reason"), "rejected");
    assert_eq!(text("queue"), SYNC_QUEUE);
    assert_eq!(text("exchange"), EXCHANGE);
    let ours = &messages[1];
    assert_eq!(ours.data, b"{not json");
    assert!(
        matches!(
            header(&ours.properties, "x-dead-letter-kind"),
            Some(AMQPValue::LongString(kind)) if kind.to_string() == "malformed"
        ),
        "{:?}",
        ours.properties
    );
    db.drop().await;
    vhost.drop().await;
    index.drop().await;
}

#[tokio::test]
async fn a_consumer_that_dies_holding_a_message_gets_it_back_and_nothing_is_dead_lettered() {
    let vhost = TestVhost::new().await;
    declare(&vhost, QueueType::Quorum).await.expect("declare");
    let body = br#"{"held": true}"#;
    publish_raw(&vhost, body).await;

    // 3.10 counts every return, a lost channel included: ten deaths are ten returns, which
    // a delivery limit of 10 or less would have turned into a dead letter.
    for death in 0..10_i64 {
        let connection = vhost.url.connect("test consumer").await.expect("connect");
        let channel = connection.create_channel().await.expect("channel");
        let mut consumer = channel
            .basic_consume(
                SYNC_QUEUE.into(),
                "dies".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume");
        let delivery = tokio::time::timeout(PATIENCE, consumer.next())
            .await
            .expect("delivered in time")
            .expect("consumer open")
            .expect("delivery");
        assert_eq!(delivery.data, body);
        assert_eq!(delivery.redelivered, death > 0, "death {death}");
        if let Some(count) = header(&delivery.properties, "x-delivery-count") {
            assert_eq!(
                count,
                &AMQPValue::LongLongInt(death),
                "3.10 counts the return"
            );
        }
        // Dies: the channel goes without an ack.
        let _ = channel.close(200, "dying".into()).await;
        let _ = connection.close(200, "dead".into()).await;
    }
    assert_eq!(depth(&vhost, DLQ).await, 0, "never dead-lettered");
    let left = drain_queue(&vhost.url, SYNC_QUEUE).await;
    assert_eq!(left.len(), 1, "still in its queue");
    assert_eq!(left[0].data, body);
    vhost.drop().await;
}

#[tokio::test]
async fn a_full_quorum_queue_nacks_and_the_job_is_retried_instead_of_marked_sent() {
    let (db, vhost) = (TestSchema::new().await, TestVhost::new().await);
    declare(&vhost, QueueType::Quorum).await.expect("declare");
    // An operator's bound on the sync queue; x-overflow reject-publish (the topology's) makes
    // the queue refuse beyond it.
    let (http, base, user, password) = management();
    let policy = format!("{base}/api/policies/{}/bounded", vhost.name);
    let put = http
        .put(&policy)
        .basic_auth(&user, Some(&password))
        .json(&json!({
            "pattern": "^elasticsearch\\.sync$",
            "definition": {"max-length": 2},
            "apply-to": "queues"
        }))
        .send()
        .await
        .expect("set policy");
    assert!(put.status().is_success(), "{}", put.status());
    let started = std::time::Instant::now();
    while queue_info(&vhost, SYNC_QUEUE).await["effective_policy_definition"]["max-length"] != 2 {
        assert!(started.elapsed() < PATIENCE, "the policy applies");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Filled to its bound and beyond (a quorum queue overshoots by what is in flight when it
    // starts refusing), so the bridge meets a full queue from its first publish.
    let mut filled = 0;
    while try_publish(&vhost, b"filler").await {
        filled += 1;
        assert!(filled < 50, "the bounded queue refuses at some point");
    }

    db.insert_listings(20).await;
    let running = bridge(&db, &vhost);
    wait_counts(
        &db,
        "the full queue refuses every job",
        |sent, failed, _| sent == 0 && failed == 20,
    )
    .await;
    let failed = db
        .client
        .query(
            "SELECT error_message, sent_at IS NULL FROM elasticsearch_sync_queue WHERE status = 'failed'",
            &[],
        )
        .await
        .expect("failed jobs");
    for row in &failed {
        let (error, never_sent): (String, bool) = (row.get(0), row.get(1));
        assert!(error.contains("nack"), "{error}");
        assert!(never_sent, "a refused job is not marked sent");
    }

    // A consumer catches up (the bound stays): as the queue falls below it, RabbitMQ lets
    // the publishing channel in again, and the refused jobs are retried and arrive.
    let mut arrived = HashSet::new();
    let started = std::time::Instant::now();
    while db.count("sent").await < 20 || arrived.len() < 20 {
        assert!(
            started.elapsed() < PATIENCE,
            "every job is sent in the end: {} sent, {} arrived",
            db.count("sent").await,
            arrived.len()
        );
        for delivery in drain_queue(&vhost.url, SYNC_QUEUE).await {
            if let Ok(envelope) = Envelope::decode(&delivery.data) {
                arrived.insert(envelope.job_id);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop(running).await;
    db.drop().await;
    vhost.drop().await;
}

#[tokio::test]
async fn a_queue_of_the_other_type_stops_the_declare_naming_both_types_and_the_way_out() {
    for (existing, wanted) in [
        (QueueType::Classic, QueueType::Quorum),
        (QueueType::Quorum, QueueType::Classic),
    ] {
        let vhost = TestVhost::new().await;
        declare(&vhost, existing).await.expect("first declare");
        let error = declare(&vhost, wanted)
            .await
            .expect_err("the other type conflicts");
        let text = error.to_string();
        assert!(error.is_conflict() && !error.is_retryable(), "{text}");
        assert_eq!(error.queue_types(), Some((existing, wanted)), "{text}");
        assert_eq!(error.conflicting_argument(), Some("x-queue-type"));
        for says in [
            format!("queue {SYNC_QUEUE} as a {existing} queue"),
            format!("asks for {wanted} queues"),
            format!("BENALSAM_QUEUE_TYPE={existing}"),
            "Changing the queue type".to_owned(),
        ] {
            assert!(text.contains(&says), "{says:?} in {text}");
        }
        // Nothing was changed by finding out: the original still declares cleanly.
        declare(&vhost, existing).await.expect("still the original");
        assert_eq!(
            queue_info(&vhost, SYNC_QUEUE).await["type"],
            existing.as_str()
        );
        vhost.drop().await;
    }
}

#[tokio::test]
async fn the_quorum_definitions_file_is_current_and_declares_cleanly() {
    let topology = Topology::benalsam(&config(QueueType::Quorum));
    let shipped: serde_json::Value = serde_json::from_str(include_str!(
        "../../docker/rabbitmq/definitions.quorum.json"
    ))
    .expect("docker/rabbitmq/definitions.quorum.json is JSON");
    assert_eq!(
        shipped,
        topology.definitions("/"),
        "docker/rabbitmq/definitions.quorum.json is stale: regenerate it with `cargo run -p \
         benalsam-bridge -- topology --queue-type quorum > docker/rabbitmq/definitions.quorum.json`"
    );
    let vhost = TestVhost::new().await;
    vhost
        .import_definitions(&topology.definitions(&vhost.name))
        .await;
    declare(&vhost, QueueType::Quorum)
        .await
        .expect("declaring over the imported definitions hits no PRECONDITION_FAILED");
    assert_eq!(queue_info(&vhost, SYNC_QUEUE).await["type"], "quorum");
    vhost.drop().await;
}
