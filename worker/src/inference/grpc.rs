//! gRPC adapters: OIP v2 `GRPCInferenceService` and `tandem.v1.WorkerControl`
//! over the shared [`Worker`].

use std::sync::Arc;

use tandem_proto::inference::grpc_inference_service_server::GrpcInferenceService;
use tandem_proto::inference::model_metadata_response::TensorMetadata;
use tandem_proto::inference::*;
use tandem_proto::tandem::v1::worker_control_server::WorkerControl;
use tandem_proto::tandem::v1::{GetStatsRequest, SetRoutesRequest, SetRoutesResponse, WorkerStats};
use tonic::{Request, Response, Status};

use super::service::Worker;
use super::trace::request_span;

/// The OIP v2 gRPC service.
#[derive(Clone)]
pub struct Oip(pub Arc<Worker>);

fn tensor_meta(specs: &[tandem_engine::TensorSpec]) -> Vec<TensorMetadata> {
    specs
        .iter()
        .map(|s| TensorMetadata {
            name: s.name.clone(),
            datatype: s.datatype.as_str().into(),
            shape: s.dims.clone(),
        })
        .collect()
}

/// ModelMetadata for the served model, or `None` before it is loaded.
pub fn model_metadata(w: &Worker) -> Option<ModelMetadataResponse> {
    let spec = w.spec()?;
    Some(ModelMetadataResponse {
        name: w.model_name.clone(),
        versions: vec![w.model_version.clone()],
        platform: "tandem".into(),
        inputs: tensor_meta(&spec.inputs),
        outputs: tensor_meta(&spec.outputs),
    })
}

#[tonic::async_trait]
impl GrpcInferenceService for Oip {
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
            return Err(Status::not_found(format!(
                "model {:?} is not served here",
                r.name
            )));
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
            name: "tandem-worker".into(),
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
            return Err(Status::not_found(format!(
                "model {:?} is not served here",
                r.name
            )));
        }
        model_metadata(&self.0)
            .map(Response::new)
            .ok_or_else(|| Status::unavailable("model is not loaded yet"))
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
        let inner = req.into_inner();
        let span = request_span(&inner.model_name, traceparent.as_deref());
        let w = self.0.clone();
        Ok(Response::new(w.infer(inner, span).await?))
    }
}

/// The WorkerControl service (GetStats; SetRoutes is for preprocess workers).
#[derive(Clone)]
pub struct Control(pub Arc<Worker>);

#[tonic::async_trait]
impl WorkerControl for Control {
    async fn get_stats(
        &self,
        _: Request<GetStatsRequest>,
    ) -> Result<Response<WorkerStats>, Status> {
        Ok(Response::new(self.0.stats()))
    }

    async fn set_routes(
        &self,
        _: Request<SetRoutesRequest>,
    ) -> Result<Response<SetRoutesResponse>, Status> {
        Err(Status::unimplemented(
            "inference workers hold no routing table",
        ))
    }
}
