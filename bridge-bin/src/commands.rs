//! The command line of `benalsam-bridge`: `run` (the default) and the operator commands.

use std::time::Duration;

use anyhow::Context;
use benalsam_cli::{
    self as cli, BridgeArgs, ConfigArgs, DatabaseArgs, LogArgs, RabbitArgs, TopologyArgs,
};
use benalsam_events::outbox::JobSelection;
use benalsam_events::{EventType, bridge};
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
    config: ConfigArgs,

    #[command(flatten)]
    pub log: LogArgs,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the bridge (the default)
    Run(Box<BridgeArgs>),
    /// Apply the database migrations (the job table, the trigger function), attach the
    /// trigger to the table of every event type, and exit
    Migrate,
    /// Print the RabbitMQ topology as a definitions file (for docker/) and exit
    Topology {
        /// Virtual host to write into the definitions
        #[arg(long, default_value = "/")]
        vhost: String,
        /// Print instead the least privileges of the bridge's and the consumer's broker users
        /// on this topology (user, configure, write, read; tab-separated)
        #[arg(long)]
        permissions: bool,
        #[command(flatten)]
        topology: TopologyArgs,
    },
    /// Print the GRANT statements giving the bridge's and the consumer's PostgreSQL roles the
    /// least privileges their work needs on the outbox (run them as the outbox's owner)
    Grants {
        /// The bridge's role
        #[arg(long, value_name = "ROLE", required_unless_present = "consumer_role")]
        bridge_role: Option<String>,
        /// The consumer's role
        #[arg(long, value_name = "ROLE")]
        consumer_role: Option<String>,
    },
    /// Summarise the job table: jobs by status, average processing time, oldest pending,
    /// pending jobs by table
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
    /// Delete completed jobs older than an age, in small batches; or, with --failed-of, the
    /// failed jobs of a table whose event type is no longer configured
    Purge {
        /// Age of the completed jobs to delete, e.g. 7d
        #[arg(long, value_parser = cli::parse_duration, required_unless_present = "failed_of")]
        older_than: Option<Duration>,
        /// Delete the failed jobs of this table instead (as `status` names it: `orders`,
        /// `shop.orders`, a relation's `listings#seller`), once its event type was removed
        /// from the configuration: nothing retries them any more. Refused for a table a
        /// configured event type still routes (use retry-failed for those)
        #[arg(long, value_name = "TABLE", conflicts_with = "older_than")]
        failed_of: Option<String>,
        /// Rows per delete statement
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        batch: u32,
        /// Allow an age under one hour (jobs that recent may still be looked at)
        #[arg(long)]
        force: bool,
    },
    /// Enqueue a job for every existing row of a table (or the rows --where selects), so rows
    /// that predate the trigger (an event type added, also a second one on a table) get
    /// indexed. An interrupted backfill continues where it stopped; a finished one run again
    /// starts a new run over every row
    Backfill {
        /// The event type whose table to backfill (its table and key from the configuration;
        /// may be left out when there is only one)
        #[arg(long = "type", conflicts_with = "table")]
        event_type: Option<String>,
        /// A table instead, schema-qualified unless in --schema
        #[arg(long)]
        table: Option<String>,
        /// The key column of --table
        #[arg(long, default_value = "id", requires = "table")]
        key: String,
        /// Rows per transaction
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(i64).range(1..))]
        batch: i64,
        /// Start over instead of continuing an interrupted backfill
        #[arg(long)]
        restart: bool,
        /// Only the rows where this SQL condition holds, e.g. "company_id = 42". It is SQL
        /// run as written with this command's database role (like psql): give only a
        /// condition you wrote, never one taken from elsewhere. A backfill with a condition
        /// keeps its own progress (the same --where continues it)
        #[arg(long = "where", value_name = "SQL CONDITION")]
        condition: Option<String>,
    },
}

