//! The bridge's health verdicts: pure functions of the statuses, so they are tested
//! without services.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use serde_json::json;

use crate::ops::{HealthReport, Live, rfc3339, since};
use crate::outbox::{CaptureStatus, JobStreamStatus, ResenderStatus};
use crate::publish::PublisherStatus;
use crate::relations::FanOutStatus;
use crate::service::{Check, check};

/// The RabbitMQ verdict: unhealthy when not connected, when publishes failed within the
/// `window` and none was confirmed since, or when messages wait for confirms that do not
/// come.
pub(super) fn rabbitmq_report(
    s: &PublisherStatus,
    window: Duration,
    broker: &str,
    now: SystemTime,
) -> HealthReport {
    let recent = |t: Option<SystemTime>| t.is_some_and(|t| since(now, t) <= window);
    let confirmed_after = |t: SystemTime| s.last_confirm_at.is_some_and(|c| c >= t);
    let mut problems = Vec::new();
    if !s.connected {
        problems.push(format!(
            "not connected to {broker}{}",
            s.last_error
                .as_ref()
                .map(|(_, e)| format!(": {e}"))
                .unwrap_or_default()
        ));
    }
    if let Some((at, why)) = &s.last_failure
        && since(now, *at) <= window
        && !confirmed_after(*at)
    {
        problems.push(format!(
            "publishes fail and none succeeded since: {why}; the bridge declares the topology again, check the exchanges and bindings"
        ));
    }
    if s.connected && s.unconfirmed > 0 && !recent(s.last_confirm_at) && !recent(s.last_publish_at)
    {
        problems.push(format!(
            "{} messages wait for confirms that did not come within {}s (is the broker blocked? check its alarms)",
            s.unconfirmed,
            window.as_secs()
        ));
    }
    let healthy = problems.is_empty();
    let message = if healthy {
        // Of a list of brokers, the one in use.
        format!(
            "connected to {}; {} unconfirmed",
            s.broker.as_deref().unwrap_or(broker),
            s.unconfirmed
        )
    } else {
        problems.join("; ")
    };
    // The latest of a connection error and a refused publish, so an operator looking at
    // one field sees what went wrong last.
    let latest_error = [&s.last_error, &s.last_failure]
        .into_iter()
        .flatten()
        .max_by_key(|(at, _)| *at)
        .map(|(_, e)| e);
    HealthReport::new(
        "rabbitmq",
        healthy,
        message,
        json!({
            "connected": s.connected,
            "broker": broker,
            "brokerInUse": s.broker,
            "published": s.published,
            "confirmed": s.confirmed,
            "failed": s.failed,
            "republished": s.republished,
            "unconfirmed": s.unconfirmed,
            "repairs": s.repairs,
            "lastPublishAt": rfc3339(s.last_publish_at),
            "lastConfirmAt": rfc3339(s.last_confirm_at),
            "lastFailure": s.last_failure.as_ref().map(|(_, why)| why),
            "lastFailureAt": rfc3339(s.last_failure.as_ref().map(|(at, _)| *at)),
            "errors": s.errors,
            "lastError": latest_error,
        }),
    )
}

/// The database-trigger-bridge verdict: unhealthy when PostgreSQL cannot be reached, when
/// jobs wait and none was claimed within `window`, or when jobs sent longer than
/// `resend_after` ago never completed. Pure, so the verdicts are tested without services.
pub(super) fn database_report(
    s: &JobStreamStatus,
    routed: &[String],
    resender: &ResenderStatus,
    window: Duration,
    resend_after: Duration,
    database: &str,
    now: SystemTime,
) -> HealthReport {
    let problems = database_problems(s, resender, window, resend_after, database, now);
    let backlog = s.backlog.unwrap_or_default();
    // Jobs of tables this bridge does not route wait for one that does: said, not red.
    let unrouted: serde_json::Map<String, serde_json::Value> = s
        .pending_by_table
        .iter()
        .filter(|(table, _)| !routed.contains(table))
        .map(|(table, jobs)| (table.clone(), json!(jobs)))
        .collect();
    let healthy = problems.is_empty();
    let message = if healthy {
        let mut m = format!("jobs flow; {} pending", backlog.pending);
        if s.listening == Some(false) {
            m.push_str("; LISTEN is down, polling meanwhile");
        }
        if !unrouted.is_empty() {
            let tables: Vec<&String> = unrouted.keys().collect();
            m.push_str(&format!(
                "; jobs of {tables:?} wait for a bridge that routes them (not this one)"
            ));
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
            "processing": s.backlog.map(|b| b.processing),
            "retrying": s.backlog.map(|b| b.retrying),
            "sent": s.backlog.map(|b| b.sent),
            "oldestPendingAgeSeconds": backlog.oldest_pending_age.map(|d| d.as_secs_f64()),
            "oldestSentAgeSeconds": backlog.oldest_sent_age.map(|d| d.as_secs_f64()),
            "lastClaimAt": rfc3339(s.last_claim_at),
            "lastJobAt": rfc3339(s.last_job_at),
            "claimed": s.claimed,
            "draining": s.draining,
            "retried": s.retried,
            "reclaimed": s.reclaimed,
            "resent": resender.resent,
            "routedTables": routed,
            "unroutedPending": unrouted,
            "errors": s.errors,
            "lastError": s.last_error.as_ref().map(|(_, e)| e),
        }),
    )
}

