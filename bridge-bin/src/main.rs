//! `benalsam-bridge`: claims jobs from the PostgreSQL outbox and publishes them to RabbitMQ.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use benalsam_events::bridge::{self, BridgeMonitor, HealthThresholds};
use benalsam_events::cli::{self, BridgeArgs, DatabaseArgs, LogArgs, RabbitArgs, TopologyArgs};
use benalsam_events::health::HealthServer;
use benalsam_events::metrics::Metrics;
use benalsam_events::routing::Routes;
use benalsam_events::{
    JobStream, JobStreamConfig, Outbox, Publisher, PublisherConfig, admin, heartbeat, postgres,
};
use clap::{Parser, Subcommand};
use futures::StreamExt;

/// Claims the change jobs that the add_to_sync_queue() trigger writes to
/// elasticsearch_sync_queue and publishes them to RabbitMQ with publisher confirms.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    database: DatabaseArgs,

    #[command(flatten)]
    rabbitmq: RabbitArgs,

    #[command(flatten)]
    bridge: BridgeArgs,

    #[command(flatten)]
    topology: TopologyArgs,

    #[command(flatten)]
    log: LogArgs,

    /// Address of the health endpoints
    #[arg(long, env = "BENALSAM_HEALTH_ADDR", default_value = "127.0.0.1:3001")]
    health_addr: SocketAddr,

    /// Interval of heartbeat events (health.bridge on benalsam.system)
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
    /// Run the bridge (the default)
    Run,
    /// Apply the database migrations (listings, the queue table, the trigger) and exit
    Migrate,
    /// Print the RabbitMQ topology as a definitions file (for docker/) and exit
    Topology {
        /// Virtual host to write into the definitions
        #[arg(long, default_value = "/")]
        vhost: String,
    },
    /// Summarise the job table: jobs by status, average processing time, oldest pending
    Status,
    /// Put failed jobs back to pending (attempts reset) so they are published again
    RetryFailed {
        /// Retry these jobs only
        #[arg(long = "job", required_unless_present = "all")]
        jobs: Vec<i64>,
        /// Retry every failed job
        #[arg(long, conflicts_with = "jobs")]
        all: bool,
    },
    /// Delete completed jobs older than an age, in small batches
    Purge {
        /// Age of the completed jobs to delete, e.g. 7d
        #[arg(long, value_parser = cli::parse_duration)]
        older_than: Duration,
        /// Rows per delete statement
        #[arg(long, default_value_t = 1000)]
        batch: usize,
    },
    /// Enqueue a job for every existing row of a table (resumable), so rows that predate the
    /// trigger get indexed
    Backfill {
        /// The table
        #[arg(long, default_value = "listings")]
        table: String,
        /// Its key column
        #[arg(long, default_value = "id")]
        key: String,
        /// Rows per transaction
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(i64).range(1..))]
        batch: i64,
        /// Start over instead of continuing an interrupted backfill
        #[arg(long)]
        restart: bool,
    },
}

