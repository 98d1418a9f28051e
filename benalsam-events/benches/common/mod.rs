//! What the benchmarks share: a RabbitMQ vhost and a PostgreSQL schema of their own with the
//! topology and migrations in place, listings like the demo's, and their jobs as envelopes.
#![allow(dead_code)] // each benchmark uses a part

pub mod joined;
pub mod load;

use benalsam_events::publish::TopologyConfig;
use benalsam_events::{
    Action, AmqpUrl, DatabaseUrl, Envelope, EventType, Outbox, OutboxConfig, Outcome, Settle,
    Topology,
};

/// The listings event type, indexed into `alias`.
#[allow(dead_code)] // not every bench uses it
///
/// `BENCH_ANALYZER` (say `standard`) replaces the Turkish analysis of its text fields, for an
/// engine without the analysis-common module (Elasticsearch's integration-test zip) and for
/// runs that compare such an engine with one that has it on the same mapping.
pub fn listings(alias: &str) -> benalsam_events::EventType {
    let mut listings = benalsam_events::EventType::listings();
    alias.clone_into(&mut listings.index.alias);
    if let Some(analyzer) = std::env::var("BENCH_ANALYZER")
        .ok()
        .filter(|a| !a.is_empty())
    {
        let properties = listings.document.properties();
        let names: Vec<String> = listings.document.field_names().map(str::to_owned).collect();
        for name in names {
            let mapping = &properties[name.as_str()];
            if mapping["analyzer"] == "benalsam_turkish" {
                listings.document = listings.document.field(
                    &name,
                    benalsam_events::event_type::FieldType::Text {
                        analyzer: analyzer.clone(),
                        raw: mapping["fields"]["raw"].is_object(),
                        copy_to: mapping["copy_to"].as_str().map(str::to_owned),
                    },
                );
            }
        }
    }
    listings
}

/// The example schema of the seed's listings table.
pub const LISTINGS_SQL: &str = include_str!("../../../examples/sql/listings.sql");

pub type BoxError = Box<dyn std::error::Error>;

/// A number from the environment, or `default`.
pub fn setting<T: std::str::FromStr>(name: &str, default: T) -> Result<T, BoxError>
where
    T::Err: std::error::Error + 'static,
{
    Ok(std::env::var(name)
        .ok()
        .map(|v| v.parse())
        .transpose()?
        .unwrap_or(default))
}

pub struct BenchEnv {
    pub name: String,
    pub db_url: DatabaseUrl,
    pub url: AmqpUrl,
    pub client: tokio_postgres::Client,
    pub connection: lapin::Connection,
    /// `BENCH_CAPTURE=1`: the outbox is fed by WAL capture through this slot (named after the
    /// schema), which the binaries get as `BENALSAM_CAPTURE_SLOT`; triggers otherwise.
    pub capture_slot: Option<String>,
    http: reqwest::Client,
    mgmt: String,
    user: String,
    password: String,
}

impl BenchEnv {
    pub async fn new(prefix: &str) -> Result<Self, BoxError> {
        Self::with_topology(prefix, &TopologyConfig::default()).await
    }

    /// The same with a topology of its own choosing (quorum queues on a cluster).
    pub async fn with_topology(prefix: &str, topology: &TopologyConfig) -> Result<Self, BoxError> {
        let db_url = DatabaseUrl::from_env()?;
        let base = AmqpUrl::from_env()?;
        let name = format!("{prefix}_{}", std::process::id());
        let http = reqwest::Client::new();
        // `scripts/stack env` names the management API of a stack on other ports (or of a
        // cluster's node 1); the default stack's otherwise.
        let mgmt = match std::env::var("RABBITMQ_MANAGEMENT_URL") {
            Ok(url) if !url.is_empty() => format!("{}/api", url.trim_end_matches('/')),
            _ => format!(
                "http://{}:15672/api",
                base.url().host_str().unwrap_or("127.0.0.1")
            ),
        };
        let user = base.url().username().to_owned();
        let password = base.url().password().unwrap_or_default().to_owned();
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
        let connection = url.connect("bench").await?;
        Topology::benalsam(topology).declare(&connection).await?;
        let mut client = db_url.connect().await?;
        client
            .batch_execute(&format!(
                "CREATE SCHEMA {name}; SET search_path TO {name}; {LISTINGS_SQL}"
            ))
            .await?;
        let mut outbox = benalsam_events::OutboxConfig::in_schema(&name);
        if setting("BENCH_CAPTURE", 0u8)? == 1 {
            outbox.capture_slot = Some(name.clone());
        }
        outbox
            .migrate(&mut client, &[benalsam_events::EventType::listings()])
            .await?;
        Ok(Self {
            capture_slot: outbox.capture_slot,
            name,
            db_url,
            url,
            client,
            connection,
            http,
            mgmt,
            user,
            password,
        })
    }

