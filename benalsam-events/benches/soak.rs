//! The soak-and-fault harness (`scripts/soak`): the real binaries as processes against the
//! local stack, in a schema, vhost and index of their own, with writers changing listings as
//! an application would and faults drawn from a seed; at the end, a checker that compares
//! every document of the index with its row and every job with its final state.
//!
//! The listings are joined documents: each carries its seller's name (a parent relation to a
//! `sellers` table, as in examples/joined_documents), read from the database when indexed.
//!
//! Writers (`--writers`, 4) insert listings in searchable and unsearchable statuses, edit
//! them, change their status, delete them, change their key, edit rows other writers wrote,
//! rename sellers (a fan-out to every listing of the seller: a few to a few hundred), move a
//! listing to another seller, and now and then one of them truncates the table. They stop
//! after `--jobs` jobs (the outbox's newest id, which also counts the fan-out's REBUILD jobs
//! and the versions joined reads take from the same sequence) or `--duration`; while more
//! than `--max-backlog` jobs wait, they pause, so a long run is a soak and not a dump.
//!
//! Every `--fault-every` (±50 %, from the seed) one fault of `--faults` strikes:
//!
//! | kind | what |
//! |---|---|
//! | `bridge-kill`, `consumer-kill` | SIGKILL, then the binary is started again |
//! | `bridge-term`, `consumer-term` | SIGTERM (it must exit within 60 s), then started again |
//! | `bridge-pause`, `consumer-pause` | SIGSTOP for 2–20 s, then SIGCONT |
//! | `pg-terminate` | `pg_terminate_backend` of every session of both binaries |
//! | `broker-kill`, `search-kill`, `postgres-kill` | kill -9 of the server, then `scripts/stack` starts it again (only with `--services`: it disrupts everything else on the machine) |
//!
//! `--faults binaries` (the default) is the first seven; a comma-separated list picks.
//!
//! At the end the writers stop, the harness waits until every job is completed or failed
//! for good (`--settle`, 10 min), stops the binaries with SIGTERM and checks:
//!
//! - **lost**: a searchable row (`active`) without its document;
//! - **ghost**: a document whose row is gone or not searchable (a lost delete);
//! - **stale**: a document whose content (title, description, status) differs from its row's,
//!   whose joined part (the seller's name) differs from the SQL join's, or whose version is
//!   not above the row's latest job id (a joined read's version is taken after the job);
//! - **stuck**: a job still pending, processing or sent, or failed with attempts left;
//! - **failed**: jobs failed for good, and the dead-letter queue's depth.
//!
//! It also samples each binary's resident memory (`VmRSS`) every `--rss-every` (5 s) and
//! compares the first and the last tenth of the run. The exit status is 1 when anything was
//! lost, ghost, stale or stuck. With `--cluster` it runs on the clusters of
//! `scripts/stack up --cluster` (their variables from `scripts/stack env`): broker and search
//! node lists, quorum queues, an index with a replica.
mod common;

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use benalsam_events::publish::{QueueType, TopologyConfig};
use common::{BenchEnv, BoxError, binary};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const USAGE: &str = "scripts/soak [--seed N] [--jobs N | --duration 10m] [--writers 4] \
[--fault-every 30s] [--faults binaries|all|KIND,KIND…] [--services] [--cluster] \
[--max-backlog 20000] [--truncate-every N] [--lease 60s] [--settle 10m] [--rss-every 5s] [--keep] \
[--sabotage: spoil four documents before the check, which must then find 1 lost, 2 stale (1 in its joined part), 1 ghost]";

const FAULT_KINDS: [&str; 10] = [
    "bridge-kill",
    "consumer-kill",
    "bridge-term",
    "consumer-term",
    "bridge-pause",
    "consumer-pause",
    "pg-terminate",
    "broker-kill",
    "search-kill",
    "postgres-kill",
];
/// The kinds that touch only the harness's own processes and sessions.
const BINARY_FAULTS: usize = 7;

/// Sellers the listings are joined with: a parent relation, so a seller's rename fans out to
/// every listing of that seller, and moving a listing to another seller changes its joined
/// part. The run's index alias replaces `SOAK_ALIAS`, and `SOAK_REPLICAS` is 1 on a cluster
/// (BENALSAM_INDEX_REPLICAS is for the built-in listings only).
const SELLERS_SQL: &str = "CREATE TABLE sellers (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    display_name text NOT NULL
)";
const SOAK_ALIAS: &str = "SOAK_ALIAS";
const SOAK_TOML: &str = r#"
[[event_type]]
name = "listings"
ignore = ["view_count"]
exchange = "benalsam.listings"
routing_prefix = "listing"
status_column = "status"
queue = "elasticsearch.sync"
dead_letter_exchange = "benalsam.dlx"
dead_letter_queue = "elasticsearch.sync.dlq"
status_queue = "listing.status.changes"

[event_type.index]
alias = "SOAK_ALIAS"
replicas = SOAK_REPLICAS

[event_type.document]
searchable_statuses = ["active"]

[event_type.document.fields]
title = { type = "text", analyzer = "benalsam_turkish", raw = true, copy_to = "search_text" }
description = { type = "text", analyzer = "benalsam_turkish", copy_to = "search_text" }
category = { type = "keyword" }
status = { type = "keyword" }
created_at = { type = "date" }

[event_type.relations.seller]
table = "sellers"
kind = "parent"
foreign_key = ["user_id"]
references = ["id"]
fields.display_name = { type = "text", analyzer = "benalsam_turkish", raw = true }
"#;
/// How many sellers the run starts with. Listings pick them skewed (the first few have
/// hundreds of listings, the last a few), so a rename fans out to a few or a few hundred.
const SELLERS: usize = 300;

#[derive(Debug, Clone)]
struct Options {
    seed: u64,
    jobs: Option<i64>,
    duration: Option<Duration>,
    writers: usize,
    fault_every: Duration,
    faults: Vec<&'static str>,
    services: bool,
    cluster: bool,
    max_backlog: i64,
    truncate_every: Option<i64>,
    lease: String,
    settle: Duration,
    rss_every: Duration,
    keep: bool,
    sabotage: bool,
}

