//! Service URLs, validated when they are read.
//!
//! Each URL type checks its scheme at parse time, so a wrong value stops start-up with a
//! message naming the setting instead of failing later in a connection attempt. Their
//! `Display` and `Debug` hide the password: printing a configuration is always safe.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use super::redact::{redact_unparsed, redact_url};
use super::tls::{ClientFiles, TlsFiles, split_amqp, split_postgres};
use super::url_list::{
    Disagreement, one_at_sign, parse_list, same_scheme_and_credentials, same_vhost, split_addresses,
};
use crate::{error::Error, error::Result};

/// Default `DATABASE_URL`: the database of the local stack (`scripts/stack`).
pub(crate) const DEFAULT_DATABASE_URL: &str =
    "postgres://benalsam:benalsam@127.0.0.1:5432/benalsam";
/// Default `RABBITMQ_URL`: the local stack's broker, with the architecture document's user.
pub(crate) const DEFAULT_RABBITMQ_URL: &str = "amqp://benalsam:benalsam123@127.0.0.1:5672/%2f";
/// Default `ELASTICSEARCH_URL`: the local stack's search node.
pub(crate) const DEFAULT_ELASTICSEARCH_URL: &str = "http://127.0.0.1:9200";

// `check` validates what the scheme and host checks cannot (the TLS parameters of the query);
// `from_env` completes a URL read from the environment with the settings that cannot be in
// it; `extra` fields hold those settings (empty after parsing).
macro_rules! service_url {
    ($(#[$doc:meta])* $name:ident, setting = $setting:literal, default = $default:ident, schemes = [$($scheme:literal),+], example = $example:literal, check = $check:expr, from_env = $from_env:expr, list = $list:expr $(, extra { $($field:ident: $ty:ty),* })?) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq)]
        pub struct $name {
            url: url::Url,
            /// The addresses after the first, for a setting that takes a list (empty otherwise).
            others: Vec<url::Url>,
            $($($field: $ty,)*)?
        }

        impl $name {
            /// The environment variable (and long flag, lowercased) this setting is read from.
            pub const SETTING: &'static str = $setting;

            /// The local stack's address (`scripts/stack`), what [`Self::from_env`] reads
            /// when the setting is not given. It carries the stack's password: show it
            /// redacted.
            pub const DEFAULT: &'static str = $default;

            /// The full URL, password included: pass it to a client, never to a log. Of a
            /// list, the first address.
            pub fn expose(&self) -> &str {
                self.url.as_str()
            }

            /// The URL with its password masked; of a list, every address, comma-separated.
            pub fn redacted(&self) -> String {
                let mut text = redact_url(self.url.as_str());
                for other in &self.others {
                    text.push(',');
                    text.push_str(&redact_url(other.as_str()));
                }
                text
            }

            /// Each address of the setting on its own, in the order given (one for a single
            /// URL).
            pub fn addresses(&self) -> Vec<Self> {
                std::iter::once(&self.url)
                    .chain(&self.others)
                    .map(|url| Self {
                        url: url.clone(),
                        others: Vec::new(),
                        $($($field: self.$field.clone(),)*)?
                    })
                    .collect()
            }

            /// The parsed URL.
            pub fn url(&self) -> &url::Url {
                &self.url
            }

            /// Reads the setting from its environment variable, or from the file its
            /// `_FILE` variable names (Docker and Kubernetes secrets; both set is an
            /// error); neither set, the local stack's (`scripts/stack`).
            pub fn from_env() -> Result<Self> {
                let parsed: Self = super::secret_file::env_or_file($setting)?
                    .as_deref()
                    .unwrap_or($default)
                    .parse()?;
                $from_env(parsed)
            }
        }

        impl FromStr for $name {
            type Err = Error;

            fn from_str(raw: &str) -> Result<Self> {
                let agree: Option<Disagreement> = $list;
                match agree {
                    Some(agree) if split_addresses(raw).len() > 1 => {
                        let (url, others) = parse_list(
                            $setting,
                            raw,
                            |entry| Self::parse_one(entry).map(|one| one.url),
                            agree,
                        )?;
                        Ok(Self {
                            url,
                            others,
                            $($($field: <$ty>::default(),)*)?
                        })
                    }
                    Some(_) => {
                        one_at_sign($setting, raw, "the address")?;
                        Self::parse_one(raw)
                    }
                    None => Self::parse_one(raw),
                }
            }
        }

        impl $name {
            /// Parses one URL.
            fn parse_one(raw: &str) -> Result<Self> {
                let parsed = url::Url::parse(raw).map_err(|e| Error::config(
                    $setting,
                    format!("{} is not a URL ({e}); expected e.g. {}", redact_unparsed(raw), $example),
                ))?;
                let schemes: &[&str] = &[$($scheme),+];
                if !schemes.contains(&parsed.scheme()) {
                    return Err(Error::config(
                        $setting,
                        format!(
                            "scheme {:?} is not one of {}; expected e.g. {}",
                            parsed.scheme(),
                            schemes.join(", "),
                            $example
                        ),
                    ));
                }
                if parsed.host_str().is_none_or(str::is_empty) {
                    return Err(Error::config(
                        $setting,
                        format!("{} names no host; expected e.g. {}", redact_unparsed(raw), $example),
                    ));
                }
                $check(parsed.as_str())?;
                Ok(Self {
                    url: parsed,
                    others: Vec::new(),
                    $($($field: <$ty>::default(),)*)?
                })
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.redacted())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({}", stringify!($name), self.redacted())?;
                $($(
                    if self.$field != <$ty>::default() {
                        write!(f, ", {}: {:?}", stringify!($field), self.$field)?;
                    }
                )*)?
                f.write_str(")")
            }
        }
    };
}

service_url!(
    /// Where PostgreSQL is: `postgres://user:password@host:port/database`.
    ///
    /// TLS is set with libpq's parameters: `sslmode` = `disable`, `prefer` (the default: TLS
    /// when the server offers it, its certificate not checked), `require` (TLS or nothing; the
    /// certificate checked against `sslrootcert` when given), `verify-ca` (the certificate
    /// must lead to `sslrootcert`) or `verify-full` (and name the URL's host); `allow` is
    /// refused. `sslrootcert=<path>` is the CA file (PEM), needed by `verify-ca` and
    /// `verify-full`; `sslcert=<path>` and `sslkey=<path>` a client certificate and its
    /// unencrypted key (PEM). Paths are percent-encoded like any URL value
    /// (`sslrootcert=%2Fetc%2Fpki%2Fca.pem`).
    DatabaseUrl,
    setting = "DATABASE_URL",
    default = DEFAULT_DATABASE_URL,
    schemes = ["postgres", "postgresql"],
    example = "postgres://benalsam:benalsam@127.0.0.1:5432/benalsam",
    check = |url| split_postgres(url).map(drop),
    from_env = Ok,
    list = None
);

service_url!(
    /// Where RabbitMQ is: `amqp://user:password@host:port/vhost`, or `amqps://` for TLS.
    ///
    /// An `amqps://` broker's certificate must lead to one of the public CAs (webpki roots)
    /// or to the CA file (PEM) of the query parameter `cacertfile=<path>`, and name the URL's
    /// host. `certfile=<path>` and `keyfile=<path>` give a client certificate and its
    /// unencrypted key (PEM). The parameter names are those of RabbitMQ's URI specification.
    ///
    /// Several nodes of one cluster are given as a comma-separated list
    /// (`amqp://u:p@mq1:5672/%2f,amqp://u:p@mq2:5672/%2f`; a comma separates entries only
    /// before a scheme, so a comma inside a password stays part of it). Connections try them
    /// in turn, moving to the next when one fails or is lost.
    /// Every entry is checked on its own and all must name the same vhost.
    AmqpUrl,
    setting = "RABBITMQ_URL",
    default = DEFAULT_RABBITMQ_URL,
    schemes = ["amqp", "amqps"],
    example = "amqp://benalsam:benalsam123@127.0.0.1:5672/%2f",
    check = |url| split_amqp(url).map(drop),
    from_env = Ok,
    list = Some(same_vhost)
);

service_url!(
    /// Where Elasticsearch (or OpenSearch) is: `http://host:9200`, or `https://`.
    ///
    /// An `https://` node's certificate must lead to one of the public CAs (webpki roots) or
    /// to the CA of [`SearchUrl::with_ca`], and name the URL's host; a node that asks for a
    /// client certificate gets the one of [`SearchUrl::with_client_certificate`]. From the
    /// environment, `ELASTICSEARCH_CA`, `ELASTICSEARCH_CLIENT_CERT` and
    /// `ELASTICSEARCH_CLIENT_KEY` set them.
    ///
    /// Several nodes of one cluster are given as a comma-separated list
    /// (`http://u:p@es1:9200,http://u:p@es2:9200`; as for RabbitMQ, a comma separates entries
    /// only before a scheme). The consumer sticks to one node and moves to the next when it
    /// fails ([`SearchNodes`](crate::search::SearchNodes)). Every entry is checked on its own;
    /// all must use the same scheme (the TLS files apply to every node, and a failover must
    /// never fall back to plain HTTP) and carry the same user and password (one cluster, one
    /// set of credentials: a node that would refuse them must not be failed over to).
    SearchUrl,
    setting = "ELASTICSEARCH_URL",
    default = DEFAULT_ELASTICSEARCH_URL,
    schemes = ["http", "https"],
    example = "http://127.0.0.1:9200",
    check = |_| Ok::<(), Error>(()),
    from_env = SearchUrl::with_tls_from_env,
    list = Some(same_scheme_and_credentials),
    extra { tls: TlsFiles }
);

/// The environment variable of [`SearchUrl::with_ca`].
pub(crate) const ELASTICSEARCH_CA: &str = "ELASTICSEARCH_CA";
/// The environment variable of the certificate of [`SearchUrl::with_client_certificate`].
pub(crate) const ELASTICSEARCH_CLIENT_CERT: &str = "ELASTICSEARCH_CLIENT_CERT";
/// The environment variable of the key of [`SearchUrl::with_client_certificate`].
pub(crate) const ELASTICSEARCH_CLIENT_KEY: &str = "ELASTICSEARCH_CLIENT_KEY";

impl SearchUrl {
    /// Trusts the CA certificates of the PEM file at `path` for an `https://` node, besides
    /// the public CAs. The file is read when a client is built.
    #[must_use]
    pub fn with_ca(mut self, path: impl Into<PathBuf>) -> Self {
        self.tls.ca = Some(path.into());
        self
    }

    /// Presents the client certificate of the PEM file `cert` (intermediates may follow it),
    /// with its unencrypted private key in the PEM file `key`, to a node that asks for one.
    /// The files are read when a client is built.
    #[must_use]
    pub fn with_client_certificate(
        mut self,
        cert: impl Into<PathBuf>,
        key: impl Into<PathBuf>,
    ) -> Self {
        self.tls.client = Some(ClientFiles {
            cert: cert.into(),
            key: key.into(),
        });
        self
    }

    /// The TLS files of the client.
    pub(crate) fn tls(&self) -> &TlsFiles {
        &self.tls
    }

    /// Adds the files named by `ELASTICSEARCH_CA`, `ELASTICSEARCH_CLIENT_CERT` and
    /// `ELASTICSEARCH_CLIENT_KEY` (unset or empty: none).
    fn with_tls_from_env(mut self) -> Result<Self> {
        let path = |name: &str| {
            std::env::var_os(name)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        self.tls.ca = path(ELASTICSEARCH_CA);
        self.tls.client = match (
            path(ELASTICSEARCH_CLIENT_CERT),
            path(ELASTICSEARCH_CLIENT_KEY),
        ) {
            (Some(cert), Some(key)) => Some(ClientFiles { cert, key }),
            (None, None) => None,
            (Some(_), None) => {
                return Err(Error::config(
                    ELASTICSEARCH_CLIENT_KEY,
                    format!(
                        "must be set with {ELASTICSEARCH_CLIENT_CERT} (the certificate's private key)"
                    ),
                ));
            }
            (None, Some(_)) => {
                return Err(Error::config(
                    ELASTICSEARCH_CLIENT_CERT,
                    format!(
                        "must be set with {ELASTICSEARCH_CLIENT_KEY} (the certificate of that key)"
                    ),
                ));
            }
        };
        Ok(self)
    }
}

/// Validates a PostgreSQL schema name used to place the tables ([`OutboxConfig::schema`](crate::outbox::OutboxConfig::schema)).
pub(crate) fn validate_schema(schema: &str) -> Result<&str> {
    validate_identifier("OutboxConfig::schema", schema)
}

/// Validates a name that goes into SQL text (a schema, a NOTIFY channel): only plain
/// lowercase identifiers are accepted, so no quoting can go wrong. `setting` names it in the
/// error.
pub(crate) fn validate_identifier<'a>(setting: &str, name: &'a str) -> Result<&'a str> {
    let valid = !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if valid {
        Ok(name)
    } else {
        Err(Error::config(
            setting,
            format!("{name:?} is not a plain lowercase identifier (a-z, 0-9, _; at most 63 bytes)"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_and_debug_hide_the_password() {
        let url: AmqpUrl = "amqp://benalsam:benalsam123@localhost:5672/%2f"
            .parse()
            .expect("valid url");
        assert!(!url.to_string().contains("benalsam123"));
        assert!(!format!("{url:?}").contains("benalsam123"));
        assert!(url.expose().contains("benalsam123"));
    }

    #[test]
    fn a_wrong_scheme_names_the_setting() {
        let err = "http://localhost:5672"
            .parse::<AmqpUrl>()
            .expect_err("http is not amqp");
        let text = err.to_string();
        assert!(text.contains("RABBITMQ_URL"), "{text}");
        assert!(text.contains("\"http\""), "{text}");
    }

    #[test]
    fn an_unparseable_url_is_reported_without_its_password() {
        let err = "postgres://app:hunter2@[::1/db"
            .parse::<DatabaseUrl>()
            .expect_err("bad host");
        let text = err.to_string();
        assert!(text.contains("DATABASE_URL"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
    }

    #[test]
    fn amqps_is_a_broker_url_and_tls_parameters_are_checked_as_it_is_read() {
        let url: AmqpUrl = "amqps://u:secret@mq:5671/%2f?cacertfile=%2Fca.pem"
            .parse()
            .expect("amqps");
        assert!(!format!("{url:?}").contains("secret"));
        let error = "postgres://db/app?sslmode=verify-ca"
            .parse::<DatabaseUrl>()
            .expect_err("no CA");
        assert_eq!(error.setting(), Some("DATABASE_URL"));
    }

    #[test]
    fn a_search_url_carries_its_tls_files() {
        let url: SearchUrl = "https://u:secret@es:9200".parse().expect("https");
        assert_eq!(format!("{url:?}"), "SearchUrl(https://u:***@es:9200/)");
        let with = url
            .clone()
            .with_ca("/ca.pem")
            .with_client_certificate("/c.pem", "/k.pem");
        assert_ne!(with, url);
        let debug = format!("{with:?}");
        assert!(
            debug.contains("/ca.pem") && debug.contains("/k.pem"),
            "{debug}"
        );
        assert!(!debug.contains("secret"), "{debug}");
        assert_eq!(with.to_string(), url.to_string());
    }

    #[test]
    fn a_list_of_brokers_is_read_each_entry_checked_and_every_password_hidden() {
        let url: AmqpUrl =
            "amqp://u:first-secret@mq1:5672/%2f, amqp://v:second-secret@mq2:5673/%2f"
                .parse()
                .expect("two addresses");
        let addresses = url.addresses();
        assert_eq!(addresses.len(), 2);
        assert_eq!(addresses[1].url().port(), Some(5673));
        assert!(addresses[1].expose().contains("second-secret"));
        for shown in [url.to_string(), format!("{url:?}"), url.redacted()] {
            assert!(
                !shown.contains("first-secret") && !shown.contains("second-secret"),
                "{shown}"
            );
            assert!(shown.contains("mq1") && shown.contains("mq2"), "{shown}");
        }

        let error = "amqp://u:p@mq1/%2f,http://u:hidden@mq2/%2f"
            .parse::<AmqpUrl>()
            .expect_err("the second entry is not amqp");
        let text = error.to_string();
        assert_eq!(error.setting(), Some("RABBITMQ_URL"));
        assert!(
            text.contains("entry 2 of 2") && text.contains("mq2"),
            "{text}"
        );
        assert!(!text.contains("hidden"), "{text}");

        let error = "amqp://u:p@mq1/%2f,amqp://u:p@mq2/other"
            .parse::<AmqpUrl>()
            .expect_err("another vhost");
        assert!(error.to_string().contains("same vhost"), "{error}");
        assert!("amqp://u:p@mq1/%2f,".parse::<AmqpUrl>().is_err());

        // A comma inside a password is part of it: one URL, and nothing of it shown.
        let one: AmqpUrl = "amqp://u:pa,ss@mq1:5672/%2f".parse().expect("one address");
        assert_eq!(one.addresses().len(), 1);
        assert_eq!(one.url().password(), Some("pa,ss"));
        let error = "amqp://u:pa,ss@mq1:5672/%2f,amqp://u:pa,ss@mq2:5672/other"
            .parse::<AmqpUrl>()
            .expect_err("another vhost");
        let text = error.to_string();
        assert!(text.contains("entry 2 of 2"), "{text}");
        assert!(!text.contains("pa,ss") && !text.contains("ss@"), "{text}");

        // A second address without its scheme would swallow the first host into a password.
        let error = "http://elastic:pw@es1:9200,elastic:pw@es2:9200"
            .parse::<SearchUrl>()
            .expect_err("an address without its scheme");
        let text = error.to_string();
        assert!(
            text.contains("more than one @") && !text.contains("pw"),
            "{text}"
        );
    }

    #[test]
    fn a_list_of_search_nodes_is_read_each_entry_checked_and_every_password_hidden() {
        let url: SearchUrl = "https://u:first-secret@es1:9200, https://u:first-secret@es2:9201"
            .parse()
            .expect("two nodes");
        let addresses = url.addresses();
        assert_eq!(addresses.len(), 2);
        assert_eq!(addresses[0].url().host_str(), Some("es1"));
        assert_eq!(addresses[1].url().port(), Some(9201));
        assert!(addresses[1].expose().contains("first-secret"));
        assert_eq!(url.expose(), addresses[0].expose(), "expose is the first");
        for shown in [url.to_string(), format!("{url:?}"), url.redacted()] {
            assert!(!shown.contains("first-secret"), "{shown}");
            assert!(shown.contains("es1") && shown.contains("es2"), "{shown}");
        }
        assert_eq!(
            url.redacted(),
            "https://u:***@es1:9200/,https://u:***@es2:9201/"
        );
        // The TLS files go with every node.
        let with = url.with_ca("/ca.pem");
        assert!(
            with.addresses()
                .iter()
                .all(|a| format!("{a:?}").contains("/ca.pem"))
        );

        let error = "http://es1:9200,ftp://u:hidden@es2"
            .parse::<SearchUrl>()
            .expect_err("the second entry is no search node");
        let text = error.to_string();
        assert_eq!(error.setting(), Some("ELASTICSEARCH_URL"));
        assert!(
            text.contains("entry 2 of 2") && text.contains("es2") && text.contains("\"ftp\""),
            "{text}"
        );
        assert!(!text.contains("hidden"), "{text}");

        let error = "https://u:p@es1:9200,http://u:p@es2:9200"
            .parse::<SearchUrl>()
            .expect_err("a mix of TLS and plain HTTP");
        let text = error.to_string();
        assert!(
            text.contains("entry 2 of 2") && text.contains("same scheme"),
            "{text}"
        );

        for other in [
            "http://u:other-secret@es2:9200",
            "http://v:first-secret@es2:9200",
            "http://es2:9200",
        ] {
            let error = format!("http://u:first-secret@es1:9200,{other}")
                .parse::<SearchUrl>()
                .expect_err("other credentials");
            let text = error.to_string();
            assert!(
                text.contains("entry 2 of 2") && text.contains("same user and password"),
                "{text}"
            );
            assert!(
                !text.contains("first-secret") && !text.contains("other-secret"),
                "{text}"
            );
        }
        assert!("http://es1:9200,".parse::<SearchUrl>().is_err());
        assert!(" , http://es1:9200".parse::<SearchUrl>().is_err());

        // A comma inside a password is part of it: one node, and nothing of it shown.
        let one: SearchUrl = "http://u:pa,ss@es1:9200".parse().expect("one node");
        assert_eq!(one.addresses().len(), 1);
        assert_eq!(one.url().password(), Some("pa,ss"));
        let two: SearchUrl = "http://u:pa,ss@es1:9200,http://u:pa,ss@es2:9200"
            .parse()
            .expect("two nodes, commas in both passwords");
        assert_eq!(two.addresses().len(), 2);
        assert_eq!(two.addresses()[1].url().password(), Some("pa,ss"));
        assert!(!two.redacted().contains("pa,ss"), "{two}");
        let error = "http://u:pa,ss@es1:9200,https://u:pa,ss@es2:9200"
            .parse::<SearchUrl>()
            .expect_err("another scheme");
        let text = error.to_string();
        assert!(text.contains("entry 2 of 2"), "{text}");
        assert!(!text.contains("pa,ss") && !text.contains("ss@"), "{text}");
    }

    proptest::proptest! {
        /// Whatever the passwords (commas included), a list of nodes reads back as that many
        /// addresses, each with its password, and no printed form shows one.
        #[test]
        fn no_password_of_a_node_list_is_ever_shown(
            password in "[a-zA-Z0-9,;!*_-]{4,16}",
            hosts in proptest::collection::vec("[a-z]{1,8}", 1..5),
        ) {
            let raw = hosts
                .iter()
                .map(|host| format!("https://user:{password}@{host}:9200"))
                .collect::<Vec<_>>()
                .join(",");
            let url: SearchUrl = raw.parse().expect("a valid list");
            let addresses = url.addresses();
            proptest::prop_assert_eq!(addresses.len(), hosts.len());
            for (address, host) in addresses.iter().zip(&hosts) {
                proptest::prop_assert_eq!(address.url().host_str(), Some(host.as_str()));
                // The URL keeps a password percent-encoded (`;` as `%3B`).
                let kept = address.url().password().map(|p| {
                    percent_encoding::percent_decode_str(p).decode_utf8_lossy().into_owned()
                });
                proptest::prop_assert_eq!(kept, Some(password.clone()));
            }
            for shown in [url.to_string(), format!("{url:?}"), url.redacted()] {
                proptest::prop_assert!(!shown.contains(&password), "{}", shown);
            }
        }
    }

    /// Values an operator may get wrong, `{u}` the user, `{p}` the password, `{h}` the host.
    const MALFORMED: &[&str] = &[
        "postgres:/{u}:{p}@{h}/db",
        "postgres:{u}:{p}@{h}/db",
        "postgres//{u}:{p}@{h}/db",
        "postgres:///{u}:{p}@{h}/db",
        "postgres://{u}:{p}@",
        "postgres://{u}:{p}@/db",
        "postgres://{u}:{p}@[{h}/db",
        "postgres://{u}:{p}@{h}:99999/db",
        "postgres://{u}:{p}",
        "postgres://{u}:{p}/db",
        "postgres ://{u}:{p}@{h}/db",
        " postgres://{u}:{p}@{h}/db",
        "postgres://{u}:{p}@{h}/db?sslmode=allow",
        "postgres://{u}:{p}@{h}/db?sslmode=verify-full",
        "postgres://{h}/db?password={p}&sslmode=bogus",
        "postgres://{h}/db?sslmode=allow&password={p}",
        "postgres://{u}:{p}@{h}/db,postgres://{u}:{p}@{h}/db",
        "{u}:{p}@{h}/db",
        "{u}:{p}@{h}",
        "host={h} user={u} password={p} dbname=db",
        "host={h} password = {p} dbname=db",
        "host={h} password='{p}' dbname=db",
        "host={h} PASSWORD={p}",
        "password={p}",
        "amqp:/{u}:{p}@{h}",
        "amqp:{u}:{p}@{h}",
        "amqp://{u}:{p}@{h}:notaport/%2f",
        "amqp://{u}:{p}@",
        "amqp://{u}:{p}",
        "amqps://{u}:{p}@{h}/%2f?certfile=%2Fc.pem",
        "amqp://{u}:{p}@{h}/%2f,amqp://{u}:{p}@{h}/other",
        "amqp://{u}:{p}@{h}/%2f,{u}:{p}@{h}/%2f",
        "http:/{u}:{p}@{h}:9200",
        "http://{u}:{p}@{h}:9200,{u}:{p}@{h}:9201",
        "https://{u}:{p}@{h}:9200,http://{u}:{p}@{h}:9200",
        "http://{u}:{p}@{h}:92x0",
        "ftp://{u}:{p}@{h}",
    ];

    /// Every printed form of parsing `raw` as each kind of URL: the error, or the value.
    fn shown(raw: &str) -> Vec<String> {
        fn forms<T: std::fmt::Display + std::fmt::Debug>(parsed: Result<T>) -> [String; 2] {
            match parsed {
                Ok(value) => [value.to_string(), format!("{value:?}")],
                Err(error) => [error.to_string(), format!("{error:?}")],
            }
        }
        let mut all = Vec::new();
        all.extend(forms(raw.parse::<DatabaseUrl>()));
        all.extend(forms(raw.parse::<AmqpUrl>()));
        all.extend(forms(raw.parse::<SearchUrl>()));
        all
    }

    #[test]
    fn malformed_urls_never_show_their_password() {
        for shape in MALFORMED {
            let raw = shape
                .replace("{u}", "app")
                .replace("{p}", "Hunter2secret")
                .replace("{h}", "db");
            for text in shown(&raw) {
                assert!(!text.contains("Hunter2secret"), "{raw} -> {text}");
                assert!(!text.contains("unter2"), "{raw} -> {text}");
            }
        }
        // What is shown still helps: the scheme, the user and the host.
        let error = "postgres:/app:Hunter2secret@db/x"
            .parse::<DatabaseUrl>()
            .expect_err("no host");
        assert!(
            error.to_string().contains("postgres:/app:***@db/x"),
            "{error}"
        );
    }

    proptest::proptest! {
        /// Whatever the password (URL delimiters included) and the shape, no error and no
        /// printed value shows it.
        #[test]
        fn no_password_is_ever_shown_whatever_the_shape(
            shape in proptest::sample::select(MALFORMED),
            user in "[a-z]{1,8}",
            host in "[a-z]{1,8}",
            password in "[A-Z][0-9][A-Za-z0-9!$*_~.,;:/?#%@+=-]{4,14}",
        ) {
            // libpq's unquoted values end at a space or a quote, and a quoted one at its
            // closing quote: such a password is not one value there.
            let raw = shape
                .replace("{u}", &user)
                .replace("{p}", &password)
                .replace("{h}", &host);
            // Its first four characters (an upper-case letter and a digit among them, which
            // no message has) show whether a part of it leaked.
            let head: String = password.chars().take(4).collect();
            for text in shown(&raw) {
                proptest::prop_assert!(!text.contains(&password), "{} -> {}", raw, text);
                proptest::prop_assert!(!text.contains(&head), "{} -> {}", raw, text);
            }
        }
    }

    #[test]
    fn schema_names_are_plain_identifiers() {
        assert!(validate_schema("public").is_ok());
        assert!(validate_schema("t_42_ab").is_ok());
        assert!(validate_schema("Public").is_err());
        assert!(validate_schema("a; drop table x").is_err());
        assert!(validate_schema("").is_err());
    }
}
