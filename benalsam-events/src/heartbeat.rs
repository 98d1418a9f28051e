//! Periodic heartbeat events on `benalsam.system` (`health.<service>`), so a monitor
//! listening on `system.health` notices a binary that stopped.

use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Connection};
use tokio_util::sync::CancellationToken;

use crate::config::AmqpUrl;
use crate::health::Check;
use crate::topology::SYSTEM_EXCHANGE;
use crate::{Error, Result};

/// Publishes `report`'s answer every `interval` as `health.<service>` until `shutdown`.
/// Heartbeats are best effort: a failed one is logged and the next tries a new connection.
pub async fn run(
    url: AmqpUrl,
    service: String,
    interval: Duration,
    report: Check,
    shutdown: CancellationToken,
) {
    let routing_key = format!("health.{service}");
    let mut link: Option<(Connection, Channel)> = None;
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = ticks.tick() => {}
        }
        if link.is_none() {
            match open(&url, &service).await {
                Ok(opened) => link = Some(opened),
                Err(error) => {
                    tracing::debug!(%error, "heartbeat: no connection");
                    continue;
                }
            }
        }
        let body = serde_json::to_vec(&report()).unwrap_or_default();
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

async fn open(url: &AmqpUrl, service: &str) -> Result<(Connection, Channel)> {
    let connection = crate::amqp::connect(url, &format!("benalsam-{service} heartbeat")).await?;
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| Error::amqp("opening the heartbeat channel", e))?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| Error::amqp("enabling confirms for heartbeats", e))?;
    Ok((connection, channel))
}

async fn beat(channel: &Channel, routing_key: &str, body: &[u8]) -> Result<()> {
    let properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_type(ShortString::from(routing_key))
        .with_expiration(ShortString::from("3600000"));
    channel
        .basic_publish(
            SYSTEM_EXCHANGE.into(),
            ShortString::from(routing_key),
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
