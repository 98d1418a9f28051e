//! Checks the publisher against a real RabbitMQ and PostgreSQL: a job is `sent` only once the
//! broker confirmed it, and neither lost connections nor unroutable messages lose or
//! misreport a job. Each test has its own schema and its own RabbitMQ virtual host.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use benalsam_events::ops::Live;
use benalsam_events::outbox::Wake;
use benalsam_events::publish::{PublisherStatus, TopologyConfig};
use benalsam_events::{
    Envelope, EventType, JobStream, JobStreamConfig, Outbox, OutboxConfig, Publisher,
    PublisherConfig, Topology,
};
use futures::{StreamExt, stream};
use lapin::types::AMQPValue;
use support::{Relay, TestSchema, TestVhost, amqp_list, dead_amqp, drain_queue, until};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const PATIENCE: Duration = Duration::from_secs(60);
const SYNC_QUEUE: &str = "elasticsearch.sync";
const STATUS_QUEUE: &str = "listing.status.changes";
const DEAD_LETTER_QUEUE: &str = "elasticsearch.sync.dlq";
const JOB_ID_HEADER: &str = "x-job-id";

/// The bridge in miniature: the job stream forwarded into the publisher.
struct Bridge {
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), benalsam_events::Error>>,
    status: Live<PublisherStatus>,
}

impl Bridge {
    fn start(outbox: Outbox, vhost: &TestVhost, routes: Vec<EventType>) -> Self {
        Self::start_at(outbox, &vhost.url, routes)
    }

    fn start_at(
        outbox: Outbox,
        url: &benalsam_events::config::AmqpUrl,
        routes: Vec<EventType>,
    ) -> Self {
        Self::start_with(outbox, url, routes, PublisherConfig::default())
    }

