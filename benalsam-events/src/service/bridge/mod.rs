//! The bridge as a service: the outbox's jobs into RabbitMQ.
//!
//! [`run`] is everything `benalsam-bridge` does: health endpoints up from the first moment,
//! migrations (when asked) and the topology declared, then the [`JobStream`] forwarded into
//! the [`Publisher`] until shutdown, with a heartbeat and the resender beside it.
//!
//! Its health verdicts judge progress, not connections:
//! the bridge is unhealthy when work that should move has not moved within the window, or
//! when something it needs refuses. A backlog that drains is healthy however old its oldest
//! job is.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use prometheus_client::metrics::counter::Counter;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::EventType;
use crate::Result;
use crate::config::{AmqpUrl, DatabaseUrl, require_positive};
use crate::ops::{HealthReport, Live, Metrics, rfc3339, since};
use crate::outbox::{
    FanOut, FanOutStatus, JobStream, JobStreamConfig, JobStreamStatus, Outbox, OutboxConfig,
};
use crate::publish::{Publisher, PublisherConfig, PublisherStatus, Topology, TopologyConfig};
use crate::service::Heartbeat;
use crate::service::{Check, Service, check};

/// Everything [`run`] needs.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct BridgeSettings {
    /// The database holding the outbox.
    pub database_url: DatabaseUrl,
    /// The broker.
    pub rabbitmq_url: AmqpUrl,
    /// The outbox (schema, lease, retries).
    pub outbox: OutboxConfig,
    /// Claiming (batch size, polling, LISTEN).
    pub stream: JobStreamConfig,
    /// Publishing (window, reports).
    pub publisher: PublisherConfig,
    /// The tables whose jobs it publishes, and where they go. It claims only these tables'
    /// jobs; the jobs of any other table wait for a bridge that routes them.
    pub event_types: Vec<EventType>,
    /// The topology's choices; the topology itself is derived from the event types, declared
    /// at start, and again when a publish finds part of it missing.
    pub topology: TopologyConfig,
    /// Apply the database migrations before starting.
    pub migrate: bool,
    /// Where the health endpoints listen; `None` for none.
    pub health_addr: Option<SocketAddr>,
    /// How long work may stand still before the bridge is unhealthy.
    pub health_window: Duration,
    /// How often a heartbeat goes to `benalsam.system`; `None` for none.
    pub heartbeat_interval: Option<Duration>,
    /// Jobs sent this long ago and never completed are published again.
    pub resend_after: Duration,
    /// How long a shutdown may wait for the last confirms when RabbitMQ is away.
    pub shutdown_grace: Duration,
    /// Documents per page when a related row's change fans out to the documents that
    /// contain it (`BENALSAM_FANOUT_PAGE`); relations only.
    pub fanout_page: usize,
}

impl BridgeSettings {
    /// The defaults, for the listings of the architecture document, against these services.
    pub fn new(database_url: DatabaseUrl, rabbitmq_url: AmqpUrl) -> Self {
        Self {
            database_url,
            rabbitmq_url,
            outbox: OutboxConfig::default(),
            stream: JobStreamConfig::default(),
            publisher: PublisherConfig::default(),
            event_types: vec![EventType::listings()],
            topology: TopologyConfig::default(),
            migrate: false,
            health_addr: None,
            health_window: Duration::from_secs(30),
            heartbeat_interval: Some(Duration::from_secs(30)),
            resend_after: Duration::from_secs(15 * 60),
            shutdown_grace: Duration::from_secs(30),
            fanout_page: crate::outbox::DEFAULT_FANOUT_PAGE,
        }
    }

    fn validate(&self) -> Result<()> {
        crate::service::validate(
            "bridge",
            &self.event_types,
            self.health_window,
            self.heartbeat_interval,
        )?;
        require_positive("BridgeSettings::resend_after", self.resend_after)?;
        self.topology.validate()?;
        Ok(())
    }
}

/// Runs the bridge until `shutdown` is cancelled: the stream stops claiming, and the
/// publisher waits for every confirm and reports it (for at most the shutdown grace when
/// RabbitMQ is away; what it held then returns to other bridges when its lease expires).
///
/// A setting that cannot work, a conflicting topology or a changed migration stops it with
/// an error; an unreachable service is waited for.
pub async fn run(mut settings: BridgeSettings, shutdown: CancellationToken) -> Result<()> {
    settings.validate()?;
    crate::connect::log_transports(&settings.database_url, &settings.rabbitmq_url, None);
    let schema = settings.outbox.schema.clone();
    settings.event_types = settings
        .event_types
        .into_iter()
        .map(|t| t.recorded_in(&schema))
        .collect();
    let mut service = Service::new("benalsam-bridge", &shutdown);
    let monitor: Arc<OnceLock<BridgeMonitor>> = Arc::default();
    // Built first, so /metrics lists every family from its first answer on.
    let parts = Parts::build(&settings, &service, &shutdown)?;
    service
        .serve_health("benalsam-bridge", settings.health_addr, checks(&monitor))
        .await?;
    if !prepare(&settings, &service, &shutdown).await? {
        return Ok(());
    }
    let (jobs, publisher) = parts.start(&settings, &mut service, &monitor)?;
    service.readiness.ready();
    tracing::info!("bridge running");

    // The whole bridge: claimed batches, one job at a time, into the publisher.
    let publishing = jobs
        .flat_map(futures::stream::iter)
        .map(Ok)
        .forward(publisher);
    let grace = async {
        shutdown.cancelled().await;
        tokio::time::sleep(settings.shutdown_grace).await;
    };
    let result = tokio::select! {
        result = publishing => result,
        () = grace => {
            tracing::warn!(
                grace = ?settings.shutdown_grace,
                "shutdown did not finish in time (is RabbitMQ reachable?); unconfirmed jobs return after their lease"
            );
            Ok(())
        }
    };
    service.stop().await;
    tracing::info!("bridge stopped");
    result
}

