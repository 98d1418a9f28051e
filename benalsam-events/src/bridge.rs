//! Pieces of the bridge beyond the job stream and the publisher: its health verdicts and the
//! resender of jobs that were sent but never completed.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::health::{Check, HealthReport, HealthServer};
use crate::job_stream::{self, JobStreamStatus};
use crate::metrics::Metrics;
use crate::outbox::Outbox;
use crate::publisher::{self, PublisherStatus};

/// Thresholds of the bridge's health verdicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthThresholds {
    /// Unhealthy when the oldest pending job waits longer than this, connections or not.
    pub max_pending_age: Duration,
    /// Unhealthy when no claim succeeded for this long (the stream stalled).
    pub max_claim_gap: Duration,
}

impl Default for HealthThresholds {
    fn default() -> Self {
        Self {
            max_pending_age: Duration::from_secs(60),
            max_claim_gap: Duration::from_secs(30),
        }
    }
}

/// What the bridge's health endpoints look at.
#[derive(Debug, Clone)]
pub struct BridgeMonitor {
    /// The job stream's status.
    pub stream: Arc<job_stream::Status>,
    /// The publisher's status.
    pub publisher: Arc<publisher::Status>,
    /// The metrics, whose resend counter the health answer shows.
    pub metrics: Arc<Metrics>,
    /// Verdict thresholds.
    pub thresholds: HealthThresholds,
    /// The broker, redacted, for the answer.
    pub broker: String,
    /// The database, redacted, for the answer.
    pub database: String,
}

impl BridgeMonitor {
    /// Adds the bridge's two endpoints to `server`.
    pub fn routes(self: &Arc<Self>, server: HealthServer) -> HealthServer {
        let (rabbitmq, database) = (Arc::clone(self), Arc::clone(self));
        server
            .check("/api/v1/health/rabbitmq", move || rabbitmq.rabbitmq())
            .check("/api/v1/health/database-trigger-bridge", move || {
                database.database()
            })
    }

    /// The report the bridge's heartbeat carries: its database verdict.
    pub fn heartbeat(self: &Arc<Self>) -> Check {
        let monitor = Arc::clone(self);
        Arc::new(move || monitor.database())
    }

    /// `GET /api/v1/health/rabbitmq`.
    pub fn rabbitmq(&self) -> HealthReport {
        rabbitmq_report(&self.publisher.snapshot(), &self.broker)
    }

    /// `GET /api/v1/health/database-trigger-bridge`.
    pub fn database(&self) -> HealthReport {
        database_report(
            &self.stream.snapshot(),
            self.metrics.jobs_resent.get(),
            &self.thresholds,
            &self.database,
            SystemTime::now(),
        )
    }
}

fn rfc3339(t: Option<SystemTime>) -> serde_json::Value {
    t.map_or(serde_json::Value::Null, |t| {
        json!(humantime::format_rfc3339_millis(t).to_string())
    })
}

/// The RabbitMQ verdict: healthy while the publisher holds a connection.
pub fn rabbitmq_report(s: &PublisherStatus, broker: &str) -> HealthReport {
    let message = if s.connected {
        format!("connected to {broker}; {} unconfirmed", s.unconfirmed)
    } else {
        format!(
            "not connected to {broker}{}",
            s.last_error
                .as_deref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        )
    };
    HealthReport::new(
        "rabbitmq",
        s.connected,
        message,
        json!({
            "connected": s.connected,
            "broker": broker,
            "published": s.published,
            "confirmed": s.confirmed,
            "failed": s.failed,
            "republished": s.republished,
            "unconfirmed": s.unconfirmed,
            "lastPublishAt": rfc3339(s.last_publish_at),
            "lastConfirmAt": rfc3339(s.last_confirm_at),
            "errors": s.errors,
            "lastError": s.last_error,
        }),
    )
}

