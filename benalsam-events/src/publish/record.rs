//! The publisher's record: its live status ([`PublisherStatus`], part of the bridge's health
//! answer), the events it reports, and what each does to the status and to the metrics —
//! the only place that writes either.

use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Unit;

use crate::ops::CountsErrors;
use crate::ops::events::{Event, Recorder, count_error};
use crate::ops::metrics::{Kind, Metrics, inc, latency, observe, precreate};
use crate::publish::confirm::Refusal;

/// What a publisher has been doing, for health checks.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct PublisherStatus {
    /// Whether it holds an open connection and channel.
    pub connected: bool,
    /// Messages handed to the broker (republications included).
    pub published: u64,
    /// Jobs confirmed and reported sent.
    pub confirmed: u64,
    /// Jobs nacked, returned as unroutable, or refused by the channel: reported failed.
    pub failed: u64,
    /// Messages published again because the connection was lost before their confirm.
    pub republished: u64,
    /// Messages waiting for their confirm right now.
    pub unconfirmed: usize,
    /// When a message was last published.
    pub last_publish_at: Option<SystemTime>,
    /// When a confirm last arrived.
    pub last_confirm_at: Option<SystemTime>,
    /// When a publish last failed, and why.
    pub last_failure: Option<(SystemTime, String)>,
    /// Times the topology was declared again after a refusal.
    pub repairs: u64,
    /// The broker address in use (redacted), or last used while disconnected.
    pub broker: Option<String>,
    /// Connection attempts that failed, lost connections and failed reports.
    pub errors: u64,
    /// The last of those errors, and when.
    pub last_error: Option<(SystemTime, String)>,
}

impl CountsErrors for PublisherStatus {
    fn error_fields(&mut self) -> (&mut u64, &mut Option<(SystemTime, String)>) {
        (&mut self.errors, &mut self.last_error)
    }
}

/// The publisher's recorder: its status and its families.
pub(crate) type PublisherRecorder = Recorder<PublisherStatus, PublisherMetrics>;

/// Something the publisher reports once.
#[derive(Debug)]
pub(crate) enum PublisherEvent<'a> {
    /// Connected to `broker` (redacted), a confirm-mode channel open.
    Connected { broker: Option<String> },
    /// A failure that changes nothing else: a connection attempt, a repair, a report.
    Error(&'a crate::error::Error),
    /// One message handed to the broker in `took`; `unconfirmed` now wait for their confirm.
    Published { took: Duration, unconfirmed: usize },
    /// A confirm arrived `took` after its publish; `unconfirmed` still wait.
    Confirmed { took: Duration, unconfirmed: usize },
    /// A job failed to publish, of `kind`, with `error`.
    Refused { kind: Refusal, error: &'a str },
    /// The topology was declared again after a refusal.
    Repaired,
    /// The link is gone (`error` says why); `republished` unconfirmed messages go out
    /// again on the next one.
    LinkLost {
        error: &'a crate::error::Error,
        republished: u64,
    },
    /// Closed for good.
    Closed,
    /// Outcomes reported to the outbox: `sent` jobs sent, `failed` failed.
    Reported { sent: u64, failed: u64 },
}

impl Event for PublisherEvent<'_> {
    type Status = PublisherStatus;
    type Metrics = PublisherMetrics;

    fn apply(self, s: &mut PublisherStatus, m: &PublisherMetrics) {
        match self {
            PublisherEvent::Connected { broker } => {
                s.connected = true;
                s.broker = broker;
            }
            PublisherEvent::Error(error) => count_error(s, error),
            PublisherEvent::Published { took, unconfirmed } => {
                observe(&m.publish_duration, took);
                m.jobs_published.inc();
                s.published += 1;
                s.unconfirmed = unconfirmed;
                s.last_publish_at = Some(SystemTime::now());
            }
            PublisherEvent::Confirmed { took, unconfirmed } => {
                observe(&m.confirm_duration, took);
                s.unconfirmed = unconfirmed;
                s.last_confirm_at = Some(SystemTime::now());
            }
            PublisherEvent::Refused { kind, error } => {
                inc(&m.jobs_publish_failed, kind.as_str());
                s.last_failure = Some((SystemTime::now(), error.to_owned()));
            }
            PublisherEvent::Repaired => s.repairs += 1,
            PublisherEvent::LinkLost { error, republished } => {
                count_error(s, error);
                m.jobs_republished.inc_by(republished);
                s.connected = false;
                s.unconfirmed = 0;
                s.republished += republished;
            }
            PublisherEvent::Closed => s.connected = false,
            PublisherEvent::Reported { sent, failed } => {
                s.confirmed += sent;
                s.failed += failed;
                m.jobs_confirmed.inc_by(sent);
            }
        }
    }
}

