//! The fan-out of the deeper shapes of relations against the one-level seller rename of the
//! same size, in one run on the local stack: what a change three levels down, a tag renamed
//! through a join table and children added under an aggregate cost, as a ratio of the
//! fan-out `benches/fanout.rs` measures.
//!
//! The real `benalsam-bridge` and `benalsam-consumer` binaries (release build, separate
//! processes) run with one event-type file holding both examples,
//! `examples/joined_documents/listings.toml` and `jobs.toml` (their index aliases this run's
//! own), on a schema and vhost of their own. Seeded before the binaries start (and indexed
//! by them before anything is measured): a seller with N listings (two photos each), and N
//! job posts at 40 companies of the 4 industries of one sector, each post carrying one tag.
//! Then, `BENCH_DEEP_ROUNDS` times (default 2), each of these changes in turn, with nothing
//! else running:
//!
//! * one level: the seller renamed (`listings#seller`);
//! * one level on the posts: every company renamed in one statement (`job_posts#company`,
//!   40 changes of N/40 posts each), the same documents as the deeper changes;
//! * three levels: the sector renamed (`job_posts#company.industry.sector`);
//! * many-to-many: the tag renamed (`job_posts#tags.tag`, through `post_tags`);
//! * aggregate: one application added to each post in one statement (N rows, each one job
//!   of `open_applications` and one of `last_applied_at`, each fanned out to its one post).
//!
//! For each: from the commit until a `_count` (polled every 250 ms, no forced refresh) finds
//! all N documents with the change; until the last REBUILD job completed (from the queue);
//! documents/s; CPU seconds per 1,000 documents of every process (the binaries, PostgreSQL,
//! RabbitMQ, OpenSearch, this load generator); the binaries' RSS before and at peak (sampled
//! every 100 ms); and the ratios of time and CPU to the seller rename of the same round.
//!
//! ```text
//! scripts/stack up
//! cargo build --release --bins
//! cargo bench -p benalsam-events --bench fanout_deep
//! ```
//! `BENCH_DEEP_DOCUMENTS` is N (default 10000); `BENCH_FANOUT_PAGE` starts the bridge with
//! that `BENALSAM_FANOUT_PAGE` (default: the bridge's own, 500).

mod common;

use std::time::{Duration, Instant};

use benalsam_events::config::SearchUrl;
use benalsam_events::elasticsearch::Elasticsearch;
use benalsam_events::elasticsearch::http::Method;
use benalsam_events::{EventType, OutboxConfig};
use common::joined::{Config, RssPeak, Service, es_json, insert_listings, memory_mib, users};
use common::{BenchEnv, BoxError, max_job, setting, wait_completed};
use serde_json::{Value, json};

const MARKETPLACE_SQL: &str = include_str!("../../examples/joined_documents/marketplace.sql");
const LISTINGS_TOML: &str = include_str!("../../examples/joined_documents/listings.toml");
const JOBS_SQL: &str = include_str!("../../examples/joined_documents/jobs.sql");
const JOBS_TOML: &str = include_str!("../../examples/joined_documents/jobs.toml");
const COMPANIES: i64 = 40;
const INDUSTRIES: i64 = 4;

/// What one change measured.
struct Measured {
    shape: &'static str,
    round: usize,
    /// REBUILD jobs the change wrote, and the documents among them.
    rebuilds: i64,
    documents: i64,
    /// Commit → a search counts every document with the change, s.
    searchable: f64,
    /// The change's first job created → the last REBUILD job completed, s (the queue's clock).
    indexed: f64,
    rss_before: Vec<f64>,
    rss_peak: Vec<f64>,
    /// CPU seconds per 1,000 documents, per process then all, as table cells.
    cpu: Vec<String>,
}

impl Measured {
    fn cpu_all(&self) -> f64 {
        self.cpu
            .last()
            .and_then(|c| c.parse().ok())
            .unwrap_or(f64::NAN)
    }
}

/// How many documents of `alias` match `query`, as a search sees them now.
async fn count(es: &Elasticsearch, alias: &str, query: &Value) -> Result<u64, BoxError> {
    let answer = es_json(
        es,
        Method::Post,
        &format!("/{alias}/_count"),
        Some(json!({ "query": query })),
    )
    .await?;
    answer["count"]
        .as_u64()
        .ok_or_else(|| format!("no count in {answer}").into())
}

/// One change to measure: its SQL, and the search that finds the documents showing it.
struct Change<'a> {
    shape: &'static str,
    sql: String,
    alias: &'a str,
    query: Value,
}

