//! OIP v2 gRPC (`inference.GRPCInferenceService`) for clients: a thin adapter
//! over [`Service`].

use std::sync::Arc;

use tandem_proto::inference::grpc_inference_service_server::{
    GrpcInferenceService, GrpcInferenceServiceServer,
};
use tandem_proto::inference::{
    ModelInferRequest, ModelInferResponse, ModelMetadataRequest, ModelMetadataResponse,
    ModelReadyRequest, ModelReadyResponse, ServerLiveRequest, ServerLiveResponse,
    ServerMetadataRequest, ServerMetadataResponse, ServerReadyRequest, ServerReadyResponse,
};
use tonic::{Request, Response, Status};

use super::error::RequestError;
use super::service::{Service, trace_from_header};

/// The gRPC adapter.
#[derive(Debug, Clone)]
pub struct OipGrpc(pub Arc<Service>);

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
    GrpcInferenceServiceServer::new(OipGrpc(service))
        .max_decoding_message_size(limit)
        .max_encoding_message_size(usize::MAX)
}

#[tonic::async_trait]
impl GrpcInferenceService for OipGrpc {
    async fn server_live(
        &self,
        _: Request<ServerLiveRequest>,
    ) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<ServerReadyRequest>,
    ) -> Result<Response<ServerReadyResponse>, Status> {
        Ok(Response::new(ServerReadyResponse {
            ready: self.0.is_ready(),
        }))
    }

    async fn model_ready(
        &self,
        req: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        let r = req.into_inner();
        if !self.0.serves(&r.name, &r.version) {
            return Err(RequestError::ModelNotFound(r.name).into());
        }
        Ok(Response::new(ModelReadyResponse {
            ready: self.0.is_ready(),
        }))
    }

    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(ServerMetadataResponse {
            name: "tandem-preprocess".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: vec![],
        }))
    }

    async fn model_metadata(
        &self,
        req: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        let r = req.into_inner();
        if !self.0.serves(&r.name, &r.version) {
            return Err(RequestError::ModelNotFound(r.name).into());
        }
        Ok(Response::new(self.0.metadata()))
    }

    async fn model_infer(
        &self,
        req: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        let trace = trace_from_header(
            req.metadata()
                .get("traceparent")
                .and_then(|v| v.to_str().ok()),
        );
        let resp = self.0.infer(req.into_inner(), trace, "grpc").await?;
        Ok(Response::new(resp))
    }
}
