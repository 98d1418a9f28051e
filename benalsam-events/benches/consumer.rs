//! The consumer alone: messages/s from `elasticsearch.sync` to indexed and completed (decode,
//! verify, build, bulk, classify, mark completed, ack), against the ceiling: the best raw
//! `_bulk` throughput of the same documents with a bare client (bodies encoded beforehand),
//! over several request sizes and 1–4 requests in flight, in the same run against the local
//! stack. The consumer runs with the same sizes and in-flight counts.
//!
//! ```text
//! scripts/stack up
//! cargo bench -p benalsam-events --bench consumer
//! ```
//! Settings: `BENCH_JOBS` (default 20000), `BENCH_SIZES` (default `250,500,1000`),
//! `BENCH_CONCURRENCY` (default `1,2,3,4`).

mod common;

use std::time::{Duration, Instant};

use benalsam_events::config::SearchUrl;
use benalsam_events::elasticsearch::Elasticsearch;
use benalsam_events::elasticsearch::http::Method;
use benalsam_events::elasticsearch::http::headers::{CONTENT_TYPE, HeaderMap, HeaderValue};

use benalsam_events::{Indexer, IndexerConfig, Outbox, OutboxConfig};
use common::{BenchEnv, BoxError, listings, setting};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use tokio_util::sync::CancellationToken;

async fn send(
    client: &Elasticsearch,
    method: Method,
    path: &str,
    body: Vec<u8>,
    ct: &'static str,
) -> Result<serde_json::Value, BoxError> {
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(ct));
    let body = if body.is_empty() { None } else { Some(body) };
    Ok(client
        .send(method, path, headers, Option::<&()>::None, body, None)
        .await?
        .json()
        .await?)
}

const LISTINGS_EXCHANGE: &str = "benalsam.listings";

async fn fresh_index(client: &Elasticsearch, alias: &str) -> Result<(), BoxError> {
    listings(alias).ensure_index(client).await?;
    Ok(())
}

fn list(name: &str, default: &str) -> Result<Vec<usize>, BoxError> {
    std::env::var(name)
        .unwrap_or_else(|_| default.to_owned())
        .split(',')
        .map(|s| Ok(s.trim().parse()?))
        .collect()
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let jobs: i64 = setting("BENCH_JOBS", 20_000)?;
    let sizes = list("BENCH_SIZES", "250,500,1000")?;
    let concurrencies = list("BENCH_CONCURRENCY", "1,2,3,4")?;
    let es_url = SearchUrl::from_env()?;
    let env = BenchEnv::new("bench_consumer").await?;
    env.insert_listings(jobs).await?;
    let envelopes = env.envelopes().await?;
    let (name, url) = (env.name.clone(), env.url.clone());
    let es = es_url.client(Duration::from_secs(60))?;
    let outbox = Outbox::new(env.db_url.clone(), {
        let mut c = OutboxConfig::default();
        c.schema = name.clone();
        c
    })?;
    let publish_channel = env.connection.create_channel().await?;
    publish_channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;

    println!(
        "jobs: {jobs} per run, document ~{} bytes",
        envelopes.first().map_or(0, |e| e.to_bytes().len())
    );
    println!("| bulk size | in flight | raw _bulk docs/s | consumer msgs/s | consumer / raw |");
    println!("|---:|---:|---:|---:|---:|");
    let (mut ceiling, mut best) = ((0.0f64, 0, 0), (0.0f64, 0, 0));
    let mut cpu_rows = Vec::new();
    for &size in &sizes {
        for &concurrency in &concurrencies {
            // Raw: the same documents into a fresh index.
            let raw_alias = format!("{name}_raw_{size}_{concurrency}");
            fresh_index(&es, &raw_alias).await?;
            let documents = listings(&raw_alias);
            let items: Vec<(benalsam_events::Action, i64)> = envelopes
                .iter()
                .map(|e| Ok((documents.action(e)?, e.job_id)))
                .collect::<Result<_, BoxError>>()?;
            let cpu_before = common::cpu_by_process(&[("bench", std::process::id())])?;
            let raw = common::raw_bulk(&es, &items, size, concurrency).await?;
            let cpu_raw = common::cpu_by_process(&[("bench", std::process::id())])?
                .per_thousand(&cpu_before, items.len());

            // The consumer: the same envelopes waiting in the queue, into a fresh index.
            let alias = format!("{name}_c_{size}_{concurrency}");
            fresh_index(&es, &alias).await?;
            let (consumer, cpu_consumer) = consume(
                &env,
                &publish_channel,
                &envelopes,
                &url,
                &es,
                &outbox,
                &alias,
                size,
                concurrency,
            )
            .await?;
            cpu_rows.push((size, concurrency, cpu_raw, cpu_consumer));
            println!(
                "| {size} | {concurrency} | {raw:.0} | {consumer:.0} | {:.2} |",
                consumer / raw
            );
            if raw > ceiling.0 {
                ceiling = (raw, size, concurrency);
            }
            if consumer > best.0 {
                best = (consumer, size, concurrency);
            }
            for index in [raw_alias, alias] {
                send(
                    &es,
                    Method::Delete,
                    &format!("/{index}_v1"),
                    Vec::new(),
                    "application/json",
                )
                .await?;
            }
        }
    }
    println!(
        "\nceiling (best raw _bulk): {:.0} docs/s at bulk {} × {} in flight",
        ceiling.0, ceiling.1, ceiling.2
    );
    println!(
        "best consumer: {:.0} msgs/s at bulk {} × {} in flight = {:.2} of the ceiling",
        best.0,
        best.1,
        best.2,
        best.0 / ceiling.0
    );
    println!(
        "\nCPU seconds per 1,000 documents (user + system, from /proc; `bench` is this process: the bare client, or the consumer):\n"
    );
    let header = common::cpu_by_process(&[("bench", std::process::id())])?.header();
    println!("| bulk size | in flight | run | {} |", header.join(" | "));
    println!("|---:|---:|---|{}", "---:|".repeat(header.len()));
    for (size, concurrency, raw, consumer) in cpu_rows {
        println!("| {size} | {concurrency} | raw | {} |", raw.join(" | "));
        println!(
            "| {size} | {concurrency} | consumer | {} |",
            consumer.join(" | ")
        );
    }
    env.cleanup().await
}

