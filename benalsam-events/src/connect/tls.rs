//! rustls for every client of the library: the crypto provider, the PEM files of the TLS
//! settings, and the client configurations of the PostgreSQL modes.
//!
//! Files are read and checked here, when a connection (or a search client) is built, so a
//! missing or unreadable file is a configuration error naming the setting and the path,
//! rather than a handshake that fails for reasons the driver words its own way.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::{error::Error, error::Result};

/// Makes ring the process's rustls provider, unless one is installed already.
///
/// Our own configurations name ring explicitly; the drivers that build theirs (lapin's
/// connector, reqwest) take the process default, and rustls panics when it has none and
/// cannot tell from its features which to take. Installing ours first settles that, even if
/// a dependency someday enables a second provider.
pub(crate) fn install_provider() {
    // An error only says a provider is installed already, which is all we need.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A PEM file of a setting, read and parsed.
pub(crate) struct PemFile<T> {
    /// The file as read (PEM text), for drivers that parse it again themselves.
    pub(crate) pem: Vec<u8>,
    /// What it holds.
    pub(crate) parsed: T,
}

// By hand: a key file's contents must not reach a log through `{:?}`.
impl<T> std::fmt::Debug for PemFile<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PemFile({} bytes)", self.pem.len())
    }
}

/// Reads a file named by `setting` (`what` says which of its files, e.g. `sslrootcert`).
fn read(setting: &str, what: &str, path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| {
        Error::config(
            setting,
            format!("{what} {}: cannot read it: {e}", path.display()),
        )
    })
}

/// The certificates of a PEM file: at least one.
pub(crate) fn read_certificates(
    setting: &str,
    what: &str,
    path: &Path,
) -> Result<PemFile<Vec<CertificateDer<'static>>>> {
    let pem = read(setting, what, path)?;
    let invalid =
        |reason: String| Error::config(setting, format!("{what} {}: {reason}", path.display()));
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("not a PEM certificate file ({e})")))?;
    if certificates.is_empty() {
        return Err(invalid(
            "holds no certificate (no BEGIN CERTIFICATE block)".into(),
        ));
    }
    Ok(PemFile {
        pem,
        parsed: certificates,
    })
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1, unencrypted).
pub(crate) fn read_key(
    setting: &str,
    what: &str,
    path: &Path,
) -> Result<PemFile<PrivateKeyDer<'static>>> {
    let pem = read(setting, what, path)?;
    let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        Error::config(
            setting,
            format!(
                "{what} {}: no unencrypted private key (PKCS#8, RSA or EC PEM) in it ({e})",
                path.display()
            ),
        )
    })?;
    Ok(PemFile { pem, parsed: key })
}

/// Trust anchors: exactly the certificates of a CA file.
pub(crate) fn read_roots(setting: &str, what: &str, path: &Path) -> Result<Arc<RootCertStore>> {
    let mut roots = RootCertStore::empty();
    for certificate in read_certificates(setting, what, path)?.parsed {
        roots.add(certificate).map_err(|e| {
            Error::config(
                setting,
                format!(
                    "{what} {}: a certificate cannot be a CA: {e}",
                    path.display()
                ),
            )
        })?;
    }
    Ok(Arc::new(roots))
}

/// How a server's certificate is checked.
#[derive(Debug)]
pub(crate) enum Verify {
    /// Not at all (libpq's `prefer`, and `require` without a CA file): the connection is
    /// encrypted, but anyone in the middle can present any certificate.
    Nothing,
    /// Its chain must lead to these CAs; the name is not looked at (libpq's `verify-ca`).
    Chain(Arc<RootCertStore>),
    /// Its chain must lead to these CAs and it must name the host (libpq's `verify-full`).
    Full(Arc<RootCertStore>),
}

/// A client certificate with its key, already read.
pub(crate) struct ClientIdentity {
    /// The certificate and any intermediates.
    pub(crate) chain: Vec<CertificateDer<'static>>,
    /// Its key.
    pub(crate) key: PrivateKeyDer<'static>,
    /// The setting they come from, for the error of a key that does not fit.
    pub(crate) setting: String,
}

/// A rustls client configuration on ring that checks the server as `verify` says and presents
/// `identity` when the server asks for a certificate.
pub(crate) fn client_config(
    verify: Verify,
    identity: Option<ClientIdentity>,
) -> Result<ClientConfig> {
    let provider = provider();
    let algorithms = provider.signature_verification_algorithms;
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        // Only fails for a provider without the default protocol versions; ring has them.
        .map_err(|e| Error::config("TLS", format!("the ring provider is unusable: {e}")))?;
    let builder = match verify {
        Verify::Full(roots) => builder.with_root_certificates(roots),
        Verify::Chain(roots) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Lenient {
                roots: Some(roots),
                algorithms,
            })),
        Verify::Nothing => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Lenient {
                roots: None,
                algorithms,
            })),
    };
    match identity {
        None => Ok(builder.with_no_client_auth()),
        Some(identity) => builder
            .with_client_auth_cert(identity.chain, identity.key)
            .map_err(|e| {
                Error::config(
                    identity.setting,
                    format!("the client certificate and key cannot be used together: {e}"),
                )
            }),
    }
}

/// A server check short of libpq's `verify-full`: with `roots`, `verify-ca` (the chain must
/// lead to them: signatures, validity dates, server use; the host name is not checked);
/// without, `prefer`/`require` (any certificate). Either way the handshake signatures are
/// checked, so the session is bound to the certificate the server presented. The chain check
/// calls rustls' own rather than wrapping its full verifier and forgiving the name error,
/// which would rely on the order of its checks.
#[derive(Debug)]
struct Lenient {
    roots: Option<Arc<RootCertStore>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        if let Some(roots) = &self.roots {
            let certificate = ParsedCertificate::try_from(end_entity)?;
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &certificate,
                roots,
                intermediates,
                now,
                self.algorithms.all,
            )?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_file_names_the_setting_and_the_path() {
        let error = read_roots(
            "DATABASE_URL",
            "sslrootcert",
            Path::new("/nonexistent/ca.pem"),
        )
        .expect_err("no such file");
        let text = error.to_string();
        assert!(error.is_config() && !error.is_retryable(), "{text}");
        assert!(text.contains("DATABASE_URL"), "{text}");
        assert!(text.contains("sslrootcert /nonexistent/ca.pem"), "{text}");
    }

    #[test]
    fn a_file_without_certificates_is_refused() {
        let path =
            std::env::temp_dir().join(format!("benalsam-no-cert-{}.pem", std::process::id()));
        std::fs::write(&path, "not a certificate\n").expect("write");
        let error = read_certificates("ELASTICSEARCH_CA", "file", &path).expect_err("no PEM");
        assert!(error.to_string().contains("no certificate"), "{error}");
        let error = read_key("RABBITMQ_URL", "keyfile", &path).expect_err("no key");
        assert!(error.to_string().contains("private key"), "{error}");
        let _ = std::fs::remove_file(path);
    }
}
