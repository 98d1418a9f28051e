//! Joined documents (relations) on the local stack, in one run: what a related-row change
//! costs when it fans out to many documents, whether it holds up other changes meanwhile,
//! and what a joined document costs per change against a plain one.
//!
//! The real `benalsam-bridge` and `benalsam-consumer` binaries (release build, separate
//! processes) run with `--config examples/joined_documents/listings.toml` (a copy whose
//! index alias is this run's own) on a schema, vhost and indices of their own:
//!
//! 1. Capacity: a backlog of `BENCH_CAPACITY_JOBS` listing inserts drained by the binaries
//!    with the default (plain) listings, then the same number again with the joined
//!    configuration (seller, category, two photos per listing): jobs/s, CPU seconds per
//!    1,000 jobs of every process, peak RSS.
//! 2. The fan-out of one seller rename to N listings (`BENCH_FANOUT_SIZES`, default
//!    `20000,100000`): from the rename's commit until every document shows the new name
//!    (a `_count` on `seller.display_name.raw`, polled every 250 ms without forcing a
//!    refresh), split into "the fan-out wrote every REBUILD job" (its job completed) and
//!    "every REBUILD job indexed and completed" (from the queue's timestamps); peak RSS of
//!    both binaries during it (sampled every 100 ms) against before it; CPU seconds per 1,000
//!    documents of every process; outbox row bytes and WAL bytes per document.
//! 3. Other work meanwhile: a writer edits the titles of other sellers' listings at
//!    `BENCH_EDIT_RATE` per second (default 20) for `BENCH_EDIT_SECONDS` (default 20) with
//!    nothing else running, then during the largest fan-out; latency from each edit's commit
//!    until a search finds the new title (one `terms` search of every edit still unseen,
//!    every 100 ms), and commit → completed from the queue.
//! 4. Small related changes meanwhile: during the largest fan-out, one of the other sellers
//!    (a few hundred listings each) is renamed every `1 / BENCH_SMALL_RATE` seconds (default
//!    1 per second); latency from each rename's commit until a search counts every listing
//!    of that seller under the new name (one `terms` aggregation of the names still unseen,
//!    every 100 ms). The goal is 2 s at p99 during a 100,000-document fan-out.
//!
//! ```text
//! scripts/stack up
//! cargo build --release --bins
//! cargo bench -p benalsam-events --bench fanout
//! ```
//! `BENCH_FANOUT_PAGE` starts the bridge with that `BENALSAM_FANOUT_PAGE` (default: the
//! bridge's own, 500).

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use benalsam_events::config::SearchUrl;
use benalsam_events::elasticsearch::Elasticsearch;
use benalsam_events::elasticsearch::http::Method;
use benalsam_events::{EventType, OutboxConfig};
use common::joined::{
    Config, RssPeak, Service, count_by_seller, es_json, insert_listings, memory_mib, users,
};
use common::{BenchEnv, BoxError, max_job, setting, wait_completed};
use serde_json::{Value, json};

const MARKETPLACE_SQL: &str = include_str!("../../examples/joined_documents/marketplace.sql");
const JOINED_TOML: &str = include_str!("../../examples/joined_documents/listings.toml");
const JOINED_ALIAS: &str = "benalsam_listings_joined";
/// Sellers of the listings that are not fanned out (capacity backlogs, edits).
const OTHER_SELLERS: usize = 200;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// What a run of edits measured.
struct Edits {
    count: usize,
    /// Commit → found by a search, ms, sorted.
    searchable: Vec<f64>,
    /// Commit (transaction start) → completed, from the queue: p50, p99, max in ms.
    completed: [f64; 3],
}

