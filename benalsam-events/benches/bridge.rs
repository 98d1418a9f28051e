//! The bridge alone: jobs/s from `pending` to `sent` (job stream + publisher, confirms and
//! state updates included), beside a bare lapin loop publishing the same messages with
//! confirms and the same window, in the same run, against the local stack.
//!
//! ```text
//! scripts/stack up
//! cargo bench -p benalsam-events --bench bridge
//! ```
//! Settings: `BENCH_JOBS` (default 50000), `BENCH_BATCH` (claim batch, default 100),
//! `BENCH_WINDOW` (unconfirmed messages, default 1000), `BENCH_TABLES` (non-empty: claim only
//! the `listings` table, as the binary does). Uses a RabbitMQ vhost and a
//! PostgreSQL schema of its own and removes both at the end.

mod common;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use benalsam_events::EventType;

const SYNC_QUEUE: &str = "elasticsearch.sync";
use benalsam_events::{
    JobStream, JobStreamConfig, Outbox, OutboxConfig, Publisher, PublisherConfig,
};
use common::{BenchEnv, BoxError, setting};
use futures::{StreamExt, stream};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueuePurgeOptions};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let jobs: usize = setting("BENCH_JOBS", 50_000)?;
    let batch: usize = setting("BENCH_BATCH", 100)?;
    let window: usize = setting("BENCH_WINDOW", 1000)?;
    let env = BenchEnv::new("bench_bridge").await?;
    env.insert_listings(jobs as i64).await?;

    // 1. The bare client: the same envelopes, published with confirms and the same window.
    let messages: Vec<_> = env
        .envelopes()
        .await?
        .into_iter()
        .map(|e| {
            (
                e.routing_key.clone(),
                e.to_bytes(),
                e.properties("bench", None),
            )
        })
        .collect();
    let message_bytes = messages.iter().map(|m| m.1.len()).sum::<usize>() / messages.len().max(1);
    let channel = env.connection.create_channel().await?;
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
                key.as_ref().into(),
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
    let outbox = Outbox::new(env.db_url.clone(), {
        let mut c = OutboxConfig::default();
        c.schema = env.name.clone();
        if std::env::var("BENCH_TABLES").is_ok_and(|v| !v.is_empty()) {
            c.tables = Some(vec!["listings".to_owned()]);
        }
        c
    })?;
    let shutdown = CancellationToken::new();
    let config = {
        let mut c = JobStreamConfig::default();
        c.batch_size = batch;
        c
    };
    let job_stream = JobStream::new(outbox.clone(), config, shutdown.clone())?;
    let publisher = Publisher::new(env.url.clone(), outbox, vec![EventType::listings()], {
        let mut config = PublisherConfig::default();
        config.window = window;
        config
    });
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
    env.cleanup().await
}
