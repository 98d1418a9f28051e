//! Runs the real `benalsam-consumer` binary against real RabbitMQ, Elasticsearch and
//! PostgreSQL: it indexes, answers its health endpoints without secrets, sends heartbeats,
//! stops cleanly on SIGTERM, names bad settings, and its DLQ commands list and replay.

#[path = "../../benalsam-events/tests/support/mod.rs"]
mod support;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use benalsam_events::lapin::options::BasicPublishOptions;
use benalsam_events::lapin::types::{AMQPValue, FieldTable, LongString};
use benalsam_events::publish::TopologyConfig;
use benalsam_events::{
    Envelope, EventType, OutboxConfig, Outcome, SearchUrl, Settle, Topology, lapin,
};
use support::{
    TestIndex, TestSchema, TestVhost, database_url, dead_search, drain_queue, free_port,
    search_url, terminate, wait_exit,
};

const PATIENCE: Duration = Duration::from_secs(60);
const SYNC_QUEUE: &str = "elasticsearch.sync";
const DLQ: &str = "elasticsearch.sync.dlq";
const DEAD_LETTER_EXCHANGE: &str = "benalsam.dlx";
const HEALTH_QUEUE: &str = "system.health";

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
    let connection = vhost.url.connect("test").await.expect("connect");
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
    let left = drain_queue(&vhost.url, SYNC_QUEUE).await;
    let left_jobs: std::collections::HashSet<i64> = left
        .iter()
        .map(|d| Envelope::decode(&d.data).expect("envelope").job_id)
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
    let beats = drain_queue(&vhost.url, HEALTH_QUEUE).await;
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