/// The start-up steps: migrations when asked, the topology. False when shutdown came first.
async fn prepare(
    settings: &BridgeSettings,
    service: &Service,
    shutdown: &CancellationToken,
) -> Result<bool> {
    if settings.migrate {
        let migrated = service
            .step("migrating the database", shutdown, || async {
                let mut client = crate::connect::postgres(&settings.database_url).await?;
                crate::outbox::migrate(&mut client, &settings.outbox, &settings.event_types).await
            })
            .await?;
        match migrated {
            None => return Ok(false),
            Some(report) if !report.missing_tables.is_empty() => {
                return Err(missing_tables(&report.missing_tables));
            }
            Some(_) => {}
        }
    }
    let missing = service
        .step("checking the event types' tables", shutdown, || {
            crate::outbox::missing_tables(
                &settings.database_url,
                &settings.outbox.schema,
                &settings.event_types,
            )
        })
        .await?;
    match missing {
        None => return Ok(false),
        Some(missing) if !missing.is_empty() => return Err(missing_tables(&missing)),
        Some(_) => {}
    }
    let topology = settings.topology();
    let declared = service
        .step("declaring the RabbitMQ topology", shutdown, || {
            declare(&settings.rabbitmq_url, &topology)
        })
        .await?;
    Ok(declared.is_some())
}

/// The parts of a bridge: the job stream and the publisher it feeds, with the resender
/// beside them and the monitor the health checks read.
struct Parts {
    jobs: JobStream,
    publisher: Publisher,
    resender: Resender,
    fan_out: Option<FanOut>,
    monitor: BridgeMonitor,
}

impl Parts {
    /// Builds the parts and registers their metrics; nothing runs yet.
    fn build(
        settings: &BridgeSettings,
        service: &Service,
        shutdown: &CancellationToken,
    ) -> Result<Self> {
        let mut outbox_config = settings.outbox.clone();
        outbox_config.tables = Some(
            settings
                .event_types
                .iter()
                .map(|t| t.table.clone())
                .collect(),
        );
        let outbox = Outbox::new(settings.database_url.clone(), outbox_config)?;
        let jobs = JobStream::new(outbox.clone(), settings.stream.clone(), shutdown.clone())?
            .with_metrics(&service.metrics);
        let mut publisher_config = settings.publisher.clone();
        publisher_config.topology = Some(settings.topology());
        let publisher = Publisher::new(
            settings.rabbitmq_url.clone(),
            outbox.clone(),
            settings.event_types.clone(),
            publisher_config,
        )
        .with_metrics(&service.metrics);
        let resender = Resender::new(outbox, settings.resend_after)?.with_metrics(&service.metrics);
        let fan_out = FanOut::new(
            &settings.database_url,
            &settings.outbox,
            &settings.stream,
            &settings.event_types,
            settings.fanout_page,
            shutdown,
        )?
        .map(|f| f.with_metrics(&service.metrics));
        let monitor = BridgeMonitor {
            // Its event types' tables, and the jobs of their relations (which its fan-out
            // claims).
            routed: settings
                .event_types
                .iter()
                .flat_map(|t| {
                    std::iter::once(t.table.clone())
                        .chain(t.relations.iter().map(|r| r.job_table(&t.table)))
                })
                .collect(),
            fan_out: fan_out.as_ref().map(FanOut::status),
            stream: jobs.status(),
            publisher: publisher.status(),
            resender: resender.status(),
            window: settings.health_window,
            resend_after: settings.resend_after,
            broker: settings.rabbitmq_url.redacted(),
            database: settings.database_url.redacted(),
            queue_type: settings.topology.queue_type,
        };
        Ok(Self {
            jobs,
            publisher,
            resender,
            fan_out,
            monitor,
        })
    }