/// Edits titles of `listings` (round robin) at `rate` per second until `stop` is set or
/// `seconds` passed, and finds each new title by searching until every one is found.
#[allow(clippy::too_many_arguments)]
async fn edits(
    env: &BenchEnv,
    es: &Elasticsearch,
    alias: &str,
    listings: &[String],
    rate: f64,
    seconds: f64,
    stop: Arc<AtomicBool>,
    tag: &str,
) -> Result<Edits, BoxError> {
    let first = max_job(env).await?;
    let db = env.db_url.connect().await?;
    db.batch_execute(&format!("SET search_path TO {}", env.name))
        .await?;
    let edit = db
        .prepare("UPDATE listings SET title = $2, updated_at = now() WHERE id = $1::text::uuid")
        .await?;
    let unseen: Unseen = Arc::default();
    let writing = Arc::new(AtomicBool::new(true));
    let watcher = watch(
        es,
        alias,
        "edits",
        unseen.clone(),
        writing.clone(),
        |titles| {
            json!({
                "size": titles.len(),
                "_source": ["title"],
                "query": {"terms": {"title.raw": titles}},
            })
        },
        |answer| {
            answer["hits"]["hits"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|hit| hit["_source"]["title"].as_str())
                .map(|title| (title.to_owned(), 1))
                .collect()
        },
    );
    let write = async {
        let started = Instant::now();
        let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut count = 0usize;
        while !stop.load(Ordering::Relaxed) && started.elapsed().as_secs_f64() < seconds {
            ticks.tick().await;
            let title = format!("Düzenlendi {tag} {count}");
            let written = db
                .execute(&edit, &[&listings[count % listings.len()], &title])
                .await;
            if let Err(error) = written {
                writing.store(false, Ordering::Relaxed);
                return Err::<usize, BoxError>(error.into());
            }
            let committed = Instant::now();
            unseen
                .lock()
                .map_err(|_| "poisoned")?
                .push((title, 1, committed));
            count += 1;
        }
        writing.store(false, Ordering::Relaxed);
        Ok(count)
    };
    let (searchable, count) = tokio::join!(watcher, write);
    let (searchable, count) = (searchable?, count?);
    wait_completed(env, first, Duration::from_secs(1800)).await?;
    let row = env
        .client
        .query_one(
            "SELECT percentile_cont(ARRAY[0.5, 0.99, 1.0]) WITHIN GROUP
                        (ORDER BY extract(epoch FROM completed_at - created_at) * 1000)
             FROM elasticsearch_sync_queue
             WHERE id > $1 AND table_name = 'listings' AND operation = 'UPDATE'",
            &[&first],
        )
        .await?;
    let p: Vec<f64> = row.get(0);
    Ok(Edits {
        count,
        searchable,
        completed: [p[0], p[1], p[2]],
    })
}

/// What a drained backlog measured.
struct Drain {
    jobs: i64,
    rate: f64,
    cpu: Vec<String>,
    rss: Vec<f64>,
    /// Average stored size of one of the backlog's jobs (`pg_column_size` of the row).
    row_bytes: f64,
}

/// Inserts `n` listings, starts both binaries on them, waits until every job is completed;
/// the binaries keep running when `keep` (returned), else stop.
async fn drain(
    env: &BenchEnv,
    sellers: &[String],
    n: i64,
    config: Config<'_>,
    keep: bool,
) -> Result<(Drain, Option<(Service, Service)>), BoxError> {
    let first = max_job(env).await?;
    insert_listings(env, sellers, n).await?;
    let row_bytes: f64 = env
        .client
        .query_one(
            "SELECT avg(pg_column_size(q.*))::float8 FROM elasticsearch_sync_queue q WHERE id > $1",
            &[&first],
        )
        .await?
        .get(0);
    let started = Instant::now();
    let bridge = Service::start("benalsam-bridge", env, config)?;
    let consumer = Service::start("benalsam-consumer", env, config)?;
    let own = [
        ("benalsam-bridge", bridge.pid()),
        ("benalsam-consumer", consumer.pid()),
        ("load generator (this bench)", std::process::id()),
    ];
    let before = common::cpu_by_process(&own)?;
    let peak = RssPeak::start(vec![bridge.pid(), consumer.pid()]);
    wait_completed(env, first, Duration::from_secs(1800)).await?;
    let elapsed = started.elapsed().as_secs_f64();
    let after = common::cpu_by_process(&own)?;
    let rss = peak.finish().await?;
    let jobs: i64 = env
        .client
        .query_one(
            "SELECT count(*) FROM elasticsearch_sync_queue WHERE id > $1",
            &[&first],
        )
        .await?
        .get(0);
    for row in env
        .client
        .query(
            "SELECT table_name || ' ' || operation, count(*) FROM elasticsearch_sync_queue
             WHERE id > $1 GROUP BY 1 ORDER BY 1",
            &[&first],
        )
        .await?
    {
        eprintln!("    {}: {}", row.get::<_, String>(0), row.get::<_, i64>(1));
    }
    let result = Drain {
        jobs,
        rate: jobs as f64 / elapsed,
        cpu: after.per_thousand(&before, jobs as usize),
        rss,
        row_bytes,
    };
    if keep {
        Ok((result, Some((bridge, consumer))))
    } else {
        bridge.stop();
        consumer.stop();
        Ok((result, None))
    }
}

