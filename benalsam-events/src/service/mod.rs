//! What the bridge and the consumer share as running services: a health server that answers
//! from the first moment, the start-up steps it reports, the metrics registry and the
//! background tasks that end with the service.

#[cfg(feature = "bridge")]
pub mod bridge;
#[cfg(feature = "consumer")]
pub mod consumer;
mod heartbeat;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::backoff::{Backoff, retry};
use crate::ops::{HealthReport, HealthServer, Metrics, Readiness};
use crate::outbox::OutboxConfig;
use crate::{config::DatabaseUrl, error::Error, error::Result, event_type::EventType};

pub(crate) use heartbeat::Heartbeat;

/// A health check, by path.
pub(crate) type Check = (&'static str, Arc<dyn Fn() -> HealthReport + Send + Sync>);

/// A check at `path` answered by `report` of the monitor, once start-up has set it (the
/// health server answers "starting" before that anyway).
pub(crate) fn check<M: Send + Sync + 'static>(
    path: &'static str,
    monitor: &Arc<OnceLock<M>>,
    report: fn(&M) -> HealthReport,
) -> Check {
    let monitor = Arc::clone(monitor);
    let check = move || match monitor.get() {
        Some(monitor) => report(monitor),
        None => HealthReport::new(path, false, "starting", serde_json::json!({})),
    };
    (path, Arc::new(check))
}

/// Checks what every service needs: at least one event type, each of them valid, and
/// positive health and heartbeat intervals. `service` names it in the error.
/// The settings type of `service` (`bridge`, `benalsam-consumer`, ...), which the errors
/// about its fields name.
pub(crate) fn settings_type(service: &str) -> &'static str {
    if service.contains("bridge") {
        "BridgeSettings"
    } else {
        "ConsumerSettings"
    }
}

pub(crate) fn validate(
    service: &str,
    event_types: &[crate::event_type::EventType],
    health_window: std::time::Duration,
    heartbeat_interval: Option<std::time::Duration>,
) -> Result<()> {
    if event_types.is_empty() {
        return Err(Error::config(
            "event types",
            format!("a {service} needs at least one (BENALSAM_CONFIG)"),
        ));
    }
    crate::event_type::validate_all(event_types)?;
    let settings = settings_type(service);
    crate::config::require_positive(&format!("{settings}::health_window"), health_window)?;
    if let Some(interval) = heartbeat_interval {
        crate::config::require_positive(&format!("{settings}::heartbeat_interval"), interval)?;
    }
    Ok(())
}

/// A running service's shared parts.
pub(crate) struct Service {
    pub(crate) readiness: Readiness,
    pub(crate) metrics: Metrics,
    background: CancellationToken,
    /// A set rather than handles: dropping it aborts them. When the service's future is
    /// dropped without stopping (its task aborted, a `select!` that moved on), a background
    /// task left running would go on as a bridge nobody runs: a fan-out renewing its claim on
    /// a job that no other bridge can then take over.
    tasks: JoinSet<()>,
}

impl Service {
    /// A service called `name` (e.g. `benalsam-bridge`), stopping with `shutdown`.
    pub(crate) fn new(name: &str, shutdown: &CancellationToken) -> Self {
        let readiness = Readiness::default();
        readiness.starting("starting");
        Self {
            readiness,
            metrics: Metrics::for_service(name),
            background: shutdown.child_token(),
            tasks: JoinSet::new(),
        }
    }

    /// Starts the health server on `addr` (when given) with `checks`; it answers 503 with
    /// the current start-up step until [`Readiness::ready`].
    pub(crate) async fn serve_health(
        &mut self,
        name: &str,
        addr: Option<SocketAddr>,
        checks: Vec<Check>,
    ) -> Result<()> {
        let Some(addr) = addr else {
            return Ok(());
        };
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
            Error::config(
                format!("{}::health_addr", settings_type(name)),
                format!("cannot listen on {addr}: {e}"),
            )
        })?;
        let mut server =
            HealthServer::new(name, self.readiness.clone()).metrics(self.metrics.clone());
        for (path, check) in checks {
            server = server.check(path, move || check());
        }
        tracing::info!(health = %addr, "health endpoints listening");
        self.spawn(server.run(listener, self.background.clone()));
        Ok(())
    }

    /// A start-up step: reported while it runs, retried while its service is unreachable.
    /// `Ok(None)` when shutdown came first.
    pub(crate) async fn step<T, F, Fut>(
        &self,
        what: &str,
        shutdown: &CancellationToken,
        op: F,
    ) -> Result<Option<T>>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        self.readiness.starting(what);
        retry(what, Backoff::default(), shutdown, op).await
    }

    /// The database steps both services start with: the migrations when asked (`migrate`:
    /// the event types whose triggers they attach; the consumer attaches none), then every
    /// table and column `event_types` name, before anything is claimed or consumed. False
    /// when shutdown came first.
    pub(crate) async fn check_database(
        &self,
        database: &DatabaseUrl,
        outbox: &OutboxConfig,
        migrate: Option<&[EventType]>,
        event_types: &[EventType],
        shutdown: &CancellationToken,
    ) -> Result<bool> {
        if let Some(triggers) = migrate {
            let migrated = self
                .step("migrating the database", shutdown, || async {
                    let mut client = crate::connect::postgres(database).await?;
                    crate::outbox::migrate(&mut client, outbox, triggers).await
                })
                .await?;
            if migrated.is_none() {
                return Ok(false);
            }
        }
        let checked = self
            .step(
                "checking the event types against the database",
                shutdown,
                || crate::outbox::check_tables(database, &outbox.schema, event_types),
            )
            .await?;
        Ok(checked.is_some())
    }

    /// Runs `task` until the service stops.
    pub(crate) fn spawn(&mut self, task: impl Future<Output = ()> + Send + 'static) {
        self.tasks.spawn(task);
    }

    /// The token background tasks stop on.
    pub(crate) fn background(&self) -> CancellationToken {
        self.background.clone()
    }

    /// Stops the background tasks and waits for them.
    pub(crate) async fn stop(mut self) {
        self.background.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}