/// The fan-out's part of the database verdict: its numbers in `fanOut`, and unhealthy when
/// it failed within `window` and made no progress since (a related change that cannot reach
/// its documents). Pure.
pub(super) fn with_fan_out(
    report: HealthReport,
    f: &FanOutStatus,
    window: Duration,
    now: SystemTime,
) -> HealthReport {
    let problem = failing(&f.last_error, f.last_progress_at, window, now).map(|why| {
        format!("a related-row change cannot be fanned out to its documents: {why}; it is retried after its backoff")
    });
    with_part(
        report,
        "fanOut",
        json!({
            "changesDone": f.jobs_done,
            "documentsQueued": f.documents_queued,
            "documentsCoalesced": f.documents_coalesced,
            "current": f.current.as_ref().map(|(job, relation, documents)| json!({
                "job": job, "relation": relation, "documents": documents
            })),
            "lastProgressAt": rfc3339(f.last_progress_at),
            "errors": f.errors,
            "lastError": f.last_error.as_ref().map(|(_, e)| e),
        }),
        problem,
    )
}

/// WAL capture's part of the database verdict: its numbers in `capture`, and unhealthy when
/// it failed within `window` and has not looked at its slot without an error since (changes
/// that do not become jobs). Pure.
pub(super) fn with_capture(
    report: HealthReport,
    c: &CaptureStatus,
    window: Duration,
    now: SystemTime,
) -> HealthReport {
    let problem = failing(&c.last_error, c.last_look, window, now).map(|why| {
        format!("changes are not captured from the WAL: {why}; capture tries again every second, and writers are not held up meanwhile (the slot keeps their changes)")
    });
    with_part(
        report,
        "capture",
        json!({
            "capturing": c.capturing,
            "jobs": c.jobs,
            "keyless": c.keyless,
            "behindBytes": c.behind,
            "lastLookAt": rfc3339(c.last_look),
            "errors": c.errors,
            "lastError": c.last_error.as_ref().map(|(_, e)| e),
        }),
        problem,
    )
}

/// The last error of a part, when it came within `window` and nothing went right since.
fn failing(
    last_error: &Option<(SystemTime, String)>,
    last_ok: Option<SystemTime>,
    window: Duration,
    now: SystemTime,
) -> Option<&str> {
    let (at, why) = last_error.as_ref()?;
    (since(now, *at) <= window && last_ok.is_none_or(|ok| ok < *at)).then_some(why.as_str())
}

/// A part of the database verdict: its `details` under `key`, and its `problem`, when it
/// has one, making the verdict unhealthy (first in the message if the rest was well).
fn with_part(
    mut report: HealthReport,
    key: &str,
    details: serde_json::Value,
    problem: Option<String>,
) -> HealthReport {
    if let Some(problem) = problem {
        report.healthy = false;
        report.message = if report.message.starts_with("jobs flow") {
            problem
        } else {
            format!("{}; {problem}", report.message)
        };
    }
    if let Some(all) = report.details.as_object_mut() {
        all.insert(key.to_owned(), details);
    }
    report
}

