//! Health answers and the small HTTP server that serves them.
//!
//! Every check answers `{timestamp, service, healthy, message, details}` with 200 when
//! healthy and 503 when not. Beside the checks:
//!
//! | path | answers |
//! |---|---|
//! | `/livez` | 200 while the process serves requests: never fails for a dependency |
//! | `/readyz` | 503 with the start-up step until the service is ready, then the verdict of every check together |
//! | `/metrics` | Prometheus text, or OpenMetrics when the scraper asks for it |
//!
//! The server starts before anything else ([`Readiness`] says what start-up is doing), so an
//! orchestrator gets an answer from the first moment. It takes a bound listener and a
//! shutdown token, so a test or an embedding service runs it in-process on any port.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::ops::metrics::{Format, Metrics};

/// One health answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct HealthReport {
    /// When it was made, RFC 3339 UTC.
    pub timestamp: String,
    /// What it is about (`rabbitmq`, `database-trigger-bridge`, …).
    pub service: String,
    /// Whether the service does its job.
    pub healthy: bool,
    /// A sentence for a person: what is fine, or what is wrong and what to do.
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

/// Where start-up is: shared by the part that starts a service and its health server.
#[derive(Debug, Clone, Default)]
pub struct Readiness(Arc<Mutex<Option<String>>>);

impl Readiness {
    /// Start-up is at `step` (e.g. "declaring the RabbitMQ topology").
    pub fn starting(&self, step: impl Into<String>) {
        *self.lock() = Some(step.into());
    }

    /// Start-up is over: the checks decide from now on.
    pub fn ready(&self) {
        *self.lock() = None;
    }

    /// The current start-up step, while starting.
    pub fn step(&self) -> Option<String> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Produces a report when asked (from the live status: no I/O, so it answers at once).
type Check = Arc<dyn Fn() -> HealthReport + Send + Sync>;

/// The routes of a health server.
#[derive(Clone, Default)]
pub struct HealthServer {
    service: String,
    readiness: Readiness,
    checks: Vec<(String, Check)>,
    metrics: Option<Metrics>,
}

impl std::fmt::Debug for HealthServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HealthServer")
            .field("service", &self.service)
            .field("paths", &self.paths())
            .finish()
    }
}

impl HealthServer {
    /// A server for `service` whose readiness follows `readiness`.
    pub fn new(service: &str, readiness: Readiness) -> Self {
        Self {
            service: service.to_owned(),
            readiness,
            checks: Vec::new(),
            metrics: None,
        }
    }

    /// Serves `check`'s report at `GET path`; `/readyz` includes it.
    pub fn check<F>(mut self, path: &str, check: F) -> Self
    where
        F: Fn() -> HealthReport + Send + Sync + 'static,
    {
        self.checks.push((path.to_owned(), Arc::new(check)));
        self
    }

    /// Serves `metrics` at `GET /metrics`.
    pub fn metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Every path served.
    pub fn paths(&self) -> Vec<&str> {
        let mut paths = vec!["/livez", "/readyz"];
        paths.extend(self.checks.iter().map(|(p, _)| p.as_str()));
        if self.metrics.is_some() {
            paths.push("/metrics");
        }
        paths
    }

