//! The OIP v2 gRPC service (`inference.GRPCInferenceService`), written once for both worker
//! roles: each role says what it serves through [`Backend`], and [`Grpc`] answers the six
//! calls the same way for both (liveness, readiness, `NOT_FOUND` for a model or version served
//! elsewhere, naming the version served, the request's W3C `traceparent` handed to the
//! inference call).

use std::sync::Arc;

use tandem_proto::inference::grpc_inference_service_server::GrpcInferenceService;
use tandem_proto::inference::{
    ModelConfigRequest, ModelConfigResponse, ModelInferRequest, ModelInferResponse,
    ModelMetadataRequest, ModelMetadataResponse, ModelReadyRequest, ModelReadyResponse,
    ModelStatisticsRequest, ModelStatisticsResponse, ModelStreamInferResponse,
    RepositoryIndexRequest, RepositoryIndexResponse, ServerLiveRequest, ServerLiveResponse,
    ServerMetadataRequest, ServerMetadataResponse, ServerReadyRequest, ServerReadyResponse,
};
use tonic::codegen::tokio_stream;
use tonic::{Request, Response, Status, Streaming};

/// A request for a model, or a version of it, that this worker does not serve.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotServed {
    /// Another model.
    #[error("model {0:?} is not served here")]
    Model(String),
    /// The served model, at another version.
    #[error(
        "model {name:?} version {version:?} is not served here (this worker serves {})",
        served_phrase(served)
    )]
    Version {
        /// The model asked for (the one served here).
        name: String,
        /// The version asked for.
        version: String,
        /// The version served here; empty when the model is served without one.
        served: String,
    },
}

/// "version \"1\"", or how to ask for a model served without a version.
fn served_phrase(served: &str) -> String {
    if served.is_empty() {
        "it without a version; leave the version out".into()
    } else {
        format!("version {served:?}")
    }
}

/// Whether a request for model `name` at `version` (any version when empty) is for the model
/// served here, `served_name` at `served_version`.
pub fn check_served(
    served_name: &str,
    served_version: &str,
    name: &str,
    version: &str,
) -> Result<(), NotServed> {
    if name != served_name {
        Err(NotServed::Model(name.to_owned()))
    } else if !version.is_empty() && version != served_version {
        Err(NotServed::Version {
            name: name.to_owned(),
            version: version.to_owned(),
            served: served_version.to_owned(),
        })
    } else {
        Ok(())
    }
}

/// The requested-output parameter of Triton's classification extension
/// (`InferRequestedOutput(name, class_count=k)` in tritonclient).
pub const CLASSIFICATION: &str = "classification";

/// Refuses a request whose outputs ask for a protocol extension Tandem does not implement
/// (Triton's classification extension: answering the plain tensor would silently ignore
/// it). The message is for the client.
pub fn check_requested_outputs(req: &ModelInferRequest) -> Result<(), String> {
    match req
        .outputs
        .iter()
        .find(|o| o.parameters.contains_key(CLASSIFICATION))
    {
        Some(o) => Err(format!(
            "output {:?} asks for the classification extension (parameter \"{CLASSIFICATION}\", \
             class_count in tritonclient), which Tandem does not support; request the output \
             without it",
            o.name
        )),
        None => Ok(()),
    }
}

/// The answer to a Triton RPC Tandem does not implement: UNIMPLEMENTED, saying so and what
/// to use instead.
pub fn unimplemented(rpc: &str, instead: &str) -> Status {
    Status::unimplemented(format!(
        "Tandem does not implement {rpc} (a Triton extension of the protocol); {instead}"
    ))
}

/// What to use instead of a Triton extension of the protocol that Tandem lacks.
fn instead_of(rpc: &str) -> &'static str {
    match rpc {
        "RepositoryModelLoad" => {
            "a worker serves the one model it started with; change spec.inference.model to roll out another"
        }
        "RepositoryModelUnload" => {
            "a worker serves the one model it started with; scale or delete the pipeline instead"
        }
        "TraceSetting" => {
            "tracing is OpenTelemetry, set with OTEL_EXPORTER_OTLP_ENDPOINT and a W3C traceparent on each request"
        }
        "LogSettings" => "the log level is set with RUST_LOG when the worker starts",
        // The system and CUDA shared-memory calls.
        _ => "send tensors in the request (raw_input_contents), as the workers run in other pods",
    }
}

