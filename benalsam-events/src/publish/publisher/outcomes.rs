//! What became of each published job: confirms judged, outcomes gathered and reported to
//! the outbox in batches (retried while it is away), and given back when the broker never
//! returns.

use std::time::{Duration, Instant};

use lapin::Confirmation;

use crate::error::Error;
use crate::outbox::{Outcome, Settle};
use crate::publish::confirm::{self, Refusal, Verdict};
use crate::publish::publisher::{InFlight, NACKED_CHANNEL, Outgoing, Worker};
use crate::publish::record::PublisherEvent;

impl<S: Settle> Worker<S> {
    pub(super) async fn confirmed(&mut self, seq: u64, answer: &lapin::Result<Confirmation>) {
        // Gone if the link was reset meanwhile: the job is queued to be published again.
        let Some(InFlight {
            id,
            message,
            published_at,
        }) = self.unconfirmed.remove(&seq)
        else {
            return;
        };
        self.unconfirmed_bytes -= message.body.len();
        self.recorder.record(PublisherEvent::Confirmed {
            took: published_at.elapsed(),
            unconfirmed: self.unconfirmed.len(),
        });
        match confirm::judge(answer) {
            Verdict::Sent => {
                self.nacked_since = None;
                self.gather(id, Outcome::Sent);
            }
            Verdict::Refused {
                kind,
                reason,
                closes_link,
            } => {
                self.fail(kind, id, reason.clone(), true);
                let nacked_long = kind == Refusal::Nack
                    && self.nacked_since.get_or_insert_with(Instant::now).elapsed()
                        >= NACKED_CHANNEL;
                if closes_link {
                    self.link_lost(Error::broker(reason));
                } else if nacked_long {
                    self.link_lost(Error::broker(format!(
                        "every publish nacked for {} s; opening a new channel",
                        NACKED_CHANNEL.as_secs()
                    )));
                } else if kind == Refusal::Unroutable {
                    self.repair().await;
                }
            }
            Verdict::Unknown(reason) => {
                self.queue.push_front(Outgoing::Again { id, message });
                self.link_lost(Error::broker(reason));
            }
        }
    }

    pub(super) fn gather(&mut self, id: i64, outcome: Outcome) {
        self.reports.push((id, outcome));
        self.reports_due
            .get_or_insert(Instant::now() + self.config.report_interval);
    }

    pub(super) fn fail(&mut self, kind: Refusal, id: i64, error: String, retry: bool) {
        tracing::warn!(job = id, %error, retry, "publish failed");
        self.recorder.record(PublisherEvent::Refused {
            kind,
            error: &error,
        });
        self.gather(id, Outcome::Failed { error, retry });
    }

    /// Gives jobs that could not be published back to `pending`, for the next bridge.
    pub(super) async fn abandon(&mut self) {
        let reports: Vec<(i64, Outcome)> = self
            .queue
            .drain(..)
            .map(|o| (o.id(), Outcome::Released))
            .collect();
        match self.settle.settle(&reports).await {
            Ok(settled) => tracing::warn!(
                released = settled.changed.len(),
                "closing without RabbitMQ: gave unpublished jobs back"
            ),
            Err(error) => tracing::warn!(
                %error,
                count = reports.len(),
                "closing without RabbitMQ or PostgreSQL: unpublished jobs return when their lease expires"
            ),
        }
    }

    /// Reports gathered outcomes; what cannot be reported now is kept for the next try.
    pub(super) async fn report(&mut self) -> bool {
        if self.reports.is_empty() {
            self.reports_due = None;
            return true;
        }
        match self.settle.settle(&self.reports).await {
            Ok(settled) => {
                if !settled.unchanged.is_empty() {
                    tracing::debug!(jobs = ?settled.unchanged, "reported jobs had moved on (completed, or failed by a consumer)");
                }
                let sent = self
                    .reports
                    .iter()
                    .filter(|(_, o)| *o == Outcome::Sent)
                    .count() as u64;
                let failed = self.reports.len() as u64 - sent;
                self.recorder
                    .record(PublisherEvent::Reported { sent, failed });
                self.reports.clear();
                self.reports_due = None;
                true
            }
            Err(error) => {
                self.recorder.record(PublisherEvent::Error(&error));
                tracing::warn!(%error, "cannot report publish outcomes; will retry");
                let wait = self
                    .config
                    .reconnect
                    .delay(0)
                    .max(self.config.report_interval);
                self.reports_due = Some(Instant::now() + wait);
                false
            }
        }
    }

    /// At close: keep trying to report outcomes for a while. Whatever cannot be reported is
    /// found again when its lease expires (and published again, with the same messageId).
    pub(super) async fn drain_reports(&mut self) {
        const PATIENCE: Duration = Duration::from_secs(30);
        let deadline = Instant::now() + PATIENCE;
        let mut attempt = 0;
        while !self.report().await {
            if Instant::now() >= deadline {
                tracing::error!(
                    outcomes = self.reports.len(),
                    "giving up reporting outcomes at shutdown; those jobs are published again after their lease"
                );
                return;
            }
            tokio::time::sleep(self.config.reconnect.delay(attempt)).await;
            attempt += 1;
        }
    }
}