/// The publisher's families (bridge).
#[derive(Debug, Clone)]
pub(crate) struct PublisherMetrics {
    jobs_published: Counter,
    jobs_confirmed: Counter,
    jobs_publish_failed: Family<Kind, Counter>,
    jobs_republished: Counter,
    confirm_duration: Histogram,
    publish_duration: Histogram,
}

impl Default for PublisherMetrics {
    fn default() -> Self {
        Self {
            jobs_published: Counter::default(),
            jobs_confirmed: Counter::default(),
            jobs_publish_failed: Family::default(),
            jobs_republished: Counter::default(),
            confirm_duration: latency(),
            publish_duration: latency(),
        }
    }
}

impl PublisherMetrics {
    /// Registers the families into `metrics`, with a series at zero for each kind of
    /// failure.
    pub(crate) fn register(&self, metrics: &Metrics) {
        precreate(
            &self.jobs_publish_failed,
            &Refusal::ALL.map(Refusal::as_str),
        );
        metrics.register(
            "jobs_published",
            "Messages published to RabbitMQ, republications included",
            None,
            self.jobs_published.clone(),
        );
        metrics.register(
            "jobs_confirmed",
            "Jobs confirmed by RabbitMQ and reported sent",
            None,
            self.jobs_confirmed.clone(),
        );
        metrics.register(
            "jobs_publish_failed",
            "Publishes that failed, by kind",
            None,
            self.jobs_publish_failed.clone(),
        );
        metrics.register(
            "jobs_republished",
            "Messages published again after a lost connection",
            None,
            self.jobs_republished.clone(),
        );
        metrics.register(
            "confirm_duration",
            "Time from publish to the broker's confirm",
            Some(Unit::Seconds),
            self.confirm_duration.clone(),
        );
        metrics.register(
            "publish_duration",
            "Time to hand one message to the broker",
            Some(Unit::Seconds),
            self.publish_duration.clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_link_counts_its_error_and_its_republications_in_both_books() {
        let recorder = PublisherRecorder::new(PublisherMetrics::default());
        let metrics = Metrics::new();
        recorder.metrics().register(&metrics);
        recorder.record(PublisherEvent::Connected {
            broker: Some("amqp://node".to_owned()),
        });
        recorder.record(PublisherEvent::Published {
            took: Duration::from_millis(1),
            unconfirmed: 3,
        });
        recorder.record(PublisherEvent::LinkLost {
            error: &crate::error::Error::broker("connection reset"),
            republished: 3,
        });
        recorder.record(PublisherEvent::Refused {
            kind: Refusal::Nack,
            error: "nacked",
        });
        let s = recorder.status().snapshot();
        assert!(!s.connected);
        assert_eq!(
            (s.published, s.republished, s.unconfirmed, s.errors),
            (1, 3, 0, 1)
        );
        assert_eq!(s.last_failure.map(|(_, e)| e).as_deref(), Some("nacked"));
        let text = metrics.encode();
        for line in [
            "benalsam_jobs_published_total 1\n",
            "benalsam_jobs_republished_total 3\n",
            "benalsam_jobs_publish_failed_total{kind=\"nack\"} 1\n",
            "benalsam_jobs_publish_failed_total{kind=\"unroutable\"} 0\n",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
    }
}
