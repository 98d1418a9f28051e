//! Scaling out on the clusters of `scripts/stack up --cluster`: throughput with 1, 2 and 3
//! bridges and consumers, and where each limit sits, in one run (SCALING.md has the method
//! and the results).
//!
//! 1. Each limit alone, on the same jobs: the outbox's claim (claim a batch of 100, mark it
//!    sent, mark it completed) with 1, 2 and 3 claimers side by side; RabbitMQ publish with
//!    confirms into a quorum queue with 1, 2 and 3 bare publishers, each connected to
//!    another node; OpenSearch `_bulk` of the same documents with a bare client, 500 per
//!    request with 1, 2 and 4 in flight, into an index of the benchmark's shards and one
//!    replica.
//! 2. For k = 1, 2, 3: k bridges and k consumers (the release binaries, separate processes,
//!    each starting on another node of both clusters) drain a backlog of `BENCH_JOBS`
//!    pending jobs: jobs/s from the processes' start to the last job completed (indexed).
//! 3. For k = 1, 2, 3: writers at full speed while k bridges and k consumers carry every
//!    change: jobs/s from the first commit to the last completion, and commit → completed
//!    latency (searchable at the index's next refresh, within 1 s).
//!
//! Every phase also prints CPU seconds per 1,000 jobs of each process (from /proc): each
//! bridge and consumer, PostgreSQL, the three RabbitMQ nodes, the three OpenSearch nodes,
//! this load generator. Servers of other stacks on the machine are left out (only those
//! whose command line names `BENALSAM_STACK_DIR` count).
//!
//! ```text
//! export BENALSAM_STACK_DIR=... (and the ports: see scripts/stack)
//! scripts/stack up --cluster && eval "$(scripts/stack env)"
//! cargo build --release --bins
//! cargo bench -p benalsam-events --bench scaling
//! ```
//! Settings: `BENCH_JOBS` (backlog and claim jobs per run, default 20000), `BENCH_OPS`
//! (changes per full-speed run, default 6000), `BENCH_WRITERS` (default 4),
//! `BENCH_SHARDS` (primary shards of the index, default 3; one replica).

mod common;

use std::collections::VecDeque;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use benalsam_events::config::SearchUrl;
use benalsam_events::publish::{QueueType, TopologyConfig};

use benalsam_events::{AmqpUrl, Outbox, OutboxConfig, Outcome, Settle};
use common::{BenchEnv, BoxError, CpuSample, binary, max_job, setting, wait_completed};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};

/// A variable of the cluster's `scripts/stack env`.
fn cluster_var(name: &str) -> Result<String, BoxError> {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .ok_or_else(|| {
            format!("{name} is not set: run on the cluster (scripts/stack up --cluster; eval \"$(scripts/stack env)\")").into()
        })
}

/// The cluster's addresses and the benchmark's own vhost and index.
struct Cluster {
    amqp: Vec<AmqpUrl>,
    search: Vec<String>,
    stack: String,
}

impl Cluster {
    fn from_env() -> Result<Self, BoxError> {
        let amqp = cluster_var("RABBITMQ_URLS")?
            .parse::<AmqpUrl>()?
            .addresses();
        let search = cluster_var("ELASTICSEARCH_URLS")?
            .split(',')
            .map(str::to_owned)
            .collect();
        Ok(Self {
            amqp,
            search,
            stack: cluster_var("BENALSAM_STACK_DIR")?,
        })
    }