    /// Starts the resender and the heartbeat and hands the monitor to the health checks;
    /// returns the stream and the publisher for the caller to connect.
    fn start(
        self,
        settings: &BridgeSettings,
        service: &mut Service,
        monitor: &OnceLock<BridgeMonitor>,
    ) -> Result<(JobStream, Publisher)> {
        if let Some(interval) = settings.heartbeat_interval {
            let beat = self.monitor.clone();
            let heartbeat = Heartbeat::new(
                settings.rabbitmq_url.clone(),
                "bridge",
                interval,
                move || beat.database(),
            )?;
            service.spawn(heartbeat.run(service.background()));
        }
        service.spawn(self.resender.run(service.background()));
        if let Some(fan_out) = self.fan_out {
            service.spawn(fan_out.run(service.background()));
        }
        let _ = monitor.set(self.monitor);
        Ok((self.jobs, self.publisher))
    }
}

fn missing_tables(tables: &[String]) -> crate::Error {
    crate::Error::config(
        "event types",
        format!(
            "table {} does not exist; create it, or fix the event type's table (BENALSAM_CONFIG)",
            tables.join(", ")
        ),
    )
}

impl BridgeSettings {
    /// The topology of its event types.
    pub fn topology(&self) -> Topology {
        Topology::for_event_types(&self.event_types, &self.topology)
    }
}

async fn declare(url: &AmqpUrl, topology: &Topology) -> Result<()> {
    let connection = crate::connect::amqp(url, "benalsam-bridge topology").await?;
    topology.declare(&connection).await?;
    let _ = connection.close(200, "declared".into()).await;
    Ok(())
}

fn checks(monitor: &Arc<OnceLock<BridgeMonitor>>) -> Vec<Check> {
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
struct BridgeMonitor {
    /// The tables this bridge claims.
    routed: Vec<String>,
    /// Its fan-out, when its event types have relations.
    fan_out: Option<Live<FanOutStatus>>,
    stream: Live<JobStreamStatus>,
    publisher: Live<PublisherStatus>,
    resender: Live<ResenderStatus>,
    window: Duration,
    resend_after: Duration,
    broker: String,
    database: String,
    /// The queue type it declares.
    queue_type: crate::config::QueueType,
}

impl BridgeMonitor {
    fn rabbitmq(&self) -> HealthReport {
        let mut report = rabbitmq_report(
            &self.publisher.snapshot(),
            self.window,
            &self.broker,
            SystemTime::now(),
        );
        report.details["queueType"] = json!(self.queue_type.as_str());
        report
    }

    fn database(&self) -> HealthReport {
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
        match &self.fan_out {
            Some(fan_out) => with_fan_out(report, &fan_out.snapshot(), self.window, now),
            None => report,
        }
    }
}

/// The RabbitMQ verdict: unhealthy when not connected, when publishes failed within the
/// `window` and none was confirmed since, or when messages wait for confirms that do not
/// come.
fn rabbitmq_report(
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
fn database_report(
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
fn with_fan_out(
    mut report: HealthReport,
    f: &FanOutStatus,
    window: Duration,
    now: SystemTime,
) -> HealthReport {
    if let Some((at, why)) = &f.last_error
        && since(now, *at) <= window
        && f.last_progress_at.is_none_or(|p| p < *at)
    {
        report.healthy = false;
        let problem = format!(
            "a related-row change cannot be fanned out to its documents: {why}; it is retried after its backoff"
        );
        report.message = if report.message.starts_with("jobs flow") {
            problem
        } else {
            format!("{}; {problem}", report.message)
        };
    }
    if let Some(details) = report.details.as_object_mut() {
        details.insert(
            "fanOut".to_owned(),
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
        );
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

/// What the resender has done.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ResenderStatus {
    /// Jobs sent again in all.
    pub(crate) resent: u64,
    /// When it last found jobs to send again, and how many.
    pub(crate) last_resend: Option<(SystemTime, usize)>,
}

/// Sends again jobs that were confirmed by the broker and never completed (a message lost
/// inside the broker, a queue purged by hand): they go back to `pending`.
#[derive(Debug)]
pub(crate) struct Resender {
    outbox: Outbox,
    after: Duration,
    status: Live<ResenderStatus>,
    resent: Counter,
}

impl Resender {
    /// A resender of jobs sent more than `after` ago (which must be longer than zero).
    pub(crate) fn new(outbox: Outbox, after: Duration) -> Result<Self> {
        require_positive("BridgeSettings::resend_after", after)?;
        Ok(Self {
            outbox,
            after,
            status: Live::default(),
            resent: Counter::default(),
        })
    }

    /// Counts resent jobs in `metrics` (`benalsam_jobs_resent_total`).
    pub(crate) fn with_metrics(self, metrics: &Metrics) -> Self {
        metrics.register(
            "jobs_resent",
            "Sent jobs that never completed, sent again",
            None,
            self.resent.clone(),
        );
        self
    }

    /// The live status, for health checks.
    pub(crate) fn status(&self) -> Live<ResenderStatus> {
        self.status.clone()
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
                    self.resent.inc_by(ids.len() as u64);
                    {
                        let mut s = self.status.lock();
                        s.resent += ids.len() as u64;
                        s.last_resend = Some((SystemTime::now(), ids.len()));
                    }
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
}