/// What is wrong with the job stream's progress, each with what to look at.
fn database_problems(
    s: &JobStreamStatus,
    resender: &ResenderStatus,
    window: Duration,
    resend_after: Duration,
    database: &str,
    now: SystemTime,
) -> Vec<String> {
    let backlog = s.backlog.unwrap_or_default();
    let mut problems = Vec::new();
    if !s.connected {
        problems.push(format!(
            "cannot reach {database}{}",
            s.last_error
                .as_ref()
                .map(|(_, e)| format!(": {e}"))
                .unwrap_or_default()
        ));
        return problems;
    }
    // Failed jobs waiting out their backoff are not work that should move yet.
    let moved = s.last_job_at.is_some_and(|t| since(now, t) <= window);
    if backlog.pending > 0 && !moved {
        // Jobs claimed into a publisher that stopped taking more wait as well.
        let claimed = match backlog.processing {
            0 => String::new(),
            n => format!(" (and {n} claimed are not yet confirmed)"),
        };
        problems.push(format!(
            "{} jobs wait and none was claimed for over {}s{claimed}: is RabbitMQ reachable? (see /api/v1/health/rabbitmq)",
            backlog.pending,
            window.as_secs()
        ));
    }
    if s.last_claim_at.is_none_or(|t| since(now, t) > window) {
        problems.push(format!(
            "no claim for over {}s: the job stream is stalled",
            window.as_secs()
        ));
    }
    if let Some(age) = backlog.oldest_sent_age.filter(|a| *a > resend_after) {
        problems.push(format!(
            "{} jobs are sent but not completed, the oldest for {}s (over {}s): is the consumer running?",
            backlog.sent,
            age.as_secs(),
            resend_after.as_secs()
        ));
    } else if let Some((at, count)) = resender.last_resend
        && since(now, at) <= window
    {
        problems.push(format!(
            "{count} jobs were sent over {}s ago and never completed; published again: is the consumer running?",
            resend_after.as_secs()
        ));
    }
    problems
}

pub(super) fn checks(monitor: &Arc<OnceLock<BridgeMonitor>>) -> Vec<Check> {
    vec![
        check(
            "/api/v1/health/database-trigger-bridge",
            monitor,
            BridgeMonitor::database,
        ),
        check("/api/v1/health/rabbitmq", monitor, BridgeMonitor::rabbitmq),
    ]
}

/// What the bridge's health endpoints look at.
#[derive(Debug, Clone)]
pub(super) struct BridgeMonitor {
    /// The tables this bridge claims.
    pub(super) routed: Vec<String>,
    /// Its fan-out, when its event types have relations.
    pub(super) fan_out: Option<Live<FanOutStatus>>,
    /// Its WAL capture, when it records jobs from the WAL.
    pub(super) capture: Option<Live<CaptureStatus>>,
    pub(super) stream: Live<JobStreamStatus>,
    pub(super) publisher: Live<PublisherStatus>,
    pub(super) resender: Live<ResenderStatus>,
    pub(super) window: Duration,
    pub(super) resend_after: Duration,
    pub(super) broker: String,
    pub(super) database: String,
    /// The queue type it declares.
    pub(super) queue_type: crate::config::QueueType,
}

impl BridgeMonitor {
    pub(super) fn rabbitmq(&self) -> HealthReport {
        let mut report = rabbitmq_report(
            &self.publisher.snapshot(),
            self.window,
            &self.broker,
            SystemTime::now(),
        );
        report.details["queueType"] = json!(self.queue_type.as_str());
        report
    }

