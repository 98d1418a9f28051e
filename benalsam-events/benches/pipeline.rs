//! The whole pipeline against the machine's own limits, in one run on the local stack.
//!
//! 1. The limit of each hop alone, on the same data: PostgreSQL inserts without and with the
//!    trigger (concurrent writers; the trigger without NOTIFY, with NOTIFY while a bridge is
//!    marked busy so adaptive NOTIFY skips it, and with NOTIFY), RabbitMQ publish-with-confirms and consume of the same
//!    envelopes with a bare client, Elasticsearch `_bulk` of the same documents with a bare
//!    client (the best of 500 or 1,000 per request with 1–4 in flight).
//! 2. The pipeline's capacity: the real `benalsam-bridge` and `benalsam-consumer` binaries
//!    (separate processes, release build) start on the backlog the trigger inserts left, and
//!    drain it: jobs/s from pending to indexed and completed.
//! 3. The pipeline at full speed: writers run a mix of inserts, edits, status changes and
//!    deletes while the binaries carry every change; throughput from the first commit to the
//!    last job completed, latency from commit to indexed-and-completed, CPU seconds and peak
//!    RSS of both processes. CPU seconds per 1,000 jobs of every process (the binaries,
//!    PostgreSQL, RabbitMQ, OpenSearch, this load generator) in phases 2 and 3.
//! 4. The pipeline at a fixed rate of half the full-speed throughput: latency again.
//!
//! ```text
//! scripts/stack up
//! cargo build --release --bins
//! cargo bench -p benalsam-events --bench pipeline
//! ```
//! Settings: `BENCH_OPS` (changes per full-speed run, default 40000), `BENCH_WRITERS`
//! (default 4), `BENCH_MIX` (`insert,edit,status,delete` percentages, default `70,15,10,5`),
//! `BENCH_RATE_SECONDS` (length of the fixed-rate run, default 20), `BENCH_RATE` (changes/s
//! of that run; default half the full-speed throughput), `BENCH_DESCRIPTION_BYTES` (size of
//! each listing's description, default 280; e.g. 8000 with `BENCH_MIX=20,60,15,5` for an
//! update-heavy mix of large rows).

mod common;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use benalsam_events::config::SearchUrl;

