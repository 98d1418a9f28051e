//! What the joined-document benches share: the real binaries started as separate processes
//! with an event-type file, their memory sampled, searches of the index, and the
//! marketplace's sellers and listings written in bulk.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use benalsam_events::config::SearchUrl;
use benalsam_events::elasticsearch::Elasticsearch;
use benalsam_events::elasticsearch::http::Method;
use benalsam_events::elasticsearch::http::headers::{CONTENT_TYPE, HeaderMap, HeaderValue};
use serde_json::{Value, json};

use super::{BenchEnv, BoxError, binary};

/// Which event types the binaries run with.
#[derive(Clone, Copy, PartialEq)]
pub enum Config<'a> {
    /// The built-in listings, indexed into this alias.
    Plain(&'a str),
    /// The event-type file.
    Joined(&'a Path),
}

/// One of the binaries, running.
pub struct Service {
    child: Child,
}

impl Service {
    pub fn start(name: &str, env: &BenchEnv, config: Config<'_>) -> Result<Self, BoxError> {
        // A free port for its health endpoints: other benches may run beside this one.
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut command = Command::new(binary(name)?);
        command
            .env("DATABASE_URL", env.db_url.expose())
            .env("BENALSAM_SCHEMA", &env.name)
            .env("RABBITMQ_URL", env.url.expose())
            .env("ELASTICSEARCH_URL", SearchUrl::from_env()?.expose())
            .env("BENALSAM_HEALTH_ADDR", format!("127.0.0.1:{port}"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        match config {
            Config::Plain(alias) => {
                command.env("BENALSAM_INDEX", alias);
            }
            Config::Joined(file) => {
                command.arg("--config").arg(file);
            }
        }
        if let Ok(page) = std::env::var("BENCH_FANOUT_PAGE") {
            command.env("BENALSAM_FANOUT_PAGE", page);
        }
        Ok(Self {
            child: command.spawn()?,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stop(self) {
        super::stop(self.child);
    }
}

/// A field of /proc/<pid>/status in MiB (`VmRSS`, `VmHWM`).
pub fn memory_mib(pid: u32, field: &str) -> Result<f64, BoxError> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .ok_or_else(|| format!("no {field} in /proc/{pid}/status"))?
        .parse()?;
    Ok(kib / 1024.0)
}

/// Samples the RSS of `pids` every 100 ms until stopped; the largest of each.
pub struct RssPeak {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<f64>>,
}

impl RssPeak {
    pub fn start(pids: Vec<u32>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut peak = vec![0.0f64; pids.len()];
            loop {
                for (p, pid) in peak.iter_mut().zip(&pids) {
                    if let Ok(rss) = memory_mib(*pid, "VmRSS") {
                        *p = p.max(rss);
                    }
                }
                if flag.load(Ordering::Relaxed) {
                    return peak;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Self { stop, task }
    }

    pub async fn finish(self) -> Result<Vec<f64>, BoxError> {
        self.stop.store(true, Ordering::Relaxed);
        Ok(self.task.await?)
    }
}

/// A search-engine request with a JSON body; the answer as JSON.
pub async fn es_json(
    es: &Elasticsearch,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> Result<Value, BoxError> {
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(es
        .send(
            method,
            path,
            headers,
            Option::<&()>::None,
            body.map(|b| b.to_string()),
            None,
        )
        .await?
        .json::<Value>()
        .await?)
}

/// Documents of `alias` whose seller is called `name`, as a search sees them now.
pub async fn count_by_seller(es: &Elasticsearch, alias: &str, name: &str) -> Result<u64, BoxError> {
    let answer = es_json(
        es,
        Method::Post,
        &format!("/{alias}/_count"),
        Some(json!({"query": {"term": {"seller.display_name.raw": name}}})),
    )
    .await?;
    answer["count"]
        .as_u64()
        .ok_or_else(|| format!("no count in {answer}").into())
}

/// Inserts `n` active listings of the demo's size for `sellers` (round robin), each with two
/// photos, in one transaction. The photos go in with the relation trigger off: they are part
/// of the rows the documents are read from, not changes to carry.
pub async fn insert_listings(env: &BenchEnv, sellers: &[String], n: i64) -> Result<(), BoxError> {
    let db = env.db_url.connect().await?;
    db.batch_execute(&format!(
        "SET search_path TO {}; BEGIN; ALTER TABLE listing_images DISABLE TRIGGER USER",
        env.name
    ))
    .await?;
    db.execute(
        "CREATE TEMP TABLE new_listings ON COMMIT DROP AS
         WITH added AS (
           INSERT INTO listings (user_id, title, description, category, status, latitude, longitude, attributes, location_city)
           SELECT ($2::text[])[1 + i % array_length($2::text[], 1)]::uuid, 'Satılık ikinci el bisiklet ' || i,
                  repeat('Az kullanılmış, bakımlı, faturalı. ', 8), 'spor', 'active', 41.0, 29.0,
                  '{\"renk\": \"kırmızı\", \"vites\": 21}', 'İstanbul'
           FROM generate_series(1, $1::bigint) AS i
           RETURNING id)
         SELECT id FROM added",
        &[&n, &sellers],
    )
    .await?;
    db.batch_execute(
        "INSERT INTO listing_images (listing_id, url, position)
         SELECT l.id, 'https://cdn.example.com/listings/' || l.id || '/' || p || '.jpg', p
         FROM new_listings l, generate_series(1, 2) AS p;
         ALTER TABLE listing_images ENABLE TRIGGER USER;
         COMMIT",
    )
    .await?;
    Ok(())
}

/// Users called `names`; their ids.
pub async fn users(env: &BenchEnv, names: &[String]) -> Result<Vec<String>, BoxError> {
    let rows = env
        .client
        .query(
            "INSERT INTO users (display_name, rating, email)
             SELECT n, 4.5, 'satici@example.com' FROM unnest($1::text[]) AS n
             RETURNING id::text",
            &[&names],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}