impl Options {
    fn parse() -> Result<Self, BoxError> {
        let mut options = Options {
            seed: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(1),
            jobs: None,
            duration: None,
            writers: 4,
            fault_every: Duration::from_secs(30),
            faults: FAULT_KINDS[..BINARY_FAULTS].to_vec(),
            services: false,
            cluster: false,
            max_backlog: 20_000,
            truncate_every: None,
            lease: "60s".to_owned(),
            settle: Duration::from_secs(600),
            rss_every: Duration::from_secs(5),
            keep: false,
            sabotage: false,
        };
        let mut faults = None;
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            // `cargo bench` adds `--bench`; `--name=value` is `--name value`.
            let (name, inline) = match arg.split_once('=') {
                Some((n, v)) => (n.to_owned(), Some(v.to_owned())),
                None => (arg.clone(), None),
            };
            let mut value = || -> Result<String, BoxError> {
                inline
                    .clone()
                    .or_else(|| args.next())
                    .ok_or_else(|| format!("{name} needs a value; usage: {USAGE}").into())
            };
            let duration = |v: String| -> Result<Duration, BoxError> {
                humantime::parse_duration(&v)
                    .map_err(|e| format!("{name} {v}: {e} (say 90s, 10m, 1h)").into())
            };
            match name.as_str() {
                "--bench" => {}
                "--seed" => options.seed = value()?.parse()?,
                "--jobs" => options.jobs = Some(value()?.replace('_', "").parse()?),
                "--duration" => options.duration = Some(duration(value()?)?),
                "--writers" => options.writers = value()?.parse::<usize>()?.max(1),
                "--fault-every" => options.fault_every = duration(value()?)?,
                "--faults" => faults = Some(value()?),
                "--services" => options.services = true,
                "--cluster" => options.cluster = true,
                "--max-backlog" => options.max_backlog = value()?.parse()?,
                "--truncate-every" => {
                    options.truncate_every = Some(value()?.replace('_', "").parse()?);
                }
                "--lease" => options.lease = value()?,
                "--settle" => options.settle = duration(value()?)?,
                "--rss-every" => options.rss_every = duration(value()?)?,
                "--keep" => options.keep = true,
                "--sabotage" => options.sabotage = true,
                "--help" | "-h" => {
                    println!("{USAGE}");
                    std::process::exit(0);
                }
                other => return Err(format!("unknown option {other}; usage: {USAGE}").into()),
            }
        }
        if options.jobs.is_none() && options.duration.is_none() {
            options.jobs = Some(100_000);
        }
        if let Some(list) = faults {
            options.faults = match list.as_str() {
                "binaries" => FAULT_KINDS[..BINARY_FAULTS].to_vec(),
                "all" => FAULT_KINDS.to_vec(),
                "none" => Vec::new(),
                list => list
                    .split(',')
                    .map(|k| {
                        FAULT_KINDS
                            .iter()
                            .find(|known| **known == k.trim())
                            .copied()
                            .ok_or_else(|| {
                                format!("unknown fault kind {k}: one of {}", FAULT_KINDS.join(", "))
                            })
                    })
                    .collect::<Result<_, _>>()?,
            };
        }
        let services: Vec<&&str> = options.faults[..]
            .iter()
            .filter(|k| FAULT_KINDS[BINARY_FAULTS..].contains(k))
            .collect();
        if !services.is_empty() && !options.services {
            return Err(format!(
                "{services:?} kill servers every process on this machine shares: add --services \
                 to mean it"
            )
            .into());
        }
        Ok(options)
    }

    /// Truncations every so many jobs: given, or a few per run (at most every 50,000 jobs,
    /// which keeps the table, and the check at the end, to a size that fits in memory).
    fn truncate_every(&self) -> i64 {
        self.truncate_every
            .unwrap_or_else(|| self.jobs.map_or(50_000, |j| (j / 3).clamp(500, 50_000)))
    }
}

fn main() -> Result<(), BoxError> {
    let options = Options::parse()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let clean = runtime.block_on(soak(options))?;
    if !clean {
        std::process::exit(1);
    }
    Ok(())
}

/// The two binaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Bridge,
    Consumer,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Bridge => "bridge",
            Role::Consumer => "consumer",
        }
    }
}

/// A binary the harness runs, starts again after a fault, and samples.
struct Binary {
    role: Role,
    path: PathBuf,
    env: Vec<(String, String)>,
    port: u16,
    log: PathBuf,
    child: Option<Child>,
    starts: u32,
}

