//! Everything that speaks the search engine's dialect (Elasticsearch, OpenSearch): the
//! client and its nodes, the `_bulk` request and its typed answer, the index's mapping, and
//! the queries that empty an index after a `TRUNCATE`. The consumer's stages call into this
//! folder and never build engine JSON themselves, so a second engine is this folder's work.
//!
//! | file | holds |
//! |---|---|
//! | client | a client per URL, one request to one node |
//! | index | [`EventType::ensure_index`](crate::event_type::EventType::ensure_index), [`EventType::prepare_index`](crate::event_type::EventType::prepare_index): an index behind its alias, its mapping evolved at start |
//! | evolve | what separates the wanted mapping and analysis from the live ones: added in place, or a reindex (pure) |
//! | reindex | [`reindex`]: the next index version built from the database under live writes, then the alias moved |
//! | nodes | [`SearchNodes`]: every request to the node in use, the next one when it fails |
//! | bulk | encodes a `_bulk` request and sends it |
//! | plan | reads the bulk answer and decides each item once: done, retry or dead (pure) |
//! | analysis | which analysis a mapping needs, and the error naming the missing module when the engine lacks it |
//! | mapping | an event type's index settings and mapping |
//! | delete | deletes the documents older than a truncation |

#[cfg(feature = "consumer")]
mod analysis;
#[cfg(feature = "consumer")]
pub(crate) mod bulk;
#[cfg(feature = "consumer")]
mod client;
#[cfg(feature = "consumer")]
pub(crate) mod delete;
#[cfg(feature = "consumer")]
mod evolve;
#[cfg(feature = "consumer")]
mod index;
mod mapping;
#[cfg(feature = "consumer")]
mod nodes;
#[cfg(feature = "consumer")]
pub(crate) mod plan;
#[cfg(feature = "consumer")]
mod reindex;

#[cfg(feature = "consumer")]
pub(crate) use client::client;
#[cfg(feature = "consumer")]
pub(crate) use client::parse_answer;
#[cfg(feature = "consumer")]
pub use index::IndexReport;
#[cfg(feature = "consumer")]
pub(crate) use index::{create_index, ensure_index_on};
#[cfg(feature = "consumer")]
pub use nodes::SearchNodes;
#[cfg(feature = "consumer")]
pub use reindex::{ReindexOutcome, reindex};
