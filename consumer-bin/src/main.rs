//! `benalsam-consumer`: consumes change messages from RabbitMQ into Elasticsearch bulk calls.

use anyhow::Context;
use benalsam_events::cli::{self, DatabaseArgs, RabbitArgs, SearchArgs};
use clap::{Parser, Subcommand};

/// Consumes the elasticsearch.sync queue, writes the listings to Elasticsearch with bulk
/// requests and marks their jobs completed (or failed) in PostgreSQL.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    database: DatabaseArgs,

    #[command(flatten)]
    rabbitmq: RabbitArgs,

    #[command(flatten)]
    search: SearchArgs,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the consumer (the default)
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
                elasticsearch = %cli.search.elasticsearch_url,
                "configuration is valid; consuming is not built yet, exiting"
            );
        }
    }
    Ok(())
}
