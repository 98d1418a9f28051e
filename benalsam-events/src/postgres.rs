//! Connecting to PostgreSQL.

use tokio_postgres::{Client, NoTls};

use crate::config::DatabaseUrl;
use crate::{Error, Result};

/// Opens a connection and drives it on the tokio runtime.
///
/// The connection task ends when the returned [`Client`] is dropped; an error on it is
/// logged (the client's next call then fails with a closed-connection error).
pub async fn connect(url: &DatabaseUrl) -> Result<Client> {
    let (client, connection) = tokio_postgres::connect(url.expose(), NoTls)
        .await
        .map_err(|e| Error::postgres(format!("connecting to {url}"), e))?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::warn!(error = %format_args!("{error:#}"), "PostgreSQL connection closed with an error");
        }
    });
    Ok(client)
}
