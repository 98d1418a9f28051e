//! The bridge alone: jobs/s from `pending` to `sent` (job stream + publisher, confirms and
//! state updates included), beside a bare lapin loop publishing the same messages with
//! confirms and the same window, in the same run, against the local stack.
//!
//! ```text
//! scripts/stack up
//! cargo bench -p benalsam-events --bench bridge
//! ```
//! Settings: `BENCH_JOBS` (default 50000), `BENCH_BATCH` (claim batch, default 100),
//! `BENCH_WINDOW` (unconfirmed messages, default 1000). Uses a RabbitMQ vhost and a
//! PostgreSQL schema of its own and removes both at the end.

use std::collections::VecDeque;
use std::time::{Duration, Instant, SystemTime};

use benalsam_events::config::{AmqpUrl, DEFAULT_DATABASE_URL, DEFAULT_RABBITMQ_URL, DatabaseUrl};
use benalsam_events::envelope::Envelope;
use benalsam_events::job::{ClaimKind, Job};
use benalsam_events::routing::{EventType, Routes};
use benalsam_events::topology::{SYNC_QUEUE, Topology, TopologyConfig};
use benalsam_events::{
    JobStream, JobStreamConfig, Outbox, OutboxConfig, Publisher, PublisherConfig, amqp, migrate,
    postgres,
};
use futures::{StreamExt, stream};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueuePurgeOptions};
use tokio_util::sync::CancellationToken;

type BoxError = Box<dyn std::error::Error>;

fn setting(name: &str, default: usize) -> Result<usize, BoxError> {
    Ok(std::env::var(name)
        .ok()
        .map(|v| v.parse())
        .transpose()?
        .unwrap_or(default))
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let jobs = setting("BENCH_JOBS", 50_000)?;
    let batch = setting("BENCH_BATCH", 100)?;
    let window = setting("BENCH_WINDOW", 1000)?;
    let db_url = DatabaseUrl::from_env_or(DEFAULT_DATABASE_URL)?;
    let base = AmqpUrl::from_env_or(DEFAULT_RABBITMQ_URL)?;
    let name = format!("bench_bridge_{}", std::process::id());

    // A vhost of our own, through the management API.
    let http = reqwest::Client::new();
    let mgmt = format!(
        "http://{}:15672/api",
        base.url().host_str().unwrap_or("127.0.0.1")
    );
    let (user, password) = (
        base.url().username().to_owned(),
        base.url().password().unwrap_or_default().to_owned(),
    );
    http.put(format!("{mgmt}/vhosts/{name}"))
        .basic_auth(&user, Some(&password))
        .send()
        .await?
        .error_for_status()?;
    http.put(format!("{mgmt}/permissions/{name}/{user}"))
        .basic_auth(&user, Some(&password))
        .json(&serde_json::json!({"configure": ".*", "write": ".*", "read": ".*"}))
        .send()
        .await?
        .error_for_status()?;
    let mut vhost_url = base.url().clone();
    vhost_url.set_path(&format!("/{name}"));
    let url: AmqpUrl = vhost_url.as_str().parse()?;
    let connection = amqp::connect(&url, "bench").await?;
    Topology::benalsam(&TopologyConfig::default())
        .declare(&connection)
        .await?;

    let mut client = postgres::connect(&db_url).await?;
    migrate::migrate(&mut client, &name).await?;
    client
        .batch_execute(&format!("SET search_path TO {name}"))
        .await?;
    client
        .execute(
            "INSERT INTO listings (user_id, title, description, category, status, latitude, longitude, attributes)
             SELECT gen_random_uuid(), 'Satılık ikinci el bisiklet ' || i,
                    repeat('Az kullanılmış, bakımlı, faturalı. ', 8), 'spor', 'active', 41.0, 29.0,
                    '{\"renk\": \"kırmızı\", \"vites\": 21}'
             FROM generate_series(1, $1::bigint) AS i",
            &[&(jobs as i64)],
        )
        .await?;

    // 1. The bare client: the same envelopes, published with confirms and the same window.
    let rows = client
        .query(
            "SELECT id, table_name, operation, record_id, change_data, created_at, traceparent
             FROM elasticsearch_sync_queue ORDER BY id",
            &[],
        )
        .await?;
    let listings = EventType::listings();
    let messages: Vec<(String, Vec<u8>, lapin::BasicProperties)> = rows
        .iter()
        .map(|r| {
            let operation: String = r.get(2);
            let job = Job {
                id: r.get(0),
                table_name: r.get(1),
                operation: operation
                    .parse()
                    .unwrap_or(benalsam_events::Operation::Insert),
                record_id: r.get(3),
                change_data: r.get(4),
                retry_count: 0,
                created_at: r.get::<_, SystemTime>(5),
                traceparent: r.get(6),
                claim: ClaimKind::Fresh,
            };
            let route = listings.route(&job);
            let envelope = Envelope::new(&job, &route);
            let properties = envelope.properties("bench", None);
            (route.routing_key, envelope.to_bytes(), properties)
        })
        .collect();
    let message_bytes = messages.iter().map(|m| m.1.len()).sum::<usize>() / messages.len().max(1);
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let started = Instant::now();
    let mut in_flight = VecDeque::new();
    for (key, body, properties) in &messages {
        if in_flight.len() >= window
            && let Some(confirm) = in_flight.pop_front()
        {
            confirm.await?;
        }
        let confirm = channel
            .basic_publish(
                "benalsam.listings".into(),
                key.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body,
                properties.clone(),
            )
            .await?;
        in_flight.push_back(confirm);
    }
    for confirm in in_flight {
        confirm.await?;
    }
    let bare = jobs as f64 / started.elapsed().as_secs_f64();
    channel
        .queue_purge(SYNC_QUEUE.into(), QueuePurgeOptions::default())
        .await?;

    // 2. The bridge: pending → sent, state updates included.
    let outbox = Outbox::new(
        db_url.clone(),
        OutboxConfig {
            schema: name.clone(),
            ..OutboxConfig::default()
        },
    )?;
    let shutdown = CancellationToken::new();
    let config = JobStreamConfig {
        batch_size: batch,
        ..JobStreamConfig::default()
    };
    let job_stream = JobStream::new(outbox.clone(), config, shutdown.clone())?;
    let publisher = Publisher::new(
        url.clone(),
        outbox.clone(),
        Routes::default(),
        PublisherConfig {
            window,
            ..PublisherConfig::default()
        },
    );
    let status = publisher.status();
    let started = Instant::now();
    let task = tokio::spawn(job_stream.flat_map(stream::iter).map(Ok).forward(publisher));
    while status.snapshot().confirmed < jobs as u64 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let bridge = jobs as f64 / started.elapsed().as_secs_f64();
    shutdown.cancel();
    task.await??;

    println!(
        "jobs: {jobs}, message body: {message_bytes} bytes, claim batch: {batch}, window: {window}"
    );
    println!("| path | messages/s |");
    println!("|---|---:|");
    println!("| bare lapin, publish with confirms | {bare:.0} |");
    println!("| bridge, pending → sent (claim, publish, confirm, mark) | {bridge:.0} |");
    println!("| ratio | {:.2} |", bridge / bare);

    client
        .batch_execute(&format!("DROP SCHEMA {name} CASCADE"))
        .await?;
    let _ = connection.close(200, "done".into()).await;
    http.delete(format!("{mgmt}/vhosts/{name}"))
        .basic_auth(&user, Some(&password))
        .send()
        .await?;
    Ok(())
}
