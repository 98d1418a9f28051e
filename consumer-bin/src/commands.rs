//! The command line of `benalsam-consumer`: `run` (the default), `reindex` and the
//! dead-letter tools.

use anyhow::Context;
use benalsam_cli::{
    self as cli, ConfigArgs, ConsumerArgs, DatabaseArgs, LogArgs, RabbitArgs, SearchArgs,
};
use std::time::Duration;

use benalsam_events::EventType;
use benalsam_events::consume::DeadLetterQueue;
use benalsam_events::consumer;
use benalsam_events::outbox::JobSelection;
use benalsam_events::relations::Verdict;
use benalsam_events::search::{self, SearchNodes};
use clap::{Parser, Subcommand};

/// Consumes the queues of the event types (elasticsearch.sync for the listings), writes
/// their documents to Elasticsearch with bulk requests and marks their jobs completed (or
/// failed) in PostgreSQL.
///
/// Without a subcommand it runs the consumer, with its settings from the environment.
#[derive(Debug, Parser)]
#[command(version)]
pub struct Cli {
    #[command(flatten)]
    database: DatabaseArgs,

    #[command(flatten)]
    rabbitmq: RabbitArgs,

    #[command(flatten)]
    search: SearchArgs,

    #[command(flatten)]
    config: ConfigArgs,

    #[command(flatten)]
    pub log: LogArgs,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the consumer (the default)
    Run(Box<ConsumerArgs>),
    /// Apply the database migrations, attach the trigger to the event types' tables, and exit
    Migrate,
    /// Inspect or replay a dead-letter queue
    #[command(subcommand)]
    Dlq(Dlq),
    /// Print the document a row becomes (with its relations), the index alias it goes to,
    /// and whether the status policy keeps it (or why the index would not hold it); reads
    /// the database only, writes nothing
    Document {
        /// The event type of the row (may be left out when there is only one)
        #[arg(long = "type")]
        event_type: Option<String>,
        /// The row's key (the event type's key column), e.g. 42
        key: String,
    },
    /// Build the next version of an event type's index from the database while the
    /// consumers keep indexing live changes into both, then move the alias to it and delete
    /// the old one (zero downtime). Needed when the consumer's start-up says so (a field's
    /// type or an analyzer changed). A rerun after a crash continues where it stopped. Run it
    /// as the outbox's owner (it enqueues every row), with consumers running.
    Reindex {
        /// The event type
        #[arg(long = "type")]
        event_type: String,
        /// Rows enqueued per transaction
        #[arg(long, default_value_t = 1000)]
        batch: i64,
    },
}

