//! Prometheus metrics.
//!
//! A [`Metrics`] is one registry. Each component keeps its own families and registers them
//! into the registry its caller passes (`with_metrics`), so a process exports exactly the
//! families of the parts it runs: the bridge no consumer counters, the consumer no bridge
//! counters. The families live beside their component's events (see [`events`](super::events)),
//! which alone write them. Names are prefixed `benalsam_`, units are in the names, labels come
//! from small fixed sets (plus the names of configured event types, tables and queues). Every
//! labelled series exists from the start, at zero, so dashboards and alerts see zeros rather
//! than gaps.
//!
//! [`Metrics::for_service`] adds the standard process metrics (`process_cpu_seconds_total`,
//! `process_resident_memory_bytes`, `process_open_fds`, …) and `benalsam_build_info`.
//! [`Metrics::encode`] writes the Prometheus text format (what `promtool check metrics`
//! reads), [`Metrics::encode_openmetrics`] OpenMetrics; the health server serves whichever
//! the scraper asks for.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

use crate::ops::process::ProcessCollector;

/// A label of one value from a fixed list in this crate.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct Kind {
    pub(crate) kind: &'static str,
}

/// A job status label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct Status {
    pub(crate) status: &'static str,
}

/// A queue label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct Queue {
    pub(crate) queue: String,
}

/// A table label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct Table {
    pub(crate) table: String,
}

/// An event type label: the name of the event type a message belongs to (`listings`), or
/// [`OfType::UNKNOWN`] for a delivery that names none of the configured ones. Shared, so
/// labelling a message costs no allocation.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct OfType {
    pub(crate) event_type: Arc<String>,
}

impl OfType {
    /// The label of a delivery that is not a valid envelope or names a table no configured
    /// event type has.
    pub(crate) const UNKNOWN: &'static str = "unknown";

    pub(crate) fn new(name: &str) -> Self {
        Self {
            event_type: Arc::new(name.to_owned()),
        }
    }
}

/// A kind label (from a fixed list in this crate) with an event type label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct KindOfType {
    pub(crate) kind: &'static str,
    pub(crate) event_type: Arc<String>,
}

impl KindOfType {
    pub(crate) fn new(kind: &'static str, of: &OfType) -> Self {
        Self {
            kind,
            event_type: Arc::clone(&of.event_type),
        }
    }
}

/// A histogram family's constructor: a plain function, so the family stays `Clone` and
/// `Debug`.
pub(crate) type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// A relation label: the table name its jobs are recorded under (`listings#seller`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RelationLabel {
    pub(crate) relation: String,
}

pub(crate) type FloatGauge = Gauge<f64, AtomicU64>;

/// The text formats a scraper may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    /// The Prometheus text format 0.0.4 (`text/plain; version=0.0.4`).
    Prometheus,
    /// OpenMetrics 1.0 (`application/openmetrics-text; version=1.0.0`).
    OpenMetrics,
}

impl Format {
    /// The format a scraper asks for in its `Accept` header.
    pub(crate) fn negotiate(accept: Option<&str>) -> Self {
        match accept {
            Some(accept) if accept.contains("application/openmetrics-text") => Self::OpenMetrics,
            _ => Self::Prometheus,
        }
    }