impl Binary {
    fn start(&mut self) -> Result<(), BoxError> {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut command = Command::new(&self.path);
        command
            .env_remove("BENALSAM_CONFIG")
            .env("BENALSAM_HEALTH_ADDR", format!("127.0.0.1:{}", self.port))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in &self.env {
            command.env(k, v);
        }
        self.child = Some(command.spawn()?);
        self.starts += 1;
        Ok(())
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn signal(&self, signal: &str) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill")
                .args([signal, &pid.to_string()])
                .status();
        }
    }

    /// Waits for the process to exit, at most `limit`; whether it did.
    async fn exited(&mut self, limit: Duration) -> bool {
        let started = Instant::now();
        while let Some(child) = &mut self.child {
            if child.try_wait().ok().flatten().is_some() {
                self.child = None;
                return true;
            }
            if started.elapsed() > limit {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        true
    }

    /// `/readyz` answers 200, within `limit`.
    async fn ready(&self, limit: Duration) -> Result<(), BoxError> {
        let started = Instant::now();
        let http = reqwest::Client::new();
        loop {
            let answer = http
                .get(format!("http://127.0.0.1:{}/readyz", self.port))
                .timeout(Duration::from_secs(2))
                .send()
                .await;
            if answer.is_ok_and(|a| a.status() == 200) {
                return Ok(());
            }
            if started.elapsed() > limit {
                return Err(format!(
                    "the {} is not ready after {limit:?}; log {}",
                    self.role.name(),
                    self.log.display()
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A health endpoint's `details`, if it answers.
    async fn details(&self, path: &str) -> Option<Value> {
        let answer: Value = reqwest::Client::new()
            .get(format!("http://127.0.0.1:{}{path}", self.port))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        Some(answer["details"].clone())
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn free_port() -> Result<u16, BoxError> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// What the run shares between its tasks.
struct Shared {
    started: Instant,
    /// The newest job id (jobs written so far).
    jobs: AtomicI64,
    /// Jobs pending, processing or sent.
    open: AtomicI64,
    /// Bumped by a truncation: writers forget the rows they knew.
    epoch: AtomicU64,
    /// Rows recently inserted by any writer, which every writer also edits.
    recent: Mutex<Vec<String>>,
    /// The sellers' ids, first the busiest (see [`Shared::seller`]).
    sellers: Vec<String>,
    faults: Mutex<BTreeMap<&'static str, u32>>,
    /// Findings beside the check: a SIGTERM not obeyed in time, a binary that exited alone.
    findings: Mutex<Vec<String>>,
    /// The pid of each running binary, for the sampler.
    pids: Mutex<Vec<(&'static str, u32)>>,
    /// (seconds into the run, binary, KiB).
    rss: Mutex<Vec<(f64, &'static str, u64)>>,
    writer_errors: AtomicU64,
    truncations: AtomicU64,
    backlog_pauses: AtomicBool,
}

impl Shared {
    fn at(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    fn note(&self, what: String) {
        println!("[{:7.1} s] {what}", self.at());
        let _ = std::io::stdout().flush();
    }

    /// A seller for a new or moved listing: skewed (the square of a uniform draw), so the
    /// first seller has about 6 % of the listings and the last a few in ten thousand.
    fn seller(&self, rng: &mut fastrand::Rng) -> String {
        let n = self.sellers.len();
        let at = ((n as f64) * rng.f64().powi(2)) as usize;
        self.sellers[at.min(n - 1)].clone()
    }
}

/// The stack's folder (`scripts/stack where`) and the script.
fn stack_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/stack")
}

fn stack(args: &[&str]) -> Result<String, BoxError> {
    let output = Command::new(stack_script())
        .args(args)
        .stdin(Stdio::null())
        .output()?;
    if !output.status.success() {
        return Err(format!(
            "scripts/stack {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
        .into());
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// A list variable of the cluster (`RABBITMQ_URLS`, `ELASTICSEARCH_URLS`).
fn cluster_list(name: &str) -> Result<Vec<String>, BoxError> {
    let value = std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .ok_or_else(|| {
            format!(
                "--cluster: {name} is not set; start the clusters (scripts/stack up --cluster) and \
             eval \"$(scripts/stack env)\" of its folder"
            )
        })?;
    Ok(value.split(',').map(|u| u.trim().to_owned()).collect())
}

async fn soak(options: Options) -> Result<bool, BoxError> {
    println!(
        "soak: seed {}, {}, {} writers, a fault every {:?} ±50 % of {:?}, lease {}{}",
        options.seed,
        match (options.jobs, options.duration) {
            (Some(j), _) => format!("{j} jobs"),
            (None, Some(d)) => format!("{d:?}"),
            (None, None) => String::new(),
        },
        options.writers,
        options.fault_every,
        options.faults,
        options.lease,
        if options.cluster { ", cluster" } else { "" }
    );
    // The binaries of the harness's own profile (target/release under `cargo bench`, which
    // scripts/soak builds first; target/debug under `cargo test --bench soak`, as
    // scripts/test runs it after the workspace's tests), or those of BENALSAM_SOAK_BIN_DIR.
    let own = std::env::current_exe()?
        .parent()
        .and_then(|deps| deps.parent())
        .map(std::path::Path::to_path_buf);
    let dir = std::env::var_os("BENALSAM_SOAK_BIN_DIR")
        .map(PathBuf::from)
        .or(own)
        .filter(|d| d.join("benalsam-bridge").exists() && d.join("benalsam-consumer").exists());
    let (bridge_path, consumer_path) = match dir {
        Some(dir) => (dir.join("benalsam-bridge"), dir.join("benalsam-consumer")),
        None => (binary("benalsam-bridge")?, binary("benalsam-consumer")?),
    };
    println!(
        "soak: binaries {}{}",
        bridge_path.with_file_name("").display(),
        if bridge_path.components().any(|c| c.as_os_str() == "debug") {
            " (debug builds: their RSS is not the release figure the README gives)"
        } else {
            ""
        }
    );
    let mut topology = TopologyConfig::default();
    topology.queue_type = if options.cluster {
        QueueType::Quorum
    } else {
        QueueType::Classic
    };
    let mut env = BenchEnv::with_topology("soak", &topology).await?;
    let alias = format!("{}_listings", env.name);
    let logs = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(&env.name);
    std::fs::create_dir_all(&logs)?;
    // The listings joined with their seller: the binaries read this file (BENALSAM_CONFIG),
    // and its relation's trigger is attached here, before they start.
    let config = logs.join("listings.toml");
    let replicas = if options.cluster { "1" } else { "0" };
    std::fs::write(
        &config,
        SOAK_TOML
            .replace(SOAK_ALIAS, &alias)
            .replace("SOAK_REPLICAS", replicas),
    )?;
    let event_types = benalsam_events::EventType::from_file(&config)?;
    env.client.batch_execute(SELLERS_SQL).await?;
    benalsam_events::OutboxConfig::in_schema(&env.name)
        .migrate(&mut env.client, &event_types)
        .await?;
    let names: Vec<String> = (1..=SELLERS).map(|i| format!("Satıcı {i}")).collect();
    let sellers: Vec<String> = env
        .client
        .query(
            "INSERT INTO sellers (display_name) SELECT unnest($1::text[]) RETURNING id::text",
            &[&names],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    println!(
        "soak: schema, vhost {0}, index {alias}; logs in {1}",
        env.name,
        logs.display()
    );

    // Where the binaries connect: the vhost on every broker, the search node list.
    let (amqp, search) = if options.cluster {
        let amqp = cluster_list("RABBITMQ_URLS")?
            .iter()
            .map(|u| {
                let mut url = url::Url::parse(u)?;
                url.set_path(&format!("/{}", env.name));
                Ok(url.to_string())
            })
            .collect::<Result<Vec<_>, BoxError>>()?
            .join(",");
        (amqp, cluster_list("ELASTICSEARCH_URLS")?.join(","))
    } else {
        (
            env.url.expose().to_owned(),
            benalsam_events::config::SearchUrl::from_env()?
                .expose()
                .to_owned(),
        )
    };
    let search_node = search
        .split(',')
        .next()
        .unwrap_or_default()
        .trim_end_matches('/')
        .to_owned();
    // Each binary's PostgreSQL sessions carry its name, so `pg-terminate` finds them.
    let db_url = |name: &str| {
        let url = env.db_url.expose();
        let glue = if url.contains('?') { '&' } else { '?' };
        format!("{url}{glue}application_name={name}")
    };
    let common_env = |name: &str| {
        let mut vars = vec![
            ("DATABASE_URL".to_owned(), db_url(name)),
            ("BENALSAM_SCHEMA".to_owned(), env.name.clone()),
            ("RABBITMQ_URL".to_owned(), amqp.clone()),
            ("BENALSAM_CONFIG".to_owned(), config.display().to_string()),
        ];
        if options.cluster {
            vars.push(("BENALSAM_QUEUE_TYPE".to_owned(), "quorum".to_owned()));
        }
        vars
    };
    let bridge_app = format!("{}_bridge", env.name);
    let consumer_app = format!("{}_consumer", env.name);
    let mut bridge_env = common_env(&bridge_app);
    bridge_env.push(("BENALSAM_LEASE".to_owned(), options.lease.clone()));
    let mut consumer_env = common_env(&consumer_app);
    consumer_env.push(("ELASTICSEARCH_URL".to_owned(), search.clone()));
    let mut binaries = vec![
        Binary {
            role: Role::Bridge,
            path: bridge_path,
            env: bridge_env,
            port: free_port()?,
            log: logs.join("bridge.log"),
            child: None,
            starts: 0,
        },
        Binary {
            role: Role::Consumer,
            path: consumer_path,
            env: consumer_env,
            port: free_port()?,
            log: logs.join("consumer.log"),
            child: None,
            starts: 0,
        },
    ];
    for b in &mut binaries {
        b.start()?;
    }
    for b in &binaries {
        b.ready(Duration::from_secs(120)).await?;
    }

    let shared = Arc::new(Shared {
        started: Instant::now(),
        jobs: AtomicI64::new(0),
        open: AtomicI64::new(0),
        epoch: AtomicU64::new(0),
        recent: Mutex::new(Vec::new()),
        sellers,
        faults: Mutex::new(BTreeMap::new()),
        findings: Mutex::new(Vec::new()),
        pids: Mutex::new(Vec::new()),
        rss: Mutex::new(Vec::new()),
        writer_errors: AtomicU64::new(0),
        truncations: AtomicU64::new(0),
        backlog_pauses: AtomicBool::new(false),
    });
    publish_pids(&shared, &binaries);

    let stop_writing = CancellationToken::new();
    let stop_all = CancellationToken::new();
    let monitor = tokio::spawn(monitor(
        env.db_url.clone(),
        env.name.clone(),
        Arc::clone(&shared),
        options.clone(),
        stop_writing.clone(),
        stop_all.clone(),
    ));
    let sampler = tokio::spawn(sampler(
        Arc::clone(&shared),
        options.rss_every,
        stop_all.clone(),
    ));
    let writers: Vec<_> = (0..options.writers)
        .map(|w| {
            tokio::spawn(writer(
                env.db_url.clone(),
                env.name.clone(),
                options.seed.wrapping_mul(1_000).wrapping_add(w as u64),
                w,
                Arc::clone(&shared),
                options.clone(),
                stop_writing.clone(),
            ))
        })
        .collect();

    // Faults until the writers are done; the binaries stay with this task.
    let mut rng = fastrand::Rng::with_seed(options.seed);
    let fault_db = env.db_url.clone();
    let apps = [bridge_app.clone(), consumer_app.clone()];
    let mut next_fault = Instant::now() + jittered(&mut rng, options.fault_every);
    while !stop_writing.is_cancelled() {
        tokio::time::sleep(Duration::from_millis(200)).await;
        for b in &mut binaries {
            if let Some(child) = &mut b.child
                && let Ok(Some(status)) = child.try_wait()
            {
                shared.findings.lock().expect("findings").push(format!(
                    "the {} exited by itself ({status}) at {:.0} s; started again",
                    b.role.name(),
                    shared.at()
                ));
                shared.note(format!("{} exited by itself: {status}", b.role.name()));
                b.child = None;
                b.start()?;
                publish_pids(&shared, &binaries);
                break;
            }
        }
        if options.faults.is_empty() || Instant::now() < next_fault {
            continue;
        }
        let kind = options.faults[rng.usize(..options.faults.len())];
        // From this fault's start: a long fault (a pause, a slow SIGTERM) does not stretch
        // the gap to the next one.
        next_fault = Instant::now() + jittered(&mut rng, options.fault_every);
        fault(
            kind,
            &mut rng,
            &mut binaries,
            &shared,
            &fault_db,
            &apps,
            options.cluster,
        )
        .await?;
        *shared
            .faults
            .lock()
            .expect("faults")
            .entry(kind)
            .or_default() += 1;
    }
    let mut written = 0;
    for w in writers {
        written += w.await?;
    }
    let writing = shared.at();
    shared.note(format!(
        "writers stopped: {written} statements, {} jobs; waiting for every job to settle",
        shared.jobs.load(Ordering::Relaxed)
    ));

    // Every binary running, none paused, then quiescence.
    for b in &mut binaries {
        b.signal("-CONT");
        if b.child.is_none() {
            b.start()?;
        }
    }
    publish_pids(&shared, &binaries);
    let settled = settle(&env, options.settle, &shared).await?;
    let reclaimed = binaries[0]
        .details("/api/v1/health/database-trigger-bridge")
        .await
        .map(|d| d["reclaimed"].as_i64().unwrap_or(0));
    stop_all.cancel();
    let _ = monitor.await;
    let _ = sampler.await;
    for b in &mut binaries {
        b.signal("-TERM");
        if !b.exited(Duration::from_secs(60)).await {
            shared.findings.lock().expect("findings").push(format!(
                "the {} did not exit within 60 s of the final SIGTERM",
                b.role.name()
            ));
        }
    }

    if options.sabotage {
        sabotage(&env, &search_node, &alias).await?;
    }
    let check = check(&env, &search_node, &alias).await?;
    let clean = if options.sabotage {
        // The checker's own test: it must find exactly what was spoiled.
        let found = (
            check.lost.len(),
            check.stale.len(),
            check.stale_joined,
            check.ghost.len(),
        );
        println!(
            "soak: sabotaged 1 lost, 2 stale (1 of them in its joined part), 1 ghost; \
             the check found (lost, stale, stale joined, ghost) {found:?}"
        );
        found == (1, 2, 1, 1) && check.stuck == 0 && settled
    } else {
        check.clean() && settled
    };
    report(
        &options, &shared, &binaries, &check, writing, reclaimed, &logs,
    )?;
    drop(binaries);
    if clean && !options.keep {
        let _ = reqwest::Client::new()
            .delete(format!("{search_node}/{alias}_v1"))
            .send()
            .await;
        // A fresh session: the harness's first one did not live through a PostgreSQL kill.
        env.client = env.db_url.connect().await?;
        env.cleanup().await?;
    } else {
        println!(
            "soak: kept schema and vhost {} and index {alias} for a look",
            env.name
        );
    }
    Ok(clean)
}

/// `every` ±50 %.
fn jittered(rng: &mut fastrand::Rng, every: Duration) -> Duration {
    every.mul_f64(0.5 + rng.f64())
}

fn publish_pids(shared: &Shared, binaries: &[Binary]) {
    *shared.pids.lock().expect("pids") = binaries
        .iter()
        .filter_map(|b| Some((b.role.name(), b.pid()?)))
        .collect();
}

/// One fault of `kind`.
async fn fault(
    kind: &'static str,
    rng: &mut fastrand::Rng,
    binaries: &mut [Binary],
    shared: &Shared,
    db_url: &benalsam_events::DatabaseUrl,
    apps: &[String; 2],
    cluster: bool,
) -> Result<(), BoxError> {
    let target = |role| binaries.iter().position(|b| b.role == role).unwrap_or(0);
    match kind {
        "bridge-kill" | "consumer-kill" | "bridge-term" | "consumer-term" => {
            let role = if kind.starts_with("bridge") {
                Role::Bridge
            } else {
                Role::Consumer
            };
            let b = &mut binaries[target(role)];
            let term = kind.ends_with("term");
            b.signal(if term { "-TERM" } else { "-KILL" });
            let exited = b.exited(Duration::from_secs(60)).await;
            if !exited {
                shared.findings.lock().expect("findings").push(format!(
                    "the {} did not exit within 60 s of SIGTERM at {:.0} s (killed)",
                    role.name(),
                    shared.at()
                ));
                b.signal("-KILL");
                b.exited(Duration::from_secs(60)).await;
            }
            // Down for up to 3 s, as a restart by an orchestrator.
            let down = Duration::from_millis(rng.u64(0..3_000));
            tokio::time::sleep(down).await;
            b.start()?;
            shared.note(format!(
                "{kind}: down {:.1} s, started again",
                down.as_secs_f64()
            ));
        }
        "bridge-pause" | "consumer-pause" => {
            let role = if kind.starts_with("bridge") {
                Role::Bridge
            } else {
                Role::Consumer
            };
            let b = &binaries[target(role)];
            let paused = Duration::from_millis(rng.u64(2_000..20_000));
            b.signal("-STOP");
            tokio::time::sleep(paused).await;
            b.signal("-CONT");
            shared.note(format!("{kind}: stopped {:.1} s", paused.as_secs_f64()));
        }
        "pg-terminate" => {
            let client = db_url.connect().await?;
            let apps: Vec<&str> = apps.iter().map(String::as_str).collect();
            let n: i64 = client
                .query_one(
                    "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid))
                     FROM pg_stat_activity WHERE application_name = ANY($1)",
                    &[&apps],
                )
                .await?
                .get(0);
            shared.note(format!("{kind}: {n} sessions terminated"));
        }
        "broker-kill" | "search-kill" | "postgres-kill" => {
            let down = Duration::from_millis(rng.u64(5_000..30_000));
            let node = rng.usize(1..=3).to_string();
            let what = &kind[..kind.len() - 5];
            let task = tokio::task::spawn_blocking({
                let (what, node) = (what.to_owned(), node.clone());
                move || service_fault(&what, &node, cluster, down).map_err(|e| e.to_string())
            });
            let took = task.await??;
            shared.note(format!(
                "{kind}: down {:.0} s, back {:.0} s later{}",
                down.as_secs_f64(),
                took.as_secs_f64(),
                if cluster && what != "postgres" {
                    format!(" (node {node})")
                } else {
                    String::new()
                }
            ));
        }
        other => return Err(format!("no such fault: {other}").into()),
    }
    publish_pids(shared, binaries);
    Ok(())
}

/// kill -9 of a server of the stack, `down` of silence, then `scripts/stack` starts it again;
/// how long the start took. In a cluster, node `node` of the broker or search cluster (with
/// `scripts/stack pid` and `restart-node`); otherwise the single server from its pid file
/// and `scripts/stack up`, which starts what is not running.
fn service_fault(
    what: &str,
    node: &str,
    cluster: bool,
    down: Duration,
) -> Result<Duration, BoxError> {
    let state = PathBuf::from(stack(&["where"])?);
    let pid = match (what, cluster) {
        ("broker", true) => stack(&["pid", "rabbit", node])?,
        ("search", true) => stack(&["pid", "search", node])?,
        ("broker", false) => std::fs::read_to_string(state.join("rabbitmq/rabbitmq.pid"))?,
        ("search", false) => std::fs::read_to_string(state.join("opensearch/opensearch.pid"))?,
        // The postmaster's pid is the first line of its pid file.
        _ => std::fs::read_to_string(state.join("postgres/data/postmaster.pid"))?
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned(),
    };
    let pid = pid.trim();
    if pid.is_empty() || !pid.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!("no pid of the {what} server in {}", state.display()).into());
    }
    Command::new("kill").args(["-KILL", pid]).status()?;
    std::thread::sleep(down);
    let started = Instant::now();
    match (what, cluster) {
        ("broker", true) => stack(&["restart-node", "rabbit", node])?,
        ("search", true) => stack(&["restart-node", "search", node])?,
        (_, true) => stack(&["up", "--cluster"])?,
        (_, false) => stack(&["up"])?,
    };
    Ok(started.elapsed())
}

/// Every second: jobs written, open and completed, and the writers' stop once `--jobs` or
/// `--duration` is reached. Every 30 s a progress line.
async fn monitor(
    db_url: benalsam_events::DatabaseUrl,
    schema: String,
    shared: Arc<Shared>,
    options: Options,
    stop_writing: CancellationToken,
    stop_all: CancellationToken,
) {
    let mut client = None;
    let mut last_line = Instant::now();
    while !stop_all.is_cancelled() {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if client.is_none() {
            client = connect_in(&db_url, &schema).await.ok();
        }
        let Some(c) = &client else { continue };
        // The partial indexes of the live states keep this cheap with millions of jobs.
        let row = c
            .query_one(
                "SELECT coalesce((SELECT max(id) FROM elasticsearch_sync_queue), 0),
                        (SELECT count(*) FROM elasticsearch_sync_queue WHERE status = 'pending')
                      + (SELECT count(*) FROM elasticsearch_sync_queue WHERE status = 'processing')
                      + (SELECT count(*) FROM elasticsearch_sync_queue WHERE status = 'sent')",
                &[],
            )
            .await;
        let Ok(row) = row else {
            client = None;
            continue;
        };
        let (jobs, open): (i64, i64) = (row.get(0), row.get(1));
        shared.jobs.store(jobs, Ordering::Relaxed);
        shared.open.store(open, Ordering::Relaxed);
        let done = options.jobs.is_some_and(|j| jobs >= j)
            || options
                .duration
                .is_some_and(|d| shared.started.elapsed() >= d);
        if done && !stop_writing.is_cancelled() {
            stop_writing.cancel();
        }
        if last_line.elapsed() >= Duration::from_secs(30) {
            last_line = Instant::now();
            let rss: Vec<String> = shared
                .rss
                .lock()
                .expect("rss")
                .iter()
                .rev()
                .take(2)
                .map(|(_, who, kib)| format!("{who} {:.1} MiB", *kib as f64 / 1024.0))
                .collect();
            let faults: u32 = shared.faults.lock().expect("faults").values().sum();
            shared.note(format!(
                "{jobs} jobs, {open} on their way, {faults} faults, {} truncations; RSS {}",
                shared.truncations.load(Ordering::Relaxed),
                rss.join(", ")
            ));
        }
    }
}

async fn connect_in(
    db_url: &benalsam_events::DatabaseUrl,
    schema: &str,
) -> Result<tokio_postgres::Client, BoxError> {
    let client = db_url.connect().await?;
    // Without a flush per commit the writers are not what limits the run (the binaries'
    // own sessions keep the server's setting); a crash of the server loses a row and its
    // job together or neither, which the check cannot tell from a change never made.
    client
        .batch_execute(&format!(
            "SET search_path TO {schema}; SET synchronous_commit TO off"
        ))
        .await?;
    Ok(client)
}

/// Each running binary's VmRSS every `every`.
async fn sampler(shared: Arc<Shared>, every: Duration, stop: CancellationToken) {
    while !stop.is_cancelled() {
        let pids = shared.pids.lock().expect("pids").clone();
        for (who, pid) in pids {
            let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
                continue;
            };
            let kib = status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok());
            if let Some(kib) = kib {
                let at = shared.at();
                shared.rss.lock().expect("rss").push((at, who, kib));
            }
        }
        tokio::select! {
            () = stop.cancelled() => {}
            () = tokio::time::sleep(every) => {}
        }
    }
}

const STATUSES: [&str; 7] = [
    "active",
    "draft",
    "pending_approval",
    "sold",
    "inactive",
    "expired",
    "rejected",
];

/// One writer: a realistic mix of changes until told to stop; the statements it ran.
async fn writer(
    db_url: benalsam_events::DatabaseUrl,
    schema: String,
    seed: u64,
    index: usize,
    shared: Arc<Shared>,
    options: Options,
    stop: CancellationToken,
) -> u64 {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut mine: Vec<String> = Vec::new();
    let mut epoch = shared.epoch.load(Ordering::SeqCst);
    let mut statements = 0;
    let mut client = None;
    let truncate_every = options.truncate_every();
    let mut next_truncate = truncate_every;
    while !stop.is_cancelled() {
        if shared.open.load(Ordering::Relaxed) > options.max_backlog {
            shared.backlog_pauses.store(true, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        if client.is_none() {
            // `.ok()` at once: the error is not `Send`, and this future must be.
            let connected = connect_in(&db_url, &schema).await.ok();
            match connected {
                Some(c) => client = Some(c),
                None => {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            }
        }
        let Some(c) = &client else { continue };
        let now = shared.epoch.load(Ordering::SeqCst);
        if now != epoch {
            epoch = now;
            mine.clear();
        }
        // Writer 0 truncates the table every `truncate_every` jobs.
        if index == 0 && shared.jobs.load(Ordering::Relaxed) >= next_truncate {
            next_truncate += truncate_every;
            match c.batch_execute("TRUNCATE listings").await {
                Ok(()) => {
                    shared.epoch.fetch_add(1, Ordering::SeqCst);
                    shared.recent.lock().expect("recent").clear();
                    shared.truncations.fetch_add(1, Ordering::Relaxed);
                    shared.note("TRUNCATE listings".to_owned());
                }
                Err(_) => {
                    shared.writer_errors.fetch_add(1, Ordering::Relaxed);
                    client = None;
                }
            }
            statements += 1;
            continue;
        }
        let roll = rng.u32(..100);
        let pick = |rng: &mut fastrand::Rng, mine: &Vec<String>| -> Option<String> {
            if roll >= 90 {
                let recent = shared.recent.lock().expect("recent");
                (!recent.is_empty()).then(|| recent[rng.usize(..recent.len())].clone())
            } else {
                (!mine.is_empty()).then(|| mine[rng.usize(..mine.len())].clone())
            }
        };
        let target = pick(&mut rng, &mine);
        let text = format!("w{index}-{statements}-{}", rng.u32(..1_000_000));
        let result: Result<(), tokio_postgres::Error> = async {
            match (roll, target) {
                // A seller renamed: every listing of the seller gets a new joined part (a
                // fan-out of a few to a few hundred documents). Drawn as the listings' are,
                // so the busiest sellers, with hundreds of listings, are renamed the most.
                (59, _) => {
                    let seller = shared.seller(&mut rng);
                    c.execute(
                        "UPDATE sellers SET display_name = $2 WHERE id::text = $1",
                        &[&seller, &format!("Satıcı {text}")],
                    )
                    .await?;
                }
                // Inserts: searchable (active) and not (a draft, waiting for approval).
                (0..30, _) | (_, None) => {
                    let status = if roll < 30 || rng.u32(..4) > 0 {
                        "active"
                    } else {
                        STATUSES[rng.usize(1..3)]
                    };
                    let id: String = c
                        .query_one(
                            "INSERT INTO listings (user_id, title, description, category, status, latitude, longitude, attributes)
                             VALUES ($4::text::uuid, $1, $2, 'genel', $3, 41.0, 29.0, '{\"renk\": \"mavi\"}')
                             RETURNING id::text",
                            &[&format!("İlan {text}"), &format!("Açıklama {text}"), &status, &shared.seller(&mut rng)],
                        )
                        .await?
                        .get(0);
                    mine.push(id.clone());
                    // Bounded: a writer remembers its newest rows.
                    if mine.len() > 2_000 {
                        let n = mine.len();
                        mine.swap_remove(rng.usize(..n));
                    }
                    let mut recent = shared.recent.lock().expect("recent");
                    recent.push(id);
                    if recent.len() > 256 {
                        let n = recent.len();
                        recent.swap_remove(rng.usize(..n));
                    }
                }
                // Edits, of this writer's rows and of rows other writers wrote.
                (30..59, Some(id)) | (90.., Some(id)) => {
                    c.execute(
                        "UPDATE listings SET description = $2, title = $3, updated_at = now() WHERE id::text = $1",
                        &[&id, &format!("Düzenlendi {text}"), &format!("İlan {text}")],
                    )
                    .await?;
                }
                // A listing moved to another seller: its joined part changes with it.
                (60..62, Some(id)) => {
                    c.execute(
                        "UPDATE listings SET user_id = $2::text::uuid WHERE id::text = $1",
                        &[&id, &shared.seller(&mut rng)],
                    )
                    .await?;
                }
                (62..78, Some(id)) => {
                    let status = STATUSES[rng.usize(..STATUSES.len())];
                    c.execute(
                        "UPDATE listings SET status = $2 WHERE id::text = $1",
                        &[&id, &status],
                    )
                    .await?;
                }
                (78..86, Some(id)) => {
                    c.execute("DELETE FROM listings WHERE id::text = $1", &[&id])
                        .await?;
                    mine.retain(|m| *m != id);
                }
                // A key change: a delete of the old key and an insert of the new one.
                (86..90, Some(id)) => {
                    let new: Option<String> = c
                        .query_opt(
                            "UPDATE listings SET id = gen_random_uuid() WHERE id::text = $1 RETURNING id::text",
                            &[&id],
                        )
                        .await?
                        .map(|r| r.get(0));
                    mine.retain(|m| *m != id);
                    if let Some(new) = new {
                        mine.push(new);
                    }
                }
            }
            Ok(())
        }
        .await;
        statements += 1;
        if result.is_err() {
            shared.writer_errors.fetch_add(1, Ordering::Relaxed);
            if c.is_closed() {
                client = None;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    statements
}

/// Waits until no job is on its way (pending, processing, sent, or failed with attempts
/// left), for at most `limit`; whether that happened.
async fn settle(env: &BenchEnv, limit: Duration, shared: &Shared) -> Result<bool, BoxError> {
    let started = Instant::now();
    let mut last = Instant::now();
    loop {
        let client = connect_in(&env.db_url, &env.name).await;
        let open: Option<i64> = match &client {
            Ok(c) => c
                .query_one(
                    "SELECT count(*) FROM elasticsearch_sync_queue
                     WHERE status IN ('pending', 'processing', 'sent')
                        OR (status = 'failed' AND next_attempt_at IS NOT NULL)",
                    &[],
                )
                .await
                .ok()
                .map(|r| r.get(0)),
            Err(_) => None,
        };
        if open == Some(0) {
            shared.note(format!(
                "settled {:.0} s after the writers stopped",
                started.elapsed().as_secs_f64()
            ));
            return Ok(true);
        }
        if started.elapsed() > limit {
            shared.note(format!("not settled after {limit:?}: {open:?} jobs open"));
            return Ok(false);
        }
        if last.elapsed() > Duration::from_secs(30) {
            last = Instant::now();
            shared.note(format!("{open:?} jobs still on their way"));
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Spoils the index as a defect would: one searchable row's document deleted (lost),
/// another's content changed under a newer version (stale), a third's seller name changed
/// the same way (a stale joined part), and a document of no row (ghost).
async fn sabotage(env: &BenchEnv, search: &str, alias: &str) -> Result<(), BoxError> {
    let client = connect_in(&env.db_url, &env.name).await?;
    let rows = client
        .query(
            "SELECT id::text FROM listings WHERE status = 'active' ORDER BY id LIMIT 3",
            &[],
        )
        .await?;
    if rows.len() < 3 {
        return Err("--sabotage needs three searchable rows at the end".into());
    }
    let (gone, spoiled, joined): (String, String, String) =
        (rows[0].get(0), rows[1].get(0), rows[2].get(0));
    let http = reqwest::Client::new();
    http.delete(format!("{search}/{alias}/_doc/{gone}?refresh=true"))
        .send()
        .await?
        .error_for_status()?;
    let mut source = Value::Null;
    for (id, field, value) in [
        (&spoiled, "/description", "spoiled"),
        (
            &joined,
            "/seller/display_name",
            "a seller renamed in the index only",
        ),
    ] {
        let answer: Value = http
            .get(format!("{search}/{alias}/_doc/{id}"))
            .send()
            .await?
            .json()
            .await?;
        source = answer["_source"].clone();
        let Some(spot) = source.pointer_mut(field) else {
            return Err(format!("--sabotage: document {id} has no {field}: {source}").into());
        };
        *spot = json!(value);
        let version = answer["_version"].as_i64().unwrap_or(0) + 1;
        http.put(format!(
            "{search}/{alias}/_doc/{id}?version={version}&version_type=external&refresh=true"
        ))
        .json(&source)
        .send()
        .await?
        .error_for_status()?;
    }
    source["description"] = json!("a row that never was");
    http.put(format!(
        "{search}/{alias}/_doc/ghost-of-the-sabotage?refresh=true"
    ))
    .json(&source)
    .send()
    .await?
    .error_for_status()?;
    Ok(())
}

/// What the check found.
#[derive(Debug, Default)]
struct Check {
    jobs: i64,
    by_status: BTreeMap<String, i64>,
    stuck: i64,
    failed: i64,
    dead_letters: i64,
    rows: usize,
    searchable: usize,
    documents: usize,
    lost: Vec<String>,
    ghost: Vec<String>,
    stale: Vec<String>,
    /// Jobs of seller renames and the REBUILD jobs their fan-outs wrote.
    seller_changes: i64,
    rebuilds: i64,
    /// Of the stale documents, those whose joined part (the seller) is not the SQL view's.
    stale_joined: usize,
    errors: Vec<String>,
}

/// A listing at the end: title, description, status, latest job id, seller's name.
type Row = (String, String, String, i64, Option<String>);

impl Check {
    fn clean(&self) -> bool {
        self.stuck == 0 && self.lost.is_empty() && self.ghost.is_empty() && self.stale.is_empty()
    }
}

/// Every job's final state, every row against its document.
async fn check(env: &BenchEnv, search: &str, alias: &str) -> Result<Check, BoxError> {
    let client = connect_in(&env.db_url, &env.name).await?;
    let mut check = Check::default();
    for row in client
        .query(
            "SELECT status, (status = 'failed' AND next_attempt_at IS NULL), count(*)
             FROM elasticsearch_sync_queue GROUP BY 1, 2",
            &[],
        )
        .await?
    {
        let (status, for_good, n): (String, bool, i64) = (row.get(0), row.get(1), row.get(2));
        check.jobs += n;
        match (status.as_str(), for_good) {
            ("completed", _) => {}
            ("failed", true) => check.failed += n,
            _ => check.stuck += n,
        }
        *check.by_status.entry(status).or_default() += n;
    }
    for row in client
        .query(
            "SELECT left(coalesce(error_message, ''), 200), count(*) FROM elasticsearch_sync_queue
             WHERE status = 'failed' GROUP BY 1 ORDER BY 2 DESC LIMIT 5",
            &[],
        )
        .await?
    {
        let (error, n): (String, i64) = (row.get(0), row.get(1));
        check.errors.push(format!("{n} × {error}"));
    }

    let row = client
        .query_one(
            "SELECT count(*) FILTER (WHERE table_name LIKE '%#seller' AND operation = 'UPDATE'),
                    count(*) FILTER (WHERE operation = 'REBUILD')
             FROM elasticsearch_sync_queue",
            &[],
        )
        .await?;
    (check.seller_changes, check.rebuilds) = (row.get(0), row.get(1));

    // Each row as it is, its latest job, and its joined part as SQL sees it (the seller's
    // name; none when no seller matches, as the document then has no `seller`).
    let rows: HashMap<String, Row> = client
        .query(
            "SELECT l.id::text, l.title, l.description, l.status, max(q.id), s.display_name
             FROM listings l JOIN elasticsearch_sync_queue q ON q.record_id = l.id::text
             LEFT JOIN sellers s ON s.id = l.user_id
             GROUP BY l.id, s.display_name",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3), r.get(4), r.get(5))))
        .collect();
    let count: i64 = client
        .query_one("SELECT count(*) FROM listings", &[])
        .await?
        .get(0);
    check.rows = count as usize;
    if rows.len() != check.rows {
        check.errors.push(format!(
            "{} rows have no job at all (of {})",
            check.rows - rows.len(),
            check.rows
        ));
    }
    check.searchable = rows.values().filter(|r| r.2 == "active").count();

    // Every document, by scrolling.
    let http = reqwest::Client::new();
    let _ = http
        .post(format!("{search}/{alias}/_refresh"))
        .send()
        .await?;
    let mut page: Value = http
        .post(format!("{search}/{alias}/_search?scroll=5m"))
        .json(&json!({
            "query": {"match_all": {}}, "size": 5_000, "version": true,
            "_source": ["title", "description", "status", "seller"], "sort": ["_doc"],
        }))
        .send()
        .await?
        .json()
        .await?;
    let mut seen = std::collections::HashSet::new();
    loop {
        let hits = page["hits"]["hits"].as_array().cloned().unwrap_or_default();
        if hits.is_empty() {
            if page.get("error").is_some() {
                return Err(format!("reading the index: {page}").into());
            }
            break;
        }
        for hit in &hits {
            let id = hit["_id"].as_str().unwrap_or_default().to_owned();
            let version = hit["_version"].as_i64().unwrap_or(-1);
            let field = |f: &str| hit["_source"][f].as_str().unwrap_or_default().to_owned();
            check.documents += 1;
            let seller = hit["_source"]["seller"]["display_name"]
                .as_str()
                .map(str::to_owned);
            match rows.get(&id) {
                Some((title, description, status, latest, joined)) if status == "active" => {
                    // A joined document is written under the version of the read that built
                    // it, a value of the job sequence taken after its latest job was claimed:
                    // larger than that job's id (src/relations/mod.rs says why).
                    let own_stale = version <= *latest
                        || field("title") != *title
                        || field("description") != *description
                        || field("status") != *status;
                    if seller != *joined {
                        check.stale_joined += 1;
                    }
                    if own_stale || seller != *joined {
                        check.stale.push(format!(
                            "{id}: document v{version} {:?}/{:?}/{:?} seller {seller:?}, \
                             row (latest job {latest}) {title:?}/{description:?}/{status:?} seller {joined:?}",
                            field("title"),
                            field("description"),
                            field("status")
                        ));
                    }
                }
                _ => check.ghost.push(format!("{id} v{version}")),
            }
            seen.insert(id);
        }
        let Some(scroll) = page["_scroll_id"].as_str().map(str::to_owned) else {
            break;
        };
        page = http
            .post(format!("{search}/_search/scroll"))
            .json(&json!({"scroll": "5m", "scroll_id": scroll}))
            .send()
            .await?
            .json()
            .await?;
    }
    if let Some(scroll) = page["_scroll_id"].as_str() {
        let _ = http
            .delete(format!("{search}/_search/scroll"))
            .json(&json!({"scroll_id": scroll}))
            .send()
            .await;
    }
    check.lost = rows
        .iter()
        .filter(|(id, r)| r.2 == "active" && !seen.contains(*id))
        .map(|(id, r)| format!("{id} (latest job {})", r.3))
        .collect();
    check.dead_letters = env
        .queue_depth("elasticsearch.sync.dlq")
        .await
        .unwrap_or(-1);
    Ok(check)
}

/// Mean of the samples of `who` taken in `[from, to)` seconds.
fn mean_in(samples: &[(f64, &str, u64)], who: &str, from: f64, to: f64) -> Option<f64> {
    let picked: Vec<u64> = samples
        .iter()
        .filter(|(at, w, _)| *w == who && *at >= from && *at < to)
        .map(|(_, _, kib)| *kib)
        .collect();
    (!picked.is_empty()).then(|| picked.iter().sum::<u64>() as f64 / picked.len() as f64 / 1024.0)
}

fn report(
    options: &Options,
    shared: &Shared,
    binaries: &[Binary],
    check: &Check,
    writing: f64,
    reclaimed: Option<i64>,
    logs: &std::path::Path,
) -> Result<(), BoxError> {
    let faults = shared.faults.lock().expect("faults").clone();
    let total: u32 = faults.values().sum();
    let samples = shared.rss.lock().expect("rss").clone();
    let end = samples.last().map_or(1.0, |s| s.0);
    let mut csv = String::from("seconds,binary,rss_kib\n");
    for (at, who, kib) in &samples {
        let _ = writeln!(csv, "{at:.1},{who},{kib}");
    }
    let rss_file = logs.join("rss.csv");
    std::fs::write(&rss_file, csv)?;

    let mut out = String::new();
    let _ = writeln!(out, "\n==> soak result (seed {})", options.seed);
    let _ = writeln!(
        out,
        "jobs      {} in {:.0} s of writing ({:.0} jobs/s), {} truncations, {} writer errors{}",
        check.jobs,
        writing,
        check.jobs as f64 / writing.max(1.0),
        shared.truncations.load(Ordering::Relaxed),
        shared.writer_errors.load(Ordering::Relaxed),
        if shared.backlog_pauses.load(Ordering::Relaxed) {
            format!(
                ", writers paused at times (backlog over {})",
                options.max_backlog
            )
        } else {
            String::new()
        }
    );
    let _ = writeln!(out, "statuses  {:?}", check.by_status);
    let _ = writeln!(
        out,
        "joined    {} seller renames fanned out to {} REBUILD jobs",
        check.seller_changes, check.rebuilds
    );
    let _ = writeln!(
        out,
        "faults    {total}: {}",
        faults
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(
        out,
        "starts    {}; jobs reclaimed by the last bridge (lease over): {}",
        binaries
            .iter()
            .map(|b| format!("{} {}", b.role.name(), b.starts))
            .collect::<Vec<_>>()
            .join(", "),
        reclaimed.map_or("?".to_owned(), |r| r.to_string())
    );
    let _ = writeln!(
        out,
        "rows      {} ({} searchable), {} documents",
        check.rows, check.searchable, check.documents
    );
    let _ = writeln!(out, "lost      {}", check.lost.len());
    let _ = writeln!(
        out,
        "ghost     {} (documents of gone or unsearchable rows)",
        check.ghost.len()
    );
    let _ = writeln!(
        out,
        "stale     {} ({} with a stale joined part: the seller)",
        check.stale.len(),
        check.stale_joined
    );
    let _ = writeln!(out, "stuck     {}", check.stuck);
    let _ = writeln!(
        out,
        "failed    {} (dead letters in the DLQ: {})",
        check.failed, check.dead_letters
    );
    for e in &check.errors {
        let _ = writeln!(out, "          {e}");
    }
    for (what, list) in [
        ("lost", &check.lost),
        ("ghost", &check.ghost),
        ("stale", &check.stale),
    ] {
        for item in list.iter().take(10) {
            let _ = writeln!(out, "  {what}: {item}");
        }
    }
    for f in shared.findings.lock().expect("findings").iter() {
        let _ = writeln!(out, "finding   {f}");
    }
    let _ = writeln!(
        out,
        "RSS (MiB; samples every {:?}, {} in {}):",
        options.rss_every,
        samples.len(),
        rss_file.display()
    );
    for who in ["bridge", "consumer"] {
        let max = samples
            .iter()
            .filter(|s| s.1 == who)
            .map(|s| s.2)
            .max()
            .unwrap_or(0) as f64
            / 1024.0;
        let first = mean_in(&samples, who, 0.0, end / 10.0);
        let last = mean_in(&samples, who, end * 0.9, f64::INFINITY);
        let change = match (first, last) {
            (Some(f), Some(l)) => format!("{:+.0} %", (l - f) / f * 100.0),
            _ => "?".to_owned(),
        };
        // Over time: the mean of each tenth.
        let tenths: Vec<String> = (0..10)
            .map(|i| {
                mean_in(
                    &samples,
                    who,
                    end * i as f64 / 10.0,
                    if i == 9 {
                        f64::INFINITY
                    } else {
                        end * (i + 1) as f64 / 10.0
                    },
                )
                .map_or("-".to_owned(), |m| format!("{m:.1}"))
            })
            .collect();
        let _ = writeln!(
            out,
            "  {who:8} max {max:.1}; first tenth {}, last tenth {} ({change}); by tenth: {}",
            first.map_or("?".to_owned(), |f| format!("{f:.1}")),
            last.map_or("?".to_owned(), |l| format!("{l:.1}")),
            tenths.join(" ")
        );
    }
    let _ = writeln!(
        out,
        "verdict   {}",
        if check.clean() {
            "0 lost, 0 ghost, 0 stale, 0 stuck"
        } else if options.sabotage {
            "spoiled on purpose (--sabotage): see the line above the result"
        } else {
            "FAILED"
        }
    );
    print!("{out}");
    std::fs::write(logs.join("result.txt"), out)?;
    Ok(())
}