    pub(super) fn database(&self) -> HealthReport {
        let now = SystemTime::now();
        let report = database_report(
            &self.stream.snapshot(),
            &self.routed,
            &self.resender.snapshot(),
            self.window,
            self.resend_after,
            &self.database,
            now,
        );
        let report = match &self.fan_out {
            Some(fan_out) => with_fan_out(report, &fan_out.snapshot(), self.window, now),
            None => report,
        };
        match &self.capture {
            Some(capture) => with_capture(report, &capture.snapshot(), self.window, now),
            None => report,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::Backlog;

    const WINDOW: Duration = Duration::from_secs(30);
    const RESEND: Duration = Duration::from_secs(900);

    fn flowing(now: SystemTime) -> JobStreamStatus {
        JobStreamStatus {
            connected: true,
            listening: Some(true),
            last_claim_at: Some(now),
            last_job_at: Some(now),
            backlog: Some(Backlog {
                pending: 3,
                oldest_pending_age: Some(Duration::from_secs(1)),
                ..Backlog::default()
            }),
            ..JobStreamStatus::default()
        }
    }

    fn report(s: &JobStreamStatus, now: SystemTime) -> HealthReport {
        database_report(
            s,
            &["listings".to_owned()],
            &ResenderStatus::default(),
            WINDOW,
            RESEND,
            "db",
            now,
        )
    }

    #[test]
    fn flowing_jobs_are_healthy_however_old_the_oldest() {
        let now = SystemTime::now();
        let mut s = flowing(now);
        if let Some(b) = s.backlog.as_mut() {
            b.pending = 40_000;
            b.oldest_pending_age = Some(Duration::from_secs(600));
        }
        let r = report(&s, now);
        assert!(r.healthy, "{r:?}");
        assert_eq!(r.details["pending"], 40_000);
    }

    #[test]
    fn waiting_jobs_that_do_not_move_are_unhealthy() {
        let now = SystemTime::now();
        let mut s = flowing(now);
        s.last_job_at = Some(now - Duration::from_secs(120));
        let r = report(&s, now);
        assert!(!r.healthy);
        assert!(r.message.contains("3 jobs wait"), "{}", r.message);
        // Nothing waiting: nothing should move.
        s.backlog = Some(Backlog::default());
        assert!(report(&s, now).healthy);
    }

    #[test]
    fn a_stalled_stream_is_unhealthy() {
        let now = SystemTime::now();
        let mut s = flowing(now);
        s.last_claim_at = Some(now - Duration::from_secs(120));
        let r = report(&s, now);
        assert!(!r.healthy);
        assert!(r.message.contains("stalled"), "{}", r.message);
    }

    #[test]
    fn a_lost_database_is_unhealthy_and_says_why() {
        let now = SystemTime::now();
        let mut s = flowing(now);
        s.connected = false;
        s.last_error = Some((now, "connection refused".into()));
        let r = report(&s, now);
        assert!(!r.healthy);
        assert!(r.message.contains("connection refused"), "{}", r.message);
    }

    #[test]
    fn jobs_stuck_in_sent_are_unhealthy_with_their_count() {
        let now = SystemTime::now();
        let mut s = flowing(now);
        if let Some(b) = s.backlog.as_mut() {
            b.sent = 7;
            b.oldest_sent_age = Some(Duration::from_secs(1000));
        }
        let r = report(&s, now);
        assert!(!r.healthy);
        assert!(
            r.message.contains("7 jobs are sent but not completed"),
            "{}",
            r.message
        );
        let resent = ResenderStatus {
            resent: 4,
            last_resend: Some((now, 4)),
        };
        let r = database_report(&flowing(now), &[], &resent, WINDOW, RESEND, "db", now);
        assert!(
            !r.healthy && r.message.contains("4 jobs were sent"),
            "{}",
            r.message
        );
    }

    #[test]
    fn failing_publishes_are_unhealthy_until_one_succeeds() {
        let now = SystemTime::now();
        let mut s = PublisherStatus::default();
        assert!(!rabbitmq_report(&s, WINDOW, "amqp://u:***@h", now).healthy);
        s.connected = true;
        assert!(rabbitmq_report(&s, WINDOW, "amqp://u:***@h", now).healthy);
        s.last_failure = Some((now - Duration::from_secs(5), "exchange missing".into()));
        s.last_confirm_at = Some(now - Duration::from_secs(10));
        let r = rabbitmq_report(&s, WINDOW, "b", now);
        assert!(
            !r.healthy && r.message.contains("exchange missing"),
            "{}",
            r.message
        );
        s.last_confirm_at = Some(now);
        assert!(rabbitmq_report(&s, WINDOW, "b", now).healthy);
    }

    #[test]
    fn of_several_brokers_health_names_the_one_in_use() {
        let now = SystemTime::now();
        let s = PublisherStatus {
            connected: true,
            broker: Some("amqp://u:***@mq2/%2f".into()),
            ..PublisherStatus::default()
        };
        let r = rabbitmq_report(&s, WINDOW, "amqp://u:***@mq1/%2f,amqp://u:***@mq2/%2f", now);
        assert!(
            r.message.contains("connected to amqp://u:***@mq2/%2f;"),
            "{}",
            r.message
        );
        assert_eq!(r.details["brokerInUse"], "amqp://u:***@mq2/%2f");
    }

    #[test]
    fn a_failing_capture_is_red_until_it_looks_at_its_slot_again() {
        let now = SystemTime::now();
        let ago = |s| now - Duration::from_secs(s);
        let report = || {
            let s = flowing(now);
            database_report(
                &s,
                &[],
                &ResenderStatus::default(),
                WINDOW,
                RESEND,
                "db",
                now,
            )
        };
        let mut c = CaptureStatus {
            capturing: true,
            jobs: 5,
            last_look: Some(ago(10)),
            last_error: Some((ago(5), "the slot is gone".to_owned())),
            errors: 1,
            ..CaptureStatus::default()
        };
        let red = with_capture(report(), &c, WINDOW, now);
        assert!(!red.healthy);
        assert!(red.message.contains("the slot is gone"), "{}", red.message);
        assert_eq!(red.details["capture"]["jobs"], 5);
        c.last_look = Some(ago(1));
        assert!(with_capture(report(), &c, WINDOW, now).healthy);
        c.last_look = None;
        c.last_error = Some((ago(60), "long ago".to_owned()));
        assert!(with_capture(report(), &c, WINDOW, now).healthy);
    }
}
