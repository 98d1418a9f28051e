//! The resender: jobs the broker confirmed that never completed go back to `pending`.

use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;
use tokio_util::sync::CancellationToken;

use super::Outbox;
use crate::config::require_positive;
use crate::error::Result;
use crate::ops::events::{Event, Recorder};
use crate::ops::{Live, Metrics};

/// What the resender has done.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ResenderStatus {
    /// Jobs sent again in all.
    pub(crate) resent: u64,
    /// When it last found jobs to send again, and how many.
    pub(crate) last_resend: Option<(SystemTime, usize)>,
}

/// What the resender reports: jobs sent again, counted in its status and its metric at once.
struct Resent(usize);

impl Event for Resent {
    type Status = ResenderStatus;
    type Metrics = Counter;

    fn apply(self, s: &mut ResenderStatus, resent: &Counter) {
        resent.inc_by(self.0 as u64);
        s.resent += self.0 as u64;
        s.last_resend = Some((SystemTime::now(), self.0));
    }
}

/// Sends again jobs that were confirmed by the broker and never completed (a message lost
/// inside the broker, a queue purged by hand): they go back to `pending`.
#[derive(Debug)]
pub(crate) struct Resender {
    outbox: Outbox,
    after: Duration,
    recorder: Recorder<ResenderStatus, Counter>,
}

impl Resender {
    /// A resender of jobs sent more than `after` ago (which must be longer than zero).
    pub(crate) fn new(outbox: Outbox, after: Duration) -> Result<Self> {
        require_positive("BridgeSettings::resend_after", after)?;
        Ok(Self {
            outbox,
            after,
            recorder: Recorder::default(),
        })
    }

    /// Counts resent jobs in `metrics` (`benalsam_jobs_resent_total`).
    pub(crate) fn with_metrics(self, metrics: &Metrics) -> Self {
        metrics.register(
            "jobs_resent",
            "Sent jobs that never completed, sent again",
            None,
            self.recorder.metrics().clone(),
        );
        self
    }

    /// The live status, for health checks.
    pub(crate) fn status(&self) -> Live<ResenderStatus> {
        self.recorder.status().clone()
    }

    /// Looks every quarter of `after` (between 1 s and 1 min) until `shutdown`.
    pub(crate) async fn run(self, shutdown: CancellationToken) {
        const BATCH: usize = 1000;
        let every = (self.after / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
            match self.outbox.resend_stale_sent(self.after, BATCH).await {
                Ok(ids) if !ids.is_empty() => {
                    self.recorder.record(Resent(ids.len()));
                    tracing::warn!(
                        count = ids.len(),
                        first = ids.first(),
                        after = ?self.after,
                        "sending again jobs that were sent but never completed"
                    );
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "resender cannot reach the outbox"),
            }
        }
    }
}
