//! Carry PostgreSQL row changes through RabbitMQ into Elasticsearch.
//!
//! An application writes its tables as usual; the trigger `add_to_sync_queue()` records every
//! change as a job in the outbox table `elasticsearch_sync_queue` in the same transaction and
//! wakes listeners with `NOTIFY`. The bridge turns those jobs into RabbitMQ messages; the
//! consumer turns the messages into Elasticsearch bulk calls. Each job moves
//! `pending → processing → sent → completed` (or `failed`, with its error).
//!
//! # Layout
//!
//! * [`job`]: a [`Job`] (one recorded change) and its [`JobStatus`].
//! * [`outbox`]: the queue table: claiming with a lease, and the batched moves between
//!   states (sent, completed, failed with retry), retention.
//! * [`job_stream`]: [`JobStream`], the outbox as a `Stream` of claimed batches, woken by
//!   LISTEN/NOTIFY and by polling, surviving lost connections (`listener` holds the LISTEN
//!   side).
//! * [`routing`]: event types (table → exchange and routing keys).
//! * [`envelope`]: the versioned JSON body of every message and its AMQP properties.
//! * [`topology`]: exchanges, queues, bindings and dead-lettering, declared once and
//!   exported as a RabbitMQ definitions file.
//! * [`publisher`]: [`Publisher`], a `Sink` of jobs into RabbitMQ with publisher confirms,
//!   marking them `sent` only once confirmed.
//! * [`indexer`]: [`Indexer`], consuming `elasticsearch.sync` into bulk requests, with a
//!   circuit breaker ([`circuit`]) and dead-lettering ([`dead_letter`], also the DLQ tools).
//! * [`document`]: search documents built from change messages; [`search`]: the client and
//!   the listings index (mapping, alias, bootstrap); [`bulk`]: `_bulk` encoding and answers;
//!   [`outcome`]: the pure classifier of bulk item answers.
//! * [`consumer`]: the consumer's health verdicts.
//! * [`metrics`]: the Prometheus registry every component records into; [`telemetry`]: log
//!   output and OpenTelemetry traces across the three hops.
//! * [`bridge`]: the bridge's health verdicts and the resender of sent-but-never-completed
//!   jobs.
//! * [`health`]: health answers and the HTTP server for them; [`heartbeat`]: periodic
//!   heartbeat events on `benalsam.system`.
//! * [`amqp`]: connecting to RabbitMQ.
//! * [`backoff`]: exponential backoff with jitter; [`status`]: the shared status cell that
//!   health checks and metrics read.
//! * [`admin`]: operating the outbox: status summary, retrying failed jobs, backfilling.
//! * [`migrate`]: the versioned SQL migrations of `db/` (listings, the queue, the trigger),
//!   applied once each and recorded in a table.
//! * [`config`]: validated connection settings whose `Display` never shows a password.
//! * [`redact`]: the one place that hides secrets in URLs before they reach a log.
//! * [`postgres`]: connecting to PostgreSQL with errors that say what went wrong.
//! * [`error`]: the library's error type.
//! * `cli` (feature `cli`): the flags and environment variables the binaries share.
//!
//! The publisher, the consumer and the health and metrics pieces build on these.
//!
//! # Quick start: the outbox as a stream
//!
//! ```no_run
//! use benalsam_events::{JobStream, JobStreamConfig, Outbox, OutboxConfig};
//! use futures::StreamExt;
//! use tokio_util::sync::CancellationToken;
//!
//! # async fn run() -> Result<(), benalsam_events::Error> {
//! let url = "postgres://benalsam:benalsam@127.0.0.1:5432/benalsam".parse()?;
//! let outbox = Outbox::new(url, OutboxConfig::default())?;
//! let shutdown = CancellationToken::new();
//! let mut jobs = JobStream::new(outbox.clone(), JobStreamConfig::default(), shutdown.clone())?;
//! while let Some(batch) = jobs.next().await {
//!     let ids: Vec<i64> = batch.iter().map(|job| job.id).collect();
//!     // ... deliver the batch somewhere, then record it:
//!     outbox.mark_sent(&ids).await?;
//! }
//! # Ok(())
//! # }
//! ```

pub mod admin;
pub mod amqp;
pub mod backoff;
pub mod bridge;
pub mod bulk;
pub mod circuit;
#[cfg(feature = "cli")]
pub mod cli;
pub mod config;
pub mod consumer;
pub mod dead_letter;
pub mod document;
pub mod envelope;
pub mod error;
pub mod health;
pub mod heartbeat;
pub mod indexer;
pub mod job;
pub mod job_stream;
mod listener;
pub mod metrics;
pub mod migrate;
pub mod outbox;
pub mod outcome;
pub mod postgres;
pub mod publisher;
pub mod redact;
pub mod routing;
pub mod search;
pub mod status;
pub mod telemetry;
pub mod topology;

// The clients whose types appear in this API, so users need not match versions by hand.
pub use elasticsearch;
pub use lapin;
pub use tokio_postgres;

pub use error::{Error, Result};
pub use indexer::{Indexer, IndexerConfig};
pub use job::{Job, JobStatus, Operation};
pub use job_stream::{JobStream, JobStreamConfig, Wake};
pub use outbox::{Failure, Outbox, OutboxConfig, RetryPolicy};
pub use publisher::{Publisher, PublisherConfig};