/// Commits `change` and measures until all `n` documents show it.
async fn measure(
    env: &BenchEnv,
    es: &Elasticsearch,
    services: &(Service, Service),
    change: Change<'_>,
    n: i64,
    round: usize,
) -> Result<Measured, BoxError> {
    let first = max_job(env).await?;
    let own = [
        ("benalsam-bridge", services.0.pid()),
        ("benalsam-consumer", services.1.pid()),
        ("load generator (this bench)", std::process::id()),
    ];
    let pids = vec![services.0.pid(), services.1.pid()];
    let rss_before = vec![memory_mib(pids[0], "VmRSS")?, memory_mib(pids[1], "VmRSS")?];
    let before = common::cpu_by_process(&own)?;
    let peak = RssPeak::start(pids);
    let started = Instant::now();
    env.client.batch_execute(&change.sql).await?;
    let searchable = loop {
        let seen = count(es, change.alias, &change.query).await?;
        if seen >= n as u64 {
            break started.elapsed().as_secs_f64();
        }
        if started.elapsed() > Duration::from_secs(1800) {
            return Err(format!("{}: {seen} of {n} after 30 minutes", change.shape).into());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let after = common::cpu_by_process(&own)?;
    let rss_peak = peak.finish().await?;
    wait_completed(env, first, Duration::from_secs(1800)).await?;
    let row = env
        .client
        .query_one(
            "SELECT count(*) FILTER (WHERE operation = 'REBUILD'),
                    count(DISTINCT record_id) FILTER (WHERE operation = 'REBUILD'),
                    extract(epoch FROM max(completed_at) - min(created_at))::float8
             FROM elasticsearch_sync_queue WHERE id > $1",
            &[&first],
        )
        .await?;
    Ok(Measured {
        shape: change.shape,
        round,
        rebuilds: row.get(0),
        documents: row.get(1),
        searchable,
        indexed: row.get::<_, Option<f64>>(2).unwrap_or(f64::NAN),
        rss_before,
        rss_peak,
        cpu: after.per_thousand(&before, n as usize),
    })
}

/// One sector of `INDUSTRIES` industries and `COMPANIES` companies, `n` posts spread over
/// them, each with the one tag: (sector id, tag id). The links go in with their trigger
/// off, in the posts' transaction: the posts' own jobs read them.
async fn seed_posts(env: &BenchEnv, n: i64) -> Result<(i64, i64), BoxError> {
    let sector: i64 = env
        .client
        .query_one(
            "INSERT INTO sectors (name) VALUES ('Sektör') RETURNING id",
            &[],
        )
        .await?
        .get(0);
    let tag: i64 = env
        .client
        .query_one(
            "INSERT INTO tags (name) VALUES ('etiket') RETURNING id",
            &[],
        )
        .await?
        .get(0);
    env.client
        .execute(
            "INSERT INTO industries (name, sector_id)
             SELECT 'Sanayi ' || i, $1 FROM generate_series(1, $2::bigint) AS i",
            &[&sector, &INDUSTRIES],
        )
        .await?;
    env.client
        .execute(
            "INSERT INTO companies (name, industry_id)
             SELECT 'Şirket ' || i, (SELECT id FROM industries ORDER BY id OFFSET i % $1 LIMIT 1)
             FROM generate_series(1, $2::bigint) AS i",
            &[&INDUSTRIES, &COMPANIES],
        )
        .await?;
    env.client
        .batch_execute(&format!(
            "BEGIN; ALTER TABLE post_tags DISABLE TRIGGER USER;
             CREATE TEMP TABLE new_posts ON COMMIT DROP AS
             WITH companies AS (SELECT id, row_number() OVER (ORDER BY id) - 1 AS k FROM companies),
             added AS (
               INSERT INTO job_posts (title, company_id)
               SELECT 'Rust geliştirici ' || i, c.id
               FROM generate_series(1, {n}) AS i JOIN companies c ON c.k = i % {COMPANIES}
               RETURNING id)
             SELECT id FROM added;
             INSERT INTO post_tags (post_id, tag_id, position) SELECT id, {tag}, 0 FROM new_posts;
             ALTER TABLE post_tags ENABLE TRIGGER USER;
             COMMIT"
        ))
        .await?;
    Ok((sector, tag))
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let n: i64 = setting("BENCH_DEEP_DOCUMENTS", 10_000)?;
    let rounds: usize = setting("BENCH_DEEP_ROUNDS", 2)?;

    let mut env = BenchEnv::new("bench_fanout_deep").await?;
    let es = (SearchUrl::from_env()?).client(Duration::from_secs(60))?;
    let listings_alias = format!("{}_listings", env.name);
    let jobs_alias = format!("{}_jobs", env.name);
    let file = std::env::temp_dir().join(format!("{}.toml", env.name));
    std::fs::write(
        &file,
        format!(
            "{}\n{}",
            LISTINGS_TOML.replace("benalsam_listings_joined", &listings_alias),
            JOBS_TOML.replace("benalsam_jobs", &jobs_alias)
        ),
    )?;
    let types = EventType::from_file(&file)?;
    env.client.batch_execute(MARKETPLACE_SQL).await?;
    env.client.batch_execute(JOBS_SQL).await?;
    OutboxConfig::in_schema(&env.name)
        .migrate(&mut env.client, &types)
        .await?;
    env.client
        .batch_execute("INSERT INTO categories VALUES ('spor', 'Spor', 'Sports')")
        .await?;

    eprintln!("[1/2] seeding {n} listings of one seller and {n} posts of one sector and tag");
    let seller = users(&env, &["Mağaza".to_owned()]).await?;
    insert_listings(&env, &seller, n).await?;
    let (sector, tag) = seed_posts(&env, n).await?;
    // The related rows went in before the documents: their fan-outs would find nothing now,
    // but the binaries would run them beside the documents' own jobs.
    env.client
        .batch_execute("DELETE FROM elasticsearch_sync_queue WHERE table_name LIKE '%#%'")
        .await?;
    let seeding = Instant::now();
    let bridge = Service::start("benalsam-bridge", &env, Config::Joined(&file))?;
    let consumer = Service::start("benalsam-consumer", &env, Config::Joined(&file))?;
    let services = (bridge, consumer);
    wait_completed(&env, 0, Duration::from_secs(1800)).await?;
    eprintln!(
        "      {} documents indexed in {:.1} s",
        2 * n,
        seeding.elapsed().as_secs_f64()
    );

    let mut measured = Vec::new();
    for round in 1..=rounds {
        let changes = [
            Change {
                shape: "seller renamed (one level)",
                sql: format!(
                    "UPDATE users SET display_name = 'Mağaza {round}' WHERE id = '{}'",
                    seller[0]
                ),
                alias: &listings_alias,
                query: json!({"term": {"seller.display_name.raw": format!("Mağaza {round}")}}),
            },
            Change {
                shape: "every company renamed (one level, the same posts)",
                sql: format!("UPDATE companies SET name = 'Şirket {round}'"),
                alias: &jobs_alias,
                query: json!({"term": {"company.name.raw": format!("Şirket {round}")}}),
            },
            Change {
                shape: "sector renamed (three levels)",
                sql: format!("UPDATE sectors SET name = 'Sektör {round}' WHERE id = {sector}"),
                alias: &jobs_alias,
                query: json!({"term": {"company.industry.sector.name": format!("Sektör {round}")}}),
            },
            Change {
                shape: "tag renamed (through post_tags)",
                sql: format!("UPDATE tags SET name = 'etiket {round}' WHERE id = {tag}"),
                alias: &jobs_alias,
                query: json!({"term": {"tags.name": format!("etiket {round}")}}),
            },
            Change {
                shape: "an application added to each post (aggregates)",
                sql: "INSERT INTO applications (post_id) SELECT id FROM job_posts".to_owned(),
                alias: &jobs_alias,
                query: json!({"range": {"open_applications": {"gte": round}}}),
            },
        ];
        for change in changes {
            eprintln!("[2/2] round {round}: {}", change.shape);
            measured.push(measure(&env, &es, &services, change, n, round).await?);
        }
    }
    let (bridge, consumer) = services;
    let hwm = [
        memory_mib(bridge.pid(), "VmHWM")?,
        memory_mib(consumer.pid(), "VmHWM")?,
    ];
    bridge.stop();
    consumer.stop();

    let page = std::env::var("BENCH_FANOUT_PAGE").unwrap_or_else(|_| "500 (default)".into());
    println!(
        "\nFan-out of {n} documents by shape (BENALSAM_FANOUT_PAGE {page}); × = against the seller rename of the same round:\n"
    );
    println!(
        "| round | change | REBUILD jobs (documents) | commit → all searchable | → last REBUILD completed | documents/s | × time | CPU s / 1,000 documents, all | × CPU | RSS bridge / consumer before → peak |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---|");
    for m in &measured {
        let base = measured
            .iter()
            .find(|b| b.round == m.round)
            .ok_or("no seller rename")?;
        println!(
            "| {} | {} | {} ({}) | {:.1} s | {:.1} s | {:.0} | {:.2} | {:.2} | {:.2} | {:.1} / {:.1} → {:.1} / {:.1} MiB |",
            m.round,
            m.shape,
            m.rebuilds,
            m.documents,
            m.searchable,
            m.indexed,
            n as f64 / m.searchable,
            m.searchable / base.searchable,
            m.cpu_all(),
            m.cpu_all() / base.cpu_all(),
            m.rss_before[0],
            m.rss_before[1],
            m.rss_peak[0],
            m.rss_peak[1],
        );
    }
    println!(
        "\n(Peak RSS over the whole run, VmHWM: bridge {:.1} MiB, consumer {:.1} MiB.)",
        hwm[0], hwm[1]
    );
    let header = [
        "benalsam-bridge",
        "benalsam-consumer",
        "load generator (this bench)",
        "PostgreSQL",
        "RabbitMQ",
        "OpenSearch",
        "all",
    ];
    println!("\nCPU seconds per 1,000 documents (user + system, from /proc):\n");
    println!("| round | change | {} |", header.join(" | "));
    println!("|---:|---|{}", "---:|".repeat(header.len()));
    for m in &measured {
        println!("| {} | {} | {} |", m.round, m.shape, m.cpu.join(" | "));
    }

    common::delete_index(&es, &listings_alias).await;
    common::delete_index(&es, &jobs_alias).await;
    let _ = std::fs::remove_file(&file);
    env.cleanup().await
}
