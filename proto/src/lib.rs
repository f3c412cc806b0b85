//! gRPC types and services for Tandem: the Open Inference Protocol v2
//! (`inference.GRPCInferenceService`, wire-compatible with KServe and Triton)
//! and Tandem's own `tandem.v1.WorkerControl`: generated code, and the codec it uses
//! ([`codec`]), which refuses a `ModelInferRequest` too costly to decode.

pub mod codec;

/// Open Inference Protocol v2 (`inference` package).
pub mod inference {
    tonic::include_proto!("inference");
}

/// Tandem's worker control service (`tandem.v1` package).
pub mod tandem {
    /// Version 1 of the control protocol.
    pub mod v1 {
        tonic::include_proto!("tandem.v1");
    }
}