/// The database-trigger-bridge verdict: healthy when jobs flow, not merely when connections
/// are up. Pure, so the verdicts are tested without services.
pub fn database_report(
    s: &JobStreamStatus,
    resent: u64,
    thresholds: &HealthThresholds,
    database: &str,
    now: SystemTime,
) -> HealthReport {
    let oldest = s.backlog.and_then(|b| b.oldest_pending_age);
    let claim_gap = s
        .last_claim_at
        .map(|t| now.duration_since(t).unwrap_or_default());
    let mut problems = Vec::new();
    if !s.connected {
        problems.push(format!(
            "cannot reach {database}{}",
            s.last_error
                .as_deref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        ));
    }
    if let Some(age) = oldest.filter(|age| *age > thresholds.max_pending_age) {
        problems.push(format!(
            "the oldest pending job has waited {}s (limit {}s)",
            age.as_secs(),
            thresholds.max_pending_age.as_secs()
        ));
    }
    match claim_gap {
        Some(gap) if gap > thresholds.max_claim_gap => problems.push(format!(
            "no claim for {}s (limit {}s): the bridge is stalled, is RabbitMQ reachable?",
            gap.as_secs(),
            thresholds.max_claim_gap.as_secs()
        )),
        None => problems.push("no claim yet".to_owned()),
        Some(_) => {}
    }
    let healthy = problems.is_empty();
    let message = if healthy {
        let mut m = format!("jobs flow; {} pending", s.backlog.map_or(0, |b| b.pending));
        if s.listening == Some(false) {
            m.push_str("; LISTEN is down, polling meanwhile");
        }
        m
    } else {
        problems.join("; ")
    };
    HealthReport::new(
        "database-trigger-bridge",
        healthy,
        message,
        json!({
            "database": database,
            "connected": s.connected,
            "listening": s.listening,
            "pending": s.backlog.map(|b| b.pending),
            "retrying": s.backlog.map(|b| b.retrying),
            "oldestPendingAgeSeconds": oldest.map(|d| d.as_secs_f64()),
            "lastClaimAt": rfc3339(s.last_claim_at),
            "lastJobAt": rfc3339(s.last_job_at),
            "claimed": s.claimed,
            "retried": s.retried,
            "reclaimed": s.reclaimed,
            "resent": resent,
            "errors": s.errors,
            "lastError": s.last_error,
        }),
    )
}

/// Every so often, sends again jobs that were confirmed more than `older_than` ago and never
/// completed, counting them in `metrics.jobs_resent`. Runs until `shutdown`.
pub async fn resend_stale(
    outbox: Outbox,
    older_than: Duration,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    const BATCH: usize = 1000;
    let every = (older_than / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        match outbox.resend_stale_sent(older_than, BATCH).await {
            Ok(ids) if !ids.is_empty() => {
                metrics.jobs_resent.inc_by(ids.len() as u64);
                tracing::warn!(
                    count = ids.len(),
                    first = ids.first(),
                    after = ?older_than,
                    "sending again jobs that were sent but never completed"
                );
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "resender cannot reach the outbox"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::Backlog;

    fn flowing(now: SystemTime) -> JobStreamStatus {
        JobStreamStatus {
            connected: true,
            listening: Some(true),
            last_claim_at: Some(now),
            backlog: Some(Backlog {
                pending: 3,
                oldest_pending_age: Some(Duration::from_secs(1)),
                ..Backlog::default()
            }),
            ..JobStreamStatus::default()
        }
    }

    #[test]
    fn flowing_jobs_are_healthy() {
        let now = SystemTime::now();
        let r = database_report(&flowing(now), 0, &HealthThresholds::default(), "db", now);
        assert!(r.healthy, "{r:?}");
        assert_eq!(r.details["pending"], 3);
    }

    #[test]
    fn old_pending_jobs_are_unhealthy_even_with_connections_up() {
        let now = SystemTime::now();
        let mut s = flowing(now);
        s.backlog = Some(Backlog {
            pending: 10,
            oldest_pending_age: Some(Duration::from_secs(600)),
            ..Backlog::default()
        });
        let r = database_report(&s, 0, &HealthThresholds::default(), "db", now);
        assert!(!r.healthy);
        assert!(r.message.contains("waited 600s"), "{}", r.message);
    }

    #[test]
    fn a_stalled_stream_is_unhealthy() {
        let now = SystemTime::now();
        let mut s = flowing(now);
        s.last_claim_at = Some(now - Duration::from_secs(120));
        let r = database_report(&s, 0, &HealthThresholds::default(), "db", now);
        assert!(!r.healthy);
        assert!(r.message.contains("stalled"), "{}", r.message);
    }

    #[test]
    fn a_lost_database_is_unhealthy_and_says_why() {
        let now = SystemTime::now();
        let mut s = flowing(now);
        s.connected = false;
        s.last_error = Some("connection refused".into());
        let r = database_report(
            &s,
            0,
            &HealthThresholds::default(),
            "postgres://u:***@h/db",
            now,
        );
        assert!(!r.healthy);
        assert!(r.message.contains("connection refused"));
    }

    #[test]
    fn the_rabbitmq_verdict_follows_the_connection() {
        let mut s = PublisherStatus::default();
        assert!(!rabbitmq_report(&s, "amqp://u:***@h").healthy);
        s.connected = true;
        let r = rabbitmq_report(&s, "amqp://u:***@h");
        assert!(r.healthy);
        assert_eq!(r.service, "rabbitmq");
    }
}
