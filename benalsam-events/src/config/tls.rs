//! TLS settings carried by the service URLs: libpq's `sslmode`, `sslrootcert`, `sslcert` and
//! `sslkey` in `DATABASE_URL`, RabbitMQ's `cacertfile`, `certfile` and `keyfile` in
//! `RABBITMQ_URL`.
//!
//! Neither driver knows these keys as we mean them (tokio-postgres only knows
//! `sslmode=disable|prefer|require` and refuses unknown keys; lapin ignores them), so they are
//! taken out of the URL here and the drivers get the rest. Only the names of files travel in
//! the settings; the files are read when a connection is opened, so a renewed certificate is
//! picked up by the next connection.

use std::path::PathBuf;

use percent_encoding::percent_decode_str;

use crate::{error::Error, error::Result};

/// libpq's `sslmode`, as far as this client supports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SslMode {
    /// Plaintext only.
    Disable,
    /// TLS when the server offers it, without checking its certificate; plaintext otherwise.
    Prefer,
    /// TLS or nothing; the certificate is checked against `sslrootcert` when one is given
    /// (libpq's rule), not at all otherwise.
    Require,
    /// TLS, the certificate chain checked against `sslrootcert`, the host name not.
    VerifyCa,
    /// TLS, the certificate chain checked against `sslrootcert` and the host name against it.
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<Self> {
        Ok(match value {
            "disable" => Self::Disable,
            "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            // tokio-postgres cannot connect in plaintext first and try TLS after a refusal.
            "allow" => {
                return Err(pg_error(
                    "sslmode=allow is not supported (plaintext first, TLS on refusal); use \
                     disable, prefer (TLS when the server offers it) or require",
                ));
            }
            other => {
                return Err(pg_error(format!(
                    "sslmode={other:?} is not one of disable, prefer, require, verify-ca, verify-full"
                )));
            }
        })
    }
}

/// A client certificate and its private key, both PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ClientFiles {
    /// The certificate (and any intermediates after it).
    pub(crate) cert: PathBuf,
    /// Its private key (PKCS#8, PKCS#1 or SEC1), unencrypted.
    pub(crate) key: PathBuf,
}

/// The files of a TLS connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct TlsFiles {
    /// CA certificates (PEM) the server's certificate must lead to.
    pub(crate) ca: Option<PathBuf>,
    /// The certificate the client presents, when the server asks for one.
    pub(crate) client: Option<ClientFiles>,
}

/// The TLS part of a `DATABASE_URL`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PgTls {
    /// `sslmode`; `prefer` when absent (libpq's and tokio-postgres' default).
    pub(crate) mode: SslMode,
    /// `sslrootcert`, `sslcert`, `sslkey`.
    pub(crate) files: TlsFiles,
}

const DATABASE_URL: &str = "DATABASE_URL";
const RABBITMQ_URL: &str = "RABBITMQ_URL";

fn pg_error(reason: impl Into<String>) -> Error {
    Error::config(DATABASE_URL, reason)
}

/// Splits a `postgres://` URL into the URL tokio-postgres gets (without the TLS keys) and
/// its TLS settings; a setting that cannot work is a configuration error naming
/// `DATABASE_URL`.
pub(crate) fn split_postgres(url: &str) -> Result<(String, PgTls)> {
    let (rest, taken) = take_params(
        url,
        &["sslmode", "sslrootcert", "sslcert", "sslkey", "sslpassword"],
    )
    .map_err(pg_error)?;
    let mut mode = SslMode::Prefer;
    let (mut ca, mut cert, mut key) = (None, None, None);
    for (name, value) in taken {
        match name {
            "sslmode" => mode = SslMode::parse(&value)?,
            "sslrootcert" if value == "system" => {
                return Err(pg_error(
                    "sslrootcert=system (the operating system's CAs) is not supported; give the \
                     path of the CA file (PEM)",
                ));
            }
            "sslrootcert" => ca = Some(PathBuf::from(value)),
            "sslcert" => cert = Some(PathBuf::from(value)),
            "sslkey" => key = Some(PathBuf::from(value)),
            // The value is a secret: never echoed.
            _ => {
                return Err(pg_error(
                    "sslpassword is not supported: encrypted keys cannot be read; give an \
                     unencrypted sslkey readable by this service only",
                ));
            }
        }
    }
    if matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull) && ca.is_none() {
        let mode = if mode == SslMode::VerifyCa {
            "verify-ca"
        } else {
            "verify-full"
        };
        return Err(pg_error(format!(
            "sslmode={mode} needs sslrootcert=<path of the CA certificate (PEM) that signed the \
             server's certificate>"
        )));
    }
    let client = client_files(cert, key, "sslcert", "sslkey").map_err(pg_error)?;
    Ok((
        rest,
        PgTls {
            mode,
            files: TlsFiles { ca, client },
        },
    ))
}

