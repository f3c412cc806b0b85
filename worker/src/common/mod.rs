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