impl Cli {
    /// Runs the chosen command.
    pub async fn run(self) -> anyhow::Result<()> {
        let db = &self.database;
        let event_types = || self.config.event_types().context("reading the event types");
        match self.command {
            None => {
                let args = RunOnly::parse_from(["benalsam-bridge run"]).args;
                run(&args, db, &self.rabbitmq, event_types()?).await
            }
            Some(Command::Run(ref args)) => run(args, db, &self.rabbitmq, event_types()?).await,
            Some(Command::Migrate) => migrate(db, &event_types()?).await,
            Some(Command::Grants {
                ref bridge_role,
                ref consumer_role,
            }) => {
                print!(
                    "{}",
                    (db.outbox()?.config()).grants(
                        &event_types()?,
                        bridge_role.as_deref(),
                        consumer_role.as_deref()
                    )?
                );
                Ok(())
            }
            Some(Command::Topology {
                ref vhost,
                permissions,
                ref topology,
            }) => {
                let topology = topology.topology(&event_types()?);
                if permissions {
                    print!("{}", topology.permissions());
                } else {
                    let definitions = topology.definitions(vhost);
                    println!("{}", serde_json::to_string_pretty(&definitions)?);
                }
                Ok(())
            }
            Some(Command::Status) => status(db).await,
            Some(Command::RetryFailed { jobs, all }) => retry_failed(db, jobs, all).await,
            Some(Command::Purge {
                older_than,
                ref failed_of,
                batch,
                force,
            }) => match (older_than, failed_of) {
                (_, Some(table)) => purge_failed(db, &event_types()?, table).await,
                (Some(older_than), None) => purge(db, older_than, batch, force).await,
                (None, None) => anyhow::bail!("give --older-than <age> or --failed-of <table>"),
            },
            Some(Command::Backfill {
                ref event_type,
                ref table,
                ref key,
                batch,
                restart,
                ref condition,
            }) => {
                let target = match table {
                    Some(table) => Backfilled::Table(table.clone(), key.clone()),
                    None => {
                        Backfilled::Type(Box::new(backfilled(&self.config, event_type.as_deref())?))
                    }
                };
                let options = (batch, restart, condition.as_deref());
                backfill(db, &target, options).await
            }
        }
    }
}

/// `run` with its settings from the environment only: what runs without a subcommand.
#[derive(Debug, Parser)]
struct RunOnly {
    #[command(flatten)]
    args: BridgeArgs,
}

async fn run(
    args: &BridgeArgs,
    db: &DatabaseArgs,
    rabbitmq: &RabbitArgs,
    event_types: Vec<EventType>,
) -> anyhow::Result<()> {
    let names: Vec<&str> = event_types.iter().map(|t| t.name.as_str()).collect();
    tracing::info!(database = %db.database_url, rabbitmq = %rabbitmq.rabbitmq_url,
                   schema = %db.schema, event_types = %names.join(","),
                   queue_type = %args.topology.queue_type.queue_type, "starting");
    let settings = args.settings(db, rabbitmq, event_types);
    bridge::run(settings, cli::shutdown_on_signals())
        .await
        .context("running the bridge")
}

async fn migrate(db: &DatabaseArgs, event_types: &[EventType]) -> anyhow::Result<()> {
    let report = db
        .migrate(event_types)
        .await
        .with_context(|| format!("migrating schema {} of {}", db.schema, db.database_url))?;
    println!(
        "schema {}: applied {:?}, already applied {:?}",
        db.schema, report.applied, report.already_applied
    );
    if let Some(slot) = &db.capture_slot {
        for event_type in event_types {
            println!(
                "{} captured from the WAL through slot {slot}",
                event_type.table
            );
        }
    }
    for table in &report.triggers {
        println!("trigger attached to {table}");
    }
    for trigger in &report.undeclared_triggers {
        println!(
            "warning: sync trigger {trigger} is declared by no event type here; \
             drop it once its jobs are done, unless another deployment uses it"
        );
    }
    Ok(())
}

/// What a backfill enqueues the rows of: a table by a key column, or an event type's table
/// (its jobs under its job name, when several event types take the table).
enum Backfilled {
    Table(String, String),
    Type(Box<EventType>),
}

