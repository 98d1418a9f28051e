//! A TLS handshake refused over a certificate, told per service: which side refused, the
//! setting to check, and what to check in it.

use super::{Error, Kind};

/// What to tell about a TLS handshake that failed over a certificate, per service.
pub(super) struct Tls {
    service: &'static str,
    /// The setting, and what to check, when the server's certificate was refused.
    server: (&'static str, &'static str),
    /// The same when the server refused ours.
    client: (&'static str, &'static str),
}

/// A certificate refusal found in an error: which side refused, and the TLS error.
pub(super) struct Refusal<'a> {
    tls: &'a Tls,
    ours: bool,
    problem: String,
}

impl Tls {
    pub(super) const POSTGRES: Self = Self {
        service: "PostgreSQL",
        server: (
            "DATABASE_URL",
            "sslrootcert in DATABASE_URL (the CA that signed the server's certificate) and that \
             the URL's host is a name in that certificate (sslmode=verify-ca does not check names)",
        ),
        client: (
            "DATABASE_URL",
            "sslcert and sslkey in DATABASE_URL (a client certificate the server's CA trusts)",
        ),
    };
    pub(super) const RABBITMQ: Self = Self {
        service: "RabbitMQ",
        server: (
            "RABBITMQ_URL",
            "cacertfile in RABBITMQ_URL (the CA that signed the broker's certificate; without it \
             only public CAs are trusted) and that the URL's host is a name in that certificate",
        ),
        client: (
            "RABBITMQ_URL",
            "certfile and keyfile in RABBITMQ_URL (a client certificate the broker's CA trusts)",
        ),
    };
    pub(super) const SEARCH: Self = Self {
        service: "Elasticsearch",
        server: (
            "ELASTICSEARCH_CA",
            "ELASTICSEARCH_CA (the CA that signed the node's certificate; without it only public \
             CAs are trusted) and that the host of ELASTICSEARCH_URL is a name in that certificate",
        ),
        client: (
            "ELASTICSEARCH_CLIENT_CERT",
            "ELASTICSEARCH_CLIENT_CERT and ELASTICSEARCH_CLIENT_KEY (a client certificate the \
             node's CA trusts)",
        ),
    };

    /// Finds a certificate refusal in `error`'s source chain. A handshake that failed for any
    /// other reason (a reset, a timeout) is not one: that may be a service on its way up.
    pub(super) fn refusal(&self, error: &(dyn std::error::Error + 'static)) -> Option<Refusal<'_>> {
        let tls = rustls_error(error)?;
        let ours = match tls {
            rustls::Error::InvalidCertificate(_) => false,
            rustls::Error::AlertReceived(
                rustls::AlertDescription::BadCertificate
                | rustls::AlertDescription::UnsupportedCertificate
                | rustls::AlertDescription::CertificateRevoked
                | rustls::AlertDescription::CertificateExpired
                | rustls::AlertDescription::CertificateUnknown
                | rustls::AlertDescription::UnknownCA
                | rustls::AlertDescription::CertificateRequired,
            ) => true,
            _ => return None,
        };
        let problem = if ours {
            format!("TLS: the server refused the client certificate, or its absence ({tls})")
        } else {
            format!("TLS: the server's certificate was refused ({tls})")
        };
        Some(Refusal {
            tls: self,
            ours,
            problem,
        })
    }
}

impl Refusal<'_> {
    pub(super) fn error(
        self,
        context: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    ) -> Error {
        let (setting, check) = if self.ours {
            self.tls.client
        } else {
            self.tls.server
        };
        Error::new(Kind::Tls {
            service: self.tls.service,
            setting,
            context,
            problem: self.problem,
            check,
            source,
        })
    }
}

/// The rustls error in a source chain. The drivers wrap it in an `io::Error`, whose `source`
/// skips the error it wraps (its `Display` shows it instead), so wrapped errors are opened too.
fn rustls_error<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut next = Some(error);
    while let Some(error) = next {
        if let Some(tls) = error.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        if let Some(wrapped) = error
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
            && let Some(tls) = rustls_error(wrapped)
        {
            return Some(tls);
        }
        next = error.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_refusals_are_found_inside_io_errors() {
        let refused = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        let outer = std::io::Error::other(refused);
        let refusal = Tls::RABBITMQ.refusal(&outer).expect("found");
        assert!(!refusal.ours);
        let error = refusal.error("connecting".into(), Box::new(outer));
        assert!(!error.is_retryable() && error.is_config());
        assert_eq!(error.setting(), Some("RABBITMQ_URL"));
        let text = error.to_string();
        assert!(
            text.contains("UnknownIssuer") && text.contains("cacertfile"),
            "{text}"
        );

        let required = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired),
        );
        let refusal = Tls::SEARCH.refusal(&required).expect("found");
        let error = refusal.error("GET /".into(), Box::new(required));
        assert_eq!(error.setting(), Some("ELASTICSEARCH_CLIENT_CERT"));

        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert!(Tls::POSTGRES.refusal(&reset).is_none());
        let other = std::io::Error::other(rustls::Error::DecryptError);
        assert!(Tls::POSTGRES.refusal(&other).is_none());
    }
}