    /// Writes `n` listings of the demo's size in one statement.
    pub async fn insert_listings(&self, n: i64) -> Result<(), BoxError> {
        self.client
            .execute(
                "INSERT INTO listings (user_id, title, description, category, status, latitude, longitude, attributes, location_city)
                 SELECT gen_random_uuid(), 'Satılık ikinci el bisiklet ' || i,
                        repeat('Az kullanılmış, bakımlı, faturalı. ', 8), 'spor', 'active', 41.0, 29.0,
                        '{\"renk\": \"kırmızı\", \"vites\": 21}', 'İstanbul'
                 FROM generate_series(1, $1::bigint) AS i",
                &[&n],
            )
            .await?;
        Ok(())
    }

    /// The envelopes of every pending job, as the bridge would publish them. The jobs are
    /// claimed to read them and given back, so they stay pending.
    pub async fn envelopes(&self) -> Result<Vec<Envelope<'static>>, BoxError> {
        let outbox = Outbox::new(self.db_url.clone(), OutboxConfig::in_schema(&self.name))?;
        let jobs = outbox.claim(usize::MAX).await?;
        let envelopes = jobs
            .iter()
            .map(|job| Envelope::decode(&Envelope::of(job, &EventType::listings()).to_bytes()))
            .collect::<Result<Vec<_>, _>>()?;
        let released: Vec<(i64, Outcome)> =
            jobs.iter().map(|j| (j.id, Outcome::Released)).collect();
        outbox.settle(&released).await?;
        Ok(envelopes)
    }

    /// The messages a queue of this vhost holds, from the management API.
    pub async fn queue_depth(&self, queue: &str) -> Result<i64, BoxError> {
        let answer: serde_json::Value = self
            .http
            .get(format!("{}/queues/{}/{queue}", self.mgmt, self.name))
            .basic_auth(&self.user, Some(&self.password))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        Ok(answer["messages"].as_i64().unwrap_or(0))
    }

    pub async fn cleanup(self) -> Result<(), BoxError> {
        if let Some(slot) = &self.capture_slot {
            self.client
                .batch_execute(&format!(
                    "SELECT pg_drop_replication_slot('{slot}'); DROP PUBLICATION {slot}"
                ))
                .await?;
        }
        self.client
            .batch_execute(&format!("DROP SCHEMA {} CASCADE", self.name))
            .await?;
        let _ = self.connection.close(200, "done".into()).await;
        self.http
            .delete(format!("{}/vhosts/{}", self.mgmt, self.name))
            .basic_auth(&self.user, Some(&self.password))
            .send()
            .await?;
        Ok(())
    }
}

/// A `_bulk` body of `actions` with their external versions, encoded here rather than by the
/// library: the raw baseline must not share the code it is measured against.
pub fn bulk_body(actions: &[(Action, i64)]) -> Vec<u8> {
    let mut body = Vec::new();
    for (action, version) in actions {
        let (verb, index, id, document) = match action {
            Action::Index {
                index,
                id,
                document,
            } => ("index", index, id, Some(document)),
            Action::Delete { index, id } => ("delete", index, id, None),
            _ => continue,
        };
        let meta = serde_json::json!({ verb: {
            "_index": index, "_id": id, "version": version, "version_type": "external"
        }});
        body.extend_from_slice(meta.to_string().as_bytes());
        body.push(b'\n');
        if let Some(document) = document {
            body.extend_from_slice(document.to_string().as_bytes());
            body.push(b'\n');
        }
    }
    body
}

