//! OIP v2 gRPC (`inference.GRPCInferenceService`) for clients: the shared
//! [`Grpc`] service over [`Service`].

use std::sync::Arc;

use tandem_proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
use tandem_proto::inference::{ModelInferRequest, ModelInferResponse, ModelMetadataResponse};
use tonic::Status;
use tonic::codec::CompressionEncoding;

use super::error::RequestError;
use super::service::{Service, trace_from_header};
use crate::common::budget::{Budget, Exhausted, GrpcBudget};
use crate::common::oip::{Backend, Grpc, NotServed};

/// The gRPC adapter.
pub type OipGrpc = Grpc<Service>;

/// Wraps the adapter in the generated server with message limits derived
/// from `limits.maxRequestBytes` (with headroom so the handler, not the
/// codec, reports an oversized request with a clear message), each message's bytes reserved
/// from `budget` (shared with the REST server) while it is received and answered.
pub fn server(
    service: Arc<Service>,
    budget: Budget,
) -> GrpcBudget<GrpcInferenceServiceServer<OipGrpc>> {
    let limit = service
        .config()
        .limits
        .max_request_bytes
        .saturating_add(1 << 20)
        .saturating_mul(2);
    // Compressed requests (tritonclient's `compression_algorithm`) are decoded up to the same
    // limit.
    let server = GrpcInferenceServiceServer::new(Grpc(Arc::clone(&service)))
        .max_decoding_message_size(limit)
        .max_encoding_message_size(usize::MAX)
        .accept_compressed(CompressionEncoding::Gzip)
        .accept_compressed(CompressionEncoding::Deflate);
    let refused = Arc::new(move |e: &Exhausted| {
        service.infer_rejected("grpc", &RequestError::ResourceExhausted(e.to_string()));
    });
    GrpcBudget::new(server, budget, limit, refused)
}

#[tonic::async_trait]
impl Backend for Service {
    const SERVER_NAME: &'static str = "tandem-preprocess";

    fn is_ready(&self) -> bool {
        Service::is_ready(self)
    }

    fn check_served(&self, name: &str, version: &str) -> Result<(), NotServed> {
        Service::check_served(self, name, version)
    }

    fn model_metadata(&self) -> Result<ModelMetadataResponse, Status> {
        Ok(self.metadata())
    }

    async fn infer(
        self: Arc<Self>,
        req: ModelInferRequest,
        traceparent: Option<String>,
    ) -> Result<ModelInferResponse, Status> {
        let trace = trace_from_header(traceparent.as_deref());
        Ok(Service::infer(&self, req, trace, "grpc").await?)
    }
}
