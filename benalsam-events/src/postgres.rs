//! Connecting to PostgreSQL.

use std::time::Duration;

use tokio_postgres::{Client, NoTls};

use crate::config::DatabaseUrl;
use crate::{Error, Result};

/// How long opening a connection may take (unless the URL says `connect_timeout`).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens a connection and drives it on the tokio runtime.
///
/// The connection task ends when the returned [`Client`] is dropped; an error on it is
/// logged (the client's next call then fails with a closed-connection error).
pub async fn connect(url: &DatabaseUrl) -> Result<Client> {
    connect_as(url, "benalsam-events").await
}

/// Like [`connect`], naming the connection in `pg_stat_activity.application_name` (unless
/// the URL sets one), so an operator can tell the library's connections apart.
pub async fn connect_as(url: &DatabaseUrl, application_name: &str) -> Result<Client> {
    let mut config: tokio_postgres::Config = url
        .expose()
        .parse()
        .map_err(|e| Error::postgres(format!("parsing {url}"), e))?;
    if config.get_application_name().is_none() {
        config.application_name(application_name);
    }
    // Without these a connection to a server that vanished (a failover, a cut network) hangs
    // until TCP gives up, minutes later; with them it fails and is reopened.
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    config
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(30))
        .keepalives_interval(Duration::from_secs(10))
        .keepalives_retries(3);
    let (client, connection) = config
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
