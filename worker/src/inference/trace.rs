//! Request spans that continue the caller's W3C `traceparent`: the span records the caller's
//! trace id and parent span id as fields (for logs) and is attached to the caller's remote
//! span (for OTLP export), see `common::telemetry`.

use tandem_worker::common::telemetry::{TraceContext, set_remote_parent};

/// The `infer` span of one request; queue wait, batch assembly and engine
/// forward spans are created as its children by the engine thread.
pub fn request_span(model: &str, traceparent: Option<&str>) -> tracing::Span {
    match traceparent.and_then(TraceContext::parse) {
        Some(ctx) => {
            let span = tracing::info_span!(
                "infer",
                model,
                trace_id = %format_args!("{:032x}", ctx.trace_id),
                parent_span_id = %format_args!("{:016x}", ctx.span_id)
            );
            set_remote_parent(&span, &ctx);
            span
        }
        None => tracing::info_span!("infer", model),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanId, TraceId, TracerProvider as _};
    use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
    use tracing_subscriber::layer::SubscriberExt as _;

    fn exported(traceparent: Option<&str>) -> opentelemetry_sdk::trace::SpanData {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            request_span("minilm", traceparent).in_scope(|| tracing::info!("forward"));
        });
        let _ = provider.force_flush();
        exporter
            .get_finished_spans()
            .unwrap()
            .into_iter()
            .find(|s| s.name == "infer")
            .expect("the infer span is exported")
    }

    #[test]
    fn a_request_with_a_traceparent_continues_the_callers_trace() {
        let span = exported(Some(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ));
        assert_eq!(
            span.span_context.trace_id(),
            TraceId::from(0x4bf92f3577b34da6a3ce929d0e0e4736_u128)
        );
        assert_eq!(span.parent_span_id, SpanId::from(0x00f067aa0ba902b7_u64));
    }

    #[test]
    fn a_malformed_traceparent_starts_a_new_trace() {
        let span = exported(Some("00-garbage"));
        assert_eq!(span.parent_span_id, SpanId::INVALID);
        assert_ne!(
            span.span_context.trace_id(),
            TraceId::from(0x4bf92f3577b34da6a3ce929d0e0e4736_u128)
        );
    }
}
