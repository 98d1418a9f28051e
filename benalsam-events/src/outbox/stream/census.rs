//! The job stream's census: the backlog, counted on a timer of its own.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::error::Result;
use crate::outbox::Outbox;
use crate::outbox::stream::record::{StreamEvent, StreamRecorder};

/// Counts the backlog on a timer of its own, every poll interval until shutdown.
///
/// Not in the claimer's loop: that loop runs only while someone pulls batches, and a
/// publisher waiting for its broker pulls none. Counted there, the figures froze at the last
/// count for the whole outage (one pending job while thousands waited), and the backlog alert
/// could not fire during the very outage it is meant for. The database answers whatever the
/// broker does.
pub(super) struct Census {
    pub(super) outbox: Outbox,
    pub(super) recorder: StreamRecorder,
    pub(super) every: Duration,
}

impl Census {
    pub(super) fn spawn(self, shutdown: CancellationToken) -> CensusTask {
        CensusTask(tokio::spawn(async move {
            loop {
                if let Err(error) = self.count().await {
                    // The claimer reports the outage (health, metrics, a warning); this only
                    // keeps the last figures until the database answers again.
                    tracing::debug!(%error, "cannot count the backlog");
                }
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(self.every) => {}
                }
            }
        }))
    }

    async fn count(&self) -> Result<()> {
        let backlog = self.outbox.backlog().await?;
        let by_table = self.outbox.pending_by_table().await?;
        self.recorder
            .record(StreamEvent::Counted { backlog, by_table });
        Ok(())
    }
}

/// The census task, stopped with its stream.
pub(super) struct CensusTask(tokio::task::JoinHandle<()>);

impl Drop for CensusTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}
