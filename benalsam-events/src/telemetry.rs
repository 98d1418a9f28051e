//! Logs and traces.
//!
//! [`init`] installs the log output (text or JSON, filtered by `RUST_LOG`) and, when the
//! standard `OTEL_*` variables ask for it, an OpenTelemetry exporter (OTLP over HTTP). Without
//! them nothing is exported: spans stay plain `tracing` spans and cost what those cost.
//!
//! One trace per job: the bridge's publish span (a producer span whose parent is the trace
//! context the writer stored with the job, when there is one) travels to the consumer in the
//! `traceparent` header (W3C trace context); the consumer's span per message continues it,
//! and each bulk request's span links to the messages it carried.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::{Error, Result};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per event, for log collectors.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(Error::Config {
                setting: "BENALSAM_LOG_FORMAT",
                reason: format!("{other:?} is neither \"text\" nor \"json\""),
            }),
        }
    }
}

/// Keeps the exporter alive; dropping it flushes the spans not yet exported.
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(error) = provider.shutdown()
        {
            eprintln!("telemetry: flushing spans at exit failed: {error}");
        }
    }
}

/// Whether the standard variables ask for trace export: an OTLP endpoint is set, or
/// `OTEL_TRACES_EXPORTER=otlp`; `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none` win.
fn otel_requested(var: impl Fn(&str) -> Option<String>) -> bool {
    let set = |name: &str| var(name).is_some_and(|v| !v.trim().is_empty());
    if var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
        || var("OTEL_TRACES_EXPORTER").is_some_and(|v| v == "none")
    {
        return false;
    }
    set("OTEL_EXPORTER_OTLP_ENDPOINT")
        || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        || var("OTEL_TRACES_EXPORTER").is_some_and(|v| v == "otlp")
}

/// Installs logging (and tracing export when asked) for the process `service`.
pub fn init(service: &str, format: LogFormat) -> Result<Telemetry> {
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = match format {
        LogFormat::Text => fmt.with_filter(filter()).boxed(),
        LogFormat::Json => fmt.json().with_filter(filter()).boxed(),
    };
    let provider = if otel_requested(|name| std::env::var(name).ok()) {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
            .map_err(|e| Error::Config {
                setting: "OTEL_EXPORTER_OTLP_ENDPOINT",
                reason: format!("cannot build the OTLP exporter: {e}"),
            })?;
        let name = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| service.to_owned());
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name(name)
            .build();
        Some(
            SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(resource)
                .build(),
        )
    } else {
        None
    };
    let traces = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer(service.to_owned()))
            .with_filter(EnvFilter::new("benalsam_events=info,info"))
    });
    tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .try_init()
        .map_err(|e| Error::Config {
            setting: "RUST_LOG",
            reason: format!("logging was already set up: {e}"),
        })?;
    Ok(Telemetry { provider })
}

/// The W3C `traceparent` of a span, when it belongs to an exported trace.
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    let context = span.context();
    if !context.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    carrier.remove("traceparent")
}

/// Makes `traceparent` the parent of `span`. Must be called before the span is entered;
/// a malformed value is ignored.
pub fn set_parent(span: &tracing::Span, traceparent: &str) {
    let carrier = HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    let context = TraceContextPropagator::new().extract(&carrier);
    if context.span().span_context().is_valid() {
        let _ = span.set_parent(context);
    }
}

/// Links `span` to the span of `other` (a bulk request to the messages it carried).
pub fn link(span: &tracing::Span, other: &tracing::Span) {
    let context = other.context();
    let linked = context.span().span_context().clone();
    if linked.is_valid() {
        span.add_link(linked);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_follows_the_standard_variables() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        assert!(!otel_requested(env(&[])));
        assert!(otel_requested(env(&[(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "http://collector:4318"
        )])));
        assert!(otel_requested(env(&[("OTEL_TRACES_EXPORTER", "otlp")])));
        assert!(!otel_requested(env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318"),
            ("OTEL_SDK_DISABLED", "true")
        ])));
        assert!(!otel_requested(env(&[("OTEL_TRACES_EXPORTER", "none")])));
    }

    #[test]
    fn log_formats_parse_and_name_the_setting() {
        assert_eq!("json".parse::<LogFormat>().ok(), Some(LogFormat::Json));
        let err = "xml".parse::<LogFormat>().expect_err("unknown");
        assert!(err.to_string().contains("BENALSAM_LOG_FORMAT"));
    }

    #[test]
    fn without_an_exported_trace_there_is_no_traceparent() {
        let span = tracing::info_span!("plain");
        assert_eq!(traceparent_of(&span), None);
    }
}