    fn start_with(
        outbox: Outbox,
        url: &benalsam_events::config::AmqpUrl,
        routes: Vec<EventType>,
        publisher: PublisherConfig,
    ) -> Self {
        let shutdown = CancellationToken::new();
        let mut config = JobStreamConfig::default();
        config.wake = Wake::PollOnly;
        config.poll_interval = Duration::from_millis(100);
        let jobs = JobStream::new(outbox.clone(), config, shutdown.clone()).expect("stream");
        let publisher = Publisher::new(url.clone(), outbox, routes, publisher);
        let status = publisher.status();
        let task = tokio::spawn(jobs.flat_map(stream::iter).map(Ok).forward(publisher));
        Self {
            shutdown,
            task,
            status,
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(PATIENCE, self.task)
            .await
            .expect("the bridge stops in time")
            .expect("no panic")
            .expect("no error");
    }
}

async fn declare(vhost: &TestVhost) {
    let connection = vhost.url.connect("test topology").await.expect("connect");
    Topology::benalsam(&TopologyConfig::default())
        .declare(&connection)
        .await
        .expect("declare");
    let _ = connection.close(200, "ok".into()).await;
}

/// Waits until no job is in any of `live` states.
async fn wait_settled(db: &TestSchema, live: &[&str]) -> BTreeMap<String, usize> {
    let started = std::time::Instant::now();
    loop {
        let statuses = db.statuses().await;
        if !statuses.iter().any(|(_, s)| live.contains(&s.as_str())) {
            let mut counts = BTreeMap::new();
            for (_, s) in statuses {
                *counts.entry(s).or_default() += 1;
            }
            return counts;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "jobs did not settle: {:?}",
            &statuses[..statuses.len().min(5)]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every job of the schema reached the sync queue (some perhaps twice, after a lost link:
/// then with the same messageId, so a consumer knows the duplicate).
async fn every_job_reached_the_queue(db: &TestSchema, vhost: &TestVhost) {
    let deliveries = drain_queue(&vhost.url, SYNC_QUEUE).await;
    let ids: HashSet<i64> = deliveries.iter().map(job_id).collect();
    let all: HashSet<i64> = db.statuses().await.into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids, all, "every job reached the queue");
    for d in &deliveries {
        assert_eq!(
            d.properties.message_id().as_ref().map(|s| s.to_string()),
            Some(format!("job_{}", job_id(d))),
            "a duplicate carries the same messageId"
        );
    }
}

fn job_id(delivery: &lapin::message::Delivery) -> i64 {
    Envelope::decode(&delivery.data)
        .expect("a valid envelope")
        .job_id
}

#[tokio::test]
async fn every_job_arrives_once_with_its_routing_key_properties_and_body() {
    let (db, vhost) = (TestSchema::new().await, TestVhost::new().await);
    declare(&vhost).await;
    let ids = db.insert_listings(20).await;
    db.client
        .batch_execute(&format!(
            "UPDATE listings SET status = 'sold' WHERE id = '{0}';
             UPDATE listings SET title = 'Yeni başlık' WHERE id = '{1}';
             DELETE FROM listings WHERE id = '{2}';",
            ids[0], ids[1], ids[2]
        ))
        .await
        .expect("changes");

    let bridge = Bridge::start(
        db.outbox(OutboxConfig::default()),
        &vhost,
        vec![EventType::listings()],
    );
    let counts = wait_settled(&db, &["pending", "processing"]).await;
    assert_eq!(counts.get("sent"), Some(&23), "{counts:?}");
    bridge.stop().await;

    let sync = drain_queue(&vhost.url, SYNC_QUEUE).await;
    assert_eq!(sync.len(), 23, "one message per job");
    let mut seen = HashSet::new();
    let mut keys = BTreeMap::<String, usize>::new();
    for d in &sync {
        let envelope = Envelope::decode(&d.data).expect("valid envelope");
        assert!(
            seen.insert(envelope.job_id),
            "job {} twice",
            envelope.job_id
        );
        assert_eq!(d.routing_key.as_str(), envelope.routing_key);
        *keys.entry(envelope.routing_key.to_string()).or_default() += 1;
        let p = &d.properties;
        assert_eq!(
            p.message_id().as_ref().map(|s| s.to_string()),
            Some(format!("job_{}", envelope.job_id))
        );
        assert_eq!(p.delivery_mode(), &Some(2), "persistent");
        assert_eq!(
            p.content_type().as_ref().map(|s| s.as_str()),
            Some("application/json")
        );
        assert_eq!(
            p.app_id().as_ref().map(|s| s.as_str()),
            Some("benalsam-bridge")
        );
        assert_eq!(
            p.kind().as_ref().map(|s| s.as_str()),
            Some(envelope.routing_key.as_ref())
        );
        assert!(p.timestamp().is_some());
        let headers = p.headers().as_ref().expect("headers");
        assert_eq!(
            headers.inner().get(JOB_ID_HEADER),
            Some(&AMQPValue::LongLongInt(envelope.job_id))
        );
    }
    let expected: BTreeMap<String, usize> = [
        ("listing.insert".to_owned(), 20),
        ("listing.status.sold".to_owned(), 1),
        ("listing.update".to_owned(), 1),
        ("listing.delete".to_owned(), 1),
    ]
    .into();
    assert_eq!(keys, expected);

    let status_changes = drain_queue(&vhost.url, STATUS_QUEUE).await;
    assert_eq!(status_changes.len(), 1);
    let change = Envelope::decode(&status_changes[0].data).expect("envelope");
    assert_eq!(change.status.as_deref(), Some("sold"));
    assert_eq!(change.previous_status.as_deref(), Some("active"));
    assert_eq!(change.record_id, ids[0]);

    db.drop().await;
    vhost.drop().await;
}

#[tokio::test]
async fn a_byte_window_smaller_than_one_message_still_publishes_every_job() {
    let (db, vhost) = (TestSchema::new().await, TestVhost::new().await);
    declare(&vhost).await;
    db.insert_listings(30).await;
    let mut config = PublisherConfig::default();
    config.window_bytes = 1; // every message is larger: one in flight at a time
    let bridge = Bridge::start_with(
        db.outbox(OutboxConfig::default()),
        &vhost.url,
        vec![EventType::listings()],
        config,
    );
    let counts = wait_settled(&db, &["pending", "processing"]).await;
    assert_eq!(counts.get("sent"), Some(&30), "{counts:?}");
    bridge.stop().await;
    let sync = drain_queue(&vhost.url, SYNC_QUEUE).await;
    let ids: HashSet<i64> = sync.iter().map(job_id).collect();
    assert_eq!((sync.len(), ids.len()), (30, 30), "each job once");
    db.drop().await;
    vhost.drop().await;
}

#[tokio::test]
async fn connections_closed_by_the_broker_lose_no_job() {
    let (db, vhost) = (TestSchema::new().await, TestVhost::new().await);
    declare(&vhost).await;
    db.insert_listings(1000).await;

    let (relay, relay_url) = Relay::amqp(&vhost.url).await;
    let bridge = Bridge::start_at(
        db.outbox(OutboxConfig::default()),
        &relay_url,
        vec![EventType::listings()],
    );
    let status = bridge.status.clone();
    let mut cuts = 0;
    for threshold in [300, 1500] {
        until(
            "publishing goes on",
            || status.snapshot().published >= threshold,
            || status.snapshot(),
        )
        .await;
        cuts += relay.cut();
        // More jobs after each cut, so the publisher meets the cut even when it had
        // published everything before it.
        db.insert_listings(1000).await;
    }
    assert!(cuts >= 2, "cut the publisher's connection twice");
    let counts = wait_settled(&db, &["pending", "processing"]).await;
    assert_eq!(counts.get("sent"), Some(&3000), "{counts:?}");
    bridge.stop().await;
    assert!(status.snapshot().errors >= 1, "the cuts were noticed");

    every_job_reached_the_queue(&db, &vhost).await;
    db.drop().await;
    vhost.drop().await;
}

#[tokio::test]
async fn an_unroutable_or_misdirected_job_fails_with_its_reason_and_is_never_sent() {
    let (db, vhost) = (TestSchema::new().await, TestVhost::new().await);
    declare(&vhost).await;
    // An exchange with no queue bound, and one that does not exist at all.
    let connection = vhost.url.connect("test").await.expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .exchange_declare(
            "test.nowhere".into(),
            lapin::ExchangeKind::Topic,
            lapin::options::ExchangeDeclareOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("declare exchange");
    db.client
        .batch_execute(
            "CREATE TABLE orphans (id int PRIMARY KEY);
             CREATE TRIGGER orphans_sync AFTER INSERT ON orphans
                 FOR EACH ROW EXECUTE FUNCTION add_to_sync_queue();
             INSERT INTO orphans VALUES (1);",
        )
        .await
        .expect("orphans");
    db.insert_listings(1).await;
    let mut nowhere = EventType::listings();
    nowhere.exchange = "test.nowhere".into();
    let mut orphans = EventType::new("orphans", "orphans");
    orphans.exchange = "test.missing".into();
    let routes = vec![nowhere, orphans];
    let bridge = Bridge::start(db.outbox(OutboxConfig::default()), &vhost, routes);
    let counts = wait_settled(&db, &["pending", "processing"]).await;
    bridge.stop().await;
    assert_eq!(counts.get("failed"), Some(&2), "{counts:?}");

    let errors: BTreeMap<String, String> = db
        .client
        .query(
            "SELECT table_name, error_message FROM elasticsearch_sync_queue",
            &[],
        )
        .await
        .expect("read")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert!(errors["listings"].contains("unroutable"), "{errors:?}");
    assert!(errors["listings"].contains("listing.insert"), "{errors:?}");
    assert!(
        errors["orphans"].contains("exchange \"test.missing\" does not exist"),
        "{errors:?}"
    );
    assert!(drain_queue(&vhost.url, DEAD_LETTER_QUEUE).await.is_empty());
    db.drop().await;
    vhost.drop().await;
}

#[tokio::test]
async fn two_bridges_on_one_database_publish_each_job_once() {
    let (db, vhost) = (TestSchema::new().await, TestVhost::new().await);
    declare(&vhost).await;
    db.insert_listings(2000).await;
    let a = Bridge::start(
        db.outbox(OutboxConfig::default()),
        &vhost,
        vec![EventType::listings()],
    );
    let b = Bridge::start(
        db.outbox(OutboxConfig::default()),
        &vhost,
        vec![EventType::listings()],
    );
    let counts = wait_settled(&db, &["pending", "processing"]).await;
    let (published_a, published_b) = (a.status.snapshot().published, b.status.snapshot().published);
    a.stop().await;
    b.stop().await;
    assert_eq!(counts.get("sent"), Some(&2000));
    assert_eq!(published_a + published_b, 2000, "no job published twice");

    let deliveries = drain_queue(&vhost.url, SYNC_QUEUE).await;
    assert_eq!(deliveries.len(), 2000);
    let unique: HashSet<i64> = deliveries.iter().map(job_id).collect();
    assert_eq!(unique.len(), 2000);
    db.drop().await;
    vhost.drop().await;
}

#[tokio::test]
async fn the_topology_is_idempotent_and_a_conflict_names_queue_and_argument() {
    let vhost = TestVhost::new().await;
    declare(&vhost).await;
    declare(&vhost).await;

    let mut other = TopologyConfig::default();
    other.health_queue_max_length = 5;
    let connection = vhost.url.connect("test").await.expect("connect");
    let err = Topology::benalsam(&other)
        .declare(&connection)
        .await
        .expect_err("a different bound conflicts");
    let text = err.to_string();
    assert!(text.contains("queue system.health"), "{text}");
    assert!(text.contains("x-max-length"), "{text}");
    assert!(err.is_conflict() && !err.is_retryable());
    assert_eq!(err.conflicting_argument(), Some("x-max-length"));
    vhost.drop().await;
}

#[tokio::test]
async fn the_exported_definitions_are_what_the_bridge_declares() {
    let vhost = TestVhost::new().await;
    let topology = Topology::benalsam(&TopologyConfig::default());
    vhost
        .import_definitions(&topology.definitions(&vhost.name))
        .await;
    // Declaring over the imported definitions must not hit PRECONDITION_FAILED.
    declare(&vhost).await;

    // And docker/ ships exactly this file.
    let shipped: serde_json::Value =
        serde_json::from_str(include_str!("../../docker/rabbitmq/definitions.json"))
            .expect("docker/rabbitmq/definitions.json is JSON");
    assert_eq!(
        shipped,
        topology.definitions("/"),
        "docker/rabbitmq/definitions.json is stale: regenerate it with \
         `cargo run -p benalsam-bridge -- topology > docker/rabbitmq/definitions.json`"
    );
    vhost.drop().await;
}

#[tokio::test]
async fn a_sent_job_that_never_completes_is_sent_again() {
    let (db, vhost) = (TestSchema::new().await, TestVhost::new().await);
    declare(&vhost).await;
    db.insert_listings(3).await;
    let outbox = db.outbox(OutboxConfig::default());
    let bridge = Bridge::start(outbox.clone(), &vhost, vec![EventType::listings()]);
    wait_settled(&db, &["pending", "processing"]).await;
    let first = drain_queue(&vhost.url, SYNC_QUEUE).await;
    assert_eq!(first.len(), 3);

    // The messages are lost on the broker's side (drained above, never indexed), and the
    // jobs were sent long ago: the resender sends them again.
    db.client
        .batch_execute("UPDATE elasticsearch_sync_queue SET sent_at = now() - interval '1 hour'")
        .await
        .expect("age");
    // What the bridge's resender does every few seconds.
    let resent = outbox
        .resend_stale_sent(Duration::from_secs(2), 1000)
        .await
        .expect("resend");
    assert_eq!(resent.len(), 3, "the three stale jobs go back to pending");
    let counts = wait_settled(&db, &["pending", "processing"]).await;
    bridge.stop().await;
    assert_eq!(counts.get("sent"), Some(&3));
    let again = drain_queue(&vhost.url, SYNC_QUEUE).await;
    let ids = |ds: &[lapin::message::Delivery]| ds.iter().map(job_id).collect::<HashSet<_>>();
    assert_eq!(ids(&again), ids(&first), "the same jobs, published again");
    db.drop().await;
    vhost.drop().await;
}

#[tokio::test]
async fn closing_while_rabbitmq_is_away_gives_the_jobs_back_instead_of_hanging() {
    let (db, vhost) = (TestSchema::new().await, TestVhost::new().await);
    declare(&vhost).await;
    let (relay, relay_url) = Relay::amqp(&vhost.url).await;
    relay.set_up(false); // the broker is unreachable from the start
    db.insert_listings(5).await;
    let bridge = Bridge::start_at(
        db.outbox(OutboxConfig::default()),
        &relay_url,
        vec![EventType::listings()],
    );
    let started = std::time::Instant::now();
    while db.count("processing").await < 5 {
        assert!(started.elapsed() < PATIENCE, "the jobs are claimed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bridge.stop().await; // returns, although nothing could be published
    assert_eq!(
        db.count("pending").await,
        5,
        "given back for the next bridge"
    );
    db.drop().await;
    vhost.drop().await;
}

/// The failed job of the schema (there must be one): its id, attempts and error.
async fn the_failed_job(db: &TestSchema) -> (i64, i32, String) {
    let row = db
        .client
        .query_one(
            "SELECT id, retry_count, error_message FROM elasticsearch_sync_queue WHERE status = 'failed'",
            &[],
        )
        .await
        .expect("one failed job");
    (row.get(0), row.get(1), row.get(2))
}

/// With the bridge still running: more jobs flow after the failure (so it has claimed again
/// since), the failed job has not moved, and no copy of it reached the queue.
async fn failed_once_and_for_good(db: &TestSchema, vhost: &TestVhost, failed: (i64, i32, String)) {
    db.insert_listings(3).await;
    let counts = wait_settled(db, &["pending", "processing"]).await;
    assert_eq!(
        (counts.get("sent"), counts.get("failed")),
        (Some(&6), Some(&1)),
        "the other jobs flow: {counts:?}"
    );
    assert_eq!(
        the_failed_job(db).await,
        failed,
        "failed once, not tried again"
    );
    let ids: HashSet<i64> = drain_queue(&vhost.url, SYNC_QUEUE)
        .await
        .iter()
        .map(job_id)
        .collect();
    assert_eq!(ids.len(), 6, "{ids:?}");
    assert!(
        !ids.contains(&failed.0),
        "the refused job was never published"
    );
}

#[tokio::test]
async fn a_ten_mib_row_fails_its_job_once_naming_the_limit_and_the_others_flow() {
    let (db, vhost) = (TestSchema::new().await, TestVhost::new().await);
    declare(&vhost).await;
    db.insert_listings(3).await;
    db.client
        .batch_execute(
            "INSERT INTO listings (user_id, title, category, status, description)
             VALUES (gen_random_uuid(), 'Dev', 'x', 'active', repeat('x', 10 * 1024 * 1024))",
        )
        .await
        .expect("a huge row");
    let bridge = Bridge::start(
        db.outbox(OutboxConfig::default()),
        &vhost,
        vec![EventType::listings()],
    );
    let counts = wait_settled(&db, &["pending", "processing"]).await;
    assert_eq!(
        (counts.get("sent"), counts.get("failed")),
        (Some(&3), Some(&1)),
        "{counts:?}"
    );
    let failed = the_failed_job(&db).await;
    assert!(
        failed.2.contains("1048576-byte limit") && failed.2.contains("BENALSAM_MAX_MESSAGE_BYTES"),
        "{failed:?}"
    );
    failed_once_and_for_good(&db, &vhost, failed).await;
    bridge.stop().await;
    db.drop().await;
    vhost.drop().await;
}

#[tokio::test]
async fn a_600_byte_key_fails_its_job_once_and_is_never_published() {
    let (db, vhost) = (TestSchema::new().await, TestVhost::new().await);
    declare(&vhost).await;
    // A table whose key is text: one row with a key the index cannot take as a document id.
    db.client
        .batch_execute(
            "CREATE TABLE notes (id text PRIMARY KEY, body text);
             CREATE TRIGGER notes_sync AFTER INSERT OR UPDATE OR DELETE ON notes
                 FOR EACH ROW EXECUTE FUNCTION add_to_sync_queue();
             INSERT INTO notes VALUES (repeat('k', 600), 'long key');",
        )
        .await
        .expect("notes");
    db.insert_listings(3).await;
    let mut notes = EventType::new("notes", "notes");
    notes.exchange = benalsam_events::EventType::listings().exchange;
    notes.routing_prefix = "listing".into();
    let bridge = Bridge::start(
        db.outbox(OutboxConfig::default()),
        &vhost,
        vec![EventType::listings(), notes],
    );
    let counts = wait_settled(&db, &["pending", "processing"]).await;
    assert_eq!(
        (counts.get("sent"), counts.get("failed")),
        (Some(&3), Some(&1)),
        "{counts:?}"
    );
    let failed = the_failed_job(&db).await;
    assert!(
        failed.2.contains("600 bytes") && failed.2.contains("at most 512"),
        "{failed:?}"
    );
    failed_once_and_for_good(&db, &vhost, failed).await;
    bridge.stop().await;
    db.drop().await;
    vhost.drop().await;
}

#[tokio::test]
async fn a_dead_first_broker_address_is_passed_over_for_the_next() {
    let (db, vhost) = (TestSchema::new().await, TestVhost::new().await);
    declare(&vhost).await;
    db.insert_listings(50).await;

    let dead = dead_amqp(&vhost.url);
    let bridge = Bridge::start_at(
        db.outbox(OutboxConfig::default()),
        &amqp_list(&[&dead, &vhost.url]),
        vec![EventType::listings()],
    );
    let counts = wait_settled(&db, &["pending", "processing"]).await;
    assert_eq!(counts.get("sent"), Some(&50), "{counts:?}");
    let status = bridge.status.snapshot();
    assert_eq!(status.broker, Some(vhost.url.redacted()), "{status:?}");
    bridge.stop().await;
    let ids: HashSet<i64> = drain_queue(&vhost.url, SYNC_QUEUE)
        .await
        .iter()
        .map(job_id)
        .collect();
    assert_eq!(ids.len(), 50);
    db.drop().await;
    vhost.drop().await;
}

#[tokio::test]
async fn losing_one_broker_node_moves_to_the_next_and_loses_no_job() {
    let (db, vhost) = (TestSchema::new().await, TestVhost::new().await);
    declare(&vhost).await;
    db.insert_listings(3000).await;

    // Two relays to the one broker stand for two nodes of a cluster.
    let (first, first_url) = Relay::amqp(&vhost.url).await;
    let (_second, second_url) = Relay::amqp(&vhost.url).await;
    let bridge = Bridge::start_at(
        db.outbox(OutboxConfig::default()),
        &amqp_list(&[&first_url, &second_url]),
        vec![EventType::listings()],
    );
    let status = bridge.status.clone();
    until(
        "publishing goes on",
        || status.snapshot().published >= 500,
        || status.snapshot(),
    )
    .await;
    assert_eq!(status.snapshot().broker, Some(first_url.redacted()));
    // The first node goes away for good: its connections cut, new ones refused.
    first.set_up(false);

    let counts = wait_settled(&db, &["pending", "processing"]).await;
    assert_eq!(counts.get("sent"), Some(&3000), "{counts:?}");
    // Every job may be confirmed before the loss is noticed: wait for the move itself.
    let moved = Some(second_url.redacted());
    until(
        "the publisher moves to the second broker",
        || status.snapshot().broker == moved,
        || status.snapshot(),
    )
    .await;
    bridge.stop().await;

    every_job_reached_the_queue(&db, &vhost).await;
    db.drop().await;
    vhost.drop().await;
}
