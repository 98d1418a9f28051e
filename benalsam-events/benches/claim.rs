//! Claim-and-mark throughput of the outbox against the real PostgreSQL of `scripts/stack`.
//!
//! For batch sizes 1, 100 and 1,000: claim a batch, mark it sent, mark it completed, until
//! the pending jobs are gone; on a queue that also holds a million completed rows, so the
//! partial indexes are what keeps claiming fast. Prints jobs per second.
//!
//! ```text
//! scripts/stack up
//! cargo bench -p benalsam-events --bench claim
//! ```
//! Settings: `BENCH_COMPLETED_ROWS` (default 1000000).

use std::time::Instant;

use benalsam_events::config::DatabaseUrl;
use benalsam_events::{Outbox, OutboxConfig, Outcome, Settle};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = DatabaseUrl::from_env()?;
    let completed_rows: i64 = std::env::var("BENCH_COMPLETED_ROWS")
        .ok()
        .map(|v| v.parse())
        .transpose()?
        .unwrap_or(1_000_000);
    let schema = format!("bench_claim_{}", std::process::id());
    let mut client = url.connect().await?;
    benalsam_events::OutboxConfig::in_schema(&schema)
        .migrate(&mut client, &[])
        .await?;
    client
        .batch_execute(&format!("SET search_path TO {schema}"))
        .await?;

    let started = Instant::now();
    client
        .execute(
            "INSERT INTO elasticsearch_sync_queue
                 (table_name, operation, record_id, change_data, status, created_at,
                  sent_at, completed_at, processed_at)
             SELECT 'listings', 'INSERT', i::text,
                    jsonb_build_object('id', i, 'title', 'İlan ' || i, 'status', 'active'),
                    'completed', now() - interval '1 day', now(), now(), now()
             FROM generate_series(1, $1::bigint) AS i",
            &[&completed_rows],
        )
        .await?;
    client
        .batch_execute("VACUUM ANALYZE elasticsearch_sync_queue")
        .await?;
    eprintln!(
        "setup: {completed_rows} completed rows in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let outbox = Outbox::new(url.clone(), {
        let mut c = OutboxConfig::default();
        c.schema = schema.clone();
        c
    })?;
    println!("| batch size | jobs | seconds | jobs/s (claim + mark sent + mark completed) |");
    println!("|---:|---:|---:|---:|");
    for (batch, jobs) in [(1usize, 3_000i64), (100, 30_000), (1_000, 100_000)] {
        client
            .execute(
                "INSERT INTO elasticsearch_sync_queue (table_name, operation, record_id, change_data)
                 SELECT 'listings', 'UPDATE', i::text,
                        jsonb_build_object('old', jsonb_build_object('id', i), 'new', jsonb_build_object('id', i))
                 FROM generate_series(1, $1::bigint) AS i",
                &[&jobs],
            )
            .await?;
        client
            .batch_execute("ANALYZE elasticsearch_sync_queue")
            .await?;
        let started = Instant::now();
        let mut done = 0usize;
        loop {
            let claimed = outbox.claim(batch).await?;
            if claimed.is_empty() {
                break;
            }
            let ids: Vec<i64> = claimed.iter().map(|j| j.id).collect();
            let sent: Vec<(i64, Outcome)> = ids.iter().map(|id| (*id, Outcome::Sent)).collect();
            outbox.settle(&sent).await?;
            let completed: Vec<(i64, Outcome)> =
                ids.iter().map(|id| (*id, Outcome::Completed)).collect();
            outbox.settle(&completed).await?;
            done += ids.len();
        }
        let secs = started.elapsed().as_secs_f64();
        println!(
            "| {batch} | {done} | {secs:.2} | {:.0} |",
            done as f64 / secs
        );
    }
    client
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await?;
    Ok(())
}