use common::load::{Mix, Process, job_stats, mix, write};
use common::{BenchEnv, BoxError, max_job, setting, wait_completed};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let ops: usize = setting("BENCH_OPS", 40_000)?;
    let writers: usize = setting("BENCH_WRITERS", 4)?;
    let rate_seconds: f64 = setting("BENCH_RATE_SECONDS", 20.0)?;
    let mix = mix()?;
    let env = BenchEnv::new("bench_pipeline").await?;
    let es = (SearchUrl::from_env()?).client(Duration::from_secs(60))?;
    let index = format!("{}_listings", env.name);
    let raw_index = format!("{}_raw", env.name);
    common::listings(&index).ensure_index(&es).await?;
    eprintln!("[1/4] each hop alone, {ops} rows / messages / documents");

    // PostgreSQL: the same inserts into copies of the table without the trigger, with the
    // trigger but no NOTIFY, and with the default trigger while a bridge is marked busy
    // (adaptive NOTIFY skips the NOTIFY, the trigger still looks); then into the table itself
    // (trigger with NOTIFY, nobody busy).
    env.client
        .batch_execute(
            "CREATE TABLE listings_plain (LIKE listings INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING INDEXES);
             CREATE TABLE listings_quiet (LIKE listings INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING INDEXES);
             CREATE TRIGGER listings_quiet_sync AFTER INSERT OR UPDATE OR DELETE ON listings_quiet
                 FOR EACH ROW EXECUTE FUNCTION add_to_sync_queue('ignore=view_count', 'notify=off');
             CREATE TABLE listings_busy (LIKE listings INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING INDEXES);
             CREATE TRIGGER listings_busy_sync AFTER INSERT OR UPDATE OR DELETE ON listings_busy
                 FOR EACH ROW EXECUTE FUNCTION add_to_sync_queue('ignore=view_count');",
        )
        .await?;
    let inserts_only = Mix {
        insert: 100,
        edit: 0,
        status: 0,
    };
    let rate_of = |elapsed: Duration| ops as f64 / elapsed.as_secs_f64();
    let plain = rate_of(write(&env, "listings_plain", writers, ops, inserts_only, None).await?);
    let before_quiet = max_job(&env).await?;
    let quiet = rate_of(write(&env, "listings_quiet", writers, ops, inserts_only, None).await?);
    // A bridge of every table, busy for longer than the run: what a draining bridge writes.
    env.client
        .batch_execute(
            "INSERT INTO benalsam_listeners (listener, tables, busy_until)
             VALUES ('bench', NULL, now() + interval '1 hour')",
        )
        .await?;
    let busy = rate_of(write(&env, "listings_busy", writers, ops, inserts_only, None).await?);
    env.client
        .batch_execute("DELETE FROM benalsam_listeners")
        .await?;
    env.client
        .execute(
            "DELETE FROM elasticsearch_sync_queue WHERE id > $1",
            &[&before_quiet],
        )
        .await?;
    let before = max_job(&env).await?;
    let triggered = rate_of(write(&env, "listings", writers, ops, inserts_only, None).await?);

    // RabbitMQ: those jobs' envelopes, published with confirms (window 1000) and consumed
    // (prefetch 1000, acks every 100) by a bare client, through a scratch queue.
    let envelopes = env.envelopes().await?;
    let channel = env.connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let scratch = "bench.raw";
    channel
        .queue_declare(
            scratch.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let started = Instant::now();
    let mut in_flight = VecDeque::new();
    for e in &envelopes {
        if in_flight.len() >= 1000
            && let Some(confirm) = in_flight.pop_front()
        {
            confirm.await?;
        }
        in_flight.push_back(
            channel
                .basic_publish(
                    "".into(),
                    scratch.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    &e.to_bytes(),
                    e.properties("bench", None),
                )
                .await?,
        );
    }
    for confirm in in_flight {
        confirm.await?;
    }
    let published = envelopes.len() as f64 / started.elapsed().as_secs_f64();
    let consumer = env.connection.create_channel().await?;
    consumer.basic_qos(1000, BasicQosOptions::default()).await?;
    let mut deliveries = consumer
        .basic_consume(
            scratch.into(),
            "bench".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let started = Instant::now();
    let mut taken = 0usize;
    while taken < envelopes.len() {
        let delivery = deliveries.next().await.ok_or("consumer closed")??;
        taken += 1;
        if taken.is_multiple_of(100) || taken == envelopes.len() {
            delivery.ack(BasicAckOptions { multiple: true }).await?;
        }
    }
    let consumed = taken as f64 / started.elapsed().as_secs_f64();
    channel
        .queue_delete(scratch.into(), QueueDeleteOptions::default())
        .await?;

    // Elasticsearch: the same documents as raw `_bulk` requests; the ceiling is the best of
    // 500 or 1,000 per request with 1–4 in flight, each into a fresh index.
    let mut bulked = (0.0f64, 0, 0);
    for size in [500, 1000] {
        for concurrency in 1..=4 {
            let alias = format!("{raw_index}_{size}_{concurrency}");
            common::listings(&alias).ensure_index(&es).await?;
            let documents = common::listings(&alias);
            let items: Vec<(benalsam_events::Action, i64)> = envelopes
                .iter()
                .map(|e| Ok((documents.action(e)?, e.job_id)))
                .collect::<Result<_, BoxError>>()?;
            let rate = common::raw_bulk(&es, &items, size, concurrency).await?;
            if rate > bulked.0 {
                bulked = (rate, size, concurrency);
            }
            common::delete_index(&es, &alias).await;
        }
    }
    let (bulked, bulk_size, bulk_concurrency) = bulked;

    // The pipeline's capacity: the binaries drain the trigger inserts' backlog.
    eprintln!(
        "[2/4] the binaries drain a backlog of {} jobs",
        envelopes.len()
    );
    let drain_started = Instant::now();
    let bridge = Process::start("benalsam-bridge", &env, &index, 3901)?;
    let consumer_process = Process::start("benalsam-consumer", &env, &index, 3902)?;
    let binaries = [
        ("benalsam-bridge", bridge.child.id()),
        ("benalsam-consumer", consumer_process.child.id()),
        ("load generator (this bench)", std::process::id()),
    ];
    let cpu_start = common::cpu_by_process(&binaries)?;
    wait_completed(&env, before, Duration::from_secs(900)).await?;
    let capacity = envelopes.len() as f64 / drain_started.elapsed().as_secs_f64();
    let cpu_drained = common::cpu_by_process(&binaries)?;

    // The pipeline at full speed.
    eprintln!("[3/4] the pipeline at full speed: {ops} changes from {writers} writers");
    let first = max_job(&env).await?;
    let written = write(&env, "listings", writers, ops, mix, None).await?;
    wait_completed(&env, first, Duration::from_secs(900)).await?;
    let (jobs, span, full) = job_stats(&env, first).await?;
    let pipeline = jobs as f64 / span;
    let cpu_full = common::cpu_by_process(&binaries)?;
    let (bridge_cpu, bridge_rss) = bridge.usage()?;
    let (consumer_cpu, consumer_rss) = consumer_process.usage()?;

    // Half the maximum rate the pipeline sustained with writers at full speed, or BENCH_RATE.
    let rate = match std::env::var("BENCH_RATE") {
        Ok(raw) => raw.parse::<f64>()?,
        Err(_) => pipeline / 2.0,
    };
    let paced_ops = ((rate * rate_seconds) as usize).max(writers);
    eprintln!("[4/4] the pipeline at a fixed {rate:.0} changes/s for {rate_seconds} s");
    let first = max_job(&env).await?;
    write(&env, "listings", writers, paced_ops, mix, Some(rate)).await?;
    wait_completed(&env, first, Duration::from_secs(900)).await?;
    let (_, _, half) = job_stats(&env, first).await?;
    bridge.stop();
    consumer_process.stop();

    // The pipeline's own hops; the application's inserts are reported beside them.
    let slowest = [
        ("RabbitMQ publish with confirms", published),
        ("RabbitMQ consume", consumed),
        ("Elasticsearch _bulk", bulked),
    ]
    .into_iter()
    .min_by(|a, b| a.1.total_cmp(&b.1))
    .unwrap_or(("none", f64::NAN));
    let row = |figure: &str, value: String| println!("| {figure} | {value} |");
    let ms = |p: [f64; 4]| format!("{:.0} / {:.0} / {:.0} / {:.0} ms", p[0], p[1], p[2], p[3]);
    println!("\n| figure | value |");
    println!("|---|---:|");
    row(
        &format!("PostgreSQL inserts without trigger ({writers} writers)"),
        format!("{plain:.0} rows/s"),
    );
    row(
        "PostgreSQL inserts with trigger, NOTIFY off",
        format!("{quiet:.0} rows/s ({:.2} of without)", quiet / plain),
    );
    row(
        "PostgreSQL inserts with trigger and NOTIFY while a bridge is busy (adaptive, skipped)",
        format!("{busy:.0} rows/s ({:.2} of without)", busy / plain),
    );
    row(
        "PostgreSQL inserts with trigger and NOTIFY (default, no bridge busy)",
        format!(
            "{triggered:.0} rows/s ({:.2} of without)",
            triggered / plain
        ),
    );
    row(
        "RabbitMQ publish with confirms (bare lapin)",
        format!("{published:.0} msg/s"),
    );
    row(
        "RabbitMQ consume (bare lapin)",
        format!("{consumed:.0} msg/s"),
    );
    row(
        &format!(
            "Elasticsearch `_bulk` (bare client), best of 500 / 1,000 × 1–4 in flight: {bulk_size} × {bulk_concurrency}"
        ),
        format!("{bulked:.0} docs/s"),
    );
    row(
        "**pipeline capacity: backlog drained, pending → indexed and completed**",
        format!("**{capacity:.0} jobs/s**"),
    );
    row(
        &format!("capacity / slowest hop ({})", slowest.0),
        format!("{:.2}", capacity / slowest.1),
    );
    row(
        "full speed: writers' own rate while the pipeline runs",
        format!("{:.0} changes/s", ops as f64 / written.as_secs_f64()),
    );
    row(
        "full speed: first commit → last completed",
        format!("{pipeline:.0} jobs/s ({jobs} jobs)"),
    );
    row(
        "latency commit → completed at full speed, p50 / p95 / p99 / max",
        ms(full),
    );
    row(
        &format!(
            "latency commit → completed at {rate:.0}/s (half of full speed), p50 / p95 / p99 / max"
        ),
        ms(half),
    );
    println!("| benalsam-bridge: CPU, peak RSS | {bridge_cpu:.1} s, {bridge_rss:.1} MiB |");
    println!("| benalsam-consumer: CPU, peak RSS | {consumer_cpu:.1} s, {consumer_rss:.1} MiB |");

    println!("\nCPU seconds per 1,000 jobs (user + system, from /proc):\n");
    println!("| phase | {} |", cpu_start.header().join(" | "));
    println!("|---|{}", "---:|".repeat(cpu_start.header().len()));
    println!(
        "| backlog drained | {} |",
        cpu_drained
            .per_thousand(&cpu_start, envelopes.len())
            .join(" | ")
    );
    println!(
        "| full speed (writers included) | {} |",
        cpu_full
            .per_thousand(&cpu_drained, jobs as usize)
            .join(" | ")
    );

    common::delete_index(&es, &index).await;
    env.cleanup().await
}
