//! Logs and traces of the binaries.
//!
//! [`init`] installs the log output (text or JSON, filtered by `RUST_LOG`) and, when the
//! standard `OTEL_*` variables ask for it, an OpenTelemetry exporter (OTLP over HTTP). Without
//! them nothing is exported: spans stay plain `tracing` spans and cost what those cost.
//!
//! One trace per job: the bridge's publish span (a producer span whose parent is the trace
//! context the writer stored with the job, when there is one) travels to the consumer in the
//! `traceparent` header; the library carries the context (`benalsam_events::ops` docs), this
//! module installs what records and exports it. A library installs no global subscriber: an
//! embedding service keeps its own.

use opentelemetry::trace::TracerProvider;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::filter::FilterExt;
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::fmt::format::{self, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use benalsam_events::{Error, Result};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
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
            other => Err(Error::config(
                "BENALSAM_LOG_FORMAT",
                format!("{other:?} is neither \"text\" nor \"json\""),
            )),
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
///
/// Log lines go to stderr, filtered by `RUST_LOG` (default `info`; an invalid value is
/// reported in the first log line and `info` used; the AMQP client's crates stop at debug,
/// as their trace lines carry the broker password). Text is coloured only on a terminal and
/// never when `NO_COLOR` is set; JSON lines are flat objects with `timestamp`, `level`,
/// `target`, `service`, `version`, `message` and the event's fields.
pub fn init(service: &str, format: LogFormat) -> Result<Telemetry> {
    let (filter, bad_filter) = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.trim().is_empty() => match EnvFilter::try_new(&spec) {
            Ok(filter) => (filter, None),
            Err(error) => (EnvFilter::new("info"), Some(format!("{spec:?}: {error}"))),
        },
        _ => (EnvFilter::new("info"), None),
    };
    let filter = filter.and(wire_cap());
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = match format {
        LogFormat::Text => fmt.with_ansi(colour_wanted()).with_filter(filter).boxed(),
        LogFormat::Json => fmt
            .event_format(FlatJson {
                service: service.to_owned(),
            })
            .with_filter(filter)
            .boxed(),
    };
    let provider = if otel_requested(|name| std::env::var(name).ok()) {
        Some(otlp_provider(service)?)
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
        .map_err(|e| Error::config("RUST_LOG", format!("logging was already set up: {e}")))?;
    if let Some(bad) = bad_filter {
        tracing::warn!("RUST_LOG {bad}; logging at info instead");
    }
    Ok(Telemetry { provider })
}

/// The AMQP client's crates log every frame at trace level, the connection's `StartOk` too,
/// whose SASL response holds the broker's user and password (printed as a byte array). So
/// whatever `RUST_LOG` asks, their lines stop at debug: `RUST_LOG=trace` must never put a
/// password into the logs. There is no opt-in; to see frames, capture the traffic instead.
/// (Targets match by prefix: `amq_protocol` covers `amq_protocol_tcp`, `_uri`, `_types`.)
fn wire_cap() -> tracing_subscriber::filter::Targets {
    use tracing_subscriber::filter::LevelFilter;
    tracing_subscriber::filter::Targets::new()
        .with_default(LevelFilter::TRACE)
        .with_target("lapin", LevelFilter::DEBUG)
        .with_target("amq_protocol", LevelFilter::DEBUG)
}

/// The tracer provider exporting over OTLP/HTTP, as the standard OTEL_* variables say.
#[cfg(feature = "otlp")]
fn otlp_provider(service: &str) -> Result<SdkTracerProvider> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
        .map_err(|e| {
            Error::config(
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                format!("cannot build the OTLP exporter: {e}"),
            )
        })?;
    let name = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| service.to_owned());
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(name)
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

/// Without the `otlp` feature, asking for an export is a setting that cannot work.
#[cfg(not(feature = "otlp"))]
fn otlp_provider(_service: &str) -> Result<SdkTracerProvider> {
    Err(Error::config(
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "this build has no OTLP exporter (the `otlp` feature of benalsam-events); unset the OTEL_* variables or rebuild with it",
    ))
}

/// Colour only for a person at a terminal who did not ask for none (<https://no-color.org>).
fn colour_wanted() -> bool {
    use std::io::IsTerminal;
    std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()) && std::io::stderr().is_terminal()
}

/// One flat JSON object per event: what log collectors index without configuration.
struct FlatJson {
    service: String,
}

impl<S, N> FormatEvent<S, N> for FlatJson
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let meta = event.metadata();
        let mut line = serde_json::Map::new();
        line.insert(
            "timestamp".into(),
            humantime::format_rfc3339_micros(std::time::SystemTime::now())
                .to_string()
                .into(),
        );
        line.insert("level".into(), meta.level().as_str().into());
        line.insert("target".into(), meta.target().into());
        line.insert("service".into(), self.service.as_str().into());
        line.insert("version".into(), env!("CARGO_PKG_VERSION").into());
        if let Some(scope) = ctx.event_scope() {
            let spans: Vec<&str> = scope.from_root().map(|span| span.name()).collect();
            line.insert("spans".into(), spans.join(":").into());
        }
        event.record(&mut Fields(&mut line));
        writeln!(writer, "{}", serde_json::Value::Object(line))
    }
}

/// Collects an event's fields into a JSON object.
struct Fields<'a>(&'a mut serde_json::Map<String, serde_json::Value>);

impl tracing::field::Visit for Fields<'_> {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.into());
    }

    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.0.insert(field.name().to_owned(), value.into());
    }

    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.0.insert(field.name().to_owned(), value.into());
    }

    fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
        self.0.insert(field.name().to_owned(), value.into());
    }

    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.0.insert(field.name().to_owned(), value.into());
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().to_owned(), format!("{value:?}").into());
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
}
