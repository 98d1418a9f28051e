//! Prometheus metrics.
//!
//! A [`Metrics`] is one registry. Each component keeps its own families and registers them
//! into the registry its caller passes (`with_metrics`), so a process exports exactly the
//! families of the parts it runs: the bridge no consumer counters, the consumer no bridge
//! counters. Names are prefixed `benalsam_`, units are in the names, labels come from small
//! fixed sets (plus the names of configured tables and queues). Every labelled series exists
//! from the start, at zero, so dashboards and alerts see zeros rather than gaps.
//!
//! [`Metrics::for_service`] adds the standard process metrics (`process_cpu_seconds_total`,
//! `process_resident_memory_bytes`, `process_open_fds`, …) and `benalsam_build_info`.
//! [`Metrics::encode`] writes the Prometheus text format (what `promtool check metrics`
//! reads), [`Metrics::encode_openmetrics`] OpenMetrics; the health server serves whichever
//! the scraper asks for.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

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

/// The standard process metrics, read from `/proc` at each scrape (Linux; elsewhere none).
#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let Some(p) = process::sample() else {
            return Ok(());
        };
        let counter = ConstCounter::new(p.cpu_seconds);
        counter.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds.",
            None,
            counter.metric_type(),
        )?)?;
        for (name, help, value) in [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                p.resident_bytes,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
                p.virtual_bytes,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors.",
                p.open_fds,
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors.",
                p.max_fds,
            ),
        ] {
            let gauge = ConstGauge::new(value);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        let start = ConstGauge::new(p.start_time_seconds);
        start.encode(encoder.encode_descriptor(
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
            None,
            start.metric_type(),
        )?)?;
        Ok(())
    }
}

mod process {
    //! Reading the process's own numbers from `/proc`.

    /// One reading.
    pub(super) struct Sample {
        pub(super) cpu_seconds: f64,
        pub(super) resident_bytes: i64,
        pub(super) virtual_bytes: i64,
        pub(super) open_fds: i64,
        pub(super) max_fds: i64,
        pub(super) start_time_seconds: f64,
    }

    /// Clock ticks per second and page size: fixed on Linux for every platform we build.
    const TICKS_PER_SECOND: f64 = 100.0;
    const PAGE_SIZE: i64 = 4096;

    pub(super) fn sample() -> Option<Sample> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // The command name may contain spaces: the fields start after its closing ')'.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<f64>().ok());
        let (utime, stime) = (field(14)?, field(15)?);
        let start_ticks = field(22)?;
        let (vsize, rss) = (field(23)?, field(24)?);
        let boot = std::fs::read_to_string("/proc/stat")
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("btime "))?
            .trim()
            .parse::<f64>()
            .ok()?;
        let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as i64;
        let max_fds = std::fs::read_to_string("/proc/self/limits")
            .ok()?
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
            .unwrap_or(0);
        Some(Sample {
            cpu_seconds: (utime + stime) / TICKS_PER_SECOND,
            resident_bytes: rss as i64 * PAGE_SIZE,
            virtual_bytes: vsize as i64,
            open_fds,
            max_fds,
            start_time_seconds: boot + start_ticks / TICKS_PER_SECOND,
        })
    }
}

