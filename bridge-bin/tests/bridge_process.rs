//! Runs the real `benalsam-bridge` binary as a process against real PostgreSQL and RabbitMQ:
//! killed and restarted it loses no job, stopped it leaves nothing half-done, its health
//! endpoints and heartbeat answer, and bad settings stop it with a message naming them.

#[path = "../../benalsam-events/tests/support/mod.rs"]
mod support;

use std::collections::HashSet;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use benalsam_events::Envelope;

const SYNC_QUEUE: &str = "elasticsearch.sync";
const HEALTH_QUEUE: &str = "system.health";
use support::{TestSchema, TestVhost, database_url, drain_queue, free_port, terminate, wait_exit};

const PATIENCE: Duration = Duration::from_secs(60);

fn bridge(db: &TestSchema, vhost: &TestVhost, health_port: u16) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_benalsam-bridge"));
    command
        .env("DATABASE_URL", database_url().expose())
        .env("BENALSAM_SCHEMA", &db.name)
        .env("RABBITMQ_URL", vhost.url.expose())
        .env("BENALSAM_HEALTH_ADDR", format!("127.0.0.1:{health_port}"))
        .env("BENALSAM_LEASE", "2s")
        .env("BENALSAM_POLL_INTERVAL", "200ms")
        .env("BENALSAM_BATCH_SIZE", "50")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    command
}

async fn wait_for_sent(db: &TestSchema, at_least: i64) {
    let started = Instant::now();
    while db.count("sent").await < at_least {
        assert!(started.elapsed() < PATIENCE, "{at_least} jobs sent in time");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn insert_in_transactions(db: &TestSchema, transactions: usize, rows: i64) {
    for _ in 0..transactions {
        db.insert_listings(rows).await;
    }
}

#[tokio::test]
async fn a_bridge_killed_mid_run_and_restarted_loses_no_job() {
    let (db, vhost) = (TestSchema::new().await, TestVhost::new().await);
    insert_in_transactions(&db, 10, 1000).await;

    let mut first = bridge(&db, &vhost, free_port())
        .spawn()
        .expect("start bridge");
    wait_for_sent(&db, 500).await;
    first.kill().expect("SIGKILL"); // no chance to clean up
    first.wait().expect("reaped");
    let sent_at_kill = db.count("sent").await;
    assert!(
        sent_at_kill < 10_000,
        "killed mid-run ({sent_at_kill} sent)"
    );

    let mut second = bridge(&db, &vhost, free_port())
        .spawn()
        .expect("restart bridge");
    wait_for_sent(&db, 10_000).await;
    terminate(&second);
    assert!(wait_exit(&mut second).await.success());

    let deliveries = drain_queue(&vhost.url, SYNC_QUEUE).await;
    let mut ids = HashSet::new();
    for d in &deliveries {
        let envelope = Envelope::decode(&d.data).expect("envelope");
        assert_eq!(
            d.properties.message_id().as_ref().map(|m| m.to_string()),
            Some(envelope.message_id.to_string()),
            "duplicates carry the same messageId"
        );
        ids.insert(envelope.job_id);
    }
    assert_eq!(ids.len(), 10_000, "every job reached the queue");
    db.drop().await;
    vhost.drop().await;
}

#[tokio::test]
async fn sigterm_leaves_nothing_half_done_and_health_answers_meanwhile() {
    let (db, vhost) = (TestSchema::new().await, TestVhost::new().await);
    insert_in_transactions(&db, 4, 1000).await;
    let port = free_port();
    let mut child = bridge(&db, &vhost, port)
        .env("BENALSAM_HEARTBEAT_INTERVAL", "200ms")
        .spawn()
        .expect("start bridge");
    wait_for_sent(&db, 4000).await;

    support::healthy(
        port,
        "/api/v1/health/database-trigger-bridge",
        "database-trigger-bridge",
    )
    .await;
    let rabbitmq = support::healthy(port, "/api/v1/health/rabbitmq", "rabbitmq").await;

    // /metrics parses as exposition text, its counters moved, and the health answer shows
    // the same numbers.
    let metrics = support::scrape(port).await;
    let published = support::sample(&metrics, "benalsam_jobs_published_total", &[]);
    assert!(published >= 4000.0, "published {published}");
    assert!(support::sample(&metrics, "benalsam_jobs_confirmed_total", &[]) >= 4000.0);
    assert!(
        support::sample(
            &metrics,
            "benalsam_jobs_claimed_total",
            &[("kind", "fresh")]
        ) >= 4000.0
    );
    assert!(
        support::sample(&metrics, "benalsam_confirm_duration_seconds", &[]) >= 4000.0,
        "confirm latency observed"
    );
    assert_eq!(
        rabbitmq["details"]["published"].as_f64(),
        Some(published),
        "health and metrics agree"
    );

    // More work arrives, and SIGTERM comes while it is being published.
    insert_in_transactions(&db, 4, 1000).await;
    wait_for_sent(&db, 4100).await;
    terminate(&child);
    assert!(wait_exit(&mut child).await.success(), "clean exit");
    assert_eq!(db.count("processing").await, 0, "nothing left claimed");
    let sent = db.count("sent").await;
    let pending = db.count("pending").await;
    assert_eq!(sent + pending, 8000, "every job is either sent or waiting");

    let beats = drain_queue(&vhost.url, HEALTH_QUEUE).await;
    assert!(!beats.is_empty(), "heartbeats on system.health");
    assert_eq!(beats[0].routing_key.as_str(), "health.bridge");
    let beat: serde_json::Value = serde_json::from_slice(&beats[0].data).expect("JSON heartbeat");
    assert_eq!(beat["service"], "database-trigger-bridge");
    db.drop().await;
    vhost.drop().await;
}

fn run_with(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_benalsam-bridge"));
    command.args(args).env("RUST_LOG", "error");
    for (k, v) in env {
        command.env(k, v);
    }
    command.output().expect("runs")
}

/// Flags, environment, and the setting the error must name.
type BadSetting<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);

#[test]
fn bad_settings_stop_start_up_naming_the_setting() {
    let cases: [BadSetting<'_>; 11] = [
        (&["run", "--batch-size", "0"], &[], "--batch-size"),
        (&["run", "--poll-interval", "soon"], &[], "--poll-interval"),
        (&["run", "--poll-interval", "0s"], &[], "--poll-interval"),
        (&["run", "--resend-after", "0s"], &[], "--resend-after"),
        // Deleting every completed job, or the last hour's, is refused (the latter without
        // --force), before anything is touched.
        (&["purge", "--older-than", "0s"], &[], "--older-than"),
        (&["purge", "--older-than", "30m"], &[], "--force"),
        (&[], &[("BENALSAM_LEASE", "0s")], "--lease"),
        (
            &[],
            &[("BENALSAM_HEARTBEAT_INTERVAL", "0s")],
            "--heartbeat-interval",
        ),
        (
            &[],
            &[("RABBITMQ_URL", "http://localhost:5672")],
            "RABBITMQ_URL",
        ),
        (
            &[],
            &[("BENALSAM_QUEUE_TYPE", "fast")],
            "BENALSAM_QUEUE_TYPE",
        ),
        (
            &[],
            &[("DATABASE_URL", "postgres://app:hunter2@[::1/db")],
            "DATABASE_URL",
        ),
    ];
    for (args, env, setting) in cases {
        let out = run_with(args, env);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} {env:?} must fail");
        assert!(stderr.contains(setting), "{setting} named in: {stderr}");
        assert!(!stderr.contains("hunter2"), "no password in: {stderr}");
    }
}