#[derive(Debug, Subcommand)]
enum Dlq {
    /// List dead-lettered messages with their reasons (they stay in the queue)
    List {
        #[command(flatten)]
        which: WhichDlq,
        /// Most messages to show
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Publish the jobs of dead-lettered messages again, then remove them from the DLQ: only
    /// jobs the outbox has as the message names them and not completed, built from the
    /// outbox's row, to the exchange and routing key of their event type
    Replay {
        #[command(flatten)]
        which: WhichDlq,
        /// Replay the messages of these jobs only
        #[arg(long = "job", required_unless_present = "all")]
        jobs: Vec<i64>,
        /// Replay every message
        #[arg(long, conflicts_with = "jobs")]
        all: bool,
    },
}

/// Which dead-letter queue: an event type's, or one named.
#[derive(Debug, clap::Args)]
struct WhichDlq {
    /// The dead-letter queue of this event type (may be left out when there is only one)
    #[arg(long = "type")]
    event_type: Option<String>,
    /// A dead-letter queue by name
    #[arg(long, conflicts_with = "event_type")]
    queue: Option<String>,
}

impl WhichDlq {
    fn queue(&self, config: &ConfigArgs) -> anyhow::Result<String> {
        if let Some(queue) = &self.queue {
            return Ok(queue.clone());
        }
        let types = config.select(self.event_type.as_deref())?;
        match types.as_slice() {
            [one] => Ok(one.dead_letter_queue.clone()),
            many => {
                let names: Vec<&str> = many.iter().map(|t| t.name.as_str()).collect();
                anyhow::bail!(
                    "name the event type with --type (one of {}) or the queue with --queue",
                    names.join(", ")
                )
            }
        }
    }
}

/// `run` with its settings from the environment only: what runs without a subcommand.
#[derive(Debug, Parser)]
struct RunOnly {
    #[command(flatten)]
    args: ConsumerArgs,
}

impl Cli {
    /// Runs the chosen command.
    pub async fn run(self) -> anyhow::Result<()> {
        let rabbit = &self.rabbitmq.rabbitmq_url;
        match self.command {
            None => {
                let args = RunOnly::parse_from(["benalsam-consumer run"]).args;
                self.serve(&args).await
            }
            Some(Command::Run(ref args)) => self.serve(args).await,
            Some(Command::Migrate) => {
                let event_types = self.config.event_types()?;
                let report = self
                    .database
                    .migrate(&event_types)
                    .await
                    .context("migrating")?;
                println!(
                    "applied {:?}, already applied {:?}, trigger on {:?}",
                    report.applied, report.already_applied, report.triggers
                );
                Ok(())
            }
            Some(Command::Document {
                ref event_type,
                ref key,
            }) => {
                let types = self.run_event_types(event_type.as_deref())?;
                document(&self.database, types, key).await
            }
            Some(Command::Reindex {
                ref event_type,
                batch,
            }) => self.reindex(event_type, batch).await,
            Some(Command::Dlq(Dlq::List { ref which, limit })) => {
                let queue = &which.queue(&self.config)?;
                let letters = DeadLetterQueue::new(rabbit.clone(), queue)
                    .list(limit)
                    .await
                    .with_context(|| format!("listing {queue}"))?;
                if letters.is_empty() {
                    println!("the DLQ {queue} is empty");
                }
                for letter in letters {
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
            Some(Command::Dlq(Dlq::Replay {
                ref which,
                ref jobs,
                all,
            })) => {
                let queue = &which.queue(&self.config)?;
                let selection = if all {
                    JobSelection::All
                } else {
                    JobSelection::Jobs(jobs.clone())
                };
                // Where a job goes and what it holds come from the configuration and the
                // outbox, never from the dead letter (anyone who may dead-letter could have
                // written it).
                let event_types = self.config.event_types()?;
                let outbox = self.database.outbox()?;
                let mut progress = cli::Progress::new(queue, "messages");
                let report = DeadLetterQueue::new(rabbit.clone(), queue)
                    .replay(&outbox, &event_types, &selection, |done, total| {
                        progress.update(done, total);
                    })
                    .await
                    .with_context(|| format!("replaying {queue}"))?;
                progress.finish();
                println!(
                    "replayed {}, kept {}, refused {}",
                    report.replayed,
                    report.kept,
                    report.refused.len()
                );
                for refused in &report.refused {
                    println!(
                        "refused job {} (left in the DLQ): {}",
                        refused.job_id.map_or("-".to_owned(), |id| id.to_string()),
                        refused.reason
                    );
                }
                let mut problems = Vec::new();
                if !report.missing.is_empty() {
                    let ids: Vec<String> = report.missing.iter().map(i64::to_string).collect();
                    problems.push(format!(
                        "no dead letter of job {} is in {queue} (see `dlq list`)",
                        ids.join(", ")
                    ));
                }
                if !report.refused.is_empty() {
                    problems.push(format!(
                        "{} dead letters were refused and left in {queue}, for the reasons above",
                        report.refused.len()
                    ));
                }
                if all && report.replayed == 0 && report.refused.is_empty() {
                    problems.push(format!("there is nothing to replay: {queue} is empty"));
                }
                if !problems.is_empty() {
                    anyhow::bail!(problems.join("; "));
                }
                Ok(())
            }
        }
    }

    /// The event types as `run` has them: the file's, or the built-in listings with the
    /// run's settings from the environment (`BENALSAM_INDEX`, `BENALSAM_SEARCHABLE_STATUSES`,
    /// …), so `document` and `reindex` see the index and the status policy the consumer
    /// uses (they saw the default alias before, and `reindex` refused or aimed elsewhere).
    fn run_event_types(&self, name: Option<&str>) -> anyhow::Result<Vec<EventType>> {
        let run = RunOnly::try_parse_from(["benalsam-consumer run"])
            .context("reading the consumer's settings from the environment")?;
        Ok(benalsam_cli::select(
            run.args.event_types(&self.config)?,
            name,
        )?)
    }

    async fn reindex(&self, name: &str, batch: i64) -> anyhow::Result<()> {
        let event_type = self
            .run_event_types(Some(name))?
            .into_iter()
            .next()
            .with_context(|| format!("no event type {name}"))?;
        let outbox = self.database.outbox()?;
        let search = SearchNodes::new(&self.search.search_url(), Duration::from_secs(60))?;
        let outcome = search::reindex(&outbox, &search, &event_type, batch, |line| {
            eprintln!("{line}");
        })
        .await
        .with_context(|| format!("reindexing {name} (a rerun continues where this one stopped)"))?;
        println!(
            "reindex of {name} complete: {} now points at {} ({} rows enqueued{}), {} deleted",
            outcome.alias,
            outcome.new_index,
            outcome.rows_enqueued,
            outcome
                .resumed_from
                .map(|p| format!(", resumed from phase {p}"))
                .unwrap_or_default(),
            outcome.old_index
        );
        Ok(())
    }

    async fn serve(&self, args: &ConsumerArgs) -> anyhow::Result<()> {
        let settings = args
            .settings(&self.database, &self.rabbitmq, &self.search, &self.config)
            .context("reading the event types")?;
        tracing::info!(
            database = %self.database.database_url,
            rabbitmq = %self.rabbitmq.rabbitmq_url,
            elasticsearch = %self.search.elasticsearch_url,
            queue_type = %settings.queue_type,
            "starting"
        );
        consumer::run(settings, cli::shutdown_on_signals())
            .await
            .context("running the consumer")
    }
}

/// Prints what the row `key` of the event type `name` becomes in the index.
async fn document(db: &DatabaseArgs, types: Vec<EventType>, key: &str) -> anyhow::Result<()> {
    let event_type = match types.as_slice() {
        [one] => one,
        many => {
            let names: Vec<&str> = many.iter().map(|t| t.name.as_str()).collect();
            anyhow::bail!(
                "name the event type with --type (one of {})",
                names.join(", ")
            )
        }
    };
    let preview = db
        .outbox()?
        .document(event_type, key)
        .await
        .with_context(|| format!("reading {} {key:?}", event_type.name))?;
    println!(
        "event type {}: table {}, {} = {key:?}",
        event_type.name, event_type.table, event_type.key
    );
    println!(
        "index: {} (alias), document id {:?}",
        preview.alias, preview.id
    );
    match preview.verdict {
        Verdict::Kept { document, why } => {
            println!("kept: {why}");
            println!("document (job_id {}):", preview.version);
            println!("{document:#}");
            Ok(())
        }
        Verdict::Deleted(why) => {
            println!("not in the index (a change of it deletes the document): {why}");
            Ok(())
        }
        Verdict::Refused(why) => {
            anyhow::bail!("the row cannot become a document; its jobs are dead-lettered: {why}")
        }
        _ => anyhow::bail!("this build does not know what the consumer does with the row"),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_consistent_and_its_defaults_parse() {
        Cli::command().debug_assert();
        let run = RunOnly::try_parse_from(["benalsam-consumer run"]).expect("defaults parse");
        assert_eq!(run.args.searchable_statuses, None);
        // The binary's defaults are the library's.
        let library = benalsam_events::IndexerConfig::default();
        assert_eq!(run.args.bulk_size as usize, library.batch_size);
        assert_eq!(run.args.prefetch, library.prefetch);
        assert_eq!(run.args.bulk_in_flight as usize, library.in_flight);
        assert_eq!(run.args.bulk_target, library.bulk_target);
        let run = RunOnly::try_parse_from([
            "benalsam-consumer run",
            "--searchable-statuses",
            "active,featured",
        ])
        .expect("a list parses");
        assert_eq!(
            run.args.searchable_statuses,
            Some(vec!["active".to_owned(), "featured".to_owned()])
        );
    }
}