    /// The `Content-Type` of an answer in this format.
    pub(crate) fn content_type(self) -> &'static str {
        match self {
            Self::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// One Prometheus registry; cheap to clone (clones share it).
#[derive(Debug, Clone)]
pub struct Metrics {
    root: Arc<Mutex<Registry>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// An empty registry.
    pub fn new() -> Self {
        Self {
            root: Arc::new(Mutex::new(Registry::default())),
        }
    }

    /// A registry for the process `service`: with the process metrics and
    /// `benalsam_build_info{service, version}`.
    pub fn for_service(service: &str) -> Self {
        let metrics = Self::new();
        {
            let mut root = metrics.registry();
            root.register_collector(Box::new(ProcessCollector));
            root.sub_registry_with_prefix("benalsam").register(
                "build",
                "The running build: service and version",
                Info::new(vec![
                    ("service".to_owned(), service.to_owned()),
                    ("version".to_owned(), env!("CARGO_PKG_VERSION").to_owned()),
                ]),
            );
        }
        metrics
    }

    /// The registry, to register metrics of your own next to these.
    pub fn registry(&self) -> MutexGuard<'_, Registry> {
        self.root.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers `metric` as `benalsam_<name>` (with `_<unit>` appended when given).
    pub(crate) fn register(
        &self,
        name: &str,
        help: &str,
        unit: Option<Unit>,
        metric: impl prometheus_client::registry::Metric,
    ) {
        let mut root = self.registry();
        let ours = root.sub_registry_with_prefix("benalsam");
        match unit {
            Some(unit) => ours.register_with_unit(name, help, unit, metric),
            None => ours.register(name, help, metric),
        }
    }

    /// Every registered metric, in the Prometheus text format (what `promtool check metrics`
    /// reads).
    pub fn encode(&self) -> String {
        self.encode_as(Format::Prometheus)
    }

    /// Every registered metric, in OpenMetrics 1.0.
    pub fn encode_openmetrics(&self) -> String {
        self.encode_as(Format::OpenMetrics)
    }

    pub(crate) fn encode_as(&self, format: Format) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry());
        match format {
            Format::OpenMetrics => out,
            Format::Prometheus => openmetrics_to_prometheus(&out),
        }
    }
}

/// Rewrites the OpenMetrics text prometheus-client writes into the Prometheus text format:
/// a counter family `x` becomes `x_total` in its `# TYPE` and `# HELP` lines (its samples
/// already are), an info family `x` becomes the gauge `x_info`, `unknown` becomes `untyped`,
/// and the `# UNIT` and `# EOF` lines go.
fn openmetrics_to_prometheus(text: &str) -> String {
    let mut types = std::collections::HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ")
            && let Some((name, kind)) = rest.split_once(' ')
        {
            types.insert(name.to_owned(), kind.to_owned());
        }
    }
    let renamed = |name: &str| match types.get(name).map(String::as_str) {
        Some("counter") => format!("{name}_total"),
        Some("info") => format!("{name}_info"),
        _ => name.to_owned(),
    };
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            out.push_str(&format!("# HELP {} {help}\n", renamed(name)));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let kind = match kind {
                "info" => "gauge",
                "unknown" => "untyped",
                other => other,
            };
            out.push_str(&format!("# TYPE {} {kind}\n", renamed(name)));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// Latency buckets: 0.5 ms doubling to 16 s.
pub(crate) fn latency() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// Counts a labelled event.
pub(crate) fn inc(family: &Family<Kind, Counter>, kind: &'static str) {
    family.get_or_create(&Kind { kind }).inc();
}

/// Observes a duration in seconds.
pub(crate) fn observe(histogram: &Histogram, duration: Duration) {
    histogram.observe(duration.as_secs_f64());
}

/// Creates the series of every `kinds` value of `family`, at zero.
pub(crate) fn precreate(family: &Family<Kind, Counter>, kinds: &[&'static str]) {
    for kind in kinds {
        let _ = family.get_or_create(&Kind { kind });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_names_counters_by_their_samples() {
        let metrics = Metrics::for_service("test");
        let reclaimed: Counter = Counter::default();
        metrics.register("jobs_reclaimed", "Reclaimed", None, reclaimed.clone());
        reclaimed.inc();
        let text = metrics.encode();
        assert!(
            text.contains("# TYPE benalsam_jobs_reclaimed_total counter\n"),
            "{text}"
        );
        assert!(text.contains("benalsam_jobs_reclaimed_total 1\n"), "{text}");
        assert!(
            text.contains("# TYPE benalsam_build_info gauge\n"),
            "{text}"
        );
        assert!(
            text.contains("benalsam_build_info{service=\"test\""),
            "{text}"
        );
        assert!(
            text.contains("# TYPE process_cpu_seconds_total counter"),
            "{text}"
        );
        assert!(
            !text.contains("# EOF") && !text.contains("# UNIT"),
            "{text}"
        );
        let open = metrics.encode_openmetrics();
        assert!(open.ends_with("# EOF\n"), "{open}");
    }

    #[test]
    fn the_scraper_chooses_the_format() {
        assert_eq!(Format::negotiate(None), Format::Prometheus);
        assert_eq!(
            Format::negotiate(Some(
                "application/openmetrics-text;version=1.0.0,text/plain;q=0.5"
            )),
            Format::OpenMetrics
        );
        assert_eq!(Format::negotiate(Some("text/plain")), Format::Prometheus);
    }
}