/// `--help` and `run --help` together: the connection settings and the run-time ones.
fn help(env: &[(&str, &str)]) -> String {
    [&["--help"][..], &["run", "--help"]]
        .iter()
        .map(|args| {
            let out = run_with(args, env);
            assert!(out.status.success(), "{args:?}");
            String::from_utf8_lossy(&out.stdout).into_owned()
        })
        .collect()
}

#[test]
fn help_documents_the_settings_without_passwords() {
    let help = help(&[("RABBITMQ_URL", "amqp://u:topsecret@h:5672/%2f")]);
    for setting in [
        "DATABASE_URL",
        "RABBITMQ_URL",
        "BENALSAM_HEALTH_ADDR",
        "BENALSAM_BATCH_SIZE",
    ] {
        assert!(help.contains(setting), "{setting} in --help");
    }
    assert!(
        !help.contains("topsecret") && !help.contains("benalsam123"),
        "{help}"
    );
}

#[test]
fn the_compose_file_pins_its_images_and_uses_settings_the_binaries_know() {
    let compose = include_str!("../../docker/compose.yaml");
    let images: Vec<&str> = compose
        .lines()
        .filter_map(|l| l.trim().strip_prefix("image:"))
        .map(str::trim)
        .collect();
    assert!(images.len() >= 5, "{images:?}");
    for image in images {
        let tag = image
            .rsplit('/')
            .next()
            .and_then(|last| last.split_once(':'))
            .map(|(_, t)| t);
        assert!(matches!(tag, Some(t) if t != "latest"), "{image} is pinned");
    }
    // Published ports answer the machine, not its network.
    for line in compose.lines().filter(|l| l.trim().starts_with("ports:")) {
        let published: Vec<&str> = line.split('"').skip(1).step_by(2).collect();
        assert!(!published.is_empty(), "{line}");
        for port in published {
            assert!(
                port.starts_with("127.0.0.1:"),
                "{port} is published beyond the machine"
            );
        }
    }
    // Everything before the consumer's service is shared or the bridge's.
    let bridge_part = compose.split("\n  consumer:").next().unwrap_or(compose);
    let help = help(&[]);
    for line in bridge_part.lines().map(str::trim) {
        if let Some((name, _)) = line.split_once(':')
            && (name.starts_with("BENALSAM_") || name.ends_with("_URL"))
        {
            assert!(
                help.contains(name),
                "compose sets {name}, which benalsam-bridge does not read"
            );
        }
    }
}