/// How long a shutdown may wait for the last confirms and marks.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _telemetry = benalsam_events::telemetry::init("benalsam-bridge", cli.log.log_format)?;
    match cli.command {
        Some(Command::Migrate) => {
            let db = &cli.database;
            let report = db.migrate().await.with_context(|| {
                format!("migrating schema {} of {}", db.schema, db.database_url)
            })?;
            println!(
                "schema {}: applied {:?}, already applied {:?}",
                db.schema, report.applied, report.already_applied
            );
            Ok(())
        }
        Some(Command::Topology { ref vhost }) => {
            let definitions = cli.topology.topology().definitions(vhost);
            println!("{}", serde_json::to_string_pretty(&definitions)?);
            Ok(())
        }
        Some(Command::Status) => {
            let client = postgres::connect(&cli.database.database_url).await?;
            let summary = admin::summary(&client, &cli.database.schema).await?;
            println!(
                "{:<12} {:>10} {:>22}",
                "status", "jobs", "avg processing time"
            );
            for line in &summary.by_status {
                let avg = line
                    .avg_processing_seconds
                    .map_or("-".to_owned(), |s| format!("{s:.3} s"));
                println!("{:<12} {:>10} {:>22}", line.status, line.jobs, avg);
            }
            match summary.oldest_pending {
                Some(age) => println!("oldest pending job: {:.1} s old", age.as_secs_f64()),
                None => println!("no pending job"),
            }
            Ok(())
        }
        Some(Command::RetryFailed { ref jobs, all }) => {
            let client = postgres::connect(&cli.database.database_url).await?;
            let selection = if all {
                admin::Selection::All
            } else {
                admin::Selection::Ids(jobs.clone())
            };
            let ids = admin::retry_failed(&client, &cli.database.schema, &selection).await?;
            println!(
                "{} failed jobs back to pending{}",
                ids.len(),
                if ids.is_empty() {
                    String::new()
                } else {
                    format!(": {ids:?}")
                }
            );
            Ok(())
        }
        Some(Command::Purge { older_than, batch }) => {
            let outbox = Outbox::new(
                cli.database.database_url.clone(),
                cli.bridge.outbox_config(&cli.database.schema),
            )?;
            let deleted = outbox.purge_completed(older_than, batch).await?;
            println!(
                "deleted {deleted} completed jobs older than {}",
                humantime::format_duration(older_than)
            );
            Ok(())
        }
        Some(Command::Backfill {
            ref table,
            ref key,
            batch,
            restart,
        }) => {
            let mut client = postgres::connect(&cli.database.database_url).await?;
            let done = admin::backfill(
                &mut client,
                &cli.database.schema,
                table,
                key,
                batch,
                restart,
                |p| {
                    eprintln!(
                        "{}: {} rows enqueued{}",
                        p.table,
                        p.rows,
                        p.last_key
                            .as_deref()
                            .map(|k| format!(" (up to {k})"))
                            .unwrap_or_default()
                    );
                    true
                },
            )
            .await
            .with_context(|| format!("backfilling {table}"))?;
            println!(
                "{}: backfill complete, {} rows enqueued",
                done.table, done.rows
            );
            Ok(())
        }
        Some(Command::Run) | None => run(cli).await,
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let shutdown = cli::shutdown_on_signals();
    let (db, rabbit) = (&cli.database, &cli.rabbitmq.rabbitmq_url);
    tracing::info!(database = %db.database_url, rabbitmq = %rabbit, schema = %db.schema, "starting");

    // Wait for the services rather than give up; a wrong setting still stops start-up.
    let health_listener = tokio::net::TcpListener::bind(cli.health_addr)
        .await
        .with_context(|| format!("binding BENALSAM_HEALTH_ADDR {}", cli.health_addr))?;
    let topology = cli.topology.topology();
    if !cli::prepare(
        db,
        cli.migrate,
        rabbit,
        &topology,
        "benalsam-bridge",
        &shutdown,
    )
    .await
    .context("starting")?
    {
        return Ok(());
    }

    let metrics = Metrics::shared();
    let outbox = Outbox::new(
        db.database_url.clone(),
        cli.bridge.outbox_config(&db.schema),
    )?;
    let jobs = JobStream::new(
        outbox.clone(),
        JobStreamConfig {
            metrics: Arc::clone(&metrics),
            ..cli.bridge.job_stream_config()
        },
        shutdown.clone(),
    )?;
    let publisher = Publisher::new(
        rabbit.clone(),
        outbox.clone(),
        Routes::default(),
        PublisherConfig {
            metrics: Arc::clone(&metrics),
            ..cli.bridge.publisher_config()
        },
    );

    let monitor = Arc::new(BridgeMonitor {
        stream: jobs.status(),
        publisher: publisher.status(),
        metrics: Arc::clone(&metrics),
        thresholds: HealthThresholds {
            max_pending_age: cli.bridge.max_pending_age,
            ..HealthThresholds::default()
        },
        broker: rabbit.redacted(),
        database: db.database_url.redacted(),
    });
    let health = monitor
        .routes(HealthServer::new())
        .metrics(Arc::clone(&metrics));
    let background = shutdown.child_token();
    let tasks = [
        tokio::spawn(health.serve(health_listener, background.clone())),
        tokio::spawn(heartbeat::run(
            rabbit.clone(),
            "bridge".to_owned(),
            cli.heartbeat_interval,
            monitor.heartbeat(),
            background.clone(),
        )),
        tokio::spawn(bridge::resend_stale(
            outbox,
            cli.bridge.resend_after,
            Arc::clone(&metrics),
            background.clone(),
        )),
    ];
    tracing::info!(health = %cli.health_addr, "bridge running");

    // The whole bridge: claimed batches, one job at a time, into the publisher. On SIGTERM the
    // stream ends and closing the publisher waits for every confirm and its `sent` mark.
    // If RabbitMQ is away at shutdown the publisher cannot finish: after a grace period the
    // bridge exits anyway, and what it held returns to other bridges when its lease expires.
    let publishing = jobs
        .flat_map(futures::stream::iter)
        .map(Ok)
        .forward(publisher);
    let grace = async {
        shutdown.cancelled().await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        result = publishing => result.context("publishing jobs")?,
        () = grace => tracing::warn!(
            grace = ?SHUTDOWN_GRACE,
            "shutdown did not finish in time (is RabbitMQ reachable?); unconfirmed jobs return after their lease"
        ),
    }

    background.cancel();
    for task in tasks {
        let _ = task.await;
    }
    tracing::info!("bridge stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_consistent_and_its_defaults_parse() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from(["benalsam-bridge"]).expect("defaults parse");
        assert_eq!(cli.bridge.job_stream_config().batch_size, 100);
        assert_eq!(cli.bridge.publisher_config().window, 1000);
        let _ = cli.topology.topology();
    }
}
