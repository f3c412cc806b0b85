//! Logging/tracing setup and W3C trace-context helpers.
//!
//! [`init`] installs a `tracing` subscriber (`RUST_LOG` filter, JSON lines when
//! `TANDEM_LOG_FORMAT=json`) and, when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, an
//! OpenTelemetry layer exporting spans over OTLP/gRPC. The trace context travels
//! between stages as a W3C `traceparent` header in gRPC metadata:
//! [`TraceContext`] parses an incoming one and derives the child to send on, and
//! [`set_remote_parent`] makes a request's span a child of the caller's span, so
//! exported traces join the client's.

use std::sync::atomic::{AtomicU64, Ordering};

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// The installed telemetry; [`Telemetry::shutdown`] flushes spans not yet exported.
#[derive(Debug, Default)]
pub struct Telemetry {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Telemetry {
    /// Exports what is buffered and stops the exporter.
    pub fn shutdown(self) {
        if let Some(p) = self.provider
            && let Err(e) = p.shutdown()
        {
            tracing::warn!(error = %e, "flushing traces failed");
        }
    }
}

/// Installs the global tracing subscriber for `service` (the OTLP service name); call it
/// inside the tokio runtime (the OTLP exporter uses it). A second call leaves the first
/// subscriber in place.
pub fn init(service: &'static str) -> Telemetry {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let json = std::env::var("TANDEM_LOG_FORMAT").is_ok_and(|v| v == "json");
    let mut exporter_error = None;
    let provider = if std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_some() {
        match opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()
        {
            Ok(exporter) => Some(
                opentelemetry_sdk::trace::SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(
                        opentelemetry_sdk::Resource::builder()
                            .with_service_name(service)
                            .build(),
                    )
                    .build(),
            ),
            Err(e) => {
                exporter_error = Some(e.to_string());
                None
            }
        }
    } else {
        None
    };
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer(service)));
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    // Colors only on a terminal: a pod's log is a file or a pipe, where escape codes split
    // `field=value` pairs.
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = if json {
        registry.with(fmt.json()).try_init()
    } else {
        registry.with(fmt).try_init()
    };
    if let Some(e) = exporter_error {
        tracing::warn!(error = %e, "OTLP exporter not started; spans are only logged");
    }
    Telemetry { provider }
}

/// Makes `span` a child of the caller's span named by `ctx`, so exported spans carry the
/// caller's trace id and parent span id. Without an OpenTelemetry layer this does nothing.
pub fn set_remote_parent(span: &tracing::Span, ctx: &TraceContext) {
    let remote = SpanContext::new(
        TraceId::from(ctx.trace_id),
        SpanId::from(ctx.span_id),
        TraceFlags::new(ctx.flags),
        true,
        TraceState::default(),
    );
    let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
}

/// A W3C trace context (`traceparent` version 00).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    /// 16-byte trace id, never all zero.
    pub trace_id: u128,
    /// 8-byte id of the span that is the parent of the receiver's work.
    pub span_id: u64,
    /// Trace flags (bit 0 = sampled).
    pub flags: u8,
}

impl TraceContext {
    /// Parses a `traceparent` header value; `None` when malformed.
    pub fn parse(value: &str) -> Option<Self> {
        let mut parts = value.trim().split('-');
        let version = parts.next()?;
        let trace = parts.next()?;
        let span = parts.next()?;
        let flags = parts.next()?;
        if version.len() != 2
            || version == "ff"
            || trace.len() != 32
            || span.len() != 16
            || flags.len() != 2
        {
            return None;
        }
        let trace_id = u128::from_str_radix(trace, 16).ok()?;
        let span_id = u64::from_str_radix(span, 16).ok()?;
        let flags = u8::from_str_radix(flags, 16).ok()?;
        (trace_id != 0 && span_id != 0).then_some(Self {
            trace_id,
            span_id,
            flags,
        })
    }