/// Raw `_bulk` of `items` into their index with a bare client: requests of `size`, their
/// bodies encoded beforehand, `concurrency` in flight; documents per second.
pub async fn raw_bulk(
    es: &benalsam_events::elasticsearch::Elasticsearch,
    items: &[(Action, i64)],
    size: usize,
    concurrency: usize,
) -> Result<f64, BoxError> {
    use benalsam_events::elasticsearch::http::Method;
    use benalsam_events::elasticsearch::http::headers::{CONTENT_TYPE, HeaderMap, HeaderValue};
    use futures::StreamExt;

    let bodies: Vec<Vec<u8>> = items.chunks(size.max(1)).map(bulk_body).collect();
    let started = std::time::Instant::now();
    let mut answers = futures::stream::iter(bodies)
        .map(|body| async move {
            let mut headers = HeaderMap::new();
            headers.insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/x-ndjson"),
            );
            let answer: serde_json::Value = es
                .send(
                    Method::Post,
                    "/_bulk",
                    headers,
                    Option::<&()>::None,
                    Some(body),
                    None,
                )
                .await?
                .json()
                .await?;
            Ok::<_, BoxError>(answer)
        })
        .buffer_unordered(concurrency.max(1));
    while let Some(answer) = answers.next().await {
        let answer = answer?;
        if answer["errors"] != false {
            return Err(format!(
                "raw bulk had errors: {}",
                answer.to_string().chars().take(300).collect::<String>()
            )
            .into());
        }
    }
    Ok(items.len() as f64 / started.elapsed().as_secs_f64())
}

/// CPU seconds used so far by each of `own` processes (label, pid) and by each server
/// (PostgreSQL, RabbitMQ, OpenSearch), from /proc.
pub struct CpuSample(Vec<(String, f64)>);

impl CpuSample {
    /// The labels, then "all".
    pub fn header(&self) -> Vec<String> {
        let mut labels: Vec<String> = self.0.iter().map(|(l, _)| l.clone()).collect();
        labels.push("all".to_owned());
        labels
    }

    /// CPU seconds per 1,000 jobs since `before`, per label and in all, as table cells.
    pub fn per_thousand(&self, before: &CpuSample, jobs: usize) -> Vec<String> {
        let per = |seconds: f64| format!("{:.2}", seconds / jobs.max(1) as f64 * 1000.0);
        let deltas: Vec<f64> = self
            .0
            .iter()
            .zip(&before.0)
            .map(|((_, a), (_, b))| a - b)
            .collect();
        let mut cells: Vec<String> = deltas.iter().map(|d| per(*d)).collect();
        cells.push(per(deltas.iter().sum()));
        cells
    }
}

/// Samples [`CpuSample`]. A process counts with its own time and its reaped children's
/// (`cutime`, `cstime`), so PostgreSQL backends that came and went between two samples are
/// counted (by the postmaster), and the difference of two samples is what each used between
/// them.
pub fn cpu_by_process(own: &[(&str, u32)]) -> Result<CpuSample, BoxError> {
    cpu_by_process_of(own, None)
}

/// [`cpu_by_process`], counting only the servers of one stack: those whose command line, or
/// their parent's or grandparent's (PostgreSQL's backends, Erlang's helpers), contains
/// `stack` (its state folder), so other stacks on the same machine are left out.
pub fn cpu_by_process_of(own: &[(&str, u32)], stack: Option<&str>) -> Result<CpuSample, BoxError> {
    let hz: f64 = String::from_utf8(
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()?
            .stdout,
    )?
    .trim()
    .parse()?;
    let servers = ["PostgreSQL", "RabbitMQ", "OpenSearch"];
    let mut seconds = vec![0.0; own.len() + servers.len()];
    for entry in std::fs::read_dir("/proc")? {
        let Some(pid) = entry?
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // A process may end while we look: skip it (its time moves to its parent's cutime).
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let comm = head.split_once('(').map_or("", |(_, c)| c);
        if let Some(stack) = stack
            && !own.iter().any(|(_, p)| *p == pid)
            && !of_stack(pid, stack)
        {
            continue;
        }
        let group = if let Some(i) = own.iter().position(|(_, p)| *p == pid) {
            i
        } else {
            own.len()
                + match comm {
                    "postgres" => 0,
                    "beam.smp" | "erl_child_setup" | "inet_gethost" | "epmd" => 1,
                    "java" => {
                        let cmdline =
                            std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                        // The search node, whichever engine runs it.
                        let cmdline = String::from_utf8_lossy(&cmdline);
                        if !cmdline.contains("opensearch") && !cmdline.contains("elasticsearch") {
                            continue;
                        }
                        2
                    }
                    _ => continue,
                }
        };
        // utime, stime, cutime, cstime: fields 14–17 of stat, the 12th–15th after the name.
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: f64 = fields
            .get(11..15)
            .ok_or("short /proc stat")?
            .iter()
            .map(|f| f.parse::<f64>())
            .sum::<Result<f64, _>>()?;
        seconds[group] += ticks / hz;
    }
    let labels = own
        .iter()
        .map(|(l, _)| (*l).to_owned())
        .chain(servers.iter().map(|s| (*s).to_owned()));
    Ok(CpuSample(labels.zip(seconds).collect()))
}

