//! Request spans that continue the caller's W3C `traceparent`.
//!
//! The span records the incoming trace id and parent span id as fields, so
//! logs and exported spans can be joined to the caller's trace. (Attaching the
//! span to the remote parent for OTLP export belongs to the shared telemetry
//! setup in `common::telemetry`; see docs/models.md.)

/// Parses `00-<32 hex>-<16 hex>-<2 hex>` into (trace id, parent span id).
pub fn parse_traceparent(v: &str) -> Option<(&str, &str)> {
    let mut parts = v.trim().split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    let ok = hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && hex(span, 16)
        && hex(flags, 2)
        && trace.bytes().any(|b| b != b'0')
        && span.bytes().any(|b| b != b'0');
    ok.then_some((trace, span))
}

/// The `infer` span of one request; queue wait, batch assembly and engine
/// forward spans are created as its children by the engine thread.
pub fn request_span(model: &str, traceparent: Option<&str>) -> tracing::Span {
    match traceparent.and_then(parse_traceparent) {
        Some((trace_id, parent)) => {
            tracing::info_span!("infer", model, trace_id, parent_span_id = parent)
        }
        None => tracing::info_span!("infer", model),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_valid_traceparent_yields_its_trace_and_parent_ids() {
        let v = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(
            parse_traceparent(v),
            Some(("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"))
        );
    }

    #[test]
    fn malformed_or_all_zero_traceparents_are_ignored() {
        assert_eq!(parse_traceparent("garbage"), None);
        assert_eq!(
            parse_traceparent("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            None
        );
        assert_eq!(
            parse_traceparent("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            None
        );
    }
}