/// Splits an `amqp://` or `amqps://` URL into the URL lapin gets and the files of its TLS
/// connection (RabbitMQ's URI query parameters `cacertfile`, `certfile`, `keyfile`).
pub(crate) fn split_amqp(url: &str) -> Result<(String, TlsFiles)> {
    let config_error = |reason: String| Error::config(RABBITMQ_URL, reason);
    let (rest, taken) =
        take_params(url, &["cacertfile", "certfile", "keyfile"]).map_err(config_error)?;
    let (mut ca, mut cert, mut key) = (None, None, None);
    for (name, value) in taken {
        let path = Some(PathBuf::from(value));
        match name {
            "cacertfile" => ca = path,
            "certfile" => cert = path,
            _ => key = path,
        }
    }
    let client = client_files(cert, key, "certfile", "keyfile").map_err(config_error)?;
    let files = TlsFiles { ca, client };
    // A CA or certificate on a plaintext URL would be ignored: most likely a missing `s`.
    if !url.starts_with("amqps:") && files != TlsFiles::default() {
        return Err(config_error(
            "cacertfile, certfile and keyfile apply to amqps:// URLs only; use amqps://".into(),
        ));
    }
    Ok((rest, files))
}

/// Both or neither of a client certificate and its key.
fn client_files(
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    cert_name: &str,
    key_name: &str,
) -> std::result::Result<Option<ClientFiles>, String> {
    match (cert, key) {
        (Some(cert), Some(key)) => Ok(Some(ClientFiles { cert, key })),
        (None, None) => Ok(None),
        (Some(_), None) => Err(format!("{cert_name} needs {key_name} (its private key)")),
        (None, Some(_)) => Err(format!("{key_name} needs {cert_name} (its certificate)")),
    }
}