/// What one fan-out measured.
struct FanOut {
    documents: i64,
    /// Rename committed → the fan-out wrote its last page (its job completed), s.
    written: f64,
    /// → the last REBUILD job indexed and completed, s.
    indexed: f64,
    /// → a search counts every document with the new name, s (wall clock).
    searchable: f64,
    rss_before: Vec<f64>,
    rss_peak: Vec<f64>,
    cpu: Vec<String>,
    /// Average stored size of a REBUILD job (after it completed), bytes.
    row_bytes: f64,
    /// WAL the server wrote during the fan-out, per document (everything on the server).
    wal_per_document: f64,
    /// Edits of other listings measured meanwhile.
    edits: Option<Edits>,
    /// Renames of other sellers measured meanwhile: commit → searchable, ms, sorted.
    small: Option<Vec<f64>>,
    /// The same renames from the queue's timestamps, ms after each rename's commit, sorted:
    /// its fan-out's job completed (every REBUILD job written), the last of its REBUILD jobs
    /// sent, the last completed.
    small_phases: [Vec<f64>; 3],
}

/// Renames the sellers of `small` (id, listings) one after the other, `rate` per second,
/// until `stop` is set or each was renamed once; returns, sorted, the ms from each rename's
/// commit until a search counted all its listings under the new name.
async fn small_renames(
    env: &BenchEnv,
    es: &Elasticsearch,
    alias: &str,
    small: &[(String, i64)],
    rate: f64,
    stop: Arc<AtomicBool>,
) -> Result<Vec<f64>, BoxError> {
    let db = env.db_url.connect().await?;
    db.batch_execute(&format!("SET search_path TO {}", env.name))
        .await?;
    // Name → (listings, commit).
    let unseen: Unseen = Arc::default();
    let writing = Arc::new(AtomicBool::new(true));
    let watcher = watch(
        es,
        alias,
        "small renames",
        unseen.clone(),
        writing.clone(),
        |names| {
            json!({
                "size": 0,
                "query": {"terms": {"seller.display_name.raw": names}},
                "aggs": {"by": {"terms": {"field": "seller.display_name.raw", "size": names.len()}}},
            })
        },
        |answer| {
            answer["aggregations"]["by"]["buckets"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|b| Some((b["key"].as_str()?.to_owned(), b["doc_count"].as_i64()?)))
                .collect()
        },
    );
    let write = async {
        let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for (i, (seller, listings)) in small.iter().enumerate() {
            ticks.tick().await;
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let name = format!("Küçük Satıcı {i}");
            let renamed = db
                .execute(
                    "UPDATE users SET display_name = $2 WHERE id = $1::text::uuid",
                    &[seller, &name],
                )
                .await;
            if let Err(error) = renamed {
                writing.store(false, Ordering::Relaxed);
                return Err::<(), BoxError>(error.into());
            }
            let committed = Instant::now();
            unseen
                .lock()
                .map_err(|_| "poisoned")?
                .push((name, *listings, committed));
        }
        writing.store(false, Ordering::Relaxed);
        Ok(())
    };
    let (found, written) = tokio::join!(watcher, write);
    written?;
    found
}

/// What a writer changed and a search has not shown yet: (key, documents that must show it,
/// commit time).
type Unseen = Arc<Mutex<Vec<(String, i64, Instant)>>>;

