//! gRPC adapters over the shared [`Worker`]: OIP v2 `GRPCInferenceService` (the
//! shared [`crate::common::oip::Grpc`] service, with the [`Backend`] below) and
//! `tandem.v1.WorkerControl`.

use std::sync::Arc;

use tandem_proto::inference::model_metadata_response::TensorMetadata;
use tandem_proto::inference::{ModelInferRequest, ModelInferResponse, ModelMetadataResponse};
use tandem_proto::tandem::v1::worker_control_server::WorkerControl;
use tandem_proto::tandem::v1::{GetStatsRequest, SetRoutesRequest, SetRoutesResponse, WorkerStats};
use tonic::{Request, Response, Status};

use super::service::Worker;
use super::trace::request_span;
use crate::common::oip::{Backend, NotServed};

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
impl Backend for Worker {
    const SERVER_NAME: &'static str = "tandem-worker";

    fn is_ready(&self) -> bool {
        Worker::is_ready(self)
    }

    fn check_served(&self, name: &str, version: &str) -> Result<(), NotServed> {
        Worker::check_served(self, name, version)
    }

    fn model_metadata(&self) -> Result<ModelMetadataResponse, Status> {
        model_metadata(self).ok_or_else(|| Status::unavailable("model is not loaded yet"))
    }

    async fn infer(
        self: Arc<Self>,
        req: ModelInferRequest,
        traceparent: Option<String>,
    ) -> Result<ModelInferResponse, Status> {
        let span = request_span(&req.model_name, traceparent.as_deref());
        Ok(Worker::infer(&self, req, span).await?)
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
