//! Indexing: consuming change messages into Elasticsearch (or OpenSearch).
//!
//! The [`Indexer`] is a composition of small stages, each with one job:
//!
//! | stage | does |
//! |---|---|
//! | source | consumes the queues, decodes each delivery into an [`Envelope`](crate::publish::Envelope), reconnects |
//! | documents | turns an envelope into an [`Action`] on the index (its event type's [`DocumentSpec`](crate::event_type::DocumentSpec), or a [`DocumentBuilder`]) |
//! | batch | gathers actions by count, bytes and linger |
//! | pace | sizes the next bulk requests from the engine's answer times and busy refusals |
//! | verify | checks every delivery against the outbox: the wire is not trusted |
//! | writer | encodes a `_bulk` request and sends it (HTTP only) |
//! | nodes | sends every request to the search node in use, moving to the next when one fails ([`SearchNodes`]) |
//! | plan | reads the typed answer and decides each item once: done, retry or dead (pure) |
//! | settle | reports outcomes to the outbox, publishes dead letters, then acks |
//! | circuit | holds everything back while the cluster as a whole is down |
//!
//! [`ensure_index`] creates an index behind its alias with the mapping it needs (and the
//! delete protection every index gets); a [`DeadLetterQueue`] gives the operator's tools
//! for one: list its messages with their reasons, replay them.

#[cfg(feature = "consumer")]
mod analysis;
#[cfg(feature = "consumer")]
mod batch;
#[cfg(feature = "consumer")]
mod circuit;
mod dead_letter;
mod documents;
#[cfg(feature = "consumer")]
mod indexer;
#[cfg(feature = "consumer")]
mod nodes;
#[cfg(feature = "consumer")]
mod pace;
#[cfg(feature = "consumer")]
mod plan;
#[cfg(feature = "consumer")]
pub(crate) mod search;
#[cfg(feature = "consumer")]
mod settle;
#[cfg(feature = "consumer")]
mod source;
#[cfg(feature = "consumer")]
mod truncate;
mod verify;
#[cfg(feature = "consumer")]
mod writer;

pub use dead_letter::{DeadLetter, DeadLetterQueue, RefusedLetter, ReplayReport};
pub use documents::{Action, BuildError, DocumentBuilder};
#[cfg(feature = "consumer")]
pub use indexer::{Indexer, IndexerConfig, IndexerStatus};
#[cfg(feature = "consumer")]
pub use nodes::SearchNodes;
#[cfg(feature = "consumer")]
pub use search::{client, ensure_index};
