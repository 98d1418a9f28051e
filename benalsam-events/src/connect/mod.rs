//! Opening connections to PostgreSQL and RabbitMQ, with the settings every connection of
//! the library needs (timeouts, keepalives, names an operator can find, TLS).
//!
//! Every connection of the library is opened here, so each one honours the TLS settings of
//! its URL ([`DatabaseUrl`], [`AmqpUrl`]) and reports a refused certificate the same way: a
//! configuration error naming the setting to check, never retried
//! ([`Error::is_retryable`](crate::error::Error::is_retryable)).

pub(crate) mod tls;

use std::time::Duration;

use lapin::options::ConfirmSelectOptions;
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::types::LongString;
use lapin::{Channel, Connection, ConnectionProperties};
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{Client, Socket};
use tokio_postgres_rustls::MakeRustlsConnect;

use self::tls::{ClientIdentity, Verify};
use crate::config::tls::{PgTls, SslMode, TlsFiles, split_amqp, split_postgres};
use crate::config::{AmqpUrl, DatabaseUrl};
use crate::{error::Error, error::Result};

impl DatabaseUrl {
    /// Opens a PostgreSQL connection as the library opens its own: TLS as the URL's
    /// `sslmode` says (a server certificate that does not verify is an error naming
    /// `sslrootcert`, never retried), a connect timeout and TCP keepalives. The connection
    /// task ends when the returned client is dropped.
    pub async fn connect(&self) -> Result<Client> {
        postgres(self).await
    }
}

impl AmqpUrl {
    /// Opens a RabbitMQ connection named `name` (shown in the management UI) as the library
    /// opens its own: TLS for `amqps://` (a broker certificate that does not verify is an
    /// error naming `cacertfile`, never retried), each listed address tried in turn for at
    /// most the connect timeout. Recovery is the caller's.
    pub async fn connect(&self, name: &str) -> Result<Connection> {
        amqp(self, name).await
    }
}

/// How long opening a PostgreSQL connection may take (unless the URL says `connect_timeout`),
/// and opening a RabbitMQ connection to one address.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A PostgreSQL connection of the library (TLS or not, by the URL's `sslmode`).
pub(crate) type PgConnection =
    tokio_postgres::Connection<Socket, <MakeRustlsConnect as MakeTlsConnect<Socket>>::Stream>;

/// Opens a PostgreSQL connection and drives it on the tokio runtime.
///
/// TLS follows the URL's `sslmode` (see [`DatabaseUrl`]); a server certificate that does not
/// verify is an error that names `sslrootcert` and is not retryable. The connection task ends
/// when the returned [`Client`] is dropped; an error on it is logged (the client's next call
/// then fails with a closed-connection error).
pub(crate) async fn postgres(url: &DatabaseUrl) -> Result<Client> {
    postgres_as(url, "benalsam-events").await
}

/// Like [`postgres`], naming the connection in `pg_stat_activity.application_name`
/// (unless the URL sets one), so an operator can tell the library's connections apart.
pub(crate) async fn postgres_as(url: &DatabaseUrl, application_name: &str) -> Result<Client> {
    let (client, connection) = postgres_connection(url, application_name).await?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::warn!(error = %format_args!("{error:#}"), "PostgreSQL connection closed with an error");
        }
    });
    Ok(client)
}

/// Opens a PostgreSQL connection and hands over both halves, for a caller that drives the
/// connection itself (the LISTEN connection reads its notifications from it).
pub(crate) async fn postgres_connection(
    url: &DatabaseUrl,
    application_name: &str,
) -> Result<(Client, PgConnection)> {
    let (config, tls) = pg_config(url, application_name)?;
    config
        .connect(pg_tls(&tls)?)
        .await
        .map_err(|e| Error::postgres_connect(format!("connecting to {url}"), e))
}

/// The settings of every PostgreSQL connection: the URL's, plus a name, a connect timeout and
/// TCP keepalives. Without the last two a connection to a server that vanished (a failover,
/// a cut network) hangs until TCP gives up, minutes later; with them it fails and is
/// reopened. The LISTEN connection, idle most of the time, needs them most.
fn pg_config(url: &DatabaseUrl, application_name: &str) -> Result<(tokio_postgres::Config, PgTls)> {
    let (rest, tls) = split_postgres(url.expose())?;
    let mut config: tokio_postgres::Config = rest
        .parse()
        .map_err(|e| Error::postgres(format!("parsing {url}"), e))?;
    // tokio-postgres decides whether to ask for TLS and whether a refusal is fatal; the rustls
    // configuration decides what is checked.
    config.ssl_mode(match tls.mode {
        SslMode::Disable => tokio_postgres::config::SslMode::Disable,
        SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
            tokio_postgres::config::SslMode::Require
        }
    });
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
    Ok((config, tls))
}

