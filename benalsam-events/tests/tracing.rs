//! Checks that one listing change is one trace across the three hops, against real
//! PostgreSQL, RabbitMQ and Elasticsearch: the trace context the writer stored with the job is
//! the parent of the publish span, the consumer's span continues the same trace through the
//! AMQP headers, and the bulk request's span links to it. Spans go to an in-memory exporter.

mod support;

use std::time::{Duration, Instant};

use benalsam_events::{Indexer, IndexerConfig, OutboxConfig, Topology};
use opentelemetry::trace::{SpanKind, TracerProvider};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use support::{TestIndex, TestSchema, TestVhost, search_url, spawn_bridge};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::layer::SubscriberExt;

const WRITER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const WRITER_SPAN: &str = "00f067aa0ba902b7";

// One thread, so the spans of every task reach this test's subscriber.
#[tokio::test(flavor = "current_thread")]
async fn a_change_is_one_trace_from_the_writer_to_the_index() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    let _guard = tracing::subscriber::set_default(subscriber);

    let (db, vhost, index) = (
        TestSchema::new().await,
        TestVhost::new().await,
        TestIndex::new().await,
    );
    {
        let connection = vhost.url.connect("test").await.expect("connect");
        Topology::benalsam(&Default::default())
            .declare(&connection)
            .await
            .expect("declare");
    }
    let (stop_bridge, bridge) = spawn_bridge(&db, &vhost.url);
    let client = search_url()
        .client(Duration::from_secs(10))
        .expect("client");
    let indexer = Indexer::new(
        vhost.url.clone(),
        client,
        db.outbox(OutboxConfig::default()),
        vec![index.event_type()],
        IndexerConfig::default(),
    )
    .expect("valid settings");
    let stop_consumer = CancellationToken::new();
    let consumer = tokio::spawn(indexer.run(stop_consumer.clone()));

    db.client
        .batch_execute(&format!(
            "BEGIN;
             SET LOCAL benalsam.traceparent = '00-{WRITER_TRACE}-{WRITER_SPAN}-01';
             INSERT INTO listings (user_id, title, category, status) VALUES (gen_random_uuid(), 'İz sürme', 'x', 'active');
             COMMIT;"
        ))
        .await
        .expect("write with a trace context");
    let started = Instant::now();
    while db.statuses().await.iter().any(|(_, s)| s != "completed") {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the job completes"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop_bridge.cancel();
    stop_consumer.cancel();
    bridge.await.expect("no panic").expect("bridge drained");
    consumer.await.expect("no panic");
    provider.force_flush().expect("flush");

    let spans = exporter.get_finished_spans().expect("spans");
    let trace = |s: &&opentelemetry_sdk::trace::SpanData| {
        s.span_context.trace_id().to_string() == WRITER_TRACE
    };
    let publish = spans
        .iter()
        .filter(trace)
        .find(|s| s.span_kind == SpanKind::Producer)
        .unwrap_or_else(|| panic!("a producer span in the writer's trace: {spans:#?}"));
    assert_eq!(
        publish.parent_span_id.to_string(),
        WRITER_SPAN,
        "the writer's span is the parent"
    );
    assert_eq!(publish.name, "benalsam.listings publish");
    let process = spans
        .iter()
        .filter(trace)
        .find(|s| s.span_kind == SpanKind::Consumer)
        .expect("a consumer span in the same trace");
    assert_eq!(
        process.parent_span_id,
        publish.span_context.span_id(),
        "continued from the message"
    );
    let bulk = spans
        .iter()
        .find(|s| {
            s.name == "bulk"
                && s.links
                    .links
                    .iter()
                    .any(|l| l.span_context.span_id() == process.span_context.span_id())
        })
        .expect("a bulk span linked to the message");
    assert_eq!(bulk.span_kind, SpanKind::Client);

    db.drop().await;
    vhost.drop().await;
    index.drop().await;
}