/// Whether `pid`, its parent or its grandparent runs with `stack` in its command line.
fn of_stack(pid: u32, stack: &str) -> bool {
    let mut pid = pid;
    for _ in 0..3 {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(stack) {
            return true;
        }
        // The parent: the second field after the command name in /proc/<pid>/stat.
        let Some(parent) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| {
                stat.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse().ok())
            })
        else {
            return false;
        };
        if parent <= 1 {
            return false;
        }
        pid = parent;
    }
    false
}

/// A bundled binary of the release build (`benalsam-bridge`, `benalsam-consumer`), built
/// first when missing; or the one in `BENCH_BIN_DIR` when that is set.
pub fn binary(name: &str) -> Result<std::path::PathBuf, BoxError> {
    // Another build's binaries (an older commit's, for an A/B in one run of the stack).
    if let Some(dir) = std::env::var_os("BENCH_BIN_DIR") {
        let path = std::path::PathBuf::from(dir).join(name);
        if !path.exists() {
            return Err(format!("BENCH_BIN_DIR has no {name}: {}", path.display()).into());
        }
        return Ok(path);
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let path = target.join("release").join(name);
    if !path.exists() {
        let status = std::process::Command::new(env!("CARGO"))
            .args(["build", "--release", "--bin", name])
            .status()?;
        if !status.success() {
            return Err(format!("cannot build {name}").into());
        }
    }
    Ok(path)
}

/// Stops a binary as an orchestrator would (SIGTERM) and waits for it.
pub fn stop(mut child: std::process::Child) {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

/// The newest job id (0 for none): jobs after it are the next phase's.
pub async fn max_job(env: &BenchEnv) -> Result<i64, BoxError> {
    Ok(env
        .client
        .query_one(
            "SELECT coalesce(max(id), 0) FROM elasticsearch_sync_queue",
            &[],
        )
        .await?
        .get(0))
}

/// Waits until every job after `first` is completed, for at most `limit`.
pub async fn wait_completed(
    env: &BenchEnv,
    first: i64,
    limit: std::time::Duration,
) -> Result<(), BoxError> {
    let started = std::time::Instant::now();
    loop {
        let open: i64 = env
            .client
            .query_one(
                "SELECT count(*) FROM elasticsearch_sync_queue WHERE id > $1 AND status <> 'completed'",
                &[&first],
            )
            .await?
            .get(0);
        if open == 0 {
            return Ok(());
        }
        if started.elapsed() > limit {
            return Err(format!("{open} jobs still open after {limit:?}").into());
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Deletes the index behind `alias` that the run created (`<alias>_v1`); a bench's cleanup, so
/// an error (already gone) is of no interest.
pub async fn delete_index(es: &benalsam_events::elasticsearch::Elasticsearch, alias: &str) {
    use benalsam_events::elasticsearch::http::{Method, headers::HeaderMap};
    let _ = es
        .send(
            Method::Delete,
            &format!("/{alias}_v1"),
            HeaderMap::new(),
            Option::<&()>::None,
            Option::<Vec<u8>>::None,
            None,
        )
        .await;
}