/// A URL without some of its parameters, and their names with their decoded values.
type Split = (String, Vec<(&'static str, String)>);

/// Takes the query parameters named in `names` out of `url`: returns the URL without them and
/// their percent-decoded values, in URL order.
///
/// Works on the text: every other parameter stays byte for byte as it was, because
/// re-encoding a query changes it (a form encoder writes a space as `+`, which tokio-postgres
/// reads as a plus sign). Values are decoded as libpq decodes URLs: `%XX` only, `+` stays a
/// plus sign.
fn take_params(url: &str, names: &[&'static str]) -> std::result::Result<Split, String> {
    let Some((base, query_and_fragment)) = url.split_once('?') else {
        return Ok((url.to_owned(), Vec::new()));
    };
    let (query, fragment) = match query_and_fragment.split_once('#') {
        Some((query, fragment)) => (query, Some(fragment)),
        None => (query_and_fragment, None),
    };
    let mut kept = Vec::new();
    let mut taken = Vec::new();
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        let (raw_name, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = percent_decode_str(raw_name).decode_utf8_lossy();
        match names.iter().find(|wanted| **wanted == name) {
            Some(wanted) => {
                let value = percent_decode_str(raw_value)
                    .decode_utf8()
                    .map_err(|_| format!("the value of {wanted} is not UTF-8 once decoded"))?;
                taken.push((*wanted, value.into_owned()));
            }
            None => kept.push(pair),
        }
    }
    if taken.is_empty() {
        return Ok((url.to_owned(), taken));
    }
    let mut rest = base.to_owned();
    if !kept.is_empty() {
        rest.push('?');
        rest.push_str(&kept.join("&"));
    }
    if let Some(fragment) = fragment {
        rest.push('#');
        rest.push_str(fragment);
    }
    Ok((rest, taken))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tls_keys_are_taken_out_and_everything_else_kept_byte_for_byte() {
        let (rest, tls) = split_postgres(
            "postgres://u:p%40ss@db:5433/app?application_name=a+b&sslmode=verify-full\
             &options=-c%20x%3Dy&sslrootcert=%2Fetc%2Fpki%2Fca%20one.pem&connect_timeout=5",
        )
        .expect("valid");
        assert_eq!(
            rest,
            "postgres://u:p%40ss@db:5433/app?application_name=a+b&options=-c%20x%3Dy&connect_timeout=5"
        );
        assert_eq!(tls.mode, SslMode::VerifyFull);
        assert_eq!(tls.files.ca, Some(PathBuf::from("/etc/pki/ca one.pem")));
        assert_eq!(tls.files.client, None);
        // What tokio-postgres makes of the rest: `+` stays a plus sign.
        let config: tokio_postgres::Config = rest.parse().expect("tokio-postgres parses it");
        assert_eq!(config.get_application_name(), Some("a+b"));
        assert_eq!(config.get_options(), Some("-c x=y"));
    }

    #[test]
    fn without_tls_keys_the_url_is_unchanged_and_the_mode_is_prefer() {
        for url in [
            "postgres://u@db/app",
            "postgres://u@db/app?application_name=x",
            "postgres://u@db/app?a=1&&b=2#frag",
        ] {
            let (rest, tls) = split_postgres(url).expect("valid");
            assert_eq!(rest, url);
            assert_eq!(tls.mode, SslMode::Prefer);
        }
        let (rest, _) = split_postgres("postgres://u@db/app?sslmode=disable").expect("valid");
        assert_eq!(rest, "postgres://u@db/app");
        let (rest, _) = split_postgres("postgres://u@db/app?sslmode=require#f").expect("valid");
        assert_eq!(rest, "postgres://u@db/app#f");
    }

    #[test]
    fn encoded_names_and_a_client_certificate() {
        let (rest, tls) = split_postgres(
            "postgres://db/app?ssl%6Dode=require&sslcert=%2Fc.pem&x=%26&sslkey=/k.pem",
        )
        .expect("valid");
        assert_eq!(rest, "postgres://db/app?x=%26");
        assert_eq!(tls.mode, SslMode::Require);
        assert_eq!(
            tls.files.client,
            Some(ClientFiles {
                cert: "/c.pem".into(),
                key: "/k.pem".into()
            })
        );
    }

    #[test]
    fn settings_that_cannot_work_name_database_url() {
        for (url, words) in [
            (
                "postgres://db/app?sslmode=verify-full",
                &["sslrootcert"][..],
            ),
            ("postgres://db/app?sslmode=verify-ca", &["sslrootcert"]),
            ("postgres://db/app?sslmode=allow", &["allow", "prefer"]),
            ("postgres://db/app?sslmode=sometimes", &["sometimes"]),
            ("postgres://db/app?sslcert=/c.pem", &["sslkey"]),
            ("postgres://db/app?sslkey=/k.pem", &["sslcert"]),
            ("postgres://db/app?sslrootcert=system", &["system"]),
            ("postgres://db/app?sslpassword=hunter2", &["sslpassword"]),
        ] {
            let error = split_postgres(url).expect_err(url);
            let text = error.to_string();
            assert!(error.is_config(), "{text}");
            assert_eq!(error.setting(), Some("DATABASE_URL"));
            for word in words {
                assert!(text.contains(word), "{url}: {text}");
            }
            assert!(!text.contains("hunter2"), "{text}");
        }
    }

    #[test]
    fn rabbitmq_files_are_taken_out_of_amqps_urls() {
        let (rest, files) = split_amqp(
            "amqps://u:p@mq:5671/%2f?heartbeat=10&cacertfile=%2Fca.pem&certfile=/c.pem&keyfile=/k.pem",
        )
        .expect("valid");
        assert_eq!(rest, "amqps://u:p@mq:5671/%2f?heartbeat=10");
        assert_eq!(files.ca, Some(PathBuf::from("/ca.pem")));
        assert_eq!(
            files.client,
            Some(ClientFiles {
                cert: "/c.pem".into(),
                key: "/k.pem".into()
            })
        );
        let (rest, files) = split_amqp("amqp://u:p@mq/%2f").expect("plain");
        assert_eq!(
            (rest.as_str(), files),
            ("amqp://u:p@mq/%2f", TlsFiles::default())
        );

        let error = split_amqp("amqp://mq/%2f?cacertfile=/ca.pem").expect_err("plain with a CA");
        assert!(error.to_string().contains("amqps://"), "{error}");
        assert_eq!(error.setting(), Some("RABBITMQ_URL"));
        let error = split_amqp("amqps://mq/%2f?certfile=/c.pem").expect_err("no key");
        assert!(error.to_string().contains("keyfile"), "{error}");
    }
}