    /// The context of `span` as an OpenTelemetry layer exports it: its trace id and its own
    /// span id, so that a downstream span sent this context is exported as `span`'s child.
    /// `None` when no OpenTelemetry layer records `span` (tracing off, or filtered out).
    pub fn of_span(span: &tracing::Span) -> Option<Self> {
        let cx = span.context();
        let sc = cx.span().span_context().clone();
        sc.is_valid().then(|| Self {
            trace_id: u128::from_be_bytes(sc.trace_id().to_bytes()),
            span_id: u64::from_be_bytes(sc.span_id().to_bytes()),
            flags: sc.trace_flags().to_u8(),
        })
    }

    /// A fresh root context (sampled).
    pub fn new_root() -> Self {
        Self {
            trace_id: (u128::from(next_id()) << 64) | u128::from(next_id()),
            span_id: next_id(),
            flags: 1,
        }
    }

    /// The context to send downstream: same trace, a new span id.
    pub fn child(&self) -> Self {
        Self {
            span_id: next_id(),
            ..*self
        }
    }

    /// The `traceparent` header value.
    pub fn header_value(&self) -> String {
        format!(
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id, self.span_id, self.flags
        )
    }
}

/// Non-zero pseudo-random ids (splitmix64 over time and a counter); ids only
/// need to be unique, not secret.
fn next_id() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut z = nanos ^ COUNTER.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    z.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};

    /// Runs `f` under an OpenTelemetry layer with an in-memory exporter; returns its result and
    /// the spans exported.
    fn exported<T>(f: impl FnOnce() -> T) -> (T, Vec<SpanData>) {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        let out = tracing::subscriber::with_default(subscriber, f);
        let _ = provider.force_flush();
        (out, exporter.get_finished_spans().unwrap_or_default())
    }

    #[test]
    fn a_request_span_is_exported_as_a_child_of_the_callers_remote_span() {
        let caller =
            TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        let ((), spans) = exported(|| {
            let span = tracing::info_span!("infer");
            set_remote_parent(&span, &caller);
            span.in_scope(|| tracing::info!("work"));
        });
        let infer = spans
            .iter()
            .find(|s| s.name == "infer")
            .expect("exported span");
        assert_eq!(
            infer.span_context.trace_id(),
            TraceId::from(0x4bf92f3577b34da6a3ce929d0e0e4736_u128)
        );
        assert_eq!(infer.parent_span_id, SpanId::from(0x00f067aa0ba902b7_u64));
        assert!(infer.parent_span_is_remote);
    }

    #[test]
    fn the_context_sent_downstream_names_the_exported_span_so_the_next_stage_is_its_child() {
        let caller =
            TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        let (sent, spans) = exported(|| {
            let infer = tracing::info_span!("infer");
            set_remote_parent(&infer, &caller);
            let forward = tracing::info_span!(parent: &infer, "forward");
            TraceContext::of_span(&forward)
        });
        let sent = sent.expect("an OpenTelemetry layer records the span");
        let forward = spans.iter().find(|s| s.name == "forward").expect("forward");
        assert_eq!(sent.trace_id, caller.trace_id);
        assert_eq!(
            SpanId::from(sent.span_id),
            forward.span_context.span_id(),
            "downstream parent = the exported forward span"
        );
        assert_eq!(sent.flags, 1);
    }

    #[test]
    fn without_an_opentelemetry_layer_a_span_has_no_exportable_context() {
        let subscriber = tracing_subscriber::registry();
        let ctx = tracing::subscriber::with_default(subscriber, || {
            TraceContext::of_span(&tracing::info_span!("forward"))
        });
        assert_eq!(ctx, None);
    }

    #[test]
    fn traceparent_round_trips_and_child_keeps_the_trace_id() {
        let v = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let ctx = TraceContext::parse(v).unwrap();
        assert_eq!(ctx.header_value(), v);
        let child = ctx.child();
        assert_eq!(child.trace_id, ctx.trace_id);
        assert_ne!(child.span_id, ctx.span_id);
    }

    #[test]
    fn malformed_traceparent_is_rejected() {
        assert!(TraceContext::parse("garbage").is_none());
        assert!(
            TraceContext::parse("00-00000000000000000000000000000000-00f067aa0ba902b7-01")
                .is_none()
        );
        assert!(
            TraceContext::parse("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
                .is_none()
        );
    }
}