    /// Node `first` (0-based) and the others after it, with `vhost`, as one list.
    fn amqp_list(&self, vhost: &str, first: usize) -> String {
        (0..self.amqp.len())
            .map(|i| {
                let mut url = self.amqp[(first + i) % self.amqp.len()].url().clone();
                url.set_path(&format!("/{vhost}"));
                url.to_string()
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Search node `n` (0-based) alone: each consumer writes through its own node, so the
    /// coordinating work of `_bulk` spreads (no failover is needed in a benchmark).
    fn search_node(&self, n: usize) -> String {
        self.search[n % self.search.len()].clone()
    }
}

struct Process {
    label: String,
    child: Child,
}

impl Process {
    fn start(
        label: String,
        name: &str,
        env: &BenchEnv,
        settings: &[(&str, String)],
    ) -> Result<Self, BoxError> {
        let mut command = Command::new(binary(name)?);
        command
            .env_remove("BENALSAM_CONFIG")
            .env("DATABASE_URL", env.db_url.expose())
            .env("BENALSAM_SCHEMA", &env.name)
            .env("BENALSAM_QUEUE_TYPE", "quorum")
            .env("BENALSAM_HEALTH_ADDR", "127.0.0.1:0")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for (k, v) in settings {
            command.env(k, v);
        }
        Ok(Self {
            label,
            child: command.spawn()?,
        })
    }

    fn stop(self) {
        common::stop(self.child);
    }
}

/// k bridges and k consumers, each starting on node i of both clusters.
fn deploy(
    cluster: &Cluster,
    env: &BenchEnv,
    alias: &str,
    k: usize,
) -> Result<Vec<Process>, BoxError> {
    let vhost = env.url.url().path().trim_start_matches('/').to_owned();
    let mut processes = Vec::new();
    for i in 0..k {
        processes.push(Process::start(
            format!("bridge {}", i + 1),
            "benalsam-bridge",
            env,
            &[("RABBITMQ_URL", cluster.amqp_list(&vhost, i))],
        )?);
        processes.push(Process::start(
            format!("consumer {}", i + 1),
            "benalsam-consumer",
            env,
            &[
                ("RABBITMQ_URL", cluster.amqp_list(&vhost, i)),
                ("ELASTICSEARCH_URL", cluster.search_node(i)),
                ("BENALSAM_INDEX", alias.to_owned()),
            ],
        )?);
    }
    Ok(processes)
}

fn cpu(cluster: &Cluster, processes: &[Process]) -> Result<CpuSample, BoxError> {
    let mut own: Vec<(&str, u32)> = processes
        .iter()
        .map(|p| (p.label.as_str(), p.child.id()))
        .collect();
    own.push(("load generator", std::process::id()));
    common::cpu_by_process_of(&own, Some(&cluster.stack))
}

/// A phase's CPU: what, samples before and after, jobs, seconds.
type Phase = (String, CpuSample, CpuSample, usize, f64);

/// Prints each phase's CPU seconds per 1,000 jobs, and the part of "all" that the idle
/// clusters would have used in the same time anyway (`idle`: CPU seconds per second).
fn print_cpu(title: &str, rows: &[Phase], idle: f64) {
    println!("\n{title}: CPU seconds per 1,000 jobs (user + system, from /proc)\n");
    for (what, before, after, jobs, seconds) in rows {
        println!(
            "| {what} ({seconds:.1} s) | {} | of \"all\", idle clusters |",
            before.header().join(" | ")
        );
        println!("|---|{}---:|", "---:|".repeat(before.header().len()));
        println!(
            "| | {} | {:.2} |\n",
            after.per_thousand(before, *jobs).join(" | "),
            idle * seconds / *jobs as f64 * 1000.0
        );
    }
}

/// CPU seconds per second the stack's servers use with nothing to do (heartbeats, Raft
/// ticks, cluster state, JIT), measured over `seconds`.
async fn idle_cpu(cluster: &Cluster, seconds: u64) -> Result<f64, BoxError> {
    let before = cpu(cluster, &[])?;
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let after = cpu(cluster, &[])?;
    let all: f64 = after
        .per_thousand(&before, 1000)
        .last()
        .ok_or("no cells")?
        .parse()?;
    Ok(all / seconds as f64)
}

/// The outbox alone: `claimers` side by side claim batches of 100, mark them sent and
/// completed, until `jobs` jobs (not of a routed table) are done; jobs/s.
async fn claim_rate(env: &BenchEnv, jobs: i64, claimers: usize) -> Result<f64, BoxError> {
    env.client
        .execute(
            "INSERT INTO elasticsearch_sync_queue (table_name, operation, record_id, change_data)
             SELECT 'bench_claim', 'UPDATE', i::text,
                    jsonb_build_object('old', jsonb_build_object('id', i), 'new', jsonb_build_object('id', i))
             FROM generate_series(1, $1::bigint) AS i",
            &[&jobs],
        )
        .await?;
    env.client
        .batch_execute("ANALYZE elasticsearch_sync_queue")
        .await?;
    let mut config = OutboxConfig::in_schema(&env.name);
    config.tables = Some(vec!["bench_claim".to_owned()]);
    let started = Instant::now();
    let runs = (0..claimers).map(|_| {
        let outbox = Outbox::new(env.db_url.clone(), config.clone());
        async move {
            let outbox = outbox?;
            loop {
                let claimed = outbox.claim(100).await?;
                if claimed.is_empty() {
                    return Ok::<_, BoxError>(());
                }
                let sent: Vec<(i64, Outcome)> =
                    claimed.iter().map(|j| (j.id, Outcome::Sent)).collect();
                outbox.settle(&sent).await?;
                let done: Vec<(i64, Outcome)> =
                    claimed.iter().map(|j| (j.id, Outcome::Completed)).collect();
                outbox.settle(&done).await?;
            }
        }
    });
    for result in futures::future::join_all(runs).await {
        result?;
    }
    let rate = jobs as f64 / started.elapsed().as_secs_f64();
    env.client
        .execute(
            "DELETE FROM elasticsearch_sync_queue WHERE table_name = 'bench_claim'",
            &[],
        )
        .await?;
    Ok(rate)
}

/// RabbitMQ alone: `publishers` bare clients, each connected to another node, publish the
/// bodies (confirms, window 1000 each) into one quorum queue; messages/s.
async fn publish_rate(
    cluster: &Cluster,
    env: &BenchEnv,
    bodies: &[Vec<u8>],
    publishers: usize,
) -> Result<f64, BoxError> {
    let vhost = env.url.url().path().trim_start_matches('/').to_owned();
    let queue = format!("bench.raw.{publishers}");
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    let declaring = env.connection.create_channel().await?;
    declaring
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            arguments,
        )
        .await?;
    let mut channels = Vec::new();
    for p in 0..publishers {
        let list = cluster.amqp_list(&vhost, p);
        let first: AmqpUrl = list.split(',').next().ok_or("a node")?.parse()?;
        let connection = first.connect("bench publisher").await?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        channels.push((connection, channel));
    }
    let share = bodies.len() / publishers;
    let started = Instant::now();
    let runs = channels.iter().enumerate().map(|(p, (_, channel))| {
        let (queue, mine) = (queue.clone(), &bodies[p * share..(p + 1) * share]);
        async move {
            let mut in_flight = VecDeque::new();
            for body in mine {
                if in_flight.len() >= 1000
                    && let Some(confirm) = in_flight.pop_front()
                {
                    confirm.await?;
                }
                in_flight.push_back(
                    channel
                        .basic_publish(
                            "".into(),
                            queue.as_str().into(),
                            BasicPublishOptions {
                                mandatory: true,
                                ..Default::default()
                            },
                            body,
                            lapin::BasicProperties::default().with_delivery_mode(2),
                        )
                        .await?,
                );
            }
            for confirm in in_flight {
                confirm.await?;
            }
            Ok::<_, BoxError>(())
        }
    });
    for result in futures::future::join_all(runs).await {
        result?;
    }
    let rate = (share * publishers) as f64 / started.elapsed().as_secs_f64();
    declaring
        .queue_delete(queue.as_str().into(), Default::default())
        .await?;
    for (connection, _) in channels {
        let _ = connection.close(200, "done".into()).await;
    }
    Ok(rate)
}

/// Writers at full speed: `ops` inserts and edits of listings from `writers` connections.
async fn write(env: &BenchEnv, writers: usize, ops: usize) -> Result<(), BoxError> {
    let runs = (0..writers).map(|w| async move {
        let db = env.db_url.connect().await?;
        db.batch_execute(&format!("SET search_path TO {}", env.name))
            .await?;
        let mut mine: Vec<String> = Vec::new();
        for n in 0..ops / writers {
            if n % 4 == 3 && !mine.is_empty() {
                db.execute(
                    "UPDATE listings SET description = $2, updated_at = now() WHERE id = $1::text::uuid",
                    &[&mine[n % mine.len()], &format!("Düzenlendi {w}-{n}")],
                )
                .await?;
            } else {
                let row = db
                    .query_one(
                        "INSERT INTO listings (user_id, title, description, category, status, latitude, longitude, location_city)
                         VALUES (gen_random_uuid(), $1, repeat('Az kullanılmış, bakımlı, faturalı. ', 8), 'spor', 'active', 41.0, 29.0, 'İstanbul')
                         RETURNING id::text",
                        &[&format!("Satılık bisiklet {w}-{n}")],
                    )
                    .await?;
                mine.push(row.get(0));
            }
        }
        Ok::<_, BoxError>(())
    });
    for result in futures::future::join_all(runs).await {
        result?;
    }
    Ok(())
}

/// Jobs after `first`: count, span first commit → last completion, p50 / p99 commit →
/// completed in ms.
async fn job_stats(env: &BenchEnv, first: i64) -> Result<(i64, f64, f64, f64), BoxError> {
    let row = env
        .client
        .query_one(
            "SELECT count(*),
                    extract(epoch FROM max(completed_at) - min(created_at))::float8,
                    percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP
                        (ORDER BY extract(epoch FROM completed_at - created_at) * 1000)
             FROM elasticsearch_sync_queue WHERE id > $1",
            &[&first],
        )
        .await?;
    let p: Vec<f64> = row.get(2);
    Ok((row.get(0), row.get(1), p[0], p[1]))
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let jobs: i64 = setting("BENCH_JOBS", 20_000)?;
    let ops: usize = setting("BENCH_OPS", 6_000)?;
    let writers: usize = setting("BENCH_WRITERS", 4)?;
    let shards: u32 = setting("BENCH_SHARDS", 3)?;
    let cluster = Cluster::from_env()?;
    let mut topology = TopologyConfig::default();
    topology.queue_type = QueueType::Quorum;
    let env = BenchEnv::with_topology("bench_scaling", &topology).await?;
    let es = (SearchUrl::from_env()?).client(Duration::from_secs(60))?;
    let alias = format!("{}_listings", env.name);
    let mut listings = common::listings(&alias);
    listings.index.shards = shards;
    listings.index.replicas = 1;
    listings.ensure_index(&es).await?;

    eprintln!("[0/3] the idle clusters' own CPU, 20 s");
    let idle = idle_cpu(&cluster, 20).await?;
    eprintln!("[1/3] each limit alone, {jobs} jobs / messages / documents");
    let mut claims = Vec::new();
    for claimers in 1..=3 {
        let before = cpu(&cluster, &[])?;
        let rate = claim_rate(&env, jobs, claimers).await?;
        claims.push((claimers, rate, before, cpu(&cluster, &[])?));
    }

    // The backlog of phase 2's first run gives the messages and documents of the hops alone.
    env.insert_listings(jobs).await?;
    let envelopes = env.envelopes().await?;
    let bodies: Vec<Vec<u8>> = envelopes.iter().map(|e| e.to_bytes()).collect();
    let mut publishes = Vec::new();
    for publishers in 1..=3 {
        let before = cpu(&cluster, &[])?;
        let rate = publish_rate(&cluster, &env, &bodies, publishers).await?;
        publishes.push((publishers, rate, before, cpu(&cluster, &[])?));
    }
    let mut bulks = Vec::new();
    for concurrency in [1, 2, 4] {
        let raw = format!("{}_raw_{concurrency}", env.name);
        let mut documents = common::listings(&raw);
        documents.index.shards = shards;
        documents.index.replicas = 1;
        documents.ensure_index(&es).await?;
        let items: Vec<(benalsam_events::Action, i64)> = envelopes
            .iter()
            .map(|e| Ok((documents.action(e)?, e.job_id)))
            .collect::<Result<_, BoxError>>()?;
        let before = cpu(&cluster, &[])?;
        let rate = common::raw_bulk(&es, &items, 500, concurrency).await?;
        bulks.push((concurrency, rate, before, cpu(&cluster, &[])?));
        common::delete_index(&es, &raw).await;
    }

    let mut drains = Vec::new();
    let mut lives = Vec::new();
    for k in 1..=3 {
        eprintln!("[2/3] {k} bridge(s) and {k} consumer(s) drain a backlog of {jobs} jobs");
        let first = if k == 1 {
            max_job(&env).await? - jobs
        } else {
            let first = max_job(&env).await?;
            env.insert_listings(jobs).await?;
            first
        };
        let started = Instant::now();
        let processes = deploy(&cluster, &env, &alias, k)?;
        let before = cpu(&cluster, &processes)?;
        wait_completed(&env, first, Duration::from_secs(900)).await?;
        let rate = jobs as f64 / started.elapsed().as_secs_f64();
        let after = cpu(&cluster, &processes)?;
        drains.push((k, rate, before, after));

        eprintln!(
            "[3/3] {k} bridge(s) and {k} consumer(s), {writers} writers at full speed, {ops} changes"
        );
        let first = max_job(&env).await?;
        let before = cpu(&cluster, &processes)?;
        write(&env, writers, ops).await?;
        wait_completed(&env, first, Duration::from_secs(900)).await?;
        let after = cpu(&cluster, &processes)?;
        let (count, span, p50, p99) = job_stats(&env, first).await?;
        lives.push((k, count, span, p50, p99, before, after));
        for process in processes {
            process.stop();
        }
    }

    println!("\n| limit alone | 1 | 2 | 3 (4 for `_bulk` in flight) |");
    println!("|---|---:|---:|---:|");
    let cells = |rates: Vec<f64>| {
        rates
            .iter()
            .map(|r| format!("{r:.0}"))
            .collect::<Vec<_>>()
            .join(" | ")
    };
    println!(
        "| outbox claim + sent + completed, batches of 100, jobs/s with 1 / 2 / 3 claimers | {} |",
        cells(claims.iter().map(|c| c.1).collect())
    );
    println!(
        "| RabbitMQ publish with confirms into one quorum queue, msgs/s with 1 / 2 / 3 publishers (one per node) | {} |",
        cells(publishes.iter().map(|c| c.1).collect())
    );
    println!(
        "| OpenSearch `_bulk` (bare), {shards} shards × 1 replica, 500 per request, docs/s with 1 / 2 / 4 in flight | {} |",
        cells(bulks.iter().map(|c| c.1).collect())
    );
    println!(
        "\n| bridges = consumers | backlog drained, jobs/s | full speed, jobs/s (first commit → last completed) | full speed p50 / p99 commit → completed |"
    );
    println!("|---:|---:|---:|---:|");
    for ((k, drained, ..), (_, count, span, p50, p99, ..)) in drains.iter().zip(&lives) {
        println!(
            "| {k} | {drained:.0} | {:.0} ({count} jobs) | {p50:.0} / {p99:.0} ms |",
            *count as f64 / span
        );
    }
    let mut rows: Vec<Phase> = Vec::new();
    let n = jobs as usize;
    for (what, phases) in [
        ("claim, {} claimer(s)", claims),
        ("publish, {} publisher(s)", publishes),
        ("`_bulk`, {} in flight", bulks),
    ] {
        for (k, rate, before, after) in phases {
            let label = what.replace("{}", &k.to_string());
            rows.push((label, before, after, n, n as f64 / rate));
        }
    }
    print_cpu("Each limit alone", &rows, idle);
    let mut rows: Vec<Phase> = Vec::new();
    for ((k, rate, before, after), (_, count, span, _, _, live_before, live_after)) in
        drains.into_iter().zip(lives)
    {
        rows.push((
            format!("{k} × 2 processes, backlog drained"),
            before,
            after,
            n,
            n as f64 / rate,
        ));
        rows.push((
            format!("{k} × 2 processes, full speed (writers in the load generator)"),
            live_before,
            live_after,
            count as usize,
            span,
        ));
    }
    print_cpu("The pipeline", &rows, idle);
    println!("\nThe idle clusters use {idle:.2} CPU-seconds per second.");

    common::delete_index(&es, &alias).await;
    env.cleanup().await
}
