//! The search side: a client for Elasticsearch (or OpenSearch), and the index of an event
//! type, created behind an alias with an explicit mapping.
//!
//! The index is created as `<alias>_v1` with the alias pointing at it, so a later mapping
//! change can be rolled out by building `<alias>_v2` and moving the alias. An existing index
//! is never closed or reopened; its mapping is checked against ours, missing fields are
//! added, and a field of another type stops start-up with a conflict ([`Error::is_conflict`]).

use std::time::Duration;

use base64::Engine as _;
use elasticsearch::Elasticsearch;
use elasticsearch::auth::{ClientCertificate, Credentials};
use elasticsearch::cert::{Certificate, CertificateValidation};
use elasticsearch::http::headers::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue};
use elasticsearch::http::transport::{SingleNodeConnectionPool, TransportBuilder};
use elasticsearch::http::{Method, StatusCode};
use serde_json::{Value, json};

use crate::EventType;
use crate::config::{
    ELASTICSEARCH_CA, ELASTICSEARCH_CLIENT_CERT, ELASTICSEARCH_CLIENT_KEY, SearchUrl,
};
use crate::connect::tls;
use crate::error::Kind;
use crate::search::SearchNodes;
use crate::{Error, Result};

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
/// Of a list of nodes, the client talks to the first; [`SearchNodes`] holds a client per
/// node and moves between them.
pub fn client(url: &SearchUrl, timeout: Duration) -> Result<Elasticsearch> {
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
        .map_err(|e| Error::search_request(format!("{method:?} {path}"), e))?;
    let status = response.status_code();
    let bytes = response.bytes().await.map_err(|e| {
        Error::search(
            format!("reading the answer to {method:?} {path}"),
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
                format!("{method:?} {path}"),
                format!(
                    "answer is not JSON ({e}): {}",
                    String::from_utf8_lossy(&bytes)
                ),
            )
        })?
    };
    Ok((status, value))
}

/// Makes sure the index of `event_type` exists behind its alias, with a mapping compatible
/// with what its documents need (and the delete protection every index of the library gets).
/// Returns the fields it added to an existing mapping (none for a new index, or one that
/// already had them all); a field of another type is an error naming it.
///
/// The requests go to this one client's node; the consumer prepares its indexes on the
/// first of its nodes that answers.
pub async fn ensure_index(client: &Elasticsearch, event_type: &EventType) -> Result<Vec<String>> {
    ensure_index_on(&SearchNodes::from(client.clone()), event_type).await
}

/// [`ensure_index`] through `nodes`: on the node in use, or the next that answers.
pub(crate) async fn ensure_index_on(
    nodes: &SearchNodes,
    event_type: &EventType,
) -> Result<Vec<String>> {
    let alias = &event_type.index.alias;
    let body = event_type.index_body();
    let (status, _) = nodes
        .json_request(Method::Head, &format!("/{alias}"), None)
        .await?;
    if status == StatusCode::NOT_FOUND {
        let index = format!("{alias}_v1");
        let mut create = body.clone();
        create["aliases"] = json!({ alias.as_str(): { "is_write_index": true } });
        let (status, answer) = nodes
            .json_request(Method::Put, &format!("/{index}"), Some(&create))
            .await?;
        if status.is_success() {
            tracing::info!(%index, %alias, "created the search index");
            return Ok(Vec::new());
        }
        // Another consumer created it first: fall through to checking it.
        if answer["error"]["type"] != "resource_already_exists_exception" {
            if let Some(error) =
                super::analysis::missing_module(&index, &create, status.as_u16(), &answer)
            {
                return Err(error);
            }
            return Err(Error::search_response(
                format!("creating index {index}"),
                status.as_u16(),
                answer.to_string(),
            ));
        }
    }
    check_mapping(nodes, alias, &body["mappings"]["properties"]).await
}

async fn check_mapping(nodes: &SearchNodes, alias: &str, expected: &Value) -> Result<Vec<String>> {
    let (status, mappings) = nodes
        .json_request(Method::Get, &format!("/{alias}/_mapping"), None)
        .await?;
    if !status.is_success() {
        return Err(Error::search_response(
            format!("reading the mapping of {alias}"),
            status.as_u16(),
            mappings.to_string(),
        ));
    }
    let Some(indices) = mappings.as_object() else {
        return Err(Error::search_response(
            format!("reading the mapping of {alias}"),
            status.as_u16(),
            mappings.to_string(),
        ));
    };
    let expected = expected.as_object().cloned().unwrap_or_default();
    let mut missing = serde_json::Map::new();
    for (index, mapping) in indices {
        let existing = &mapping["mappings"]["properties"];
        for (field, want) in &expected {
            match existing.get(field) {
                None => {
                    missing.insert(field.clone(), want.clone());
                }
                Some(have) => {
                    let want_type = want["type"].as_str().unwrap_or("object");
                    let have_type = have["type"].as_str().unwrap_or("object");
                    if want_type != have_type {
                        return Err(Error::from(Kind::MappingConflict {
                            index: index.clone(),
                            field: field.clone(),
                            expected: want_type.to_owned(),
                            found: have_type.to_owned(),
                        }));
                    }
                }
            }
        }
    }
    let added: Vec<String> = missing.keys().cloned().collect();
    if !missing.is_empty() {
        let body = json!({ "properties": missing });
        let (status, answer) = nodes
            .json_request(Method::Put, &format!("/{alias}/_mapping"), Some(&body))
            .await?;
        if !status.is_success() {
            return Err(Error::search_response(
                format!("adding fields {added:?} to the mapping of {alias}"),
                status.as_u16(),
                answer.to_string(),
            ));
        }
        tracing::info!(alias, ?added, "added fields to the search index mapping");
    }
    Ok(added)
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
