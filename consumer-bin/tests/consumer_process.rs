//! Runs the real `benalsam-consumer` binary against real RabbitMQ, Elasticsearch and
//! PostgreSQL: it indexes, answers its health endpoints without secrets, sends heartbeats,
//! stops cleanly on SIGTERM, names bad settings, and its DLQ commands list and replay.

#[path = "../../benalsam-events/tests/support/mod.rs"]
mod support;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use benalsam_events::amqp;
use benalsam_events::lapin;
use benalsam_events::lapin::options::BasicPublishOptions;
use benalsam_events::lapin::types::{AMQPValue, FieldTable, LongString};
use benalsam_events::topology::{
    DEAD_LETTER_EXCHANGE, HEALTH_QUEUE, SYNC_QUEUE, Topology, TopologyConfig,
};
use support::{
    TestIndex, TestSchema, TestVhost, database_url, drain_queue, free_port, search_url, terminate,
    wait_exit,
};

const PATIENCE: Duration = Duration::from_secs(60);

fn consumer(db: &TestSchema, vhost: &TestVhost, index: &TestIndex, port: u16) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_benalsam-consumer"));
    command
        .env("DATABASE_URL", database_url().expose())
        .env("BENALSAM_SCHEMA", &db.name)
        .env("RABBITMQ_URL", vhost.url.expose())
        .env("ELASTICSEARCH_URL", search_url().expose())
        .env("BENALSAM_INDEX", &index.alias)
        .env("BENALSAM_HEALTH_ADDR", format!("127.0.0.1:{port}"))
        .env("BENALSAM_HEARTBEAT_INTERVAL", "200ms")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    command
}

async fn declare(vhost: &TestVhost) {
    let connection = amqp::connect(&vhost.url, "test").await.expect("connect");
    Topology::benalsam(&TopologyConfig::default())
        .declare(&connection)
        .await
        .expect("declare");
    let _ = connection.close(200, "ok".into()).await;
}