/// The event type to backfill.
fn backfilled(config: &ConfigArgs, name: Option<&str>) -> anyhow::Result<EventType> {
    let mut types = config.select(name)?;
    match types.as_slice() {
        [_] => Ok(types.remove(0)),
        many => {
            let names: Vec<&str> = many.iter().map(|t| t.name.as_str()).collect();
            anyhow::bail!(
                "name the event type to backfill with --type (one of {})",
                names.join(", ")
            )
        }
    }
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
    for (table, jobs) in &summary.pending_by_table {
        println!("pending in {table}: {jobs}");
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
    let mut progress = cli::Progress::new("completed jobs", "deleted");
    let deleted = db
        .outbox()?
        .purge_completed(older_than, batch as usize, |done, total| {
            progress.update(done, total);
        })
        .await?;
    progress.finish();
    println!(
        "deleted {deleted} completed jobs older than {}",
        humantime::format_duration(older_than)
    );
    Ok(())
}

/// Backfills `target`, with (batch, restart, condition).
async fn backfill(
    db: &DatabaseArgs,
    target: &Backfilled,
    (batch, restart, condition): (i64, bool, Option<&str>),
) -> anyhow::Result<()> {
    let table = match target {
        Backfilled::Table(table, _) => table.as_str(),
        Backfilled::Type(event_type) => event_type.table.as_str(),
    };
    let mut progress = cli::Progress::new(table, "rows");
    let outbox = db.outbox()?;
    let step = |p: &benalsam_events::outbox::BackfillProgress| {
        progress.update(
            p.rows.unsigned_abs(),
            p.total.unsigned_abs().max(p.rows.unsigned_abs()),
        );
        true
    };
    let done = match target {
        Backfilled::Table(table, key) => {
            outbox
                .backfill(table, key, batch, restart, condition, step)
                .await
        }
        Backfilled::Type(event_type) => {
            outbox
                .backfill_type(event_type, batch, restart, condition, step)
                .await
        }
    }
    .with_context(|| format!("backfilling {table}"))?;
    progress.finish();
    let selected = condition.map_or(String::new(), |c| format!(" where {c}"));
    // What this run really enqueued; a run that continued an interrupted one says so.
    let earlier = done.rows - done.this_run;
    let continued = if earlier > 0 {
        format!(" (continuing an interrupted run that had enqueued {earlier})")
    } else {
        String::new()
    };
    println!(
        "{}{selected}: backfill complete, {} rows enqueued in this run{continued}",
        done.table, done.this_run
    );
    Ok(())
}

/// Deletes the failed jobs of `table`, which no configured event type may route.
async fn purge_failed(
    db: &DatabaseArgs,
    event_types: &[EventType],
    table: &str,
) -> anyhow::Result<()> {
    let schema = &db.schema;
    // The names the trigger records: bare in the outbox's schema, qualified elsewhere, and
    // `<table>#<relation>` for a relation's jobs.
    let bare = |name: &str| {
        name.strip_prefix(&format!("{schema}."))
            .unwrap_or(name)
            .to_owned()
    };
    let routed = event_types.iter().find(|t| {
        let own = bare(t.jobs_as.as_deref().unwrap_or(&t.table));
        own == bare(table)
            || relation_paths(&t.relations)
                .iter()
                .any(|path| format!("{own}#{path}") == bare(table))
    });
    if let Some(event_type) = routed {
        anyhow::bail!(
            "event type {} still routes {table}: its failed jobs can be retried (retry-failed); \
             remove it from the configuration first to purge them",
            event_type.name
        );
    }
    let deleted = db.outbox()?.purge_failed(&bare(table)).await?;
    println!("deleted {deleted} failed jobs of {table}");
    Ok(())
}

fn listed(ids: &[i64]) -> String {
    if ids.is_empty() {
        String::new()
    } else {
        format!(": {ids:?}")
    }
}

/// The paths of every relation of the tree (`seller`, `seller.city`): its jobs are
/// `<table>#<path>`.
fn relation_paths(relations: &[benalsam_events::event_type::Relation]) -> Vec<String> {
    let mut paths = Vec::new();
    for relation in relations {
        paths.push(relation.name.clone());
        for below in relation_paths(&relation.relations) {
            paths.push(format!("{}.{below}", relation.name));
        }
    }
    paths
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
        // The binary's publish window is the library's.
        let library = benalsam_events::PublisherConfig::default();
        assert_eq!(run.args.publish_window as usize, library.window);
        assert_eq!(run.args.publish_window_bytes as usize, library.window_bytes);
        assert!(run.args.adaptive_notify, "adaptive NOTIFY is on by default");
        for (value, adaptive) in [("false", false), ("off", false), ("true", true)] {
            let run = RunOnly::try_parse_from([
                "benalsam-bridge run",
                &format!("--adaptive-notify={value}"),
            ])
            .expect("a boolean");
            assert_eq!(run.args.adaptive_notify, adaptive, "{value}");
        }
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