#[test]
fn a_run_setting_before_the_subcommand_says_where_it_belongs() {
    support::misplaced_run_settings_are_explained(env!("CARGO_BIN_EXE_benalsam-bridge"));
}

/// Jobs claimed under a lease and not given back.
async fn held(db: &TestSchema) -> i64 {
    db.client
        .query_one(
            "SELECT count(*) FROM elasticsearch_sync_queue
             WHERE status = 'processing' AND locked_by IS NOT NULL",
            &[],
        )
        .await
        .expect("count")
        .get(0)
}

/// The lease path: a bridge killed while it holds claimed jobs it could not publish (its
/// broker unreachable) leaves them `processing` under its lease; once the lease runs out,
/// another bridge reclaims them and publishes them, and nothing is lost. README: "A bridge
/// that dies holding jobs loses them to the next claimer when the lease expires."
#[tokio::test]
async fn jobs_held_by_a_killed_bridge_are_reclaimed_by_another_when_the_lease_runs_out() {
    let (db, vhost) = (TestSchema::new().await, TestVhost::new().await);
    let (relay, through_relay) = support::Relay::amqp(&vhost.url).await;
    let port = free_port();
    let mut first = bridge(&db, &vhost, port)
        .env("RABBITMQ_URL", through_relay.expose())
        .spawn()
        .expect("start bridge");
    // Connected, then the broker goes away; the jobs written now are claimed (the
    // hand-off to the publisher takes a bounded number) but cannot be published.
    let started = Instant::now();
    while reqwest::get(format!("http://127.0.0.1:{port}/readyz"))
        .await
        .map_or(true, |r| r.status() != 200)
    {
        assert!(started.elapsed() < PATIENCE, "the first bridge is ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    relay.set_up(false);
    insert_in_transactions(&db, 1, 1000).await;
    // The bridge claims until its hand-off is full; it holds them as long as it lives.
    let started = Instant::now();
    let mut last = -1;
    loop {
        let now = held(&db).await;
        if now >= 100 && now == last {
            break;
        }
        assert!(started.elapsed() < PATIENCE, "the bridge claims jobs");
        last = now;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(
        db.count("sent").await,
        0,
        "nothing published: the broker is away"
    );
    first.kill().expect("SIGKILL"); // holding them, with no chance to give them back
    first.wait().expect("reaped");
    let held_at_kill = held(&db).await;
    assert!(held_at_kill >= 100, "{held_at_kill} jobs held at the kill");
    // Their leases, to check that none was taken before its end.
    db.client
        .batch_execute(
            "CREATE TABLE held AS SELECT id, locked_until FROM elasticsearch_sync_queue
             WHERE status = 'processing'",
        )
        .await
        .expect("remember the held jobs");

    // Another bridge, with the broker: it takes the free jobs at once and the held ones when
    // their 2 s lease has run out.
    let port = free_port();
    let mut second = bridge(&db, &vhost, port).spawn().expect("start bridge");
    wait_for_sent(&db, 1000).await;
    let metrics = support::scrape(port).await;
    let reclaimed = support::sample(&metrics, "benalsam_jobs_reclaimed_total", &[]);
    let health = support::healthy(
        port,
        "/api/v1/health/database-trigger-bridge",
        "database-trigger-bridge",
    )
    .await;
    terminate(&second);
    assert!(wait_exit(&mut second).await.success());
    assert_eq!(
        reclaimed, held_at_kill as f64,
        "every held job was reclaimed after its lease, none earlier"
    );
    assert_eq!(health["details"]["reclaimed"].as_f64(), Some(reclaimed));
    let early: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM held h JOIN elasticsearch_sync_queue q USING (id)
             WHERE q.sent_at IS NULL OR q.sent_at < h.locked_until",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(
        early, 0,
        "no held job was published before its lease ran out"
    );
    assert_eq!(db.count("processing").await, 0, "nothing left claimed");
    let ids: HashSet<i64> = drain_queue(&vhost.url, SYNC_QUEUE)
        .await
        .iter()
        .map(|d| Envelope::decode(&d.data).expect("envelope").job_id)
        .collect();
    assert_eq!(ids.len(), 1000, "every job reached the queue");
    db.drop().await;
    vhost.drop().await;
}
