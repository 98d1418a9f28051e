//! `benalsam-bridge`: claims the jobs the `add_to_sync_queue()` trigger writes to the outbox
//! and publishes them to RabbitMQ with publisher confirms. `commands` holds the subcommands;
//! the service itself is `benalsam_events::bridge::run`.

mod commands;

// One thread for every task: the work is waiting on PostgreSQL, RabbitMQ and the search
// engine, and handing each wake-up between worker threads cost more CPU than it ran
// (BENCHMARKS.md, "Low rates"). The AMQP client keeps its own I/O thread.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    // Cli::parse(), with DATABASE_URL_FILE, RABBITMQ_URL_FILE and ELASTICSEARCH_URL_FILE,
    // saying where a misplaced run setting belongs.
    let cli: commands::Cli = benalsam_cli::parse();
    let _telemetry = benalsam_cli::telemetry::init("benalsam-bridge", cli.log.log_format)?;
    cli.run().await.map_err(benalsam_cli::name_the_setting)
}
