//! Plumbing shared by both worker roles (preprocess and inference).
//!
//! - [`tensor`]: Open Inference Protocol v2 tensor helpers (datatypes, shapes,
//!   raw little-endian contents, the BYTES 4-byte-length-prefixed encoding).
//! - [`body`]: REST request bodies, bounded in size and time, gzip/deflate decoded.
//! - [`budget`]: the worker's budget of request-body bytes in flight (REST and gRPC).
//! - [`rest`]: OIP v2 REST infer bodies (JSON and binary tensor data) in and out.
//! - [`metrics`]: the Prometheus `/metrics` HTTP server.
//! - [`net`]: client-facing listeners whose connections have `TCP_NODELAY` set.
//! - [`oip`]: the OIP v2 gRPC service, over what each role serves.
//! - [`shutdown`]: SIGTERM/SIGINT handling as a cloneable shutdown signal.
//! - [`telemetry`]: tracing subscriber setup and W3C `traceparent` helpers.
//! - [`stats`]: latency windows that produce the `WorkerControl` stats shapes.
//! - [`control_auth`]: the control token `WorkerControl` calls must carry, when one is set.
//! - [`write_termination_message`]: why a worker failed, where Kubernetes shows it.
//! - [`bounded_message`]: error messages sent to clients, cut to a size every client reads.

pub mod body;
pub mod budget;
pub mod control_auth;
pub mod metrics;
pub use tandem_net as net;
pub mod oip;
pub mod rest;
pub mod shutdown;
pub mod stats;
pub mod telemetry;
pub mod tensor;

/// Writes why the worker failed to `path` (the container's `terminationMessagePath`), where
/// the kubelet picks it up for the pod's status and the operator quotes it in the pipeline's
/// `Degraded` condition. A path that cannot be written (outside a pod) is skipped.
pub fn write_termination_message(path: &std::path::Path, msg: &str) {
    if let Err(e) = std::fs::write(path, msg) {
        tracing::debug!(path = %path.display(), error = %e, "termination log not written");
    }
}

/// Longest error message a client is sent, in bytes. Messages quote what the client sent (a
/// model name, a datatype, a shape), and gRPC carries the message in a response header:
/// grpc-core clients (tritonclient, grpcio) refuse a response whose headers pass 16 KiB (and may
/// refuse from 8 KiB), so a request with a 20 KB model name got `RESOURCE_EXHAUSTED: received
/// metadata size exceeds hard limit` instead of the error. REST bodies are cut the same way.
pub const MAX_ERROR_MESSAGE: usize = 1024;

/// `msg` as sent to a client: whole when it fits [`MAX_ERROR_MESSAGE`], else its start and its
/// end (where the problem is usually named: "… is not served") around a note of what was cut.
pub fn bounded_message(msg: String) -> String {
    if msg.len() <= MAX_ERROR_MESSAGE {
        return msg;
    }
    let floor = |mut i: usize| {
        while !msg.is_char_boundary(i) {
            i -= 1;
        }
        i
    };
    let head = floor(MAX_ERROR_MESSAGE * 2 / 3);
    let tail = floor(msg.len() - MAX_ERROR_MESSAGE / 4);
    format!(
        "{}…[{} bytes cut]…{}",
        &msg[..head],
        tail - head,
        &msg[tail..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_message_is_sent_whole() {
        assert_eq!(
            bounded_message("model 'x' is not served".into()),
            "model 'x' is not served"
        );
    }

    #[test]
    fn a_long_message_keeps_its_start_and_its_end_within_the_limit() {
        let name = "é".repeat(10_000);
        let msg = format!("model '{name}' is not served by this worker");
        let cut = bounded_message(msg.clone());
        assert!(cut.len() <= MAX_ERROR_MESSAGE + 32, "{} bytes", cut.len());
        assert!(cut.starts_with("model 'éé"), "{cut}");
        assert!(cut.ends_with("éé' is not served by this worker"), "{cut}");
        assert!(cut.contains(" bytes cut]"), "{cut}");
    }
}