#[tokio::test]
async fn of_several_search_nodes_the_consumer_uses_the_first_that_answers_and_health_names_it() {
    let (db, vhost, index) = (
        TestSchema::new().await,
        TestVhost::new().await,
        TestIndex::new().await,
    );
    declare(&vhost).await;
    let (shutdown, bridge) = support::spawn_bridge(&db, &vhost.url);
    // `expose` gives one address: the variable is the list's text.
    let listed = format!("{},{}", dead_search().expose(), search_url().expose());
    let port = free_port();
    // The first node is down from the start: the index is checked on the second.
    let mut child = consumer(&db, &vhost, &index, port)
        .env("ELASTICSEARCH_URL", &listed)
        .spawn()
        .expect("start consumer");
    db.insert_listings(200).await;
    let started = Instant::now();
    while db.count("completed").await < 200 {
        assert!(started.elapsed() < PATIENCE, "200 jobs completed in time");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let health = support::healthy(
        port,
        "/api/v1/health/elasticsearch-service",
        "elasticsearch-service",
    )
    .await;
    let in_use = search_url().redacted();
    assert_eq!(health["details"]["searchNodeInUse"], in_use, "{health}");
    let listed: SearchUrl = listed.parse().expect("a list");
    assert_eq!(health["details"]["search"], listed.redacted(), "{health}");
    assert_eq!(
        health["message"],
        format!("indexing into {in_use}"),
        "{health}"
    );
    let metrics = support::scrape(port).await;
    assert_eq!(
        support::sample(&metrics, "benalsam_search_node_switches_total", &[]),
        1.0,
        "one move, from the dead node to the second, and it stuck"
    );
    terminate(&child);
    assert!(wait_exit(&mut child).await.success(), "clean exit");
    shutdown.cancel();
    bridge.await.expect("no panic").expect("bridge drained");
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

/// Publishes a dead letter to the listings' dead-letter exchange, as the consumer does (or
/// anyone who may).
async fn dead_letter(channel: &lapin::Channel, body: &[u8], job: i64, routing_key: &str) {
    let mut headers = FieldTable::default();
    headers.insert(
        "x-dead-letter-kind".into(),
        AMQPValue::LongString(LongString::from("rejected")),
    );
    headers.insert(
        "x-dead-letter-reason".into(),
        AMQPValue::LongString(LongString::from("mapper_parsing_exception: bad")),
    );
    headers.insert("x-job-id".into(), AMQPValue::LongLongInt(job));
    channel
        .basic_publish(
            DEAD_LETTER_EXCHANGE.into(),
            routing_key.into(),
            BasicPublishOptions::default(),
            body,
            lapin::BasicProperties::default().with_headers(headers),
        )
        .await
        .expect("publish")
        .await
        .expect("confirmed");
}

#[tokio::test]
async fn dlq_commands_list_reasons_and_replay() {
    let (db, vhost) = (TestSchema::new().await, TestVhost::new().await);
    declare(&vhost).await;
    let database = database_url();
    let env = [
        ("RABBITMQ_URL", vhost.url.expose()),
        ("DATABASE_URL", database.expose()),
        ("BENALSAM_SCHEMA", db.name.as_str()),
    ];
    let listed = run_with(&["dlq", "list"], &env);
    assert!(
        listed.status.success()
            && String::from_utf8_lossy(&listed.stdout)
                .contains("the DLQ elasticsearch.sync.dlq is empty"),
        "an empty DLQ says so: {listed:?}"
    );

    // A job the consumer dead-lettered, with its letter; and a letter naming no real job.
    db.insert_listings(1).await;
    let outbox = db.outbox(OutboxConfig::default());
    let job = outbox.claim(1).await.expect("claim").remove(0);
    outbox
        .settle(&[(
            job.id,
            Outcome::DeadLettered {
                error: "mapper_parsing_exception: bad".to_owned(),
            },
        )])
        .await
        .expect("failed");
    let connection = vhost.url.connect("test").await.expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    let genuine = Envelope::of(&job, &EventType::listings());
    dead_letter(&channel, &genuine.to_bytes(), job.id, "listing.insert").await;
    dead_letter(&channel, br#"{"jobId": 77}"#, 77, "listing.update").await;
    // Wait until the broker counts them in the DLQ (a count, not a pause).
    let started = Instant::now();
    loop {
        let queue = channel
            .queue_declare(
                DLQ.into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("the DLQ exists");
        if queue.message_count() == 2 {
            break;
        }
        assert!(started.elapsed() < PATIENCE, "the dead letters are counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = connection.close(200, "ok".into()).await;

    let listed = run_with(&["dlq", "list"], &env);
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    assert!(
        text.contains(&job.id.to_string())
            && text.contains("77")
            && text.contains("mapper_parsing_exception: bad")
            && text.contains("rejected"),
        "{text}"
    );

    let replayed = run_with(&["dlq", "replay", "--job", &job.id.to_string()], &env);
    assert!(
        replayed.status.success(),
        "{}",
        String::from_utf8_lossy(&replayed.stderr)
    );
    assert!(String::from_utf8_lossy(&replayed.stdout).contains("replayed 1"));
    let back = drain_queue(&vhost.url, SYNC_QUEUE).await;
    assert_eq!(back.len(), 1, "the job is back on elasticsearch.sync");
    assert_eq!(back[0].routing_key.as_str(), "listing.insert");

    // An id without a letter is named; the letter naming no real job is refused with its
    // reason and stays.
    let out = run_with(&["dlq", "replay", "--job", "12345", "--job", "54321"], &env);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("12345, 54321") && stderr.contains(DLQ),
        "{stderr}"
    );
    let out = run_with(&["dlq", "replay", "--all"], &env);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        !out.status.success()
            && stdout.contains("refused job 77")
            && stdout.contains("not a valid envelope")
            && stderr.contains("refused"),
        "{stdout}{stderr}"
    );
    assert!(String::from_utf8_lossy(&run_with(&["dlq", "list"], &env).stdout).contains("77"));
    assert!(drain_queue(&vhost.url, SYNC_QUEUE).await.is_empty());
    db.drop().await;
    vhost.drop().await;
}

#[test]
fn bad_settings_stop_start_up_naming_the_setting() {
    let cases: [(&str, &str, &str); 9] = [
        ("BENALSAM_SEARCH_TIMEOUT", "0s", "--search-timeout"),
        ("BENALSAM_BULK_LINGER", "0s", "--bulk-linger"),
        ("BENALSAM_HEALTH_WINDOW", "0s", "--health-window"),
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
        (
            "ELASTICSEARCH_URL",
            "http://search:hunter2@es1:9200,https://search:hunter2@es2:9200",
            "ELASTICSEARCH_URL",
        ),
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
    // Connection settings are global; the run-time ones belong to `run`.
    let help = [&["--help"][..], &["run", "--help"]]
        .iter()
        .map(|args| String::from_utf8_lossy(&run_with(args, &[]).stdout).into_owned())
        .collect::<String>();
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

/// Metric names in a PromQL text: `benalsam_…`, without the suffixes the exposition adds.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("benalsam_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let base = ["_bucket", "_count", "_sum", "_total"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        names.insert(base.to_owned());
        rest = &tail[end..];
    }
    names
}

/// The `/metrics` answer on `port` once it serves one.
async fn metrics_text(port: u16) -> String {
    let started = Instant::now();
    loop {
        if let Ok(response) = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await
            && response.status().is_success()
        {
            return response.text().await.expect("body");
        }
        assert!(started.elapsed() < PATIENCE, "/metrics answers on {port}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `promtool check metrics` on an exposition text.
fn promtool_check_metrics(text: &str) -> Output {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed (scripts/stack up installs it)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write metrics");
    child.wait_with_output().expect("promtool runs")
}

/// The families of an exposition text.
fn families(text: &str) -> std::collections::BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn metrics_pass_promtool_each_binary_exports_its_own_and_the_dashboard_uses_real_ones() {
    // The alert rules, checked by Prometheus's own tool.
    let rules = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docker/prometheus/alerts.yml"
    );
    let checked = Command::new("promtool")
        .args(["check", "rules", rules])
        .output()
        .expect("promtool is installed (scripts/stack up installs it)");
    assert!(
        checked.status.success(),
        "{}",
        String::from_utf8_lossy(&checked.stdout)
    );
    let dashboard: serde_json::Value = serde_json::from_str(include_str!(
        "../../docker/grafana/dashboards/benalsam.json"
    ))
    .expect("dashboard JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10);
    assert!(panels.iter().all(|p| p["targets"][0]["expr"].is_string()));

    // A real consumer binary, and the bridge service in-process (what its binary runs).
    let (db, vhost, index) = (
        TestSchema::new().await,
        TestVhost::new().await,
        TestIndex::new().await,
    );
    declare(&vhost).await;
    let consumer_port = free_port();
    let mut child = consumer(&db, &vhost, &index, consumer_port)
        .spawn()
        .expect("start consumer");
    let bridge_port = free_port();
    let mut settings =
        benalsam_events::bridge::BridgeSettings::new(database_url(), vhost.url.clone());
    settings.outbox = benalsam_events::OutboxConfig::in_schema(&db.name);
    settings.health_addr = Some(format!("127.0.0.1:{bridge_port}").parse().expect("addr"));
    let stop_bridge = tokio_util::sync::CancellationToken::new();
    let bridge = tokio::spawn(benalsam_events::bridge::run(settings, stop_bridge.clone()));
    let consumer_text = metrics_text(consumer_port).await;
    let bridge_text = metrics_text(bridge_port).await;
    terminate(&child);
    wait_exit(&mut child).await;
    stop_bridge.cancel();
    bridge.await.expect("no panic").expect("bridge ran");

    for (service, text) in [("consumer", &consumer_text), ("bridge", &bridge_text)] {
        let out = promtool_check_metrics(text);
        assert!(
            out.status.success(),
            "promtool check metrics on the {service}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let names = families(text);
        for standard in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_start_time_seconds",
            "benalsam_build_info",
        ] {
            assert!(names.contains(standard), "{service} exports {standard}");
        }
    }
    let (consumer, bridge) = (families(&consumer_text), families(&bridge_text));
    assert!(consumer.contains("benalsam_deliveries_received_total"));
    assert!(
        !consumer.contains("benalsam_jobs_published_total"),
        "no bridge family in the consumer"
    );
    assert!(bridge.contains("benalsam_jobs_published_total"));
    assert!(
        !bridge.contains("benalsam_deliveries_received_total"),
        "no consumer family in the bridge"
    );

    // Every metric the dashboard and the alerts name is served by one of them.
    let served: std::collections::BTreeSet<String> = consumer.union(&bridge).cloned().collect();
    let named = metric_names(include_str!(
        "../../docker/grafana/dashboards/benalsam.json"
    ))
    .into_iter()
    .chain(metric_names(include_str!(
        "../../docker/prometheus/alerts.yml"
    )));
    for name in named {
        assert!(
            served.contains(&name) || served.contains(&format!("{name}_total")),
            "{name} is not in either /metrics: {served:?}"
        );
    }
    db.drop().await;
    vhost.drop().await;
    index.drop().await;
}

#[test]
fn a_run_setting_before_the_subcommand_says_where_it_belongs() {
    support::misplaced_run_settings_are_explained(env!("CARGO_BIN_EXE_benalsam-consumer"));
}

/// A relay in front of the search node that SIGKILLs the process `pid` names the moment the
/// answer to its first `_bulk` request arrives, and never passes that answer on: the search
/// node has applied the writes, the consumer dies before it can record them. Later
/// connections are relayed untouched. Returns the port and whether it struck.
async fn kill_at_the_bulk_answer(
    pid: std::sync::Arc<std::sync::atomic::AtomicU32>,
) -> (u16, std::sync::Arc<std::sync::atomic::AtomicBool>) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let target = search_url();
    let upstream = format!(
        "{}:{}",
        target.url().host_str().unwrap_or("127.0.0.1"),
        target.url().port().unwrap_or(9200)
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("address").port();
    let struck = Arc::new(AtomicBool::new(false));
    let fired = Arc::clone(&struck);
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let Ok(outbound) = tokio::net::TcpStream::connect(&upstream).await else {
                continue;
            };
            let (pid, fired) = (Arc::clone(&pid), Arc::clone(&fired));
            tokio::spawn(async move {
                let (mut from_client, mut to_client) = inbound.into_split();
                let (mut from_server, mut to_server) = outbound.into_split();
                // Set once a `_bulk` request went up this connection: HTTP/1.1 answers in
                // order and the client sends one request at a time on a connection, so the
                // next bytes down are its answer.
                let bulk = Arc::new(AtomicBool::new(false));
                let asked = Arc::clone(&bulk);
                let up = async move {
                    let mut buf = vec![0; 64 * 1024];
                    while let Ok(n) = from_client.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        if buf[..n].windows(5).any(|w| w == b"_bulk") {
                            asked.store(true, Ordering::SeqCst);
                        }
                        if to_server.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                };
                let down = async move {
                    let mut buf = vec![0; 64 * 1024];
                    while let Ok(n) = from_server.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        if bulk.load(Ordering::SeqCst) && !fired.swap(true, Ordering::SeqCst) {
                            let pid = pid.load(Ordering::SeqCst).to_string();
                            let killed = Command::new("kill").args(["-KILL", &pid]).status();
                            assert!(killed.is_ok_and(|s| s.success()), "kill -9 {pid}");
                            return;
                        }
                        if to_client.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                };
                tokio::select! {
                    () = up => {}
                    () = down => {}
                }
            });
        }
    });
    (port, struck)
}

/// The consumer's riskiest moment: the search node applied a bulk request and the consumer
/// dies before it marks those jobs completed and acks their messages. Restarted, it gets
/// them again from the broker; the search node refuses the writes it already has (their
/// version is the job id), every job completes once, and the index equals the rows.
#[tokio::test]
async fn a_consumer_killed_between_the_bulk_answer_and_the_settle_completes_everything_after_a_restart()
 {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    let (db, vhost, index) = (
        TestSchema::new().await,
        TestVhost::new().await,
        TestIndex::new().await,
    );
    declare(&vhost).await;
    let (shutdown, bridge) = support::spawn_bridge(&db, &vhost.url);
    let pid = Arc::new(AtomicU32::new(0));
    let (trap, struck) = kill_at_the_bulk_answer(Arc::clone(&pid)).await;
    let mut first = consumer(&db, &vhost, &index, free_port())
        .env("ELASTICSEARCH_URL", format!("http://127.0.0.1:{trap}"))
        .spawn()
        .expect("start consumer");
    pid.store(first.id(), Ordering::SeqCst);
    let ids = db.insert_listings(300).await;
    let status = wait_exit(&mut first).await;
    assert!(
        struck.load(Ordering::SeqCst),
        "killed by the relay: {status}"
    );

    // The window was hit: the index has the first batch, the outbox knows of none of it.
    let written = index.documents().await.len();
    assert!(written > 0, "the bulk request was applied");
    assert_eq!(
        db.count("completed").await,
        0,
        "no job recorded as completed"
    );

    // More changes while no consumer runs: edits and deletes of rows just indexed.
    for id in &ids[..50] {
        db.client
            .execute(
                "UPDATE listings SET description = 'Düzenlendi' WHERE id::text = $1",
                &[id],
            )
            .await
            .expect("edit");
    }
    for id in &ids[50..80] {
        db.client
            .execute("DELETE FROM listings WHERE id::text = $1", &[id])
            .await
            .expect("delete");
    }
    let jobs = 300 + 50 + 30;

    let port = free_port();
    let mut second = consumer(&db, &vhost, &index, port)
        .spawn()
        .expect("restart consumer");
    let started = Instant::now();
    while db.count("completed").await < jobs {
        assert!(
            started.elapsed() < PATIENCE,
            "{jobs} jobs completed in time: {:?}",
            db.statuses().await.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let health = support::healthy(
        port,
        "/api/v1/health/elasticsearch-service",
        "elasticsearch-service",
    )
    .await;
    terminate(&second);
    assert!(wait_exit(&mut second).await.success(), "clean exit");
    shutdown.cancel();
    bridge.await.expect("no panic").expect("bridge drained");

    assert_eq!(db.count("completed").await, jobs, "every job completed");
    assert_eq!(db.count("failed").await, 0);
    assert!(
        drain_queue(&vhost.url, DLQ).await.is_empty(),
        "no dead letter"
    );
    // The writes the search node had already applied came back and were refused by their
    // version, not applied twice.
    let superseded = health["details"]["superseded"].as_u64().unwrap_or(0);
    assert!(
        superseded >= written as u64,
        "{written} writes applied before the kill, {superseded} refused as superseded: {health}"
    );

    // The index equals the rows: each row's document, with its content and its latest job.
    let rows: std::collections::BTreeMap<String, (String, i64)> = db
        .client
        .query(
            "SELECT l.id::text, l.description, max(q.id) FROM listings l
             JOIN elasticsearch_sync_queue q ON q.record_id = l.id::text GROUP BY l.id",
            &[],
        )
        .await
        .expect("rows")
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    let documents: std::collections::BTreeMap<String, (String, i64)> = index
        .documents()
        .await
        .into_iter()
        .map(|(id, source)| {
            (
                id,
                (
                    source["description"].as_str().unwrap_or("").to_owned(),
                    source["job_id"].as_i64().unwrap_or(-1),
                ),
            )
        })
        .collect();
    assert_eq!(rows.len(), 270);
    assert_eq!(documents, rows, "the index equals the rows");
    db.drop().await;
    vhost.drop().await;
    index.drop().await;
}
