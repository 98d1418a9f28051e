//! Health that tells the truth, through the real binaries against the real stack: red while
//! PostgreSQL is away and green again when it returns, red while publishes fail on a deleted
//! exchange or an unbound queue until the bridge repairs them, green throughout a long backlog
//! drain, and "starting" (503, never a refused connection) while start-up waits for the search
//! engine. Outages are made with relays in front of the services, so no other test sees them.

mod binaries;
#[path = "../../benalsam-events/tests/support/mod.rs"]
mod support;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use benalsam_events::config::DatabaseUrl;
use benalsam_events::publish::TopologyConfig;
use benalsam_events::{EventType, Topology};
use binaries::{answer, bridge_binary, consumer_binary, stop, wait_until};
use serde_json::Value;
use support::{
    Relay, TestIndex, TestSchema, TestVhost, database_url, free_port, management, search_url,
};

const PATIENCE: Duration = Duration::from_secs(90);
const BRIDGE: &str = "/api/v1/health/database-trigger-bridge";
const PUBLISHING: &str = "/api/v1/health/rabbitmq";
const INDEXING: &str = "/api/v1/health/elasticsearch-service";

/// A binary running with its health endpoints on `port`.
struct Running {
    child: binaries::Guarded,
    port: u16,
}

fn start(binary: PathBuf, env: &[(&str, String)]) -> Running {
    let port = free_port();
    let mut command = Command::new(binary);
    command
        .env("BENALSAM_HEALTH_ADDR", format!("127.0.0.1:{port}"))
        .env("ELASTICSEARCH_URL", search_url().expose())
        .env("RUST_LOG", "warn")
        .env_remove("BENALSAM_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, v) in env {
        command.env(k, v);
    }
    Running {
        child: command.spawn().expect("the binary starts").into(),
        port,
    }
}

/// Waits until `path` answers `status`; returns the body.
async fn wait_for(port: u16, path: &str, status: u16, within: Duration) -> Value {
    wait_until(port, path, within, |got, _| got == status).await
}