/// Searches every 100 ms (`query` of the keys still unseen, no forced refresh) until the
/// writer stopped (`writing` false) and every key of `unseen` was seen in as many documents
/// as it needs (`seen` reads an answer as (key, documents)); returns the ms from each
/// commit until then, sorted.
async fn watch(
    es: &Elasticsearch,
    alias: &str,
    what: &str,
    unseen: Unseen,
    writing: Arc<AtomicBool>,
    query: impl Fn(&[String]) -> Value,
    seen: impl Fn(&Value) -> Vec<(String, i64)>,
) -> Result<Vec<f64>, BoxError> {
    let mut found = Vec::new();
    let started = Instant::now();
    loop {
        let keys: Vec<String> = unseen
            .lock()
            .map_err(|_| "poisoned")?
            .iter()
            .map(|(k, _, _)| k.clone())
            .collect();
        if keys.is_empty() && !writing.load(Ordering::Relaxed) {
            found.sort_by(f64::total_cmp);
            return Ok(found);
        }
        if started.elapsed() > Duration::from_secs(1800) {
            return Err(format!("{what} not searchable after 30 minutes").into());
        }
        if !keys.is_empty() {
            let answer = es_json(
                es,
                Method::Post,
                &format!("/{alias}/_search"),
                Some(query(&keys)),
            )
            .await?;
            let now = Instant::now();
            let mut unseen = unseen.lock().map_err(|_| "poisoned")?;
            for (key, documents) in seen(&answer) {
                if let Some(i) = unseen
                    .iter()
                    .position(|(k, all, _)| *k == key && documents >= *all)
                {
                    let (_, _, committed) = unseen.swap_remove(i);
                    found.push((now - committed).as_secs_f64() * 1000.0);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Renames `seller` (who has `n` listings) to `name` and measures until every document
/// shows it; `edits` runs the edit writer meanwhile on those listings, `small` renames those
/// sellers meanwhile at that rate.
#[allow(clippy::too_many_arguments)]
async fn fan_out(
    env: &BenchEnv,
    es: &Elasticsearch,
    alias: &str,
    services: &(Service, Service),
    seller: &str,
    name: &str,
    n: i64,
    edit: Option<(&[String], f64)>,
    small: Option<(&[(String, i64)], f64)>,
) -> Result<FanOut, BoxError> {
    let first = max_job(env).await?;
    let own = [
        ("benalsam-bridge", services.0.pid()),
        ("benalsam-consumer", services.1.pid()),
        ("load generator (this bench)", std::process::id()),
    ];
    let pids = vec![services.0.pid(), services.1.pid()];
    let rss_before = vec![memory_mib(pids[0], "VmRSS")?, memory_mib(pids[1], "VmRSS")?];
    let wal_before: String = env
        .client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);
    let before = common::cpu_by_process(&own)?;
    let peak = RssPeak::start(pids);
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    env.client
        .execute(
            "UPDATE users SET display_name = $2 WHERE id = $1::text::uuid",
            &[&seller, &name],
        )
        .await?;
    let writer = edit.map(|(listings, rate)| {
        edits(
            env,
            es,
            alias,
            listings,
            rate,
            f64::INFINITY,
            stop.clone(),
            name,
        )
    });
    // The small renames stop with the big fan-out (or when every seller was renamed once).
    let small_stop = Arc::new(AtomicBool::new(false));
    let small = small
        .map(|(sellers, rate)| small_renames(env, es, alias, sellers, rate, small_stop.clone()));
    let watch = async {
        loop {
            let seen = count_by_seller(es, alias, name).await?;
            if seen >= n as u64 {
                let took = started.elapsed().as_secs_f64();
                stop.store(true, Ordering::Relaxed);
                small_stop.store(true, Ordering::Relaxed);
                return Ok::<_, BoxError>(took);
            }
            if started.elapsed() > Duration::from_secs(1800) {
                return Err(format!("{seen} of {n} renamed after 30 minutes").into());
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    };
    // The edit writer and the small renames run together, beside the watch.
    let edits = async {
        match writer {
            Some(writer) => writer.await.map(Some),
            None => Ok(None),
        }
    };
    let small = async {
        match small {
            Some(small) => small.await.map(Some),
            None => Ok(None),
        }
    };
    let (searchable, edits, small) = tokio::join!(watch, edits, small);
    let (searchable, edits, small) = (searchable?, edits?, small?);
    let after = common::cpu_by_process(&own)?;
    let rss_peak = peak.finish().await?;
    wait_completed(env, first, Duration::from_secs(1800)).await?;
    let wal: f64 = env
        .client
        .query_one(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::text::pg_lsn)::float8",
            &[&wal_before],
        )
        .await?
        .get(0);
    let row = env
        .client
        .query_one(
            "SELECT extract(epoch FROM completed_at - created_at)::float8
             FROM elasticsearch_sync_queue WHERE id > $1 AND table_name = 'listings#seller'
               AND record_id = $2",
            &[&first, &seller],
        )
        .await?;
    let written: f64 = row.get(0);
    let row = env
        .client
        .query_one(
            "SELECT count(*),
                    extract(epoch FROM max(q.completed_at) - (SELECT created_at FROM elasticsearch_sync_queue
                        WHERE id > $1 AND table_name = 'listings#seller' AND record_id = $2))::float8,
                    avg(pg_column_size(q.*))::float8
             FROM elasticsearch_sync_queue q JOIN listings l ON l.id::text = q.record_id
             WHERE q.id > $1 AND q.operation = 'REBUILD' AND l.user_id = $2::text::uuid",
            &[&first, &seller],
        )
        .await?;
    let documents: i64 = row.get(0);
    let small_phases = small_phases(env, first, seller).await?;
    Ok(FanOut {
        documents,
        written,
        indexed: row.get(1),
        searchable,
        rss_before,
        rss_peak,
        cpu: after.per_thousand(&before, documents as usize),
        row_bytes: row.get(2),
        wal_per_document: wal / documents.max(1) as f64,
        edits,
        small,
        small_phases,
    })
}

/// Where the small renames' time went (see [`FanOut::small_phases`]): their REBUILD jobs
/// carry the rename's job's `created_at`.
async fn small_phases(env: &BenchEnv, first: i64, big: &str) -> Result<[Vec<f64>; 3], BoxError> {
    let rows = env
        .client
        .query(
            "SELECT extract(epoch FROM r.completed_at - r.created_at)::float8 * 1000,
                    extract(epoch FROM max(q.sent_at) - r.created_at)::float8 * 1000,
                    extract(epoch FROM max(q.completed_at) - r.created_at)::float8 * 1000
             FROM elasticsearch_sync_queue r
             JOIN elasticsearch_sync_queue q
               ON q.id > r.id AND q.operation = 'REBUILD' AND q.created_at = r.created_at
             WHERE r.id > $1 AND r.table_name = 'listings#seller' AND r.record_id <> $2
             GROUP BY r.id",
            &[&first, &big],
        )
        .await?;
    let mut phases: [Vec<f64>; 3] = Default::default();
    for row in rows {
        for (i, phase) in phases.iter_mut().enumerate() {
            phase.push(row.get::<_, Option<f64>>(i).unwrap_or(f64::NAN));
        }
    }
    for phase in &mut phases {
        phase.sort_by(f64::total_cmp);
    }
    Ok(phases)
}

fn ms(sorted: &[f64]) -> String {
    format!(
        "{:.0} / {:.0} / {:.0} ms",
        percentile(sorted, 0.5),
        percentile(sorted, 0.99),
        sorted.last().copied().unwrap_or(f64::NAN)
    )
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let capacity_jobs: i64 = setting("BENCH_CAPACITY_JOBS", 20_000)?;
    let edit_rate: f64 = setting("BENCH_EDIT_RATE", 20.0)?;
    let edit_seconds: f64 = setting("BENCH_EDIT_SECONDS", 20.0)?;
    let small_rate: f64 = setting("BENCH_SMALL_RATE", 1.0)?;
    let mut sizes: Vec<i64> = std::env::var("BENCH_FANOUT_SIZES")
        .unwrap_or_else(|_| "20000,100000".to_owned())
        .split(',')
        .map(|s| s.trim().parse())
        .collect::<Result<_, _>>()?;
    sizes.sort_unstable();
    let largest = sizes.last().copied().ok_or("BENCH_FANOUT_SIZES is empty")?;

    let mut env = BenchEnv::new("bench_fanout").await?;
    let es = (SearchUrl::from_env()?).client(Duration::from_secs(60))?;
    let plain_alias = format!("{}_plain", env.name);
    let joined_alias = format!("{}_joined", env.name);
    let file = std::env::temp_dir().join(format!("{}.toml", env.name));
    std::fs::write(&file, JOINED_TOML.replace(JOINED_ALIAS, &joined_alias))?;
    let joined = EventType::from_file(&file)?;
    env.client.batch_execute(MARKETPLACE_SQL).await?;
    OutboxConfig::in_schema(&env.name)
        .migrate(&mut env.client, &joined)
        .await?;
    env.client
        .batch_execute("INSERT INTO categories VALUES ('spor', 'Spor', 'Sports')")
        .await?;
    let names: Vec<String> = (1..=OTHER_SELLERS).map(|i| format!("Satıcı {i}")).collect();
    let others = users(&env, &names).await?;
    let sizes_named: Vec<String> = sizes.iter().map(|n| format!("Mağaza {n}")).collect();
    let stores = users(&env, &sizes_named).await?;
    // The sellers and the category were added before any listing: their fan-outs would
    // find nothing now, but the plain run leaves them waiting and the joined bridge would
    // then rebuild every listing of both backlogs.
    env.client
        .batch_execute("DELETE FROM elasticsearch_sync_queue WHERE table_name LIKE 'listings#%'")
        .await?;

    eprintln!("[1/4] capacity: {capacity_jobs} listing inserts, plain, then joined");
    let (plain, _) = drain(
        &env,
        &others,
        capacity_jobs,
        Config::Plain(&plain_alias),
        false,
    )
    .await?;
    common::delete_index(&es, &plain_alias).await;
    let edited_first = max_job(&env).await?;
    let (joined_drain, services) =
        drain(&env, &others, capacity_jobs, Config::Joined(&file), true).await?;
    let services = services.ok_or("the joined binaries")?;
    // Listings to edit: active, other sellers', in the joined index.
    let editable: Vec<String> = env
        .client
        .query(
            "SELECT record_id FROM elasticsearch_sync_queue WHERE id > $1 AND table_name = 'listings'
             ORDER BY id LIMIT 2000",
            &[&edited_first],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();

    eprintln!(
        "[2/4] the fan-out sellers' listings: {} in all",
        sizes.iter().sum::<i64>()
    );
    let first = max_job(&env).await?;
    let seeding = Instant::now();
    for (store, n) in stores.iter().zip(&sizes) {
        insert_listings(&env, std::slice::from_ref(store), *n).await?;
    }
    wait_completed(&env, first, Duration::from_secs(1800)).await?;
    let seeded = sizes.iter().sum::<i64>() as f64 / seeding.elapsed().as_secs_f64();

    eprintln!("[3/4] edits at {edit_rate}/s for {edit_seconds} s, nothing else running");
    let quiet = edits(
        &env,
        &es,
        &joined_alias,
        &editable,
        edit_rate,
        edit_seconds,
        Arc::new(AtomicBool::new(false)),
        "quiet",
    )
    .await?;

    // The other sellers, with their listings: each rename is a small fan-out.
    let small: Vec<(String, i64)> = env
        .client
        .query(
            "SELECT user_id::text, count(*) FROM listings WHERE user_id = ANY($1::text[]::uuid[])
             GROUP BY 1 ORDER BY 1",
            &[&others],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut fan_outs = Vec::new();
    for (store, n) in stores.iter().zip(&sizes) {
        eprintln!("[4/4] a seller of {n} listings renamed");
        let edit = (*n == largest).then_some((editable.as_slice(), edit_rate));
        let small = (*n == largest).then_some((small.as_slice(), small_rate));
        let renamed = format!("Mağaza {n} Yeni");
        fan_outs.push(
            fan_out(
                &env,
                &es,
                &joined_alias,
                &services,
                store,
                &renamed,
                *n,
                edit,
                small,
            )
            .await?,
        );
    }
    let (bridge, consumer) = services;
    let hwm = [
        memory_mib(bridge.pid(), "VmHWM")?,
        memory_mib(consumer.pid(), "VmHWM")?,
    ];
    bridge.stop();
    consumer.stop();

    let page = std::env::var("BENCH_FANOUT_PAGE").unwrap_or_else(|_| "500 (default)".into());
    println!("\nFan-out of one seller rename (BENALSAM_FANOUT_PAGE {page}):\n");
    println!(
        "| documents | rename → all REBUILD jobs written | → all indexed | → all searchable | documents/s | RSS bridge / consumer before → peak during |"
    );
    println!("|---:|---:|---:|---:|---:|---|");
    for f in &fan_outs {
        println!(
            "| {} | {:.1} s | {:.1} s | {:.1} s | {:.0} | {:.1} / {:.1} → {:.1} / {:.1} MiB |",
            f.documents,
            f.written,
            f.indexed,
            f.searchable,
            f.documents as f64 / f.searchable,
            f.rss_before[0],
            f.rss_before[1],
            f.rss_peak[0],
            f.rss_peak[1],
        );
    }
    println!(
        "\n(Peak RSS over the whole run, VmHWM: bridge {:.1} MiB, consumer {:.1} MiB; the {largest}-document fan-out ran with the edit writer.)",
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
    println!("\nCPU seconds per 1,000 documents / jobs (user + system, from /proc):\n");
    println!("| run | {} |", header.join(" | "));
    println!("|---|{}", "---:|".repeat(header.len()));
    for f in &fan_outs {
        println!(
            "| fan-out of {} documents | {} |",
            f.documents,
            f.cpu.join(" | ")
        );
    }
    println!(
        "| backlog of {} inserts, plain | {} |",
        plain.jobs,
        plain.cpu.join(" | ")
    );
    println!(
        "| backlog of {} inserts, joined | {} |",
        joined_drain.jobs,
        joined_drain.cpu.join(" | ")
    );

    println!("\nCapacity, a backlog of listing inserts drained (binaries started on it):\n");
    println!("| configuration | jobs | jobs/s | peak RSS bridge / consumer |");
    println!("|---|---:|---:|---|");
    for (label, d) in [
        ("plain (built-in listings)", &plain),
        ("joined", &joined_drain),
    ] {
        println!(
            "| {label} | {} | {:.0} | {:.1} / {:.1} MiB |",
            d.jobs, d.rate, d.rss[0], d.rss[1]
        );
    }
    println!(
        "| joined, the fan-out sellers' listings (inserts of 2 photos each timed too, binaries already running) | {} | {seeded:.0} | |",
        sizes.iter().sum::<i64>()
    );

    println!("\nEdits of other sellers' listings at {edit_rate}/s:\n");
    println!(
        "| while | edits | commit → searchable p50 / p99 / max | commit → completed p50 / p99 / max |"
    );
    println!("|---|---:|---:|---:|");
    let mut rows = vec![("nothing else", &quiet)];
    if let Some(e) = fan_outs.last().and_then(|f| f.edits.as_ref()) {
        rows.push(("the largest fan-out", e));
    }
    for (label, e) in rows {
        println!(
            "| {label} | {} | {} | {:.0} / {:.0} / {:.0} ms |",
            e.count,
            ms(&e.searchable),
            e.completed[0],
            e.completed[1],
            e.completed[2]
        );
    }

    if let Some(renames) = fan_outs.last().and_then(|f| f.small.as_ref()) {
        let fewest = small.iter().map(|(_, n)| *n).min().unwrap_or(0);
        let most = small.iter().map(|(_, n)| *n).max().unwrap_or(0);
        println!(
            "\nSmall related changes during the {largest}-document fan-out (another seller of {fewest}–{most} listings renamed, {small_rate}/s):\n"
        );
        println!(
            "| renames | commit → all its listings searchable p50 / p99 / max | its fan-out done | its REBUILD jobs all sent | all completed |"
        );
        println!("|---:|---:|---:|---:|---:|");
        let phases = fan_outs
            .last()
            .map(|f| f.small_phases.clone())
            .unwrap_or_default();
        println!(
            "| {} | {} | {} | {} | {} |",
            renames.len(),
            ms(renames),
            ms(&phases[0]),
            ms(&phases[1]),
            ms(&phases[2])
        );
    }

    println!("\nOutbox rows and WAL:\n");
    println!("| job | stored row (pg_column_size) | WAL per document, whole server |");
    println!("|---|---:|---:|");
    println!(
        "| listing insert (pending, demo size) | {:.0} B | |",
        joined_drain.row_bytes
    );
    for f in &fan_outs {
        println!(
            "| REBUILD, fan-out of {} (completed) | {:.0} B | {:.0} B |",
            f.documents, f.row_bytes, f.wal_per_document
        );
    }

    common::delete_index(&es, &joined_alias).await;
    let _ = std::fs::remove_file(&file);
    env.cleanup().await
}
