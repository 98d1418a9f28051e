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

use std::time::{Duration, Instant, SystemTime};

use benalsam_events::bulk::{self, BulkItem};
use benalsam_events::config::{
    AmqpUrl, DEFAULT_DATABASE_URL, DEFAULT_ELASTICSEARCH_URL, DEFAULT_RABBITMQ_URL, DatabaseUrl,
    SearchUrl,
};
use benalsam_events::document::{Documents, ListingDocuments};
use benalsam_events::elasticsearch::Elasticsearch;
use benalsam_events::elasticsearch::http::Method;
use benalsam_events::elasticsearch::http::headers::{CONTENT_TYPE, HeaderMap, HeaderValue};
use benalsam_events::envelope::Envelope;
use benalsam_events::job::{ClaimKind, Job};
use benalsam_events::routing::{EventType, LISTINGS_EXCHANGE};
use benalsam_events::search::{self, IndexConfig};
use benalsam_events::topology::{Topology, TopologyConfig};
use benalsam_events::{Indexer, IndexerConfig, Outbox, OutboxConfig, amqp, migrate, postgres};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use tokio_util::sync::CancellationToken;

type BoxError = Box<dyn std::error::Error>;

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

async fn fresh_index(client: &Elasticsearch, alias: &str) -> Result<(), BoxError> {
    let config = IndexConfig {
        alias: alias.to_owned(),
        ..IndexConfig::default()
    };
    search::ensure_index(client, &config, &search::listings_index_body(&config)).await?;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let jobs: i64 = std::env::var("BENCH_JOBS")
        .ok()
        .map(|v| v.parse())
        .transpose()?
        .unwrap_or(20_000);
    let sizes: Vec<usize> = std::env::var("BENCH_SIZES")
        .unwrap_or_else(|_| "100,500,1000".to_owned())
        .split(',')
        .map(|s| s.trim().parse())
        .collect::<Result<_, _>>()?;
    let db_url = DatabaseUrl::from_env_or(DEFAULT_DATABASE_URL)?;
    let base = AmqpUrl::from_env_or(DEFAULT_RABBITMQ_URL)?;
    let es_url = SearchUrl::from_env_or(DEFAULT_ELASTICSEARCH_URL)?;
    let name = format!("bench_consumer_{}", std::process::id());

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
    let mut vhost = base.url().clone();
    vhost.set_path(&format!("/{name}"));
    let url: AmqpUrl = vhost.as_str().parse()?;
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
            "INSERT INTO listings (user_id, title, description, category, status, latitude, longitude, attributes, location_city)
             SELECT gen_random_uuid(), 'Satılık ikinci el bisiklet ' || i,
                    repeat('Az kullanılmış, bakımlı, faturalı. ', 8), 'spor', 'active', 41.0, 29.0,
                    '{\"renk\": \"kırmızı\", \"vites\": 21}', 'İstanbul'
             FROM generate_series(1, $1::bigint) AS i",
            &[&jobs],
        )
        .await?;
    let rows = client
        .query("SELECT id, table_name, operation, record_id, change_data, created_at FROM elasticsearch_sync_queue ORDER BY id", &[])
        .await?;
    let envelopes: Vec<Envelope> = rows
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
                traceparent: None,
                claim: ClaimKind::Fresh,
            };
            Envelope::new(&job, &EventType::listings().route(&job))
        })
        .collect();
    let es = search::client(&es_url, Duration::from_secs(60))?;
    let outbox = Outbox::new(
        db_url.clone(),
        OutboxConfig {
            schema: name.clone(),
            ..OutboxConfig::default()
        },
    )?;
    let publish_channel = connection.create_channel().await?;
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
        let documents = Documents::new().with("listings", ListingDocuments::new(&raw_alias));
        let items: Vec<BulkItem> = envelopes
            .iter()
            .map(|e| {
                Ok(BulkItem {
                    action: documents.build(e)?,
                    version: e.job_id,
                })
            })
            .collect::<Result<_, BoxError>>()?;
        let started = Instant::now();
        for chunk in items.chunks(size) {
            let answer = send(
                &es,
                Method::Post,
                "/_bulk",
                bulk::encode(chunk),
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
        let mut confirms = Vec::with_capacity(envelopes.len());
        for e in &envelopes {
            confirms.push(
                publish_channel
                    .basic_publish(
                        LISTINGS_EXCHANGE.into(),
                        e.routing_key.as_str().into(),
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
            Documents::new().with("listings", ListingDocuments::new(&alias)),
            IndexerConfig {
                batch_size: size,
                prefetch: u16::try_from((size * 2).max(1000)).unwrap_or(u16::MAX),
                ..IndexerConfig::default()
            },
        );
        let status = indexer.status();
        let shutdown = CancellationToken::new();
        let started = Instant::now();
        let task = tokio::spawn(indexer.run(shutdown.clone()));
        while status.snapshot().indexed < jobs as u64 {
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
