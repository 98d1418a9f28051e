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
use std::time::Duration;

use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::config::{AmqpUrl, DatabaseUrl, require_positive};
use crate::error::Result;
use crate::event_type::EventType;
use crate::outbox::{Capture, JobStream, JobStreamConfig, Outbox, OutboxConfig, Resender};
use crate::publish::{Publisher, PublisherConfig, Topology, TopologyConfig};
use crate::relations::FanOut;
use crate::service::Heartbeat;
use crate::service::Service;

mod health;

use health::{BridgeMonitor, checks};

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
            fanout_page: crate::relations::DEFAULT_FANOUT_PAGE,
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
    let (jobs, publisher, outbox) = parts.start(&settings, &mut service, &monitor)?;
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
                "shutdown did not finish in time (is RabbitMQ reachable?); unconfirmed jobs are given back and published again"
            );
            Ok(())
        }
    };
    service.stop().await;
    release_held(&outbox).await;
    tracing::info!("bridge stopped");
    result
}

/// Gives back whatever the stopped bridge still holds, so the next bridge takes it at once
/// rather than after the lease: jobs the publisher had not published when the grace ran out,
/// changes the fan-out claimed as it stopped. Every part has stopped by now, so nothing of
/// this worker will report them any more; a job whose message did reach RabbitMQ is
/// published again, which the consumer's versions make harmless (as after a lease).
async fn release_held(outbox: &Outbox) {
    // Bounded: a stop must end even when PostgreSQL is away or stalled (a connection that
    // never answers), and what is not given back returns with its lease anyway.
    match tokio::time::timeout(RELEASE_WAIT, outbox.release_held()).await {
        Ok(Ok(released)) if released.is_empty() => {}
        Ok(Ok(released)) => tracing::info!(
            released = released.len(),
            "shutting down: gave the jobs still claimed back"
        ),
        Ok(Err(error)) => tracing::warn!(
            %error,
            "shutting down: could not give the jobs still claimed back; they return when their lease expires"
        ),
        Err(_) => tracing::warn!(
            wait = ?RELEASE_WAIT,
            "shutting down: PostgreSQL did not answer in time to take the jobs still claimed back; they return when their lease expires"
        ),
    }
}

/// How long a stopping bridge waits for PostgreSQL to take back what it still holds.
const RELEASE_WAIT: Duration = Duration::from_secs(5);

/// The start-up steps: migrations when asked, the topology. False when shutdown came first.
async fn prepare(
    settings: &BridgeSettings,
    service: &Service,
    shutdown: &CancellationToken,
) -> Result<bool> {
    let migrate = settings.migrate.then_some(settings.event_types.as_slice());
    let checked = service
        .check_database(
            &settings.database_url,
            &settings.outbox,
            migrate,
            &settings.event_types,
            shutdown,
        )
        .await?;
    if !checked {
        return Ok(false);
    }
    if settings.outbox.capture_slot.is_none() {
        let url = &settings.database_url;
        let checked = service
            .step("looking for WAL captures", shutdown, || {
                crate::outbox::warn_if_captured(url, &settings.outbox.schema)
            })
            .await?;
        if checked.is_none() {
            return Ok(false);
        }
    }
    if let Some(slot) = &settings.outbox.capture_slot {
        let capturable = service
            .step("checking WAL capture", shutdown, || {
                crate::outbox::check_capture(
                    &settings.database_url,
                    &settings.outbox.schema,
                    slot,
                    &settings.event_types,
                )
            })
            .await?;
        if capturable.is_none() {
            return Ok(false);
        }
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
    capture: Option<Capture>,
    monitor: BridgeMonitor,
    /// The outbox, for giving back what the bridge holds when it stops.
    outbox: Outbox,
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
                .map(|t| t.job_table().to_owned())
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
        let resender =
            Resender::new(outbox.clone(), settings.resend_after)?.with_metrics(&service.metrics);
        let fan_out = FanOut::new(
            &settings.database_url,
            &settings.outbox,
            &settings.stream,
            &settings.event_types,
            settings.fanout_page,
            shutdown,
        )?
        .map(|f| f.with_metrics(&service.metrics));
        let capture = settings.capture().map(|c| c.with_metrics(&service.metrics));
        let monitor = BridgeMonitor {
            // Its event types' tables, and the jobs of their relations (which its fan-out
            // claims).
            routed: settings
                .event_types
                .iter()
                .flat_map(|t| {
                    std::iter::once(t.job_table().to_owned()).chain(
                        crate::event_type::chains(&t.relations)
                            .into_iter()
                            .filter_map(|chain| chain.last().map(|r| r.job_table(t.job_table()))),
                    )
                })
                .collect(),
            fan_out: fan_out.as_ref().map(FanOut::status),
            capture: capture.as_ref().map(Capture::status),
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
            capture,
            monitor,
            outbox,
        })
    }

    /// Starts the resender and the heartbeat and hands the monitor to the health checks;
    /// returns the stream and the publisher for the caller to connect, and the outbox.
    fn start(
        self,
        settings: &BridgeSettings,
        service: &mut Service,
        monitor: &OnceLock<BridgeMonitor>,
    ) -> Result<(JobStream, Publisher, Outbox)> {
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
        if let Some(capture) = self.capture {
            service.spawn(capture.run(service.background()));
        }
        let _ = monitor.set(self.monitor);
        Ok((self.jobs, self.publisher, self.outbox))
    }
}

impl BridgeSettings {
    /// Its WAL capture, when it records the jobs from the WAL.
    fn capture(&self) -> Option<Capture> {
        let slot = self.outbox.capture_slot.as_ref()?;
        Some(Capture::new(
            &self.database_url,
            &self.outbox.schema,
            slot,
            &self.outbox.notify_channel,
            &self.event_types,
        ))
    }

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
