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
//! * [`migrate`]: the versioned SQL migrations of `db/` (listings, the queue, the trigger),
//!   applied once each and recorded in a table.
//! * [`config`]: validated connection settings whose `Display` never shows a password.
//! * [`redact`]: the one place that hides secrets in URLs before they reach a log.
//! * [`postgres`]: connecting to PostgreSQL with errors that say what went wrong.
//! * [`error`]: the library's error type.
//! * `cli` (feature `cli`): the flags and environment variables the binaries share.
//!
//! The job stream, the publisher, the consumer and the health and metrics pieces build on these.

#[cfg(feature = "cli")]
pub mod cli;
pub mod config;
pub mod error;
pub mod migrate;
pub mod postgres;
pub mod redact;

pub use error::{Error, Result};
