//! Service URLs, validated when they are read.
//!
//! Each URL type checks its scheme at parse time, so a wrong value stops start-up with a
//! message naming the setting instead of failing later in a connection attempt. Their
//! `Display` and `Debug` hide the password: printing a configuration is always safe.

use std::fmt;
use std::str::FromStr;

use super::redact::redact_url;
use crate::{Error, Result};

/// Default `DATABASE_URL`: the database of the local stack (`scripts/stack`).
pub(crate) const DEFAULT_DATABASE_URL: &str =
    "postgres://benalsam:benalsam@127.0.0.1:5432/benalsam";
/// Default `RABBITMQ_URL`: the local stack's broker, with the architecture document's user.
pub(crate) const DEFAULT_RABBITMQ_URL: &str = "amqp://benalsam:benalsam123@127.0.0.1:5672/%2f";
/// Default `ELASTICSEARCH_URL`: the local stack's search node.
pub(crate) const DEFAULT_ELASTICSEARCH_URL: &str = "http://127.0.0.1:9200";

macro_rules! service_url {
    ($(#[$doc:meta])* $name:ident, setting = $setting:literal, default = $default:ident, schemes = [$($scheme:literal),+], example = $example:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq)]
        pub struct $name(url::Url);

        impl $name {
            /// The environment variable (and long flag, lowercased) this setting is read from.
            pub const SETTING: &'static str = $setting;

            /// The full URL, password included: pass it to a client, never to a log.
            pub fn expose(&self) -> &str {
                self.0.as_str()
            }

            /// The URL with its password masked.
            pub fn redacted(&self) -> String {
                redact_url(self.0.as_str())
            }

            /// The parsed URL.
            pub fn url(&self) -> &url::Url {
                &self.0
            }

            /// Reads the setting from its environment variable; unset, the local stack's
            /// (`scripts/stack`).
            pub fn from_env() -> Result<Self> {
                std::env::var($setting)
                    .ok()
                    .filter(|v| !v.is_empty())
                    .as_deref()
                    .unwrap_or($default)
                    .parse()
            }
        }

        impl FromStr for $name {
            type Err = Error;

            fn from_str(raw: &str) -> Result<Self> {
                let parsed = url::Url::parse(raw).map_err(|e| Error::config(
                    $setting,
                    format!("{} is not a URL ({e}); expected e.g. {}", redact_url(raw), $example),
                ))?;
                let schemes: &[&str] = &[$($scheme),+];
                if !schemes.contains(&parsed.scheme()) {
                    return Err(Error::config(
                        $setting,
                        format!(
                            "scheme {:?} is not one of {schemes:?}; expected e.g. {}",
                            parsed.scheme(),
                            $example
                        ),
                    ));
                }
                if parsed.host_str().is_none_or(str::is_empty) {
                    return Err(Error::config(
                        $setting,
                        format!("{} names no host; expected e.g. {}", redact_url(raw), $example),
                    ));
                }
                Ok(Self(parsed))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.redacted())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.redacted())
            }
        }
    };
}

service_url!(
    /// Where PostgreSQL is: `postgres://user:password@host:port/database`.
    DatabaseUrl,
    setting = "DATABASE_URL",
    default = DEFAULT_DATABASE_URL,
    schemes = ["postgres", "postgresql"],
    example = "postgres://benalsam:benalsam@127.0.0.1:5432/benalsam"
);

service_url!(
    /// Where RabbitMQ is: `amqp://user:password@host:port/vhost`.
    AmqpUrl,
    setting = "RABBITMQ_URL",
    default = DEFAULT_RABBITMQ_URL,
    schemes = ["amqp"],
    example = "amqp://benalsam:benalsam123@127.0.0.1:5672/%2f"
);

service_url!(
    /// Where Elasticsearch (or OpenSearch) is: `http://host:9200`.
    SearchUrl,
    setting = "ELASTICSEARCH_URL",
    default = DEFAULT_ELASTICSEARCH_URL,
    schemes = ["http", "https"],
    example = "http://127.0.0.1:9200"
);

/// Validates a PostgreSQL schema name used to place the tables (`BENALSAM_SCHEMA`).
pub(crate) fn validate_schema(schema: &str) -> Result<&str> {
    validate_identifier("BENALSAM_SCHEMA", schema)
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
    fn schema_names_are_plain_identifiers() {
        assert!(validate_schema("public").is_ok());
        assert!(validate_schema("t_42_ab").is_ok());
        assert!(validate_schema("Public").is_err());
        assert!(validate_schema("a; drop table x").is_err());
        assert!(validate_schema("").is_err());
    }
}
