//! OIP v2 gRPC (`inference.GRPCInferenceService`) for clients: the shared
//! [`Grpc`] service over [`Service`].

use std::sync::Arc;

use tandem_proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
use tandem_proto::inference::{ModelInferRequest, ModelInferResponse, ModelMetadataResponse};
use tonic::Status;
use tonic::codec::CompressionEncoding;

use super::error::RequestError;
use super::service::{Service, trace_from_header};
use crate::common::oip::{self, Backend, Grpc, NotServed};

/// The gRPC adapter.
pub type OipGrpc = Grpc<Service>;

/// Wraps the adapter in the generated server with message limits derived
/// from `limits.maxRequestBytes` (with headroom so the handler, not the
/// codec, reports an oversized request with a clear message).
pub fn server(service: Arc<Service>) -> GrpcInferenceServiceServer<OipGrpc> {
    let limit = service
        .config()
        .limits
        .max_request_bytes
        .saturating_add(1 << 20)
        .saturating_mul(2);
    // Compressed requests (tritonclient's `compression_algorithm`) are decoded up to the same
    // limit.
    GrpcInferenceServiceServer::new(Grpc(service))
        .max_decoding_message_size(limit)
        .max_encoding_message_size(usize::MAX)
        .accept_compressed(CompressionEncoding::Gzip)
        .accept_compressed(CompressionEncoding::Deflate)
}

#[tonic::async_trait]
impl Backend for Service {
    const SERVER_NAME: &'static str = "tandem-preprocess";

    fn is_ready(&self) -> bool {
        Service::is_ready(self)
    }

    fn check_served(&self, name: &str, version: &str) -> Result<(), NotServed> {
        check_served(self, name, version)
    }

    fn model_metadata(&self) -> Result<ModelMetadataResponse, Status> {
        Ok(self.metadata())
    }

    async fn infer(
        self: Arc<Self>,
        req: ModelInferRequest,
        traceparent: Option<String>,
    ) -> Result<ModelInferResponse, Status> {
        if let Err(e) = refuse_early(&self, &req) {
            self.infer_rejected("grpc", &e);
            return Err(e.into());
        }
        let trace = trace_from_header(traceparent.as_deref());
        Ok(Service::infer(&self, req, trace, "grpc").await?)
    }
}

/// Whether `name`/`version` address the model served here, [`oip::check_served`] over the
/// pipeline's `model`.
pub fn check_served(s: &Service, name: &str, version: &str) -> Result<(), NotServed> {
    let model = &s.config().model;
    oip::check_served(&model.name, &model.version, name, version)
}

/// What is refused before a request reaches [`Service::infer`], over gRPC and REST: a model
/// version not served here is answered naming the version that is, and an output asking for
/// Triton's classification extension is refused, pointing at the pipeline's own.
pub fn refuse_early(s: &Service, req: &ModelInferRequest) -> Result<(), RequestError> {
    check_served(s, &req.model_name, &req.model_version)?;
    oip::check_requested_outputs(req).map_err(|e| {
        RequestError::invalid(format!(
            "{e}; `postprocess: Classification` in the pipeline returns the top-k labels \
             (outputs \"labels\" and \"probabilities\")"
        ))
    })
}
