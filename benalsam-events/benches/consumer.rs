//! The consumer alone: messages/s from `elasticsearch.sync` to indexed and completed (decode,
//! build, bulk, classify, mark completed, ack), beside raw `_bulk` requests of the same
//! documents with a bare client, for several bulk sizes, in the same run against the local
//! stack.
//!
//! ```text
//! scripts/stack up
//! cargo bench -p benalsam-events --bench consumer
//! ```
//! Settings: `BENCH_JOBS` (default 20000), `BENCH_SIZES` (default `100,500,1000`).

mod common;

use std::time::{Duration, Instant};

use benalsam_events::config::SearchUrl;
use benalsam_events::elasticsearch::Elasticsearch;
use benalsam_events::elasticsearch::http::Method;
use benalsam_events::elasticsearch::http::headers::{CONTENT_TYPE, HeaderMap, HeaderValue};
use benalsam_events::index as search;
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
    search::ensure_index(client, &listings(alias)).await?;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let jobs: i64 = setting("BENCH_JOBS", 20_000)?;
    let sizes: Vec<usize> = std::env::var("BENCH_SIZES")
        .unwrap_or_else(|_| "100,500,1000".to_owned())
        .split(',')
        .map(|s| s.trim().parse())
        .collect::<Result<_, _>>()?;
    let es_url = SearchUrl::from_env()?;
    let env = BenchEnv::new("bench_consumer").await?;
    env.insert_listings(jobs).await?;
    let envelopes = env.envelopes().await?;
    let (name, url) = (env.name.clone(), env.url.clone());
    let es = search::client(&es_url, Duration::from_secs(60))?;
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
    println!("| bulk size | raw _bulk docs/s | consumer msgs/s | ratio |");
    println!("|---:|---:|---:|---:|");
    for size in sizes {
        // Raw: the same documents, bulk requests of `size`, one after the other.
        let raw_alias = format!("{name}_raw_{size}");
        fresh_index(&es, &raw_alias).await?;
        let documents = listings(&raw_alias);
        let items: Vec<(benalsam_events::Action, i64)> = envelopes
            .iter()
            .map(|e| Ok((documents.action(e)?, e.job_id)))
            .collect::<Result<_, BoxError>>()?;
        let started = Instant::now();
        for chunk in items.chunks(size) {
            let answer = send(
                &es,
                Method::Post,
                "/_bulk",
                common::bulk_body(chunk),
                "application/x-ndjson",
            )
            .await?;
            if answer["errors"] != false {
                return Err(format!(
                    "raw bulk had errors: {}",
                    answer.to_string().chars().take(300).collect::<String>()
                )
                .into());
            }
        }
        let raw = jobs as f64 / started.elapsed().as_secs_f64();

        // The consumer: the same envelopes waiting in the queue, into a fresh index.
        let alias = format!("{name}_c_{size}");
        fresh_index(&es, &alias).await?;
        // The jobs as the bridge leaves them, published and confirmed: the consumer checks
        // every delivery against the outbox and indexes only jobs that expect one.
        env.client
            .execute(
                "UPDATE elasticsearch_sync_queue
                 SET status = 'sent', sent_at = now(), completed_at = NULL, processed_at = NULL",
                &[],
            )
            .await?;
        let mut confirms = Vec::with_capacity(envelopes.len());
        for e in &envelopes {
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
            vec![listings(&alias)],
            {
                let mut c = IndexerConfig::default();
                c.batch_size = size;
                c.prefetch = u16::try_from((size * 2).max(1000)).unwrap_or(u16::MAX);
                c
            },
        )?;
        let status = indexer.status();
        let shutdown = CancellationToken::new();
        let started = Instant::now();
        let task = tokio::spawn(indexer.run(shutdown.clone()));
        let (mut seen, mut moved) = (0, Instant::now());
        while status.snapshot().indexed < jobs as u64 {
            let indexed = status.snapshot().indexed;
            if indexed > seen {
                (seen, moved) = (indexed, Instant::now());
            } else if moved.elapsed() > Duration::from_secs(60) {
                return Err(format!("the consumer stopped at {indexed} of {jobs} indexed").into());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let consumer = jobs as f64 / started.elapsed().as_secs_f64();
        shutdown.cancel();
        task.await?;
        println!(
            "| {size} | {raw:.0} | {consumer:.0} | {:.2} |",
            consumer / raw
        );
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

    env.cleanup().await
}