/// The envelopes published as the bridge leaves them, then consumed by an [`Indexer`] with
/// `size` actions per request and `in_flight` requests at once: msgs/s until all are indexed.
#[allow(clippy::too_many_arguments)]
async fn consume(
    env: &BenchEnv,
    publish_channel: &lapin::Channel,
    envelopes: &[benalsam_events::Envelope<'static>],
    url: &benalsam_events::AmqpUrl,
    es: &Elasticsearch,
    outbox: &Outbox,
    alias: &str,
    size: usize,
    in_flight: usize,
) -> Result<(f64, Vec<String>), BoxError> {
    // The consumer checks every delivery against the outbox and indexes only jobs that
    // expect one: the jobs are `sent`, as the bridge leaves them.
    env.client
        .execute(
            "UPDATE elasticsearch_sync_queue
             SET status = 'sent', sent_at = now(), completed_at = NULL, processed_at = NULL",
            &[],
        )
        .await?;
    let mut confirms = Vec::with_capacity(envelopes.len());
    for e in envelopes {
        confirms.push(
            publish_channel
                .basic_publish(
                    LISTINGS_EXCHANGE.into(),
                    e.routing_key.as_ref().into(),
                    BasicPublishOptions::default(),
                    &e.to_bytes(),
                    e.properties("bench", None),
                )
                .await?,
        );
    }
    for c in confirms {
        c.await?;
    }
    let indexer = Indexer::new(
        url.clone(),
        es.clone(),
        outbox.clone(),
        vec![listings(alias)],
        {
            let mut c = IndexerConfig::default();
            c.batch_size = size;
            c.in_flight = in_flight;
            c.prefetch = u16::try_from((size * (in_flight + 1)).max(1000)).unwrap_or(u16::MAX);
            c
        },
    )?;
    let status = indexer.status();
    let shutdown = CancellationToken::new();
    let cpu_before = common::cpu_by_process(&[("bench", std::process::id())])?;
    let started = Instant::now();
    let task = tokio::spawn(indexer.run(shutdown.clone()));
    let jobs = envelopes.len() as u64;
    let (mut seen, mut moved) = (0, Instant::now());
    while status.snapshot().indexed < jobs {
        let indexed = status.snapshot().indexed;
        if indexed > seen {
            (seen, moved) = (indexed, Instant::now());
        } else if moved.elapsed() > Duration::from_secs(60) {
            return Err(format!("the consumer stopped at {indexed} of {jobs} indexed").into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rate = jobs as f64 / started.elapsed().as_secs_f64();
    let cpu = common::cpu_by_process(&[("bench", std::process::id())])?
        .per_thousand(&cpu_before, envelopes.len());
    shutdown.cancel();
    task.await?;
    Ok((rate, cpu))
}