/// The TLS connector of an `sslmode`, its files read now (so a renewed certificate is used
/// by the next connection).
fn pg_tls(tls: &PgTls) -> Result<MakeRustlsConnect> {
    tls::install_provider();
    const SETTING: &str = "DATABASE_URL";
    let roots = |path| tls::read_roots(SETTING, "sslrootcert", path);
    let verify = match (tls.mode, &tls.files.ca) {
        // tokio-postgres never calls the connector with `disable`: nothing to read.
        (SslMode::Disable, _) => {
            return Ok(MakeRustlsConnect::new(tls::client_config(
                Verify::Nothing,
                None,
            )?));
        }
        // `prefer` does not check: tokio-postgres falls back to plaintext only when the server
        // declines TLS, not after a failed handshake, so a check would refuse servers that
        // plaintext reaches.
        (SslMode::Prefer, _) | (SslMode::Require, None) => Verify::Nothing,
        // libpq: "if a root CA file exists, require behaves like verify-ca".
        (SslMode::Require | SslMode::VerifyCa, Some(ca)) => Verify::Chain(roots(ca)?),
        (SslMode::VerifyFull, Some(ca)) => Verify::Full(roots(ca)?),
        // split_postgres refuses these without a CA file.
        (SslMode::VerifyCa | SslMode::VerifyFull, None) => {
            return Err(Error::config(
                SETTING,
                "sslmode=verify-ca and verify-full need sslrootcert",
            ));
        }
    };
    let identity = match &tls.files.client {
        Some(files) => Some(ClientIdentity {
            chain: tls::read_certificates(SETTING, "sslcert", &files.cert)?.parsed,
            key: tls::read_key(SETTING, "sslkey", &files.key)?.parsed,
            setting: SETTING.to_owned(),
        }),
        None => None,
    };
    let mut config = tls::client_config(verify, identity)?;
    // PostgreSQL 17 requires ALPN for direct TLS (sslnegotiation=direct); harmless otherwise.
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(MakeRustlsConnect::new(config))
}

/// Opens a RabbitMQ connection named `name` (shown in the management UI, and usable to find
/// or close it there). Recovery is ours, not lapin's: callers reconnect with their own
/// backoff and know which messages were confirmed.
///
/// An `amqps://` URL connects over TLS (see [`AmqpUrl`] for `cacertfile`, `certfile` and
/// `keyfile`); a broker certificate that does not verify is an error that names `cacertfile`
/// and is not retryable. A URL listing several addresses tries them in order, each for at
/// most the connect timeout, and fails with the last error when none answers.
pub(crate) async fn amqp(url: &AmqpUrl, name: &str) -> Result<Connection> {
    amqp_from(url, name, 0)
        .await
        .map(|(connection, _)| connection)
}

/// Like [`amqp`], trying the addresses of `url` in turn starting with the one at `start`
/// (wrapping around): a caller that lost the link to one address passes the next, so a
/// dead node is tried last rather than first. Returns the connection and the index of the
/// address it reached.
pub(crate) async fn amqp_from(
    url: &AmqpUrl,
    name: &str,
    start: usize,
) -> Result<(Connection, usize)> {
    let addresses = url.addresses();
    let count = addresses.len();
    let mut last_error = None;
    for step in 0..count {
        let index = (start + step) % count;
        let address = &addresses[index];
        match amqp_one(address, name).await {
            Ok(connection) => return Ok((connection, index)),
            Err(error) => {
                if count > 1 {
                    tracing::warn!(broker = %address, %error, "RabbitMQ address unreachable, trying the next");
                }
                last_error = Some(error);
            }
        }
    }
    Err(last_error.unwrap_or_else(|| Error::broker(format!("{url} lists no address"))))
}

/// One connection attempt to one address, bounded by [`CONNECT_TIMEOUT`]: a node that
/// swallows packets must not hold up the others of the list.
async fn amqp_one(url: &AmqpUrl, name: &str) -> Result<Connection> {
    let context = || format!("connecting to {url} as {name}");
    let (uri, files) = split_amqp(url.expose())?;
    let tls = amqp_tls(&files)?;
    let runtime = lapin::runtime::default_runtime().map_err(|e| Error::amqp(context(), e))?;
    let properties = ConnectionProperties::default().with_connection_name(LongString::from(name));
    match tokio::time::timeout(
        CONNECT_TIMEOUT,
        Connection::connect_with_config(&uri, properties, tls, runtime),
    )
    .await
    {
        Ok(connected) => connected.map_err(|e| Error::amqp_connect(context(), e)),
        Err(_) => Err(Error::broker(format!(
            "{}: no answer within {CONNECT_TIMEOUT:?}",
            context()
        ))),
    }
}