/// Latency buckets: 0.5 ms doubling to 16 s.
fn latency() -> Histogram {
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
fn precreate(family: &Family<Kind, Counter>, kinds: &[&'static str]) {
    for kind in kinds {
        let _ = family.get_or_create(&Kind { kind });
    }
}

/// The job stream's families (bridge).
#[derive(Debug, Clone, Default)]
pub(crate) struct StreamMetrics {
    pub(crate) jobs_claimed: Family<Kind, Counter>,
    pub(crate) jobs_reclaimed: Counter,
    pub(crate) queue_jobs: Family<Status, Gauge>,
    pub(crate) pending_by_table: Family<Table, Gauge>,
    pub(crate) oldest_pending_age: FloatGauge,
    pub(crate) oldest_sent_age: FloatGauge,
}

impl StreamMetrics {
    pub(crate) fn register(&self, metrics: &Metrics) {
        precreate(&self.jobs_claimed, &["fresh", "retry"]);
        for status in ["pending", "processing", "sent", "retrying"] {
            let _ = self.queue_jobs.get_or_create(&Status { status });
        }
        metrics.register(
            "jobs_claimed",
            "Jobs claimed from the outbox, by kind (fresh, retry)",
            None,
            self.jobs_claimed.clone(),
        );
        metrics.register(
            "jobs_reclaimed",
            "Jobs given back to pending after their lease expired",
            None,
            self.jobs_reclaimed.clone(),
        );
        metrics.register(
            "queue_jobs",
            "Jobs in the queue table by live status (sampled)",
            None,
            self.queue_jobs.clone(),
        );
        metrics.register(
            "queue_pending_jobs",
            "Pending jobs by table (sampled); a table no bridge routes keeps its jobs here",
            None,
            self.pending_by_table.clone(),
        );
        metrics.register(
            "queue_oldest_pending_age",
            "Age of the oldest pending job (sampled)",
            Some(Unit::Seconds),
            self.oldest_pending_age.clone(),
        );
        metrics.register(
            "queue_oldest_sent_age",
            "Age of the oldest sent, not completed job (sampled)",
            Some(Unit::Seconds),
            self.oldest_sent_age.clone(),
        );
    }
}

/// The publisher's families (bridge).
#[derive(Debug, Clone)]
pub(crate) struct PublisherMetrics {
    pub(crate) jobs_published: Counter,
    pub(crate) jobs_confirmed: Counter,
    pub(crate) jobs_publish_failed: Family<Kind, Counter>,
    pub(crate) jobs_republished: Counter,
    pub(crate) confirm_duration: Histogram,
    pub(crate) publish_duration: Histogram,
}

impl Default for PublisherMetrics {
    fn default() -> Self {
        Self {
            jobs_published: Counter::default(),
            jobs_confirmed: Counter::default(),
            jobs_publish_failed: Family::default(),
            jobs_republished: Counter::default(),
            confirm_duration: latency(),
            publish_duration: latency(),
        }
    }
}

impl PublisherMetrics {
    /// Registers the families into `metrics`, with a series at zero for each of the
    /// publisher's `failure_kinds`.
    pub(crate) fn register(&self, metrics: &Metrics, failure_kinds: &[&'static str]) {
        precreate(&self.jobs_publish_failed, failure_kinds);
        metrics.register(
            "jobs_published",
            "Messages published to RabbitMQ, republications included",
            None,
            self.jobs_published.clone(),
        );
        metrics.register(
            "jobs_confirmed",
            "Jobs confirmed by RabbitMQ and reported sent",
            None,
            self.jobs_confirmed.clone(),
        );
        metrics.register(
            "jobs_publish_failed",
            "Publishes that failed, by kind",
            None,
            self.jobs_publish_failed.clone(),
        );
        metrics.register(
            "jobs_republished",
            "Messages published again after a lost connection",
            None,
            self.jobs_republished.clone(),
        );
        metrics.register(
            "confirm_duration",
            "Time from publish to the broker's confirm",
            Some(Unit::Seconds),
            self.confirm_duration.clone(),
        );
        metrics.register(
            "publish_duration",
            "Time to hand one message to the broker",
            Some(Unit::Seconds),
            self.publish_duration.clone(),
        );
    }
}

/// The indexer's families (consumer).
#[derive(Debug, Clone)]
pub(crate) struct IndexerMetrics {
    pub(crate) deliveries_received: Counter,
    pub(crate) deliveries_acked: Counter,
    pub(crate) deliveries_dead_lettered: Family<Kind, Counter>,
    pub(crate) bulk_requests: Family<Kind, Counter>,
    pub(crate) bulk_duration: Histogram,
    pub(crate) bulk_size: Histogram,
    pub(crate) bulk_limit: Gauge,
    pub(crate) bulk_items: Family<Kind, Counter>,
    pub(crate) jobs_completed: Counter,
    pub(crate) circuit_open: Gauge,
    /// Moves from one search node to the next (shared with the indexer's `SearchNodes`).
    pub(crate) search_node_switches: Counter,
    pub(crate) end_to_end_latency: Histogram,
    pub(crate) queue_messages: Family<Queue, Gauge>,
}

impl Default for IndexerMetrics {
    fn default() -> Self {
        Self {
            deliveries_received: Counter::default(),
            deliveries_acked: Counter::default(),
            deliveries_dead_lettered: Family::default(),
            bulk_requests: Family::default(),
            bulk_duration: latency(),
            bulk_size: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            bulk_limit: Gauge::default(),
            bulk_items: Family::default(),
            jobs_completed: Counter::default(),
            circuit_open: Gauge::default(),
            search_node_switches: Counter::default(),
            end_to_end_latency: Histogram::new(exponential_buckets(0.005, 2.0, 18)),
            queue_messages: Family::default(),
        }
    }
}

impl IndexerMetrics {
    pub(crate) fn register(&self, metrics: &Metrics) {
        precreate(
            &self.deliveries_dead_lettered,
            &["malformed", "rejected", "retries-exhausted", "unverified"],
        );
        precreate(&self.bulk_requests, &["ok", "failed"]);
        precreate(
            &self.bulk_items,
            &[
                "applied",
                "superseded",
                "already_gone",
                "retry",
                "permanent",
            ],
        );
        metrics.register(
            "deliveries_received",
            "Deliveries received from the consumed queues",
            None,
            self.deliveries_received.clone(),
        );
        metrics.register(
            "deliveries_acked",
            "Deliveries acked after their outcome was recorded",
            None,
            self.deliveries_acked.clone(),
        );
        metrics.register(
            "deliveries_dead_lettered",
            "Deliveries dead-lettered, by kind",
            None,
            self.deliveries_dead_lettered.clone(),
        );
        metrics.register(
            "bulk_requests",
            "Bulk requests to Elasticsearch, by kind (ok, failed)",
            None,
            self.bulk_requests.clone(),
        );
        metrics.register(
            "bulk_duration",
            "Duration of bulk requests",
            Some(Unit::Seconds),
            self.bulk_duration.clone(),
        );
        metrics.register(
            "bulk_size_actions",
            "Actions per bulk request",
            None,
            self.bulk_size.clone(),
        );
        metrics.register(
            "bulk_limit_actions",
            "Actions the next bulk request may carry (shrinks while Elasticsearch is slow or busy)",
            None,
            self.bulk_limit.clone(),
        );
        metrics.register(
            "bulk_items",
            "Bulk item outcomes, by kind",
            None,
            self.bulk_items.clone(),
        );
        metrics.register(
            "jobs_completed",
            "Jobs reported completed by the consumer",
            None,
            self.jobs_completed.clone(),
        );
        metrics.register(
            "circuit_open",
            "1 while the circuit breaker holds requests to Elasticsearch back",
            None,
            self.circuit_open.clone(),
        );
        metrics.register(
            "search_node_switches",
            "Moves from a search node that failed a request to the next",
            None,
            self.search_node_switches.clone(),
        );
        metrics.register(
            "end_to_end_latency",
            "From the change's commit to its document being indexed",
            Some(Unit::Seconds),
            self.end_to_end_latency.clone(),
        );
        metrics.register(
            "rabbitmq_queue_messages",
            "Messages waiting in a RabbitMQ queue, by queue (sampled)",
            None,
            self.queue_messages.clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_names_counters_by_their_samples() {
        let metrics = Metrics::for_service("test");
        let stream = StreamMetrics::default();
        stream.register(&metrics);
        stream.jobs_reclaimed.inc();
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
