//! Indexing: consuming change messages into Elasticsearch (or OpenSearch).
//!
//! The [`Indexer`] is a composition of small stages, each with one job:
//!
//! | stage | does |
//! |---|---|
//! | source | consumes the queues, decodes each delivery into an [`Envelope`](crate::publish::Envelope), reconnects |
//! | documents | turns an envelope into an [`Action`] on the index (its event type's [`DocumentSpec`](crate::event_type::DocumentSpec), or a [`DocumentBuilder`]) |
//! | batch | gathers actions by count, bytes and linger |
//! | verify | checks every delivery against the outbox: the wire is not trusted |
//! | writer | encodes a `_bulk` request and sends it (HTTP only) |
//! | plan | reads the typed answer and decides each item once: done, retry or dead (pure) |
//! | settle | reports outcomes to the outbox, publishes dead letters, then acks |
//! | circuit | holds everything back while the cluster as a whole is down |
//!
//! [`ensure_index`] creates an index behind its alias with the mapping it needs (and the
//! delete protection every index gets); a [`DeadLetterQueue`] gives the operator's tools
//! for one: list its messages with their reasons, replay them.

mod batch;
mod circuit;
mod dead_letter;
mod documents;
mod indexer;
mod plan;
mod search;
mod settle;
mod source;
mod truncate;
mod verify;
mod writer;

pub use dead_letter::{DeadLetter, DeadLetterQueue, ReplayReport};
pub use documents::{Action, BuildError, DocumentBuilder};
pub use indexer::{Indexer, IndexerConfig, IndexerStatus};
pub use search::{client, ensure_index};
