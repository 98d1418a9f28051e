//! Consuming change messages into Elasticsearch (or OpenSearch).
//!
//! The [`Indexer`] runs one delivery through a chain of stages, one file each, every file
//! holding both the stage's decision and its calls:
//!
//! | stage | does |
//! |---|---|
//! | source | consumes the queues, decodes each delivery into an [`Envelope`](crate::publish::Envelope), reconnects |
//! | admit | a delivery becomes a message of the batch being filled, its rows dropped |
//! | batch | gathers messages by count, bytes and linger ([`pace`](self) sizes the count) |
//! | verify | checks every delivery against the outbox: the wire is not trusted |
//! | build | a verified change becomes an [`Action`](crate::event_type::Action), from the outbox's copy of its row |
//! | join | the documents of joined event types, read from the database |
//! | write | one `_bulk` request, every item decided once ([`search`](crate::search) speaks the engine's dialect) |
//! | truncate | a `TRUNCATE` empties its index of everything older |
//! | settle | reports outcomes to the outbox, publishes dead letters, then acks |
//!
//! `process` chains verify → settle for one batch; `run` is the loop around it: intake,
//! up to `in_flight` batches at once, retries after their backoff, and the circuit that
//! holds everything back while the cluster as a whole is down.
//!
//! A [`DeadLetterQueue`] gives the operator's tools for a dead-letter queue: list its
//! messages with their reasons, replay them.

#[cfg(feature = "consumer")]
mod admit;
#[cfg(feature = "consumer")]
mod batch;
#[cfg(feature = "consumer")]
mod build;
#[cfg(feature = "consumer")]
mod circuit;
mod dead_letter;
#[cfg(feature = "consumer")]
mod indexer;
#[cfg(feature = "consumer")]
mod join;
#[cfg(feature = "consumer")]
mod message;
#[cfg(feature = "consumer")]
mod metrics;
#[cfg(feature = "consumer")]
mod pace;
#[cfg(feature = "consumer")]
mod process;
#[cfg(feature = "consumer")]
mod record;
#[cfg(feature = "consumer")]
mod run;
#[cfg(feature = "consumer")]
mod settle;
#[cfg(feature = "consumer")]
mod shared;
#[cfg(feature = "consumer")]
mod sorted;
#[cfg(feature = "consumer")]
mod source;
#[cfg(feature = "consumer")]
mod status;
#[cfg(feature = "consumer")]
mod truncate;
mod verify;
mod why;
#[cfg(feature = "consumer")]
mod write;

pub use dead_letter::{DeadLetter, DeadLetterQueue, RefusedLetter, ReplayReport};
#[cfg(feature = "consumer")]
pub use indexer::{Indexer, IndexerConfig};
#[cfg(feature = "consumer")]
pub use status::IndexerStatus;
