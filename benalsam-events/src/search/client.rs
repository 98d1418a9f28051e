//! The search side: a client for Elasticsearch (or OpenSearch), one request to one node,
//! and reading its answer. The index of an event type is [`index`](super::index)'s.

use std::time::Duration;

use base64::Engine as _;
use elasticsearch::Elasticsearch;
use elasticsearch::auth::{ClientCertificate, Credentials};
use elasticsearch::cert::{Certificate, CertificateValidation};
use elasticsearch::http::headers::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue};
use elasticsearch::http::transport::{SingleNodeConnectionPool, TransportBuilder};
use elasticsearch::http::{Method, StatusCode};
use serde_json::Value;

use crate::config::{
    ELASTICSEARCH_CA, ELASTICSEARCH_CLIENT_CERT, ELASTICSEARCH_CLIENT_KEY, SearchUrl,
};
use crate::connect::tls;
use crate::{error::Error, error::Result};

impl SearchUrl {
    /// A search client for this URL with a request timeout, as the consumer makes its own:
    /// credentials become Basic authentication (and stay out of every log line), an
    /// `https://` node is trusted through a public CA or [`SearchUrl::with_ca`], and the
    /// certificate of [`SearchUrl::with_client_certificate`] is presented when asked for. Of a
    /// list of nodes it talks to the first; [`SearchNodes`](super::SearchNodes) moves between
    /// them.
    pub fn client(&self, timeout: Duration) -> Result<Elasticsearch> {
        client(self, timeout)
    }
}

/// A search client with a request timeout. Credentials in the URL become Basic
/// authentication (and stay out of every log line).
///
/// An `https://` node is trusted when its certificate leads to a public CA or to the CA of
/// [`SearchUrl::with_ca`], and names the URL's host; the client certificate of
/// [`SearchUrl::with_client_certificate`] is presented to a node that asks for one. Their
/// files are read here: a missing or unusable one is a configuration error naming its
/// setting (`ELASTICSEARCH_CA`, `ELASTICSEARCH_CLIENT_CERT`, `ELASTICSEARCH_CLIENT_KEY`).
/// A certificate refused later, by either side, fails requests with a configuration error
/// that is not retryable.
///
/// Of a list of nodes, the client talks to the first; [`SearchNodes`](super::SearchNodes) holds a client per
/// node and moves between them.
pub(crate) fn client(url: &SearchUrl, timeout: Duration) -> Result<Elasticsearch> {
    let mut bare = url.url().clone();
    let basic = credentials(url)?;
    // Both calls only fail for URLs that cannot carry credentials, which have none.
    let _ = bare.set_username("");
    let _ = bare.set_password(None);
    let files = url.tls();
    if bare.scheme() != "https" && (files.ca.is_some() || files.client.is_some()) {
        let setting = if files.ca.is_some() {
            ELASTICSEARCH_CA
        } else {
            ELASTICSEARCH_CLIENT_CERT
        };
        return Err(Error::config(
            setting,
            format!("applies to https:// nodes only, and ELASTICSEARCH_URL is {url}"),
        ));
    }
    tls::install_provider();
    let mut builder = TransportBuilder::new(SingleNodeConnectionPool::new(bare)).timeout(timeout);
    if let Some(path) = &files.ca {
        // Checked with rustls first: the client only parses the file when it is built, and
        // then says neither which setting nor which file.
        let pem = tls::read_certificates(ELASTICSEARCH_CA, "file", path)?.pem;
        let ca = Certificate::from_pem(&pem).map_err(|e| {
            Error::config(ELASTICSEARCH_CA, format!("file {}: {e}", path.display()))
        })?;
        // Full: the chain and the host name. The CA is added to the public roots (the search
        // client offers no way to trust it alone).
        builder = builder.cert_validation(CertificateValidation::Full(ca));
    }
    match (&files.client, basic) {
        (Some(client), basic) => {
            let mut pem =
                tls::read_certificates(ELASTICSEARCH_CLIENT_CERT, "file", &client.cert)?.pem;
            let key = tls::read_key(ELASTICSEARCH_CLIENT_KEY, "file", &client.key)?.pem;
            // The client wants the certificate and its key in one PEM buffer.
            pem.push(b'\n');
            pem.extend_from_slice(&key);
            builder = builder.auth(Credentials::Certificate(ClientCertificate::Pem(pem)));
            // The client takes one credential: the certificate. The URL's user and password
            // still go along, as the header Basic authentication would have sent.
            if let Some((user, password)) = basic {
                builder = builder.header(AUTHORIZATION, basic_header(&user, &password)?);
            }
        }
        (None, Some((user, password))) => {
            builder = builder.auth(Credentials::Basic(user, password));
        }
        (None, None) => {}
    }
    let transport = builder.build().map_err(|e| {
        Error::config(
            SearchUrl::SETTING,
            format!("cannot build a client for {url}: {e}"),
        )
    })?;
    Ok(Elasticsearch::new(transport))
}

