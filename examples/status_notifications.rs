//! A consumer of `listing.status.changes`: every status change of a listing, once.
//!
//! # When to copy this
//!
//! Copy it to react to status changes — mail the seller when a listing is approved, notify
//! watchers when it is sold. The bridge routes every UPDATE that changes `status` to
//! `listing.status.<new status>`, and the queue `listing.status.changes` (bound
//! `listing.status.#`, bounded to 100,000 messages) collects them. Replace `notify` with your
//! own work; ack only after it is done, so a crash means a redelivery, not a lost change.
//! The envelope's `messageId` is the same on every redelivery: use it to skip duplicates if
//! your side effect must happen once.
//!
//! ```text
//! scripts/stack up
//! cargo run --example status_notifications
//! ```

use benalsam_events::Envelope;
use benalsam_events::config::AmqpUrl;
use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::FieldTable;

/// The queue the topology binds to `listing.status.#` (bounded: it keeps the newest changes).
const STATUS_QUEUE: &str = "listing.status.changes";

async fn notify(envelope: &Envelope<'_>) {
    println!(
        "listing {}: {} → {} (job {}, at {})",
        envelope.record_id,
        envelope.previous_status.as_deref().unwrap_or("?"),
        envelope.status.as_deref().unwrap_or("?"),
        envelope.job_id,
        humantime::format_rfc3339_seconds(envelope.occurred_at),
    );
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = AmqpUrl::from_env()?;
    let connection = url.connect("status notifications").await?;
    let channel = connection.create_channel().await?;
    channel.basic_qos(100, BasicQosOptions::default()).await?;
    let mut deliveries = channel
        .basic_consume(
            STATUS_QUEUE.into(),
            "status-notifications".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    println!("waiting for status changes on {STATUS_QUEUE}; Ctrl-C stops");
    loop {
        let delivery = tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            next = deliveries.next() => match next {
                Some(delivery) => delivery?,
                None => break,
            },
        };
        match Envelope::decode(&delivery.data) {
            Ok(envelope) => {
                notify(&envelope).await;
                delivery.ack(BasicAckOptions::default()).await?;
            }
            Err(error) => {
                // Not ours to fix: drop it (or dead-letter it, as the indexer does).
                eprintln!("skipping a message that is not an envelope: {error}");
                delivery
                    .nack(BasicNackOptions {
                        requeue: false,
                        ..BasicNackOptions::default()
                    })
                    .await?;
            }
        }
    }
    connection.close(200, "bye".into()).await?;
    Ok(())
}
