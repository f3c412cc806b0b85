//! gRPC adapters over the shared [`Worker`]: OIP v2 `GRPCInferenceService` (the
//! shared [`crate::common::oip::Grpc`] service, with the [`Backend`] below, in the worker's
//! budget of request bytes) and `tandem.v1.WorkerControl`.

use std::sync::Arc;

use tandem_proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
use tandem_proto::inference::model_metadata_response::TensorMetadata;
use tandem_proto::inference::{ModelInferRequest, ModelInferResponse, ModelMetadataResponse};
use tandem_proto::tandem::v1::worker_control_server::WorkerControl;
use tandem_proto::tandem::v1::{GetStatsRequest, SetRoutesRequest, SetRoutesResponse, WorkerStats};
use tonic::codec::CompressionEncoding;
use tonic::{Request, Response, Status};

use super::rest::MAX_BODY_BYTES;
use super::service::Worker;
use super::trace::request_span;
use crate::common::budget::{Budget, Exhausted, GrpcBudget};
use crate::common::oip::{Backend, Grpc, NotServed};

/// The OIP v2 gRPC server: messages up to [`MAX_BODY_BYTES`], compressed or not, each one's
/// bytes reserved from `budget` (shared with the REST server) while it is received and
/// answered.
pub fn server(
    w: Arc<Worker>,
    budget: Budget,
) -> GrpcBudget<GrpcInferenceServiceServer<Grpc<Worker>>> {
    let server = GrpcInferenceServiceServer::new(Grpc(Arc::clone(&w)))
        .max_decoding_message_size(MAX_BODY_BYTES)
        .max_encoding_message_size(MAX_BODY_BYTES)
        .accept_compressed(CompressionEncoding::Gzip)
        .accept_compressed(CompressionEncoding::Deflate);
    let refused = Arc::new(move |_: &Exhausted| w.infer_refused());
    GrpcBudget::new(server, budget, MAX_BODY_BYTES, refused)
}

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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tandem_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
    use tandem_proto::inference::model_infer_request::InferInputTensor;
    use tokio_stream::wrappers::TcpListenerStream;
    use tonic::Code;

    use super::super::testing::held_worker;
    use super::*;

    /// One row of 2 MiB of FP32 zeros for the held worker's model.
    fn two_mib_request() -> ModelInferRequest {
        ModelInferRequest {
            model_name: "m".into(),
            inputs: vec![InferInputTensor {
                name: "x".into(),
                datatype: "FP32".into(),
                shape: vec![1, 1 << 19],
                ..Default::default()
            }],
            raw_input_contents: vec![vec![0u8; 2 << 20].into()],
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_message_that_would_pass_the_budget_is_refused_until_the_one_held_is_answered() {
        let (w, mut gate) = held_worker();
        let budget = Budget::new(
            3 << 20,
            "--max-request-bytes-in-flight",
            w.metrics.request_bytes_in_flight.clone(),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let oip = server(Arc::clone(&w), budget.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(oip)
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        let mut client = GrpcInferenceServiceClient::connect(url).await.unwrap();
        let mut c = client.clone();
        let first = tokio::spawn(async move { c.model_infer(two_mib_request()).await });
        // In the engine: its message was decoded long ago, and is still budgeted.
        gate.arrived.recv().await.unwrap();
        assert_eq!(budget.reserved(), (2 << 20) + 1024);

        let refused = tokio::time::timeout(
            Duration::from_secs(10),
            client.model_infer(two_mib_request()),
        )
        .await
        .expect("refused at once, not queued")
        .unwrap_err();
        assert_eq!(refused.code(), Code::ResourceExhausted);
        assert_eq!(
            refused.message(),
            "worker is receiving 2 MiB of request bodies; this request's 2 MiB would pass its \
             budget of 3 MiB (--max-request-bytes-in-flight); retry later"
        );

        gate.open();
        first.await.unwrap().expect("the held request is answered");
        client
            .model_infer(two_mib_request())
            .await
            .expect("the refused request, sent again");
        assert_eq!(budget.reserved(), 0);
        crate::inference::service::assert_one_refusal_counted(&w);
    }
}
