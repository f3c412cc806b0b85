//! The OIP v2 gRPC service (`inference.GRPCInferenceService`), written once for both worker
//! roles: each role says what it serves through [`Backend`], and [`Grpc`] answers the six
//! calls the same way for both (liveness, readiness, `NOT_FOUND` for a model served elsewhere,
//! the request's W3C `traceparent` handed to the inference call).

use std::sync::Arc;

use tandem_proto::inference::grpc_inference_service_server::GrpcInferenceService;
use tandem_proto::inference::{
    ModelInferRequest, ModelInferResponse, ModelMetadataRequest, ModelMetadataResponse,
    ModelReadyRequest, ModelReadyResponse, ServerLiveRequest, ServerLiveResponse,
    ServerMetadataRequest, ServerMetadataResponse, ServerReadyRequest, ServerReadyResponse,
};
use tonic::{Request, Response, Status};

/// What a worker role serves over OIP v2.
#[tonic::async_trait]
pub trait Backend: Send + Sync + 'static {
    /// ServerMetadata's `name`.
    const SERVER_NAME: &'static str;

    /// Whether requests are served now (ServerReady and ModelReady).
    fn is_ready(&self) -> bool;

    /// Whether this worker serves model `name` at `version` (any version when it is empty).
    fn serves(&self, name: &str, version: &str) -> bool;

    /// The served model's metadata; an error status while it cannot be given yet.
    fn model_metadata(&self) -> Result<ModelMetadataResponse, Status>;

    /// Answers one ModelInfer request; `traceparent` is the caller's W3C trace context header.
    async fn infer(
        self: Arc<Self>,
        req: ModelInferRequest,
        traceparent: Option<String>,
    ) -> Result<ModelInferResponse, Status>;
}

/// The gRPC service over a [`Backend`].
#[derive(Debug)]
pub struct Grpc<B>(pub Arc<B>);

impl<B> Clone for Grpc<B> {
    fn clone(&self) -> Self {
        Self(Arc::clone(&self.0))
    }
}

impl<B: Backend> Grpc<B> {
    fn check_model(&self, name: String, version: &str) -> Result<(), Status> {
        if self.0.serves(&name, version) {
            Ok(())
        } else {
            Err(Status::not_found(format!(
                "model {name:?} is not served here"
            )))
        }
    }
}

#[tonic::async_trait]
impl<B: Backend> GrpcInferenceService for Grpc<B> {
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
        self.check_model(r.name, &r.version)?;
        Ok(Response::new(ModelReadyResponse {
            ready: self.0.is_ready(),
        }))
    }

    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(ServerMetadataResponse {
            name: B::SERVER_NAME.into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: vec![],
        }))
    }

    async fn model_metadata(
        &self,
        req: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        let r = req.into_inner();
        self.check_model(r.name, &r.version)?;
        self.0.model_metadata().map(Response::new)
    }

    async fn model_infer(
        &self,
        req: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        let traceparent = req
            .metadata()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let resp = Arc::clone(&self.0)
            .infer(req.into_inner(), traceparent)
            .await?;
        Ok(Response::new(resp))
    }
}