/// Waits until `n` jobs are completed.
async fn wait_completed(db: &TestSchema, n: i64) {
    let started = Instant::now();
    while db.count("completed").await < n {
        assert!(started.elapsed() < PATIENCE, "{n} jobs completed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A relay to PostgreSQL; returns it and the URL through it.
async fn postgres_relay() -> (Relay, DatabaseUrl) {
    let target = database_url();
    let upstream = format!(
        "{}:{}",
        target.url().host_str().unwrap_or("127.0.0.1"),
        target.url().port().unwrap_or(5432)
    );
    let relay = Relay::start(upstream).await;
    let mut url = target.url().clone();
    url.set_port(Some(relay.port)).expect("port");
    (relay, url.as_str().parse().expect("relay url"))
}

fn env(db: &TestSchema, vhost: &TestVhost, database: &DatabaseUrl) -> Vec<(&'static str, String)> {
    vec![
        ("DATABASE_URL", database.expose().to_owned()),
        ("BENALSAM_SCHEMA", db.name.clone()),
        ("RABBITMQ_URL", vhost.url.expose().to_owned()),
        ("BENALSAM_POLL_INTERVAL", "200ms".to_owned()),
    ]
}

#[tokio::test]
async fn postgres_away_turns_both_red_within_30s_and_green_within_30s_of_its_return() {
    let (db, vhost, index) = (
        TestSchema::new().await,
        TestVhost::new().await,
        TestIndex::new().await,
    );
    let (relay, through_relay) = postgres_relay().await;
    let common = env(&db, &vhost, &through_relay);
    let bridge = start(bridge_binary(), &common);
    let mut consumer_env = common.clone();
    consumer_env.push(("BENALSAM_INDEX", index.alias.clone()));
    let consumer = start(consumer_binary(), &consumer_env);
    for service in [&bridge, &consumer] {
        wait_for(service.port, "/readyz", 200, PATIENCE).await;
    }
    db.insert_listings(3).await;
    wait_completed(&db, 3).await;

    relay.set_up(false);
    let red = Duration::from_secs(30);
    let bridge_red = wait_for(bridge.port, BRIDGE, 503, red).await;
    let consumer_red = wait_for(consumer.port, INDEXING, 503, red).await;
    assert!(
        bridge_red["message"]
            .as_str()
            .unwrap_or("")
            .contains("cannot reach"),
        "{bridge_red}"
    );
    assert!(
        consumer_red["message"]
            .as_str()
            .unwrap_or("")
            .contains("PostgreSQL"),
        "{consumer_red}"
    );
    // Liveness never fails for a dependency.
    assert_eq!(answer(bridge.port, "/livez").await.map(|a| a.0), Some(200));

    relay.set_up(true);
    let green = Duration::from_secs(30);
    wait_for(bridge.port, BRIDGE, 200, green).await;
    wait_for(consumer.port, INDEXING, 200, green).await;
    db.insert_listings(2).await;
    wait_completed(&db, 5).await;
    stop(bridge.child);
    stop(consumer.child);
    db.drop().await;
    vhost.drop().await;
    index.drop().await;
}

/// Deletes `what` (a path of the management API under the test's vhost).
async fn delete(vhost: &TestVhost, what: &str) {
    let (http, base, admin, password) = management();
    let response = http
        .delete(format!("{base}/api/{what}"))
        .basic_auth(&admin, Some(&password))
        .send()
        .await
        .expect("management API");
    assert!(
        response.status().is_success(),
        "delete {what}: {}",
        response.status()
    );
    let _ = vhost;
}

/// Whether `what` exists on the broker.
async fn exists(what: &str) -> bool {
    let (http, base, admin, password) = management();
    http.get(format!("{base}/api/{what}"))
        .basic_auth(&admin, Some(&password))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
}

#[tokio::test]
async fn publishes_refused_by_a_deleted_exchange_or_an_unbound_queue_turn_the_bridge_red_until_it_repairs_them()
 {
    let (db, vhost) = (TestSchema::new().await, TestVhost::new().await);
    let mut bridge_env = env(&db, &vhost, &database_url());
    // A retry waits 2-4 s: long enough to see the red answer before the repaired publish.
    bridge_env.push(("BENALSAM_RETRY_INITIAL", "4s".to_owned()));
    let bridge = start(bridge_binary(), &bridge_env);
    wait_for(bridge.port, "/readyz", 200, PATIENCE).await;
    let exchange = format!("exchanges/{}/benalsam.listings", vhost.name);
    let binding = format!(
        "bindings/{}/e/benalsam.listings/q/elasticsearch.sync",
        vhost.name
    );

    for (n, break_it) in [&exchange, &format!("{binding}/listing.%23")]
        .into_iter()
        .enumerate()
    {
        delete(&vhost, break_it).await;
        db.insert_listings(1).await;
        let red = wait_for(bridge.port, PUBLISHING, 503, PATIENCE).await;
        assert!(
            red["message"]
                .as_str()
                .unwrap_or("")
                .contains("publishes fail"),
            "{red}"
        );
        assert!(
            red["details"]["lastError"].is_string(),
            "the reason is in the details: {red}"
        );
        wait_for(bridge.port, PUBLISHING, 200, PATIENCE).await;
        let started = Instant::now();
        while db.count("sent").await < n as i64 + 1 {
            assert!(
                started.elapsed() < PATIENCE,
                "the job is sent after the repair"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(exists(&exchange).await, "the exchange is declared again");
        assert!(exists(&binding).await, "the queue is bound again");
    }
    stop(bridge.child);
    db.drop().await;
    vhost.drop().await;
}

#[tokio::test]
async fn a_backlog_that_takes_many_windows_to_drain_stays_green_throughout() {
    const JOBS: i64 = 15_000;
    const WINDOW: u64 = 3;
    let (db, vhost, index) = (
        TestSchema::new().await,
        TestVhost::new().await,
        TestIndex::new().await,
    );
    db.insert_listings(JOBS).await;
    let mut common = env(&db, &vhost, &database_url());
    common.push(("BENALSAM_HEALTH_WINDOW", format!("{WINDOW}s")));
    let mut bridge_env = common.clone();
    // One job per claim: a drain of many windows without a huge table.
    bridge_env.push(("BENALSAM_BATCH_SIZE", "1".to_owned()));
    let mut consumer_env = common;
    consumer_env.push(("BENALSAM_INDEX", index.alias.clone()));
    let bridge = start(bridge_binary(), &bridge_env);
    let consumer = start(consumer_binary(), &consumer_env);
    for service in [&bridge, &consumer] {
        wait_for(service.port, "/readyz", 200, PATIENCE).await;
    }
    let (started, mut oldest, mut answers) = (Instant::now(), 0.0_f64, 0);
    while db.count("completed").await < JOBS {
        for (port, path) in [
            (bridge.port, BRIDGE),
            (bridge.port, PUBLISHING),
            (consumer.port, INDEXING),
            (consumer.port, PUBLISHING),
            (bridge.port, "/readyz"),
            (consumer.port, "/readyz"),
        ] {
            let (status, body) = answer(port, path).await.expect("health answers");
            assert_eq!(status, 200, "{path} during the drain: {body}");
            answers += 1;
            if path == BRIDGE {
                oldest = oldest.max(
                    body["details"]["oldestPendingAgeSeconds"]
                        .as_f64()
                        .unwrap_or(0.0),
                );
            }
        }
        // A safety net, not a speed check: a loaded machine drains slowly, and the test is
        // about health while it drains, however long that takes.
        assert!(
            started.elapsed() < Duration::from_secs(900),
            "the backlog drains"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        oldest > (2 * WINDOW) as f64,
        "the oldest job waited {oldest} s, more than two windows, and health stayed green ({answers} answers)"
    );
    stop(bridge.child);
    stop(consumer.child);
    db.drop().await;
    vhost.drop().await;
    index.drop().await;
}

#[tokio::test]
async fn start_up_waiting_for_the_search_engine_answers_503_starting_then_200() {
    let (db, vhost) = (TestSchema::new().await, TestVhost::new().await);
    let alias = support::unique_name("t");
    let connection = vhost.url.connect("test").await.expect("connect");
    Topology::for_event_types(&[EventType::listings()], &TopologyConfig::default())
        .declare(&connection)
        .await
        .expect("declare");
    let (search, through_relay) = Relay::search().await;
    search.set_up(false);
    let mut consumer_env = env(&db, &vhost, &database_url());
    consumer_env.push(("BENALSAM_INDEX", alias.clone()));
    consumer_env.push(("ELASTICSEARCH_URL", through_relay.expose().to_owned()));
    let consumer = start(consumer_binary(), &consumer_env);
    // The first answer may come before the step is reached; every answer is a 503 until then.
    let starting = wait_until(consumer.port, "/readyz", PATIENCE, |status, body| {
        assert_eq!(
            status, 503,
            "not ready while the search engine is away: {body}"
        );
        body["message"]
            .as_str()
            .unwrap_or("")
            .contains("search index")
    })
    .await;
    let message = starting["message"].as_str().unwrap_or("");
    assert!(message.starts_with("starting"), "{message}");
    let (status, _) = answer(consumer.port, INDEXING)
        .await
        .expect("answers while starting");
    assert_eq!(status, 503);
    assert_eq!(
        answer(consumer.port, "/livez").await.map(|a| a.0),
        Some(200)
    );

    search.set_up(true);
    wait_for(consumer.port, "/readyz", 200, PATIENCE).await;
    stop(consumer.child);
    let index = TestIndex {
        alias,
        client: search_url()
            .client(Duration::from_secs(10))
            .expect("client"),
    };
    index.drop().await;
    let _ = connection.close(200, "ok".into()).await;
    db.drop().await;
    vhost.drop().await;
}

#[tokio::test]
async fn the_backlog_figures_come_from_the_database_while_the_broker_is_away() {
    let (db, vhost) = (TestSchema::new().await, TestVhost::new().await);
    let (broker, through_relay) = Relay::amqp(&vhost.url).await;
    let mut environment = env(&db, &vhost, &database_url());
    environment.retain(|(k, _)| *k != "RABBITMQ_URL");
    environment.push(("RABBITMQ_URL", through_relay.expose().to_owned()));
    environment.push(("BENALSAM_HEALTH_WINDOW", "5s".to_owned()));
    let bridge = start(bridge_binary(), &environment);
    wait_for(bridge.port, "/readyz", 200, PATIENCE).await;
    db.insert_listings(3).await;
    let started = Instant::now();
    while db.count("sent").await < 3 {
        assert!(
            started.elapsed() < PATIENCE,
            "3 jobs sent before the outage"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    broker.set_up(false);
    db.insert_listings(250).await;
    // The gauges and the health answer follow the outbox, not the publisher: 250 waiting
    // (pending, or claimed into the publisher's buffer before it stopped taking more), the
    // oldest of them ageing, and the verdict red with the true count.
    let started = Instant::now();
    loop {
        let scrape = support::scrape(bridge.port).await;
        let waiting = ["pending", "processing"]
            .map(|status| support::sample(&scrape, "benalsam_queue_jobs", &[("status", status)]))
            .iter()
            .sum::<f64>();
        let age = support::sample(&scrape, "benalsam_queue_oldest_pending_age_seconds", &[]);
        if waiting >= 250.0 && age >= 2.0 {
            break;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "the gauges show the backlog while the broker is away: waiting {waiting}, oldest {age} s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let red = wait_for(bridge.port, BRIDGE, 503, PATIENCE).await;
    let details = &red["details"];
    let waiting =
        details["pending"].as_i64().unwrap_or(0) + details["processing"].as_i64().unwrap_or(0);
    assert!(waiting >= 250, "{red}");
    assert!(
        red["message"].as_str().unwrap_or("").contains("jobs wait"),
        "{red}"
    );

    broker.set_up(true);
    let started = Instant::now();
    while db.count("sent").await < 253 {
        assert!(
            started.elapsed() < PATIENCE,
            "the backlog sent after the outage"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_for(bridge.port, BRIDGE, 200, PATIENCE).await;
    stop(bridge.child);
    db.drop().await;
    vhost.drop().await;
}

/// Opens `n` connections to `port` that each send half a request head and then nothing.
/// Connections the server does not take (out of descriptors, over its limit) wait in the
/// kernel's backlog or are refused; those are left out.
fn half_requests(port: u16, n: usize) -> Vec<std::net::TcpStream> {
    use std::io::Write;
    (0..n)
        .filter_map(|_| {
            let address = std::net::SocketAddr::from(([127, 0, 0, 1], port));
            let mut stream =
                std::net::TcpStream::connect_timeout(&address, Duration::from_secs(1)).ok()?;
            let _ = stream.write_all(b"GET /livez HTTP/1.1\r\nHost: slow\r\n");
            Some(stream)
        })
        .collect()
}

/// Whether the server closed `stream`: a read ends (end of stream or reset) by `deadline`.
fn closed_by_the_server(mut stream: &std::net::TcpStream, deadline: Instant) -> bool {
    use std::io::Read;
    let left = deadline.saturating_duration_since(Instant::now());
    let _ = stream.set_read_timeout(Some(left.max(Duration::from_millis(1))));
    let mut buf = [0u8; 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {} // a 408 or similar before the close
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false;
            }
            Err(_) => return true,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off_after_the_header_timeout_while_livez_answers() {
    let (db, vhost) = (TestSchema::new().await, TestVhost::new().await);
    let port = free_port();
    let mut command = Command::new(bridge_binary());
    command
        .env("BENALSAM_HEALTH_ADDR", format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "warn")
        .env_remove("BENALSAM_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, v) in env(&db, &vhost, &database_url()) {
        command.env(k, v);
    }
    let bridge: binaries::Guarded = command.spawn().expect("the bridge starts").into();
    wait_for(port, "/readyz", 200, PATIENCE).await;
    let slow = tokio::task::spawn_blocking(move || half_requests(port, 320))
        .await
        .expect("clients");
    assert!(slow.len() >= 300, "{} slow clients connected", slow.len());
    // While they hang, a probe is still answered.
    wait_for(port, "/livez", 200, PATIENCE).await;
    // And the server hangs up on each of them once its head did not arrive in time.
    let deadline = Instant::now() + PATIENCE;
    let open = tokio::task::spawn_blocking(move || {
        slow.iter()
            .filter(|s| !closed_by_the_server(s, deadline))
            .count()
    })
    .await
    .expect("reads");
    assert_eq!(open, 0, "half-sent requests left open by the server");
    wait_for(port, "/livez", 200, PATIENCE).await;
    stop(bridge);
    db.drop().await;
    vhost.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_the_health_server_backs_off_logs_rarely_and_recovers() {
    let (db, vhost) = (TestSchema::new().await, TestVhost::new().await);
    let log = std::env::temp_dir().join(format!("{}.log", support::unique_name("bridge")));
    let port = free_port();
    // The real binary with 64 descriptors: a few hundred connections exhaust them, so its
    // accepts fail with EMFILE for as long as the clients hold them.
    let mut command = Command::new("prlimit");
    command
        .arg("--nofile=64")
        .arg("--")
        .arg(bridge_binary())
        .env("BENALSAM_HEALTH_ADDR", format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "warn")
        .env_remove("BENALSAM_CONFIG")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"));
    for (k, v) in env(&db, &vhost, &database_url()) {
        command.env(k, v);
    }
    let bridge: binaries::Guarded = command.spawn().expect("the bridge starts").into();
    wait_for(port, "/readyz", 200, PATIENCE).await;

    let flood = tokio::task::spawn_blocking(move || {
        let mut held = Vec::new();
        // Keep opening for a while: the header timeout frees descriptors and the flood
        // takes them again, as a hostile client would.
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(12) {
            // Within the listen backlog, so connecting never waits on a full queue.
            if held.len() < 800 {
                held.extend(half_requests(port, 100));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        held.len()
    });
    let held = flood.await.expect("the flood");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let accept_warnings = text.lines().filter(|l| l.contains("health server")).count();
    assert!(
        accept_warnings < 20,
        "{accept_warnings} warnings about accepting in 12 s; the log must not explode"
    );
    assert!(
        text.contains("accepting connections fails"),
        "the descriptors ran out ({held} connections held): {}",
        text.lines().take(20).collect::<Vec<_>>().join("\n")
    );
    // The clients are gone (closed above): it answers again.
    wait_for(port, "/livez", 200, PATIENCE).await;
    stop(bridge);
    let _ = std::fs::remove_file(log);
    db.drop().await;
    vhost.drop().await;
}
