//! Connecting to RabbitMQ.

use lapin::types::LongString;
use lapin::{Connection, ConnectionProperties};

use crate::config::AmqpUrl;
use crate::{Error, Result};

/// Opens a connection named `name` (shown in the management UI, and usable to find or close
/// it there). Recovery is ours, not lapin's: callers reconnect with their own backoff and
/// know which messages were confirmed.
pub async fn connect(url: &AmqpUrl, name: &str) -> Result<Connection> {
    let properties = ConnectionProperties::default().with_connection_name(LongString::from(name));
    Connection::connect(url.expose(), properties)
        .await
        .map_err(|e| Error::amqp(format!("connecting to {url} as {name}"), e))
}
