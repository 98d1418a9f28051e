//! Apply the database migrations from your own program.
//!
//! Copy this when your service owns its database schema and should bring the outbox table
//! and trigger with it instead of running `benalsam-bridge migrate`.
//!
//! ```text
//! DATABASE_URL=postgres://benalsam:benalsam@127.0.0.1:5432/benalsam cargo run --example migrate
//! ```

use benalsam_events::config::DatabaseUrl;
use benalsam_events::{connect, outbox};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url: DatabaseUrl = std::env::var(DatabaseUrl::SETTING)
        .unwrap_or_else(|_| "postgres://benalsam:benalsam@127.0.0.1:5432/benalsam".to_owned())
        .parse()?;
    let schema = std::env::var("BENALSAM_SCHEMA").unwrap_or_else(|_| "public".to_owned());

    let mut client = connect::postgres(&url).await?;
    let report = outbox::migrate(&mut client, &schema).await?;
    println!(
        "{url} schema {schema}: applied {:?}, already there {:?}",
        report.applied, report.already_applied
    );
    Ok(())
}