/// lapin's TLS settings of the files in an `amqps://` URL. lapin parses the PEM again, but
/// skips what it cannot parse; reading them here first turns a bad file into an error that
/// names it. The CA is added to the public roots lapin trusts (its `webpki-roots` store).
fn amqp_tls(files: &TlsFiles) -> Result<OwnedTLSConfig> {
    const SETTING: &str = "RABBITMQ_URL";
    tls::install_provider();
    let cert_chain = match &files.ca {
        Some(path) => {
            let pem = tls::read_certificates(SETTING, "cacertfile", path)?.pem;
            Some(String::from_utf8(pem).map_err(|_| {
                Error::config(
                    SETTING,
                    format!("cacertfile {}: not a PEM text file", path.display()),
                )
            })?)
        }
        None => None,
    };
    let identity = match &files.client {
        Some(client) => Some(OwnedIdentity::PKCS8 {
            pem: tls::read_certificates(SETTING, "certfile", &client.cert)?.pem,
            // Despite the name, lapin reads PKCS#8, RSA and EC keys.
            key: tls::read_key(SETTING, "keyfile", &client.key)?.pem,
        }),
        None => None,
    };
    Ok(OwnedTLSConfig {
        identity,
        cert_chain,
    })
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

/// How the connections of a URL travel, for the start-up log: `None` when every one is
/// encrypted and its certificate checked, otherwise what an operator should know.
#[cfg_attr(not(any(feature = "bridge", feature = "consumer")), allow(dead_code))]
fn database_transport(url: &DatabaseUrl) -> Option<String> {
    let (_, tls) = split_postgres(url.expose()).ok()?;
    match (tls.mode, &tls.files.ca) {
        (SslMode::Disable, _) => Some("plaintext (sslmode=disable)".to_owned()),
        (SslMode::Prefer, _) => Some(
            "plaintext when the server offers no TLS, and the certificate is not checked when \
             it does (sslmode=prefer, the default); set sslmode=verify-full with sslrootcert"
                .to_owned(),
        ),
        (SslMode::Require, None) => Some(
            "TLS, but the server's certificate is not checked (sslmode=require without \
             sslrootcert)"
                .to_owned(),
        ),
        _ => None,
    }
}

/// Logs, once at start, each connection of `service` that is plaintext or whose certificate
/// is not checked (a warning), so a deployment that meant TLS and forgot it is seen at once.
/// URLs are shown redacted.
#[cfg_attr(not(any(feature = "bridge", feature = "consumer")), allow(dead_code))]
pub(crate) fn log_transports(
    database: &DatabaseUrl,
    broker: &AmqpUrl,
    search: Option<&crate::config::SearchUrl>,
) {
    match database_transport(database) {
        Some(how) => tracing::warn!(database = %database, "PostgreSQL connections: {how}"),
        None => {
            tracing::info!(database = %database, "PostgreSQL connections: TLS, certificate checked")
        }
    }
    for address in broker.addresses() {
        if address.url().scheme() == "amqps" {
            tracing::info!(rabbitmq = %address, "RabbitMQ connection: TLS, certificate checked");
        } else {
            tracing::warn!(rabbitmq = %address, "RabbitMQ connection: plaintext (amqp://); use amqps:// for TLS");
        }
    }
    if let Some(search) = search {
        if search.url().scheme() == "https" {
            tracing::info!(search = %search, "search connections: TLS, certificate checked");
        } else {
            tracing::warn!(search = %search, "search connections: plaintext (http://); use https:// for TLS");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_transport_of_each_sslmode_is_described() {
        let of = |url: &str| database_transport(&url.parse().expect("a database URL"));
        assert!(of("postgres://u@db/x").is_some_and(|t| t.contains("sslmode=prefer")));
        assert!(
            of("postgres://u@db/x?sslmode=disable").is_some_and(|t| t.starts_with("plaintext"))
        );
        assert!(of("postgres://u@db/x?sslmode=require").is_some_and(|t| t.contains("not checked")));
        assert_eq!(
            of("postgres://u@db/x?sslmode=verify-full&sslrootcert=%2Fca.pem"),
            None
        );
        assert_eq!(
            of("postgres://u@db/x?sslmode=require&sslrootcert=%2Fca.pem"),
            None
        );
    }
}
