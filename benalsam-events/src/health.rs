//! Health answers and the small HTTP server that serves them.
//!
//! Every endpoint answers `{timestamp, service, healthy, message, details}` with 200 when
//! healthy and 503 when not. The server takes a bound listener and a shutdown token, so a
//! test (or an embedding service) runs it in-process on any port.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::SystemTime;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use serde::Serialize;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// One health answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HealthReport {
    /// When it was made, RFC 3339 UTC.
    pub timestamp: String,
    /// What it is about (`rabbitmq`, `database-trigger-bridge`, …).
    pub service: String,
    /// Whether the service does its job.
    pub healthy: bool,
    /// A sentence for a person: what is fine, or what is wrong.
    pub message: String,
    /// Numbers behind the verdict.
    pub details: Value,
}

impl HealthReport {
    /// A report made now.
    pub fn new(service: &str, healthy: bool, message: impl Into<String>, details: Value) -> Self {
        Self {
            timestamp: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            service: service.to_owned(),
            healthy,
            message: message.into(),
            details,
        }
    }
}

/// Produces a report when asked (from the live status: no I/O, so it answers at once).
pub type Check = Arc<dyn Fn() -> HealthReport + Send + Sync>;

/// Produces a text body (e.g. Prometheus metrics) when asked.
pub type TextSource = Arc<dyn Fn() -> String + Send + Sync>;

/// The routes of a health server.
#[derive(Clone, Default)]
pub struct HealthServer {
    checks: Vec<(String, Check)>,
    texts: Vec<(String, &'static str, TextSource)>,
}

impl std::fmt::Debug for HealthServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let paths: Vec<&str> = self
            .checks
            .iter()
            .map(|(p, _)| p.as_str())
            .chain(self.texts.iter().map(|(p, _, _)| p.as_str()))
            .collect();
        f.debug_struct("HealthServer")
            .field("paths", &paths)
            .finish()
    }
}

impl HealthServer {
    /// A server with no routes.
    pub fn new() -> Self {
        Self::default()
    }

    /// Serves `check`'s report at `GET path`.
    pub fn check<F>(mut self, path: &str, check: F) -> Self
    where
        F: Fn() -> HealthReport + Send + Sync + 'static,
    {
        self.checks.push((path.to_owned(), Arc::new(check)));
        self
    }

    /// Serves `source`'s text at `GET path` with `content_type`.
    pub fn text<F>(mut self, path: &str, content_type: &'static str, source: F) -> Self
    where
        F: Fn() -> String + Send + Sync + 'static,
    {
        self.texts
            .push((path.to_owned(), content_type, Arc::new(source)));
        self
    }

    /// Serves `metrics` in the Prometheus text format at `GET /metrics`.
    pub fn metrics(self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        self.text(
            "/metrics",
            "text/plain; version=0.0.4; charset=utf-8",
            move || metrics.encode(),
        )
    }

    /// Every path served.
    pub fn paths(&self) -> Vec<&str> {
        self.checks
            .iter()
            .map(|(p, _)| p.as_str())
            .chain(self.texts.iter().map(|(p, _, _)| p.as_str()))
            .collect()
    }

    /// Serves until `shutdown` is cancelled, then lets open requests finish.
    pub async fn serve(self, listener: TcpListener, shutdown: CancellationToken) {
        let routes = Arc::new(self);
        let graceful = GracefulShutdown::new();
        loop {
            let (stream, _peer) = tokio::select! {
                () = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        tracing::warn!(%error, "health server: accept failed");
                        continue;
                    }
                },
            };
            let routes = Arc::clone(&routes);
            let service = service_fn(move |request| {
                let routes = Arc::clone(&routes);
                async move { Ok::<_, Infallible>(routes.answer(request).await) }
            });
            let connection = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            let connection = graceful.watch(connection);
            tokio::spawn(async move {
                if let Err(error) = connection.await {
                    tracing::debug!(%error, "health server: connection ended with an error");
                }
            });
        }
        graceful.shutdown().await;
    }

    async fn answer<B>(&self, request: Request<B>) -> Response<Full<Bytes>> {
        let path = request.uri().path();
        if request.method() != Method::GET {
            return respond(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "GET only\n".into(),
            );
        }
        if let Some((_, check)) = self.checks.iter().find(|(p, _)| p == path) {
            let report = check();
            let status = if report.healthy {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            let body = serde_json::to_vec_pretty(&report).unwrap_or_default();
            return respond(status, "application/json", body);
        }
        if let Some((_, content_type, source)) = self.texts.iter().find(|(p, _, _)| p == path) {
            return respond(StatusCode::OK, content_type, source().into_bytes());
        }
        let paths: Vec<&str> = self
            .checks
            .iter()
            .map(|(p, _)| p.as_str())
            .chain(self.texts.iter().map(|(p, _, _)| p.as_str()))
            .collect();
        let body =
            serde_json::to_vec_pretty(&serde_json::json!({ "error": "not found", "paths": paths }))
                .unwrap_or_default();
        respond(StatusCode::NOT_FOUND, "application/json", body)
    }
}

fn respond(status: StatusCode, content_type: &'static str, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    response
}
