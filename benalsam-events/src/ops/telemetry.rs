//! Trace context across the broker: the bridge's publish span travels to the consumer in the
//! `traceparent` header (W3C trace context); the consumer's span per message continues it,
//! and each bulk request's span links to the messages it carried.
//!
//! The library only creates `tracing` spans and moves their context; whoever runs it (the
//! bundled binaries through `benalsam-cli`, or an embedding service) installs the subscriber
//! and, if wanted, an OpenTelemetry exporter. Without one nothing is exported and
//! [`traceparent_of`] gives nothing.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The W3C `traceparent` of a span, when it belongs to an exported trace.
pub(crate) fn traceparent_of(span: &tracing::Span) -> Option<String> {
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
pub(crate) fn set_parent(span: &tracing::Span, traceparent: &str) {
    let carrier = HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    let context = TraceContextPropagator::new().extract(&carrier);
    if context.span().span_context().is_valid() {
        let _ = span.set_parent(context);
    }
}

/// Links `span` to the span of `other` (a bulk request to the messages it carried).
pub(crate) fn link(span: &tracing::Span, other: &tracing::Span) {
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
    fn without_an_exported_trace_there_is_no_traceparent() {
        let span = tracing::info_span!("plain");
        assert_eq!(traceparent_of(&span), None);
    }
}
