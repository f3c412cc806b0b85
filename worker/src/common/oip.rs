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

        fn serves(&self, name: &str, version: &str) -> bool {
            name == "m" && (version.is_empty() || version == "1")
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
        for (name, version) in [("other", ""), ("m", "2")] {
            let err = svc.model_ready(ready_req(name, version)).await.unwrap_err();
            assert_eq!(err.code(), Code::NotFound);
            assert_eq!(err.message(), format!("model {name:?} is not served here"));
            let err = svc
                .model_metadata(Request::new(ModelMetadataRequest {
                    name: name.into(),
                    version: version.into(),
                }))
                .await
                .unwrap_err();
            assert_eq!(err.code(), Code::NotFound);
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