/// The user and password of `url`, if it names a user. A URL keeps its user information
/// percent-encoded (`p%40ss` for `p@ss`, `a%3Bb` for `a;b`); Basic authentication carries
/// it decoded.
fn credentials(url: &SearchUrl) -> Result<Option<(String, String)>> {
    let parsed = url.url();
    if parsed.username().is_empty() {
        return Ok(None);
    }
    let decoded = |part: &str| {
        percent_encoding::percent_decode_str(part)
            .decode_utf8()
            .map(std::borrow::Cow::into_owned)
            .map_err(|_| {
                Error::config(
                    SearchUrl::SETTING,
                    format!("the user or password of {url} is not UTF-8 once decoded"),
                )
            })
    };
    Ok(Some((
        decoded(parsed.username())?,
        decoded(parsed.password().unwrap_or_default())?,
    )))
}

/// An `Authorization: Basic` header, marked sensitive (kept out of debug output).
fn basic_header(user: &str, password: &str) -> Result<HeaderValue> {
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let mut value = HeaderValue::from_str(&format!("Basic {encoded}")).map_err(|_| {
        Error::config(
            SearchUrl::SETTING,
            "the user name cannot go into an HTTP header",
        )
    })?;
    value.set_sensitive(true);
    Ok(value)
}

/// Sends one request to one node and reads its answer's bytes: `Err` only when the node gave
/// no answer at all (refused, cut, timed out, a certificate refused). What the status means
/// is the caller's business; [`SearchNodes`](super::SearchNodes) moves on to the next node
/// on the failures that say a node is gone.
pub(crate) async fn send(
    client: &Elasticsearch,
    method: Method,
    path: &str,
    body: Option<&[u8]>,
    content_type: &'static str,
) -> Result<(StatusCode, Vec<u8>)> {
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    // The client takes the query string apart from the path (a `?` in the path would be
    // sent escaped, as part of it).
    let (route, query) = match path.split_once('?') {
        Some((route, query)) => {
            let pairs: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes())
                .into_owned()
                .collect();
            (route, Some(pairs))
        }
        None => (path, None),
    };
    let response = client
        .send(method, route, headers, query.as_ref(), body, None)
        .await
        .map_err(|e| Error::search_request(format!("{} {path}", method_name(&method)), e))?;
    let status = response.status_code();
    let bytes = response.bytes().await.map_err(|e| {
        Error::search(
            format!("reading the answer to {} {path}", method_name(&method)),
            e.to_string(),
        )
    })?;
    // Without a copy when the buffer is the answer's alone (the usual case).
    Ok((status, Vec::from(bytes)))
}

/// Reads an answer's body as JSON (`Null` for an empty body).
pub(crate) fn parse_answer(
    method: Method,
    path: &str,
    (status, bytes): (StatusCode, Vec<u8>),
) -> Result<(StatusCode, Value)> {
    let value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).map_err(|e| {
            Error::search(
                format!("{} {path}", method_name(&method)),
                format!(
                    "answer is not JSON ({e}): {}",
                    String::from_utf8_lossy(&bytes)
                ),
            )
        })?
    };
    Ok((status, value))
}

/// The HTTP method as an operator reads it (`POST`), not as Rust data (`Post`).
fn method_name(method: &Method) -> &'static str {
    match method {
        Method::Get => "GET",
        Method::Put => "PUT",
        Method::Post => "POST",
        Method::Delete => "DELETE",
        Method::Head => "HEAD",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_basic_header_beside_a_client_certificate_is_rfc_7617s() {
        let header = basic_header("Aladdin", "open sesame").expect("header");
        assert_eq!(
            header.to_str().expect("ascii"),
            "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ=="
        );
        assert!(header.is_sensitive());
    }

    #[test]
    fn credentials_are_sent_decoded() {
        let url: SearchUrl = "http://app%40corp:p%40ss%3Bw%2Crd@es:9200"
            .parse()
            .expect("valid");
        assert_eq!(
            credentials(&url).expect("UTF-8"),
            Some(("app@corp".to_owned(), "p@ss;w,rd".to_owned()))
        );
        let url: SearchUrl = "http://u:a;b@es:9200".parse().expect("valid");
        assert_eq!(
            credentials(&url).expect("UTF-8").map(|(_, p)| p),
            Some("a;b".to_owned()),
            "the parser encodes `;`; it is sent as written"
        );
        let none: SearchUrl = "http://es:9200".parse().expect("valid");
        assert_eq!(credentials(&none).expect("no user"), None);
        let bad: SearchUrl = "http://u:%FF@es:9200".parse().expect("valid URL");
        let error = credentials(&bad).expect_err("not UTF-8");
        assert_eq!(error.setting(), Some("ELASTICSEARCH_URL"));
    }
}
