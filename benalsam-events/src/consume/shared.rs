//! What the stages share: the clients, the event types, the settings, the status and
//! metrics; and the outbox as the stages see it ([`Ledger`]), called until it answers.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use crate::consume::IndexerConfig;
use crate::consume::pace::{Answer, Pace};
use crate::consume::record::{IndexerEvent, IndexerRecorder};
use crate::ops::metrics::OfType;
use crate::outbox::{Outbox, Outcome, Recorded, Settle, Settled};
use crate::relations::Read;
use crate::search::SearchNodes;
use crate::{error::Result, event_type::EventType};

/// What the stages share: the clients, the settings, the status and metrics.
pub(crate) struct Shared {
    pub(crate) search: SearchNodes,
    pub(crate) ledger: Arc<dyn Ledger>,
    /// The event types, by table.
    pub(crate) event_types: HashMap<String, EventType>,
    /// The `event_type` label of each event type, by table.
    pub(crate) labels: HashMap<String, OfType>,
    /// The label of a delivery that names no configured event type.
    pub(crate) unknown: OfType,
    pub(crate) config: IndexerConfig,
    /// The live status and the metrics, written through [`Shared::record`].
    pub(crate) recorder: IndexerRecorder,
    pub(crate) shutdown: CancellationToken,
    /// The size of the next bulk requests, from the answers to the last ones.
    pub(crate) pace: Mutex<Pace>,
}

impl Shared {
    /// Records what happened: the status and the metrics follow.
    pub(crate) fn record(&self, event: IndexerEvent<'_>) {
        self.recorder.record(event);
    }

    /// The `event_type` label of the event type of `table` (`unknown` for none).
    pub(crate) fn label_of(&self, table: Option<&str>) -> &OfType {
        table
            .and_then(|table| self.labels.get(table))
            .unwrap_or(&self.unknown)
    }

    /// Adjusts the size of the next bulk requests to an answer.
    pub(crate) fn observe(&self, answer: Answer) {
        let size = {
            let mut pace = self.pace.lock().unwrap_or_else(PoisonError::into_inner);
            pace.observe(answer);
            pace.size()
        };
        self.record(IndexerEvent::BulkLimit(size));
    }

    pub(crate) fn bulk_limit(&self) -> usize {
        self.pace
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .size()
    }
}

/// The outbox as the indexer's stages use it: behind a pointer, so they can be tested with
/// a ledger of their own.
pub(crate) trait Ledger: Send + Sync + 'static {
    fn report<'a>(&'a self, reports: &'a [(i64, Outcome)]) -> BoxFuture<'a, Result<Settled>>;
    fn lookup<'a>(&'a self, jobs: &'a [i64]) -> BoxFuture<'a, Result<Vec<Recorded>>>;
    fn unsettled_before<'a>(&'a self, table: &'a str, job: i64) -> BoxFuture<'a, Result<i64>>;
    fn ping(&self) -> BoxFuture<'_, Result<()>>;
    /// The reindexes under way: (table, new index).
    fn reindexing(&self) -> BoxFuture<'_, Result<Vec<(String, String)>>>;
    fn read_joined<'a>(
        &'a self,
        event_type: &'a EventType,
        ids: &'a [String],
    ) -> BoxFuture<'a, Result<Read>>;
}

impl Ledger for Outbox {
    fn report<'a>(&'a self, reports: &'a [(i64, Outcome)]) -> BoxFuture<'a, Result<Settled>> {
        Box::pin(self.settle(reports))
    }

    fn lookup<'a>(&'a self, jobs: &'a [i64]) -> BoxFuture<'a, Result<Vec<Recorded>>> {
        Box::pin(Outbox::lookup(self, jobs))
    }

    fn unsettled_before<'a>(&'a self, table: &'a str, job: i64) -> BoxFuture<'a, Result<i64>> {
        Box::pin(Outbox::unsettled_before(self, table, job))
    }

    fn ping(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(Outbox::ping(self))
    }

    fn reindexing(&self) -> BoxFuture<'_, Result<Vec<(String, String)>>> {
        Box::pin(Outbox::reindexing(self))
    }

    fn read_joined<'a>(
        &'a self,
        event_type: &'a EventType,
        ids: &'a [String],
    ) -> BoxFuture<'a, Result<Read>> {
        Box::pin(crate::relations::read_joined(self, event_type, ids))
    }
}

/// Records that the outbox does not answer (since when, and why): the consumer's health
/// turns red until it answers again.
pub(crate) fn outbox_failing(shared: &Shared, error: &crate::error::Error) {
    shared.record(IndexerEvent::OutboxFailing(&error.to_string()));
}

/// Runs a call to the outbox until it answers, waiting out the backoff between attempts;
/// `None` if shutdown came first. While it fails, the status says since when (the consumer's
/// health turns red).
pub(crate) async fn retrying<T, F, Fut>(shared: &Shared, mut call: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut attempt = 0;
    loop {
        match call().await {
            Ok(value) => {
                shared.record(IndexerEvent::OutboxAnswers);
                return Some(value);
            }
            Err(error) => {
                outbox_failing(shared, &error);
                let wait = shared.config.reconnect.delay(attempt);
                attempt += 1;
                tracing::warn!(%error, retry_in = ?wait, "cannot reach the outbox; holding the acks");
                tokio::select! {
                    () = shared.shutdown.cancelled() => return None,
                    () = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}
