//! `benalsam-bridge`: claims jobs from the PostgreSQL outbox and publishes them to RabbitMQ.

use anyhow::Context;
use benalsam_events::cli::{self, DatabaseArgs, RabbitArgs};
use clap::{Parser, Subcommand};

/// Claims the change jobs that the add_to_sync_queue() trigger writes to
/// elasticsearch_sync_queue and publishes them to RabbitMQ with publisher confirms.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    database: DatabaseArgs,

    #[command(flatten)]
    rabbitmq: RabbitArgs,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the bridge (the default)
    Run,
    /// Apply the database migrations (listings, the queue table, the trigger) and exit
    Migrate,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    cli::init_logging();
    let cli = Cli::parse();

    match cli.command.unwrap_or(Command::Run) {
        Command::Migrate => {
            let db = &cli.database;
            let report = db.migrate().await.with_context(|| {
                format!("migrating schema {} of {}", db.schema, db.database_url)
            })?;
            println!(
                "schema {}: applied {:?}, already applied {:?}",
                db.schema, report.applied, report.already_applied
            );
        }
        Command::Run => {
            tracing::info!(
                database = %cli.database.database_url,
                rabbitmq = %cli.rabbitmq.rabbitmq_url,
                schema = %cli.database.schema,
                "configuration is valid; publishing is not built yet, exiting"
            );
        }
    }
    Ok(())
}
