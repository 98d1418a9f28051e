//! The command line of `benalsam-bridge`: `run` (the default) and the operator commands.

use std::time::Duration;

use anyhow::Context;
use benalsam_events::bridge;
use benalsam_events::ops::cli::{
    self, BridgeArgs, DatabaseArgs, LogArgs, RabbitArgs, TopologyArgs,
};
use benalsam_events::outbox::JobSelection;
use clap::{Parser, Subcommand};

/// Claims the change jobs that the add_to_sync_queue() trigger writes to
/// elasticsearch_sync_queue and publishes them to RabbitMQ with publisher confirms.
///
/// Without a subcommand it runs the bridge, with its settings from the environment.
#[derive(Debug, Parser)]
#[command(version)]
pub struct Cli {
    #[command(flatten)]
    database: DatabaseArgs,

    #[command(flatten)]
    rabbitmq: RabbitArgs,

    #[command(flatten)]
    pub log: LogArgs,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the bridge (the default)
    Run(Box<BridgeArgs>),
    /// Apply the database migrations (the queue table, the trigger function) and exit
    Migrate,
    /// Print the RabbitMQ topology as a definitions file (for docker/) and exit
    Topology {
        /// Virtual host to write into the definitions
        #[arg(long, default_value = "/")]
        vhost: String,
        #[command(flatten)]
        topology: TopologyArgs,
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
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        batch: u32,
        /// Allow an age under one hour (jobs that recent may still be looked at)
        #[arg(long)]
        force: bool,
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

impl Cli {
    /// Runs the chosen command.
    pub async fn run(self) -> anyhow::Result<()> {
        let db = &self.database;
        match self.command {
            None => {
                let args = RunOnly::parse_from(["benalsam-bridge run"]).args;
                run(&args, db, &self.rabbitmq).await
            }
            Some(Command::Run(args)) => run(&args, db, &self.rabbitmq).await,
            Some(Command::Migrate) => {
                let report = db.migrate().await.with_context(|| {
                    format!("migrating schema {} of {}", db.schema, db.database_url)
                })?;
                println!(
                    "schema {}: applied {:?}, already applied {:?}",
                    db.schema, report.applied, report.already_applied
                );
                Ok(())
            }
            Some(Command::Topology { vhost, topology }) => {
                let definitions = topology.topology().definitions(&vhost);
                println!("{}", serde_json::to_string_pretty(&definitions)?);
                Ok(())
            }
            Some(Command::Status) => status(db).await,
            Some(Command::RetryFailed { jobs, all }) => retry_failed(db, jobs, all).await,
            Some(Command::Purge {
                older_than,
                batch,
                force,
            }) => purge(db, older_than, batch, force).await,
            Some(Command::Backfill {
                table,
                key,
                batch,
                restart,
            }) => backfill(db, &table, &key, batch, restart).await,
        }
    }
}

/// `run` with its settings from the environment only: what runs without a subcommand.
#[derive(Debug, Parser)]
struct RunOnly {
    #[command(flatten)]
    args: BridgeArgs,
}

async fn run(args: &BridgeArgs, db: &DatabaseArgs, rabbitmq: &RabbitArgs) -> anyhow::Result<()> {
    let settings = args.settings(db, rabbitmq);
    tracing::info!(database = %db.database_url, rabbitmq = %rabbitmq.rabbitmq_url, schema = %db.schema, "starting");
    bridge::run(settings, cli::shutdown_on_signals())
        .await
        .context("running the bridge")
}

async fn status(db: &DatabaseArgs) -> anyhow::Result<()> {
    let summary = db
        .outbox()?
        .summary()
        .await
        .context("summarising the job table")?;
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

async fn retry_failed(db: &DatabaseArgs, jobs: Vec<i64>, all: bool) -> anyhow::Result<()> {
    let selection = if all {
        JobSelection::All
    } else {
        JobSelection::Jobs(jobs.clone())
    };
    let ids = db.outbox()?.retry_failed(&selection).await?;
    println!("{} failed jobs back to pending{}", ids.len(), listed(&ids));
    let missing: Vec<i64> = jobs.into_iter().filter(|j| !ids.contains(j)).collect();
    if !missing.is_empty() {
        anyhow::bail!("no failed job with id {missing:?} (unknown, or not failed)");
    }
    if all && ids.is_empty() {
        anyhow::bail!("there is no failed job to retry");
    }
    Ok(())
}

async fn purge(
    db: &DatabaseArgs,
    older_than: Duration,
    batch: u32,
    force: bool,
) -> anyhow::Result<()> {
    const RECENT: Duration = Duration::from_secs(3600);
    if older_than < RECENT && !force {
        anyhow::bail!(
            "--older-than {} would delete jobs completed in the last hour; add --force if that is meant",
            humantime::format_duration(older_than)
        );
    }
    let deleted = db
        .outbox()?
        .purge_completed(older_than, batch as usize)
        .await?;
    println!(
        "deleted {deleted} completed jobs older than {}",
        humantime::format_duration(older_than)
    );
    Ok(())
}

async fn backfill(
    db: &DatabaseArgs,
    table: &str,
    key: &str,
    batch: i64,
    restart: bool,
) -> anyhow::Result<()> {
    let done = db
        .outbox()?
        .backfill(table, key, batch, restart, |p| {
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
        })
        .await
        .with_context(|| format!("backfilling {table}"))?;
    println!(
        "{}: backfill complete, {} rows enqueued",
        done.table, done.rows
    );
    Ok(())
}

fn listed(ids: &[i64]) -> String {
    if ids.is_empty() {
        String::new()
    } else {
        format!(": {ids:?}")
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_consistent_and_its_defaults_parse() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from(["benalsam-bridge"]).expect("defaults parse");
        assert!(cli.command.is_none());
        let run = RunOnly::try_parse_from(["benalsam-bridge run"]).expect("run defaults parse");
        assert_eq!(run.args.batch_size, 100);
        let status = Cli::try_parse_from([
            "benalsam-bridge",
            "status",
            "--database-url",
            "postgres://u:p@db/x",
        ])
        .expect("connection flags after the subcommand");
        assert_eq!(status.database.database_url.url().host_str(), Some("db"));
    }
}
