//! Apply the database migrations from your own program.
//!
//! Copy this when your service owns its database schema and should bring the outbox table,
//! the trigger function and the triggers on its tables with it instead of running
//! `benalsam-bridge migrate`. Run it after your own migrations: the trigger is attached to
//! tables that exist, and the ones that do not are reported.
//!
//! ```text
//! DATABASE_URL=postgres://benalsam:benalsam@127.0.0.1:5432/benalsam cargo run --example migrate
//! ```

use benalsam_events::config::DatabaseUrl;
use benalsam_events::{EventType, OutboxConfig};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url: DatabaseUrl = std::env::var(DatabaseUrl::SETTING)
        .unwrap_or_else(|_| "postgres://benalsam:benalsam@127.0.0.1:5432/benalsam".to_owned())
        .parse()?;
    let schema = std::env::var("BENALSAM_SCHEMA").unwrap_or_else(|_| "public".to_owned());

    let mut client = url.connect().await?;
    // Your event types: the same list the bridge and the consumer run with.
    let event_types = [EventType::listings()];
    let report = OutboxConfig::in_schema(&schema)
        .migrate(&mut client, &event_types)
        .await?;
    println!(
        "{url} schema {schema}: applied {:?}, already there {:?}, trigger on {:?}",
        report.applied, report.already_applied, report.triggers
    );
    Ok(())
}
