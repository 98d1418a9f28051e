//! Periodic heartbeat events on `benalsam.system` (`health.<service>`), so a monitor
//! listening on `system.health` notices a binary that stopped.

use std::time::Duration;

use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Connection};
use tokio_util::sync::CancellationToken;

use crate::config::{AmqpUrl, require_positive};
use crate::ops::HealthReport;
use crate::publish::SYSTEM_EXCHANGE;
use crate::{error::Error, error::Result};

/// Publishes a report every `interval` as `health.<service>` on `benalsam.system`.
pub(crate) struct Heartbeat {
    url: AmqpUrl,
    service: String,
    interval: Duration,
    report: Box<dyn Fn() -> HealthReport + Send + Sync>,
}

impl std::fmt::Debug for Heartbeat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Heartbeat")
            .field("service", &self.service)
            .field("interval", &self.interval)
            .finish_non_exhaustive()
    }
}

impl Heartbeat {
    /// Heartbeats of `service` carrying `report`'s answer, every `interval` (which must be
    /// longer than zero).
    pub(crate) fn new(
        url: AmqpUrl,
        service: &str,
        interval: Duration,
        report: impl Fn() -> HealthReport + Send + Sync + 'static,
    ) -> Result<Self> {
        require_positive(
            &format!("{}::heartbeat_interval", super::settings_type(service)),
            interval,
        )?;
        Ok(Self {
            url,
            service: service.to_owned(),
            interval,
            report: Box::new(report),
        })
    }

    /// Beats until `shutdown`. Heartbeats are best effort: a failed one is logged and the
    /// next tries a new connection.
    pub(crate) async fn run(self, shutdown: CancellationToken) {
        let routing_key = format!("health.{}", self.service);
        let mut link: Option<(Connection, Channel)> = None;
        let mut ticks = tokio::time::interval(self.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = ticks.tick() => {}
            }
            if link.is_none() {
                match open(&self.url, &self.service).await {
                    Ok(opened) => link = Some(opened),
                    Err(error) => {
                        tracing::debug!(%error, "heartbeat: no connection");
                        continue;
                    }
                }
            }
            let body = serde_json::to_vec(&(self.report)()).unwrap_or_default();
            if let Some((_, channel)) = &link
                && let Err(error) = beat(channel, &routing_key, &body).await
            {
                tracing::debug!(%error, "heartbeat not delivered");
                link = None;
            }
        }
        if let Some((connection, _)) = link {
            let _ = connection.close(200, "shutting down".into()).await;
        }
    }
}

async fn open(url: &AmqpUrl, service: &str) -> Result<(Connection, Channel)> {
    let connection = crate::connect::amqp(url, &format!("benalsam-{service} heartbeat")).await?;
    let channel = crate::connect::confirm_channel(&connection, "heartbeat").await?;
    Ok((connection, channel))
}

async fn beat(channel: &Channel, routing_key: &str, body: &[u8]) -> Result<()> {
    let key = ShortString::try_new(routing_key).map_err(|_| {
        Error::config(
            "service",
            format!("{routing_key:?} is longer than 255 bytes"),
        )
    })?;
    let properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_type(key.clone())
        .with_expiration(ShortString::from("3600000"));
    channel
        .basic_publish(
            SYSTEM_EXCHANGE.into(),
            key,
            BasicPublishOptions::default(),
            body,
            properties,
        )
        .await
        .map_err(|e| Error::amqp("publishing a heartbeat", e))?
        .await
        .map_err(|e| Error::amqp("confirming a heartbeat", e))?;
    Ok(())
}
