//! `benalsam-consumer`: consumes change messages from RabbitMQ into Elasticsearch bulk calls.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use benalsam_events::backoff::{Backoff, retry};
use benalsam_events::cli::{
    self, ConsumerArgs, DatabaseArgs, LogArgs, RabbitArgs, SearchArgs, TopologyArgs,
};
use benalsam_events::consumer::ConsumerMonitor;
use benalsam_events::dead_letter::{self, Selection};
use benalsam_events::health::HealthServer;
use benalsam_events::metrics::Metrics;
use benalsam_events::{Indexer, IndexerConfig, Outbox, OutboxConfig, heartbeat, search};
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

    #[command(flatten)]
    consumer: ConsumerArgs,

    #[command(flatten)]
    topology: TopologyArgs,

    #[command(flatten)]
    log: LogArgs,

    /// Address of the health endpoints
    #[arg(long, env = "BENALSAM_HEALTH_ADDR", default_value = "127.0.0.1:3002")]
    health_addr: SocketAddr,

    /// Interval of heartbeat events (health.consumer on benalsam.system)
    #[arg(long, env = "BENALSAM_HEARTBEAT_INTERVAL", default_value = "30s", value_parser = cli::parse_duration)]
    heartbeat_interval: Duration,

    /// Apply the database migrations before starting
    #[arg(long, env = "BENALSAM_MIGRATE")]
    migrate: bool,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the consumer (the default)
    Run,
    /// Apply the database migrations and exit
    Migrate,
    /// Inspect or replay the dead-letter queue (elasticsearch.sync.dlq)
    #[command(subcommand)]
    Dlq(Dlq),
}

#[derive(Debug, Subcommand)]
enum Dlq {
    /// List dead-lettered messages with their reasons (they stay in the queue)
    List {
        /// Most messages to show
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Publish dead-lettered messages back to their exchange, then remove them from the DLQ
    Replay {
        /// Replay the messages of these jobs only
        #[arg(long = "job", required_unless_present = "all")]
        jobs: Vec<i64>,
        /// Replay every message
        #[arg(long, conflicts_with = "jobs")]
        all: bool,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _telemetry = benalsam_events::telemetry::init("benalsam-consumer", cli.log.log_format)?;
    let rabbit = &cli.rabbitmq.rabbitmq_url;
    match cli.command {
        Some(Command::Migrate) => {
            let report = cli.database.migrate().await.context("migrating")?;
            println!(
                "applied {:?}, already applied {:?}",
                report.applied, report.already_applied
            );
            Ok(())
        }
        Some(Command::Dlq(Dlq::List { limit })) => {
            for letter in dead_letter::list(rabbit, limit)
                .await
                .context("listing the DLQ")?
            {
                println!(
                    "job {:>10}  {:<18} {:<28} {}\n    {}",
                    letter.job_id.map_or("-".to_owned(), |id| id.to_string()),
                    letter.kind.as_deref().unwrap_or("-"),
                    letter.routing_key,
                    letter.dead_lettered_at.as_deref().unwrap_or("-"),
                    letter.reason.as_deref().unwrap_or("(no reason recorded)"),
                );
            }
            Ok(())
        }
        Some(Command::Dlq(Dlq::Replay { ref jobs, all })) => {
            let selection = if all {
                Selection::All
            } else {
                Selection::Jobs(jobs.clone())
            };
            let report = dead_letter::replay(rabbit, &selection)
                .await
                .context("replaying the DLQ")?;
            println!("replayed {}, kept {}", report.replayed, report.kept);
            Ok(())
        }
        Some(Command::Run) | None => run(cli).await,
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let shutdown = cli::shutdown_on_signals();
    let (db, rabbit, es) = (
        &cli.database,
        &cli.rabbitmq.rabbitmq_url,
        &cli.search.elasticsearch_url,
    );
    tracing::info!(database = %db.database_url, rabbitmq = %rabbit, elasticsearch = %es, "starting");

    let health_listener = tokio::net::TcpListener::bind(cli.health_addr)
        .await
        .with_context(|| format!("binding BENALSAM_HEALTH_ADDR {}", cli.health_addr))?;
    let topology = cli.topology.topology();
    if !cli::prepare(
        db,
        cli.migrate,
        rabbit,
        &topology,
        "benalsam-consumer",
        &shutdown,
    )
    .await
    .context("starting")?
    {
        return Ok(());
    }
    let client = search::client(es, cli.consumer.search_timeout)?;
    let index = cli.consumer.index_config();
    let body = search::listings_index_body(&index);
    let bootstrapped = retry(
        "preparing the search index",
        Backoff::default(),
        &shutdown,
        || search::ensure_index(&client, &index, &body),
    )
    .await
    .context("preparing the search index")?;
    if bootstrapped.is_none() {
        return Ok(());
    }

    let metrics = Metrics::shared();
    let outbox = Outbox::new(
        db.database_url.clone(),
        OutboxConfig {
            schema: db.schema.clone(),
            ..OutboxConfig::default()
        },
    )?;
    let indexer = Indexer::new(
        rabbit.clone(),
        client,
        outbox,
        cli.consumer.documents(),
        IndexerConfig {
            metrics: Arc::clone(&metrics),
            ..cli.consumer.indexer_config()
        },
    );
    let monitor = Arc::new(ConsumerMonitor {
        indexer: indexer.status(),
        max_bulk_gap: Duration::from_secs(60),
        search: es.redacted(),
        broker: rabbit.redacted(),
    });
    let health = monitor
        .routes(HealthServer::new())
        .metrics(Arc::clone(&metrics));
    let background = shutdown.child_token();
    let tasks = [
        tokio::spawn(health.serve(health_listener, background.clone())),
        tokio::spawn(heartbeat::run(
            rabbit.clone(),
            "consumer".to_owned(),
            cli.heartbeat_interval,
            monitor.heartbeat(),
            background.clone(),
        )),
    ];
    tracing::info!(health = %cli.health_addr, index = %cli.consumer.index, "consumer running");

    // The whole consumer: on SIGTERM the batch in hand is finished and acked, then it stops.
    indexer.run(shutdown).await;

    background.cancel();
    for task in tasks {
        let _ = task.await;
    }
    tracing::info!("consumer stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_consistent_and_its_defaults_parse() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from(["benalsam-consumer"]).expect("defaults parse");
        assert_eq!(cli.consumer.searchable_statuses, vec!["active".to_owned()]);
        assert_eq!(cli.consumer.indexer_config().batch_size, 500);
        let cli = Cli::try_parse_from([
            "benalsam-consumer",
            "--searchable-statuses",
            "active,featured",
        ])
        .expect("a list parses");
        assert_eq!(cli.consumer.searchable_statuses, vec!["active", "featured"]);
    }
}
