//! What an indexer has been doing, as its health answer shows it. Written only by the
//! indexer's record (`record.rs`).

use std::time::{Duration, SystemTime};

use crate::ops::CountsErrors;

/// What an indexer has been doing, for health checks.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct IndexerStatus {
    /// Whether it holds a consuming channel.
    pub connected: bool,
    /// The broker address in use (redacted), or last used while disconnected.
    pub broker: Option<String>,
    /// The search node in use (redacted): the one requests go to, or went to last. `None`
    /// for a client given without its address.
    pub search_node: Option<String>,
    /// Since when the circuit breaker holds requests back (`None` while it is closed).
    pub circuit_open_since: Option<SystemTime>,
    /// Consecutive failures of the cluster as a whole (0 while the circuit is closed).
    pub circuit_failures: u32,
    /// Messages received.
    pub received: u64,
    /// Documents written.
    pub indexed: u64,
    /// Documents deleted (or already absent).
    pub deleted: u64,
    /// Changes refused as older than the index's (duplicates, reordering).
    pub superseded: u64,
    /// Messages dead-lettered.
    pub dead_lettered: u64,
    /// Item attempts repeated after a busy answer.
    pub retried: u64,
    /// Messages acked (their outcome recorded).
    pub acked: u64,
    /// When a message was last acked.
    pub last_ack_at: Option<SystemTime>,
    /// Bulk requests sent.
    pub bulk_requests: u64,
    /// When the last bulk request answered.
    pub last_bulk_at: Option<SystemTime>,
    /// Its actions.
    pub last_bulk_items: usize,
    /// Its duration.
    pub last_bulk_duration: Option<Duration>,
    /// Actions the next bulk request may carry: `batch_size` while the engine answers
    /// quickly, fewer while it is slow or busy.
    pub bulk_limit: usize,
    /// Messages waiting in the consumed queues, when last looked (every few seconds).
    pub queue_depth: Option<u32>,
    /// Messages in their dead-letter queues.
    pub dlq_depth: Option<u32>,
    /// Deliveries refused because the outbox does not know their job as they tell it.
    pub unverified: u64,
    /// Joined documents read from the database (every change of a joined event type).
    pub joined_reads: u64,
    /// Since when outcomes cannot be recorded in PostgreSQL, and why (`None` while they can).
    pub outbox_failing: Option<(SystemTime, String)>,
    /// Changes of the event type files the live indexes cannot take in place
    /// (`<event type>: <change>`), found at start: each needs `reindex --type <event type>`.
    /// Indexing goes on with the live mapping meanwhile.
    pub reindex_needed: Vec<String>,
    /// Errors: lost connections, failed bulk requests, failed reports.
    pub errors: u64,
    /// The last of those errors, and when.
    pub last_error: Option<(SystemTime, String)>,
}

impl CountsErrors for IndexerStatus {
    fn error_fields(&mut self) -> (&mut u64, &mut Option<(SystemTime, String)>) {
        (&mut self.errors, &mut self.last_error)
    }
}
