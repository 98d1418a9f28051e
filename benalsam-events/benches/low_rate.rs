//! The binaries at a low, steady rate: what a change costs when there is little to batch.
//!
//! Most deployments live at tens to hundreds of changes per second, where every commit may be
//! claimed, published, indexed and settled on its own. This bench runs the real
//! `benalsam-bridge` and `benalsam-consumer` (release builds) on the local stack:
//!
//! 1. **Idle**: both running on an empty outbox for `BENCH_IDLE_SECONDS` (default 20): their
//!    CPU per second of what they do with nothing to carry (polls, the backlog census,
//!    heartbeats, queue depths).
//! 2. **Paced**: `BENCH_WRITERS` (default 2) writers commit single-row changes (the pipeline
//!    bench's mix, `BENCH_MIX`) at `BENCH_RATE` changes/s (default 200) for
//!    `BENCH_RATE_SECONDS` (default 60). Then, once every job is completed: the binaries' CPU
//!    milliseconds per job, each process's CPU seconds per 1,000 jobs, and the latency from
//!    commit to completed (indexed; searchable after the index's next refresh, 1 s).
//!
//! ```text
//! scripts/stack up
//! cargo build --release --bins
//! cargo bench -p benalsam-events --bench low_rate
//! ```
//! `BENCH_BIN_DIR` runs the binaries of another build (an A/B of two builds, alternated);
//! `BENALSAM_*` settings in the environment reach both binaries.

mod common;

use std::time::Duration;

use benalsam_events::config::SearchUrl;
use common::load::{Process, job_stats, mix, write};
use common::{BenchEnv, BoxError, max_job, setting, wait_completed};

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let idle_seconds: f64 = setting("BENCH_IDLE_SECONDS", 20.0)?;
    let rate: f64 = setting("BENCH_RATE", 200.0)?;
    let rate_seconds: f64 = setting("BENCH_RATE_SECONDS", 60.0)?;
    let writers: usize = setting("BENCH_WRITERS", 2)?;
    let mix = mix()?;
    let env = BenchEnv::new("bench_low_rate").await?;
    let es = (SearchUrl::from_env()?).client(Duration::from_secs(60))?;
    let index = format!("{}_listings", env.name);
    common::listings(&index).ensure_index(&es).await?;

    let bridge = Process::start("benalsam-bridge", &env, &index, 3911)?;
    let consumer = Process::start("benalsam-consumer", &env, &index, 3912)?;
    let binaries = [
        ("benalsam-bridge", bridge.child.id()),
        ("benalsam-consumer", consumer.child.id()),
        ("load generator (this bench)", std::process::id()),
    ];
    // Both started and caught up with the empty outbox before anything is counted.
    let warm = max_job(&env).await?;
    write(&env, "listings", 1, 20, mix, None).await?;
    wait_completed(&env, warm, Duration::from_secs(300)).await?;

    eprintln!("[1/2] idle for {idle_seconds} s");
    let (bridge_idle0, _) = bridge.usage()?;
    let (consumer_idle0, _) = consumer.usage()?;
    tokio::time::sleep(Duration::from_secs_f64(idle_seconds)).await;
    let (bridge_idle1, _) = bridge.usage()?;
    let (consumer_idle1, _) = consumer.usage()?;

    eprintln!("[2/2] {writers} writers at {rate:.0} changes/s for {rate_seconds} s");
    let ops = ((rate * rate_seconds) as usize).max(writers);
    let first = max_job(&env).await?;
    let cpu_before = common::cpu_by_process(&binaries)?;
    let (bridge0, _) = bridge.usage()?;
    let (consumer0, _) = consumer.usage()?;
    let written = write(&env, "listings", writers, ops, mix, Some(rate)).await?;
    wait_completed(&env, first, Duration::from_secs(900)).await?;
    let (bridge1, bridge_rss) = bridge.usage()?;
    let (consumer1, consumer_rss) = consumer.usage()?;
    let cpu_after = common::cpu_by_process(&binaries)?;
    let (jobs, _, latency) = job_stats(&env, first).await?;
    bridge.stop();
    consumer.stop();

    let per_job_ms = |cpu: f64| cpu / jobs.max(1) as f64 * 1000.0;
    let idle_ms = |cpu: f64| cpu / idle_seconds * 1000.0;
    println!("\n| figure | bridge | consumer | both |");
    println!("|---|---:|---:|---:|");
    println!(
        "| idle: CPU ms per second | {:.1} | {:.1} | {:.1} |",
        idle_ms(bridge_idle1 - bridge_idle0),
        idle_ms(consumer_idle1 - consumer_idle0),
        idle_ms(bridge_idle1 - bridge_idle0 + consumer_idle1 - consumer_idle0),
    );
    let (bridge_cpu, consumer_cpu) = (bridge1 - bridge0, consumer1 - consumer0);
    println!(
        "| at {:.0}/s ({jobs} jobs): CPU ms per job | {:.3} | {:.3} | **{:.3}** |",
        ops as f64 / written.as_secs_f64(),
        per_job_ms(bridge_cpu),
        per_job_ms(consumer_cpu),
        per_job_ms(bridge_cpu + consumer_cpu),
    );
    println!("| peak RSS (MiB) | {bridge_rss:.1} | {consumer_rss:.1} | |");
    println!(
        "\nlatency commit → completed, p50 / p95 / p99 / max: {:.0} / {:.0} / {:.0} / {:.0} ms",
        latency[0], latency[1], latency[2], latency[3]
    );
    println!("\nCPU seconds per 1,000 jobs (user + system, from /proc), paced phase:\n");
    println!("| {} |", cpu_before.header().join(" | "));
    println!("|{}", "---:|".repeat(cpu_before.header().len()));
    println!(
        "| {} |",
        cpu_after
            .per_thousand(&cpu_before, jobs as usize)
            .join(" | ")
    );
    common::delete_index(&es, &index).await;
    env.cleanup().await
}