#[tokio::test]
async fn the_consumer_indexes_answers_health_and_stops_cleanly() {
    let (db, vhost, index) = (
        TestSchema::new().await,
        TestVhost::new().await,
        TestIndex::new().await,
    );
    declare(&vhost).await;
    // The bridge, in-process, feeds the queue.
    let (shutdown, bridge) = support::spawn_bridge(&db, &vhost.url);

    let port = free_port();
    let mut child = consumer(&db, &vhost, &index, port)
        .spawn()
        .expect("start consumer");
    db.insert_listings(500).await;
    let started = Instant::now();
    while db.count("completed").await < 500 {
        assert!(started.elapsed() < PATIENCE, "500 jobs completed in time");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    support::healthy(port, "/api/v1/health/rabbitmq", "rabbitmq").await;
    let health = support::healthy(
        port,
        "/api/v1/health/elasticsearch-service",
        "elasticsearch-service",
    )
    .await;
    assert_eq!(health["details"]["circuit"], "closed");
    assert!(
        health["details"]["indexed"].as_u64().unwrap_or(0) >= 500,
        "{health}"
    );

    let metrics = support::scrape(port).await;
    assert!(support::sample(&metrics, "benalsam_deliveries_received_total", &[]) >= 500.0);
    assert!(support::sample(&metrics, "benalsam_jobs_completed_total", &[]) >= 500.0);
    assert!(
        support::sample(
            &metrics,
            "benalsam_bulk_items_total",
            &[("kind", "applied")]
        ) >= 500.0
    );
    assert!(support::sample(&metrics, "benalsam_bulk_requests_total", &[("kind", "ok")]) >= 1.0);
    assert!(
        support::sample(&metrics, "benalsam_end_to_end_latency_seconds", &[]) >= 500.0,
        "latency observed"
    );
    assert_eq!(support::sample(&metrics, "benalsam_circuit_open", &[]), 0.0);
    assert_eq!(
        health["details"]["received"].as_f64(),
        Some(support::sample(
            &metrics,
            "benalsam_deliveries_received_total",
            &[]
        )),
        "health and metrics agree"
    );

    // SIGTERM while more work flows: whatever is not completed stays in the queue.
    db.insert_listings(2000).await;
    while db.count("completed").await < 600 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    terminate(&child);
    assert!(wait_exit(&mut child).await.success(), "clean exit");
    // Let the bridge publish the rest, so every job is either completed or in the queue.
    let started = Instant::now();
    while db.count("pending").await + db.count("processing").await > 0 {
        assert!(
            started.elapsed() < PATIENCE,
            "the bridge publishes everything"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shutdown.cancel();
    bridge.await.expect("no panic").expect("bridge drained");

    let completed = db.count("completed").await;
    let left = drain_queue(&vhost.url, SYNC_QUEUE, Duration::from_millis(500)).await;
    let left_jobs: std::collections::HashSet<i64> = left
        .iter()
        .map(|d| {
            benalsam_events::envelope::Envelope::decode(&d.data)
                .expect("envelope")
                .job_id
        })
        .collect();
    assert_eq!(db.count("failed").await, 0);
    assert_eq!(
        db.count("sent").await,
        left_jobs.len() as i64,
        "what is not completed is queued"
    );
    assert!(
        completed + left_jobs.len() as i64 >= 2500,
        "every job is completed or still queued: {completed} completed, {} queued",
        left_jobs.len()
    );
    let beats = drain_queue(&vhost.url, HEALTH_QUEUE, Duration::from_millis(300)).await;
    assert!(
        beats
            .iter()
            .any(|b| b.routing_key.as_str() == "health.consumer"),
        "heartbeats"
    );
    db.drop().await;
    vhost.drop().await;
    index.drop().await;
}

fn run_with(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_benalsam-consumer"));
    command.args(args).env("RUST_LOG", "error");
    for (k, v) in env {
        command.env(k, v);
    }
    command.output().expect("runs")
}

#[tokio::test]
async fn dlq_commands_list_reasons_and_replay() {
    let vhost = TestVhost::new().await;
    declare(&vhost).await;
    let connection = amqp::connect(&vhost.url, "test").await.expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    let mut headers = FieldTable::default();
    headers.insert(
        "x-dead-letter-kind".into(),
        AMQPValue::LongString(LongString::from("rejected")),
    );
    headers.insert(
        "x-dead-letter-reason".into(),
        AMQPValue::LongString(LongString::from("mapper_parsing_exception: bad")),
    );
    headers.insert("x-job-id".into(), AMQPValue::LongLongInt(77));
    channel
        .basic_publish(
            DEAD_LETTER_EXCHANGE.into(),
            "listing.update".into(),
            BasicPublishOptions::default(),
            br#"{"jobId": 77}"#,
            lapin::BasicProperties::default().with_headers(headers),
        )
        .await
        .expect("publish")
        .await
        .expect("confirmed");
    let _ = connection.close(200, "ok".into()).await;
    // The broker needs a moment to count the message in the queue.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let env = [("RABBITMQ_URL", vhost.url.expose())];
    let listed = run_with(&["dlq", "list"], &env);
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    assert!(
        text.contains("77")
            && text.contains("mapper_parsing_exception: bad")
            && text.contains("rejected"),
        "{text}"
    );

    let replayed = run_with(&["dlq", "replay", "--job", "77"], &env);
    assert!(
        replayed.status.success(),
        "{}",
        String::from_utf8_lossy(&replayed.stderr)
    );
    assert!(String::from_utf8_lossy(&replayed.stdout).contains("replayed 1"));
    let back = drain_queue(&vhost.url, SYNC_QUEUE, Duration::from_millis(500)).await;
    assert_eq!(back.len(), 1, "the message is back on elasticsearch.sync");
    assert_eq!(back[0].routing_key.as_str(), "listing.update");
    vhost.drop().await;
}

#[test]
fn bad_settings_stop_start_up_naming_the_setting() {
    let cases: [(&str, &str, &str); 5] = [
        ("BENALSAM_PREFETCH", "0", "--prefetch"),
        (
            "ELASTICSEARCH_URL",
            "ftp://search:hunter2@host",
            "ELASTICSEARCH_URL",
        ),
        ("BENALSAM_INDEX", "Bad Name", "BENALSAM_INDEX"),
        (
            "BENALSAM_SEARCHABLE_STATUSES",
            "active,,sold",
            "--searchable-statuses",
        ),
        ("BENALSAM_BULK_LINGER", "forever", "--bulk-linger"),
    ];
    for (variable, value, named) in cases {
        let out = run_with(&[], &[(variable, value)]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{variable}={value} must fail");
        assert!(stderr.contains(named), "{named} named in: {stderr}");
        assert!(!stderr.contains("hunter2"), "no password in: {stderr}");
    }
}

#[test]
fn the_compose_file_sets_only_settings_the_consumer_knows() {
    let compose = include_str!("../../docker/compose.yaml");
    let shared = compose.split("\nservices:").next().unwrap_or(compose);
    let consumer = compose
        .split("\n  consumer:")
        .nth(1)
        .expect("a consumer service");
    let help = String::from_utf8_lossy(&run_with(&["--help"], &[]).stdout).into_owned();
    for line in shared.lines().chain(consumer.lines()).map(str::trim) {
        if let Some((name, _)) = line.split_once(':')
            && (name.starts_with("BENALSAM_") || name.ends_with("_URL"))
        {
            assert!(
                help.contains(name),
                "compose sets {name}, which benalsam-consumer does not read"
            );
        }
    }
}
