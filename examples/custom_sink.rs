//! The job stream piped into something other than RabbitMQ: here, JSON lines on stdout.
//!
//! # When to copy this
//!
//! Copy it when the changes should go somewhere RabbitMQ is not needed: a webhook, a Kafka
//! topic, a file, another database. The outbox gives you the same guarantees it gives the
//! bridge — every change claimed once under a lease, nothing lost when you crash — as long as
//! you report the outcome only after your destination has the change, through the same
//! `Settle` the publisher uses: `Outcome::Completed` when it is final, `Outcome::Failed` (with
//! `retry: true`) to be handed the job again after a backoff. Jobs you never report come back
//! when their lease expires.
//!
//! ```text
//! scripts/stack up
//! cargo run --example custom_sink > changes.ndjson
//! ```

use std::io::Write;

use benalsam_events::config::DatabaseUrl;
use benalsam_events::{Job, JobStream, JobStreamConfig, Outbox, OutboxConfig, Outcome, Settle};
use futures::StreamExt;
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// Writes a batch as JSON lines; an I/O error fails the whole batch, to be retried.
fn write_batch(out: &mut impl Write, batch: &[Job]) -> std::io::Result<()> {
    for job in batch {
        let line = json!({
            "id": job.message_id(),
            "table": job.table_name,
            "operation": job.operation,
            "key": job.record_id,
            "data": job.change_data,
        });
        writeln!(out, "{line}")?;
    }
    out.flush()
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = DatabaseUrl::from_env()?;
    let schema = std::env::var("BENALSAM_SCHEMA").unwrap_or_else(|_| "public".to_owned());
    let outbox = Outbox::new(url, OutboxConfig::in_schema(&schema))?;
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        stop.cancel();
    });

    // A sink of batches: write them, then report the outcome to the outbox.
    let sink = futures::sink::unfold(outbox.clone(), |outbox, batch: Vec<Job>| async move {
        let outcome = match write_batch(&mut std::io::stdout().lock(), &batch) {
            Ok(()) => Outcome::Completed,
            Err(error) => Outcome::Failed {
                error: format!("stdout: {error}"),
                retry: true,
            },
        };
        let reports: Vec<(i64, Outcome)> = batch.iter().map(|j| (j.id, outcome.clone())).collect();
        outbox.settle(&reports).await?;
        Ok::<_, benalsam_events::Error>(outbox)
    });
    let jobs = JobStream::new(outbox, JobStreamConfig::default(), shutdown)?;
    eprintln!("writing every change as a JSON line; Ctrl-C stops");
    jobs.map(Ok).forward(sink).await?;
    Ok(())
}
