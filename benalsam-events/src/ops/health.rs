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
//!
//! It is bounded, so a client that opens connections and never finishes a request cannot
//! take the process's file descriptors or its log: a request's head must arrive within
//! [`HEADER_READ_TIMEOUT`] and fit [`MAX_HEAD_BYTES`], a connection lives at most
//! [`CONNECTION_LIFETIME`], at most [`MAX_CONNECTIONS`] are open at a time (one more is
//! closed at once), and when accepting fails (out of file descriptors) the server waits,
//! doubling from 10 ms to 1 s, and warns at most once per [`ACCEPT_LOG_INTERVAL`] with the
//! count of failures since.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::ops::metrics::{Format, Metrics};

/// How long a client has to send a request's head (line and headers), from the moment the
/// server waits for it: probes and scrapers send theirs at once.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// How long one connection may stay open, requests and keep-alive included; a scraper that
/// keeps its connection reconnects after it.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// Most connections open at a time. Probes and scrapers need a handful; the limit keeps the
/// descriptors of a process (1,024 by default on Linux) for its real work.
pub const MAX_CONNECTIONS: usize = 512;

/// Largest request head read (the engine's smallest buffer): the requests served are a path
/// and a few headers.
pub const MAX_HEAD_BYTES: usize = 8192;

/// Most headers in a request.
const MAX_HEADERS: usize = 32;

/// At most one warning about failing accepts per this interval.
pub const ACCEPT_LOG_INTERVAL: Duration = Duration::from_secs(10);

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
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let mut failing = AcceptFailures::default();
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .max_buf_size(MAX_HEAD_BYTES)
            .max_headers(MAX_HEADERS);
        loop {
            let stream = tokio::select! {
                () = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _peer)) => {
                        failing.recovered();
                        stream
                    }
                    Err(error) => {
                        // Out of descriptors (EMFILE, ENFILE) or memory the next accept fails
                        // the same way at once: wait instead of spinning, and say so rarely.
                        let pause = failing.failed(&error, Instant::now());
                        tokio::select! {
                            () = shutdown.cancelled() => break,
                            () = tokio::time::sleep(pause) => continue,
                        }
                    }
                },
            };
            // Over the limit the connection is closed at once: waiting would hold its
            // descriptor, which is what the limit protects.
            let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                drop(stream);
                continue;
            };
            let routes = Arc::clone(&routes);
            let service = service_fn(move |request| {
                let routes = Arc::clone(&routes);
                async move { Ok::<_, Infallible>(routes.answer(&request)) }
            });
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            let connection = graceful.watch(connection);
            tokio::spawn(async move {
                match tokio::time::timeout(CONNECTION_LIFETIME, connection).await {
                    Ok(Err(error)) => {
                        tracing::debug!(%error, "health server: connection ended with an error");
                    }
                    Ok(Ok(())) => {}
                    Err(_) => tracing::debug!("health server: connection closed at its lifetime"),
                }
                drop(slot);
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

/// Failing accepts in a row: how long to wait before the next, and when to warn.
#[derive(Debug, Default)]
struct AcceptFailures {
    /// Failures since the last accepted connection.
    in_a_row: u32,
    /// Failures since the last warning.
    unreported: u64,
    last_warning: Option<Instant>,
}

impl AcceptFailures {
    /// Records a failure at `now`; returns how long to wait before accepting again: 10 ms,
    /// doubling up to 1 s. Warns at most once per [`ACCEPT_LOG_INTERVAL`], counting the
    /// failures it did not report.
    fn failed(&mut self, error: &std::io::Error, now: Instant) -> Duration {
        self.unreported += 1;
        let due = self
            .last_warning
            .is_none_or(|at| now.saturating_duration_since(at) >= ACCEPT_LOG_INTERVAL);
        if due {
            tracing::warn!(
                %error,
                failures = self.unreported,
                "health server: accepting connections fails (out of file descriptors?); retrying with backoff, next warning in {} s at the earliest",
                ACCEPT_LOG_INTERVAL.as_secs()
            );
            self.unreported = 0;
            self.last_warning = Some(now);
        }
        let pause = accept_backoff(self.in_a_row);
        self.in_a_row = self.in_a_row.saturating_add(1);
        pause
    }

    /// A connection was accepted: the next failure waits the shortest time again.
    fn recovered(&mut self) {
        self.in_a_row = 0;
    }
}

/// The wait after `n` failed accepts in a row: 10 ms doubling, at most 1 s.
fn accept_backoff(n: u32) -> Duration {
    Duration::from_millis(10)
        .saturating_mul(1u32 << n.min(7))
        .min(Duration::from_secs(1))
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
    fn failing_accepts_back_off_to_a_second_and_warn_rarely() {
        assert_eq!(accept_backoff(0), Duration::from_millis(10));
        assert_eq!(accept_backoff(1), Duration::from_millis(20));
        assert_eq!(accept_backoff(6), Duration::from_millis(640));
        assert_eq!(accept_backoff(7), Duration::from_secs(1));
        assert_eq!(accept_backoff(u32::MAX), Duration::from_secs(1));

        let error = std::io::Error::from_raw_os_error(24); // EMFILE
        let start = Instant::now();
        let mut failures = AcceptFailures::default();
        let mut waited = Duration::ZERO;
        let mut warnings = 0;
        for i in 0..1000u64 {
            let now = start + Duration::from_millis(i * 10);
            let before = failures.last_warning;
            waited += failures.failed(&error, now);
            warnings += usize::from(failures.last_warning != before);
        }
        assert_eq!(warnings, 1, "one warning per interval, the rest counted");
        assert_eq!(failures.unreported, 999);
        assert!(waited > Duration::from_secs(900), "backed off: {waited:?}");
        failures.recovered();
        assert_eq!(failures.failed(&error, start), Duration::from_millis(10));
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
