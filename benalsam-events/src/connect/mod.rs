//! Opening connections to PostgreSQL and RabbitMQ, with the settings every connection of
//! the library needs (timeouts, keepalives, names an operator can find).

use std::time::Duration;

use lapin::options::ConfirmSelectOptions;
use lapin::types::LongString;
use lapin::{Channel, Connection, ConnectionProperties};
use tokio_postgres::{Client, NoTls};

use crate::config::{AmqpUrl, DatabaseUrl};
use crate::{Error, Result};

/// How long opening a PostgreSQL connection may take (unless the URL says `connect_timeout`).
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens a PostgreSQL connection and drives it on the tokio runtime.
///
/// The connection task ends when the returned [`Client`] is dropped; an error on it is
/// logged (the client's next call then fails with a closed-connection error).
pub async fn postgres(url: &DatabaseUrl) -> Result<Client> {
    postgres_as(url, "benalsam-events").await
}

/// Like [`postgres`], naming the connection in `pg_stat_activity.application_name`
/// (unless the URL sets one), so an operator can tell the library's connections apart.
pub(crate) async fn postgres_as(url: &DatabaseUrl, application_name: &str) -> Result<Client> {
    let (client, connection) = pg_config(url, application_name)?
        .connect(NoTls)
        .await
        .map_err(|e| Error::postgres(format!("connecting to {url}"), e))?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::warn!(error = %format_args!("{error:#}"), "PostgreSQL connection closed with an error");
        }
    });
    Ok(client)
}

/// The settings of every PostgreSQL connection: the URL's, plus a name, a connect timeout and
/// TCP keepalives. Without the last two a connection to a server that vanished (a failover,
/// a cut network) hangs until TCP gives up, minutes later; with them it fails and is
/// reopened. The LISTEN connection, idle most of the time, needs them most.
pub(crate) fn pg_config(
    url: &DatabaseUrl,
    application_name: &str,
) -> Result<tokio_postgres::Config> {
    let mut config: tokio_postgres::Config = url
        .expose()
        .parse()
        .map_err(|e| Error::postgres(format!("parsing {url}"), e))?;
    if config.get_application_name().is_none() {
        config.application_name(application_name);
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    config
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(30))
        .keepalives_interval(Duration::from_secs(10))
        .keepalives_retries(3);
    Ok(config)
}

/// Opens a RabbitMQ connection named `name` (shown in the management UI, and usable to find
/// or close it there). Recovery is ours, not lapin's: callers reconnect with their own
/// backoff and know which messages were confirmed.
pub async fn amqp(url: &AmqpUrl, name: &str) -> Result<Connection> {
    let properties = ConnectionProperties::default().with_connection_name(LongString::from(name));
    Connection::connect(url.expose(), properties)
        .await
        .map_err(|e| Error::amqp(format!("connecting to {url} as {name}"), e))
}

/// Opens a channel in publisher-confirm mode on `connection`; `purpose` names it in errors.
pub(crate) async fn confirm_channel(connection: &Connection, purpose: &str) -> Result<Channel> {
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| Error::amqp(format!("opening the {purpose} channel"), e))?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| Error::amqp(format!("enabling confirms on the {purpose} channel"), e))?;
    Ok(channel)
}