/// What a worker role serves over OIP v2.
#[tonic::async_trait]
pub trait Backend: Send + Sync + 'static {
    /// ServerMetadata's `name`.
    const SERVER_NAME: &'static str;

    /// Whether requests are served now (ServerReady and ModelReady).
    fn is_ready(&self) -> bool;

    /// Whether this worker serves model `name` at `version` (any version when it is empty);
    /// [`check_served`] over the served model's name and version.
    fn check_served(&self, name: &str, version: &str) -> Result<(), NotServed>;

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
    fn check_model(&self, name: &str, version: &str) -> Result<(), Status> {
        self.0
            .check_served(name, version)
            .map_err(|e| Status::not_found(super::bounded_message(e.to_string())))
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
        self.check_model(&r.name, &r.version)?;
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
        self.check_model(&r.name, &r.version)?;
        self.0.model_metadata().map(Response::new)
    }

    type ModelStreamInferStream = tokio_stream::Empty<Result<ModelStreamInferResponse, Status>>;

    async fn model_stream_infer(
        &self,
        _: Request<Streaming<ModelInferRequest>>,
    ) -> Result<Response<Self::ModelStreamInferStream>, Status> {
        Err(unimplemented(
            "ModelStreamInfer",
            "send each request with ModelInfer",
        ))
    }

    async fn model_config(
        &self,
        _: Request<ModelConfigRequest>,
    ) -> Result<Response<ModelConfigResponse>, Status> {
        Err(unimplemented(
            "ModelConfig",
            "ModelMetadata gives the model's inputs and outputs",
        ))
    }

    async fn model_statistics(
        &self,
        _: Request<ModelStatisticsRequest>,
    ) -> Result<Response<ModelStatisticsResponse>, Status> {
        Err(unimplemented(
            "ModelStatistics",
            "the worker's Prometheus /metrics has its request counts and latencies",
        ))
    }

    async fn repository_index(
        &self,
        _: Request<RepositoryIndexRequest>,
    ) -> Result<Response<RepositoryIndexResponse>, Status> {
        Err(unimplemented(
            "RepositoryIndex",
            "each worker serves one model, named by ServerMetadata and ModelMetadata",
        ))
    }

    tandem_proto::triton_extensions!(|rpc| unimplemented(rpc, instead_of(rpc)));

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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tonic::Code;
    use tonic::metadata::MetadataValue;

    use super::*;

    /// Serves model "m" at version "1" and remembers the traceparent of each inference call.
    #[derive(Default)]
    struct Fake {
        ready: bool,
        traceparents: Mutex<Vec<Option<String>>>,
    }

    #[tonic::async_trait]
    impl Backend for Fake {
        const SERVER_NAME: &'static str = "fake";

        fn is_ready(&self) -> bool {
            self.ready
        }

        fn check_served(&self, name: &str, version: &str) -> Result<(), NotServed> {
            check_served("m", "1", name, version)
        }

        fn model_metadata(&self) -> Result<ModelMetadataResponse, Status> {
            Ok(ModelMetadataResponse {
                name: "m".into(),
                ..Default::default()
            })
        }

        async fn infer(
            self: Arc<Self>,
            req: ModelInferRequest,
            traceparent: Option<String>,
        ) -> Result<ModelInferResponse, Status> {
            if let Ok(mut seen) = self.traceparents.lock() {
                seen.push(traceparent);
            }
            Ok(ModelInferResponse {
                model_name: req.model_name,
                ..Default::default()
            })
        }
    }

    fn ready_req(name: &str, version: &str) -> Request<ModelReadyRequest> {
        Request::new(ModelReadyRequest {
            name: name.into(),
            version: version.into(),
        })
    }

    #[tokio::test]
    async fn a_model_served_elsewhere_is_not_found_and_readiness_follows_the_backend() {
        let svc = Grpc(Arc::new(Fake {
            ready: true,
            ..Fake::default()
        }));
        for (name, version, says) in [
            ("other", "", "model \"other\" is not served here"),
            ("other", "1", "model \"other\" is not served here"),
            (
                "m",
                "2",
                "model \"m\" version \"2\" is not served here (this worker serves version \"1\")",
            ),
        ] {
            let err = svc.model_ready(ready_req(name, version)).await.unwrap_err();
            assert_eq!(err.code(), Code::NotFound);
            assert_eq!(err.message(), says);
            let err = svc
                .model_metadata(Request::new(ModelMetadataRequest {
                    name: name.into(),
                    version: version.into(),
                }))
                .await
                .unwrap_err();
            assert_eq!(err.code(), Code::NotFound);
            assert_eq!(err.message(), says);
        }
        assert!(
            svc.model_ready(ready_req("m", "1"))
                .await
                .unwrap()
                .into_inner()
                .ready
        );
        let md = svc
            .model_metadata(Request::new(ModelMetadataRequest {
                name: "m".into(),
                version: String::new(),
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(md.name, "m");
        let server = svc
            .server_metadata(Request::new(ServerMetadataRequest {}))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(server.name, "fake");

        let unready = Grpc(Arc::new(Fake::default()));
        let ready = |r: Response<ServerReadyResponse>| r.into_inner().ready;
        assert!(!ready(
            unready
                .server_ready(Request::new(ServerReadyRequest {}))
                .await
                .unwrap()
        ));
        assert!(ready(
            svc.server_ready(Request::new(ServerReadyRequest {}))
                .await
                .unwrap()
        ));
    }

    #[test]
    fn an_output_asking_for_the_classification_extension_is_refused() {
        use tandem_proto::inference::InferParameter;
        use tandem_proto::inference::infer_parameter::ParameterChoice;
        use tandem_proto::inference::model_infer_request::InferRequestedOutputTensor;
        let output = |params: &[&str]| InferRequestedOutputTensor {
            name: "logits".into(),
            parameters: params
                .iter()
                .map(|k| {
                    let v = InferParameter {
                        parameter_choice: Some(ParameterChoice::Int64Param(3)),
                    };
                    ((*k).to_owned(), v)
                })
                .collect(),
        };
        let mut req = ModelInferRequest {
            outputs: vec![output(&[]), output(&["binary_data"])],
            ..Default::default()
        };
        assert_eq!(check_requested_outputs(&req), Ok(()));
        req.outputs.push(output(&["classification"]));
        let err = check_requested_outputs(&req).unwrap_err();
        assert!(
            err.starts_with("output \"logits\" asks for the classification extension"),
            "{err}"
        );
        assert!(err.contains("which Tandem does not support"), "{err}");
    }

    #[tokio::test]
    async fn triton_rpcs_tandem_lacks_are_unimplemented_with_a_message_saying_so() {
        let svc = Grpc(Arc::new(Fake::default()));
        let config = svc
            .model_config(Request::new(ModelConfigRequest::default()))
            .await
            .unwrap_err();
        let stats = svc
            .model_statistics(Request::new(ModelStatisticsRequest::default()))
            .await
            .unwrap_err();
        let index = svc
            .repository_index(Request::new(RepositoryIndexRequest::default()))
            .await
            .unwrap_err();
        for (err, rpc) in [
            (config, "ModelConfig"),
            (stats, "ModelStatistics"),
            (index, "RepositoryIndex"),
        ] {
            assert_eq!(err.code(), Code::Unimplemented);
            assert!(
                err.message()
                    .starts_with(&format!("Tandem does not implement {rpc} ")),
                "{}",
                err.message()
            );
        }
    }

    /// Over a real connection: the generated server routes every declared RPC to the service,
    /// the streaming one included.
    #[tokio::test]
    async fn a_client_calling_a_triton_extension_is_told_tandem_lacks_it_and_what_to_use() {
        use tandem_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
        use tandem_proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = GrpcInferenceServiceServer::new(Grpc(Arc::new(Fake::default())));
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(server)
                .serve_with_incoming(::tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let mut client = GrpcInferenceServiceClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let err = client
            .model_config(ModelConfigRequest {
                name: "m".into(),
                version: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unimplemented);
        assert!(
            err.message()
                .contains("Tandem does not implement ModelConfig")
        );
        let err = client
            .model_stream_infer(::tokio_stream::iter(vec![ModelInferRequest::default()]))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unimplemented);
        assert!(
            err.message()
                .contains("Tandem does not implement ModelStreamInfer")
        );

        // The other extensions tritonclient offers: loading models, shared memory, trace and
        // log settings. Undeclared, they were UNIMPLEMENTED with an empty message.
        use tandem_proto::inference::{
            CudaSharedMemoryRegisterRequest, LogSettingsRequest, RepositoryModelLoadRequest,
            SystemSharedMemoryStatusRequest, TraceSettingRequest,
        };
        let answers = [
            (
                client
                    .repository_model_load(RepositoryModelLoadRequest::default())
                    .await
                    .map(|_| ()),
                "RepositoryModelLoad",
                "change spec.inference.model",
            ),
            (
                client
                    .system_shared_memory_status(SystemSharedMemoryStatusRequest::default())
                    .await
                    .map(|_| ()),
                "SystemSharedMemoryStatus",
                "raw_input_contents",
            ),
            (
                client
                    .cuda_shared_memory_register(CudaSharedMemoryRegisterRequest::default())
                    .await
                    .map(|_| ()),
                "CudaSharedMemoryRegister",
                "raw_input_contents",
            ),
            (
                client
                    .trace_setting(TraceSettingRequest::default())
                    .await
                    .map(|_| ()),
                "TraceSetting",
                "OTEL_EXPORTER_OTLP_ENDPOINT",
            ),
            (
                client
                    .log_settings(LogSettingsRequest::default())
                    .await
                    .map(|_| ()),
                "LogSettings",
                "RUST_LOG",
            ),
        ];
        for (answer, rpc, instead) in answers {
            let err = answer.unwrap_err();
            assert_eq!(err.code(), Code::Unimplemented, "{rpc}");
            assert!(
                err.message()
                    .starts_with(&format!("Tandem does not implement {rpc} "))
                    && err.message().contains(instead),
                "{rpc}: {}",
                err.message()
            );
        }
    }

    #[test]
    fn a_version_not_served_is_named_with_the_version_served() {
        assert_eq!(check_served("m", "1", "m", ""), Ok(()));
        assert_eq!(check_served("m", "1", "m", "1"), Ok(()));
        assert_eq!(check_served("m", "", "m", ""), Ok(()));
        assert_eq!(
            check_served("m", "1", "m", "7").unwrap_err().to_string(),
            "model \"m\" version \"7\" is not served here (this worker serves version \"1\")"
        );
        assert_eq!(
            check_served("m", "", "m", "7").unwrap_err().to_string(),
            "model \"m\" version \"7\" is not served here \
             (this worker serves it without a version; leave the version out)"
        );
    }

    #[tokio::test]
    async fn the_callers_traceparent_reaches_the_inference_call() {
        let fake = Arc::new(Fake::default());
        let svc = Grpc(Arc::clone(&fake));
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut req = Request::new(ModelInferRequest {
            model_name: "m".into(),
            ..Default::default()
        });
        req.metadata_mut()
            .insert("traceparent", MetadataValue::from_static(tp));
        let resp = svc.model_infer(req).await.unwrap().into_inner();
        assert_eq!(resp.model_name, "m");
        let plain = Request::new(ModelInferRequest::default());
        svc.model_infer(plain).await.unwrap();
        let seen = fake.traceparents.lock().unwrap().clone();
        assert_eq!(seen, vec![Some(tp.to_owned()), None]);
    }
}