    /// Serves until `shutdown` is cancelled, then lets open requests finish.
    pub async fn run(self, listener: TcpListener, shutdown: CancellationToken) {
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
                async move { Ok::<_, Infallible>(routes.answer(&request)) }
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

    fn answer<B>(&self, request: &Request<B>) -> Response<Full<Bytes>> {
        if request.method() != Method::GET {
            return respond(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "GET only\n".into(),
            );
        }
        let path = request.uri().path();
        match path {
            "/livez" => self.report(&HealthReport::new(
                &self.service,
                true,
                "the process answers",
                json!({ "version": env!("CARGO_PKG_VERSION") }),
            )),
            "/readyz" => self.report(&self.readyz()),
            "/metrics" if self.metrics.is_some() => {
                let accept = request
                    .headers()
                    .get(hyper::header::ACCEPT)
                    .and_then(|v| v.to_str().ok());
                let format = Format::negotiate(accept);
                let body = self
                    .metrics
                    .as_ref()
                    .map(|m| m.encode_as(format))
                    .unwrap_or_default();
                respond(StatusCode::OK, format.content_type(), body.into_bytes())
            }
            _ => match self.checks.iter().find(|(p, _)| p == path) {
                Some((_, check)) => self.report(&self.starting().unwrap_or_else(|| check())),
                None => {
                    let body = json!({ "error": "not found", "paths": self.paths() });
                    let body = serde_json::to_vec_pretty(&body).unwrap_or_default();
                    respond(StatusCode::NOT_FOUND, "application/json", body)
                }
            },
        }
    }

    /// A 503 naming the start-up step, while starting.
    fn starting(&self) -> Option<HealthReport> {
        let step = self.readiness.step()?;
        Some(HealthReport::new(
            &self.service,
            false,
            format!("starting: {step}"),
            json!({ "starting": step }),
        ))
    }

    /// Every check together: healthy when all are.
    fn readyz(&self) -> HealthReport {
        if let Some(starting) = self.starting() {
            return starting;
        }
        let reports: Vec<HealthReport> = self.checks.iter().map(|(_, check)| check()).collect();
        let failing: Vec<String> = reports
            .iter()
            .filter(|r| !r.healthy)
            .map(|r| format!("{}: {}", r.service, r.message))
            .collect();
        let details: serde_json::Map<String, Value> = reports
            .iter()
            .map(|r| {
                (
                    r.service.clone(),
                    json!({ "healthy": r.healthy, "message": r.message }),
                )
            })
            .collect();
        let message = if failing.is_empty() {
            "ready".to_owned()
        } else {
            failing.join("; ")
        };
        HealthReport::new(
            &self.service,
            failing.is_empty(),
            message,
            Value::Object(details),
        )
    }

    fn report(&self, report: &HealthReport) -> Response<Full<Bytes>> {
        let status = if report.healthy {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        let body = serde_json::to_vec_pretty(report).unwrap_or_default();
        respond(status, "application/json", body)
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

/// An RFC 3339 time for a health answer's details, or `null`.
pub(crate) fn rfc3339(t: Option<SystemTime>) -> Value {
    t.map_or(Value::Null, |t| {
        json!(humantime::format_rfc3339_millis(t).to_string())
    })
}

/// How long ago `t` was, at `now` (zero for a time in the future).
pub(crate) fn since(now: SystemTime, t: SystemTime) -> std::time::Duration {
    now.duration_since(t).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(server: &HealthServer, path: &str) -> (StatusCode, Value) {
        let request = Request::get(path).body(()).expect("request");
        let response = server.answer(&request);
        let status = response.status();
        let body =
            futures::executor::block_on(http_body_util::BodyExt::collect(response.into_body()))
                .expect("body")
                .to_bytes();
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }

    #[test]
    fn starting_answers_503_with_the_step_then_the_checks_decide() {
        let readiness = Readiness::default();
        readiness.starting("declaring the topology");
        let server = HealthServer::new("bridge", readiness.clone())
            .check("/a", || HealthReport::new("a", true, "fine", json!({})))
            .check("/b", || HealthReport::new("b", false, "broken", json!({})));
        let (status, body) = get(&server, "/a");
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["message"], "starting: declaring the topology");
        assert_eq!(get(&server, "/livez").0, StatusCode::OK);
        assert_eq!(get(&server, "/readyz").0, StatusCode::SERVICE_UNAVAILABLE);

        readiness.ready();
        assert_eq!(get(&server, "/a").0, StatusCode::OK);
        let (status, body) = get(&server, "/readyz");
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["message"], "b: broken");
        assert_eq!(body["details"]["a"]["healthy"], true);
        assert_eq!(get(&server, "/nowhere").0, StatusCode::NOT_FOUND);
    }
}
