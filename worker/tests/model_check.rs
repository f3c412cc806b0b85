//! The preprocess worker checks each routed color's model against what it sends (the model's
//! OIP v2 `ModelMetadata`) and reports the ones that cannot take it in `GetStats`. The
//! inference pods are fakes on loopback that answer only metadata (test doubles for wiring).

use std::sync::Arc;
use std::time::Duration;

use tandem_proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
use tandem_proto::inference::model_metadata_response::TensorMetadata;
use tandem_proto::inference::{ModelInferRequest, ModelInferResponse, ModelMetadataResponse};
use tandem_proto::tandem::v1::worker_control_server::WorkerControl;
use tandem_proto::tandem::v1::{
    ColorRoute, Endpoint, GetStatsRequest, ModelMismatch, RoutingTable, SetRoutesRequest,
};
use tandem_worker::common::oip::{Backend, Grpc, NotServed};
use tandem_worker::config::PipelineConfig;
use tandem_worker::preprocess::control::Control;
use tandem_worker::preprocess::metrics::Metrics;
use tandem_worker::preprocess::service::{self, Service};
use tonic::{Request, Status};

/// An inference pod that advertises one image model of the given side.
struct Advertises {
    side: i64,
}

#[tonic::async_trait]
impl Backend for Advertises {
    const SERVER_NAME: &'static str = "fake-inference";

    fn is_ready(&self) -> bool {
        true
    }

    fn check_served(&self, _: &str, _: &str) -> Result<(), NotServed> {
        Ok(())
    }

    fn model_metadata(&self) -> Result<ModelMetadataResponse, Status> {
        let t = |name: &str, shape: Vec<i64>| TensorMetadata {
            name: name.into(),
            datatype: "FP32".into(),
            shape,
        };
        Ok(ModelMetadataResponse {
            name: "effnet".into(),
            versions: vec!["1".into()],
            platform: "fake".into(),
            inputs: vec![t("input", vec![-1, 3, self.side, self.side])],
            outputs: vec![t("logits", vec![-1, 1000])],
        })
    }

    async fn infer(
        self: Arc<Self>,
        _: ModelInferRequest,
        _: Option<String>,
    ) -> Result<ModelInferResponse, Status> {
        Err(Status::unimplemented("metadata only"))
    }
}

async fn start_pod(side: i64) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let svc = GrpcInferenceServiceServer::new(Grpc(Arc::new(Advertises { side })));
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
    });
    addr
}

/// A 224×224 NCHW classification pipeline.
fn service() -> Arc<Service> {
    let cfg = PipelineConfig::parse(
        "pipeline: p\nmodel: {name: effnet, version: \"1\"}\npreprocess:\n  image:\n    resize: {width: 224, height: 224}\npostprocess: {kind: Classification, topK: 2, labels: imagenet}\n",
    )
    .unwrap();
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Metrics::register(&mut registry);
    let pipeline = service::build_pipeline(&cfg).unwrap();
    let labels = service::load_labels(&cfg).unwrap();
    Service::new(cfg, pipeline, labels, metrics)
}

async fn route(svc: &Arc<Service>, generation: u64, colors: &[(&str, &str)]) {
    let table = RoutingTable {
        generation,
        colors: colors
            .iter()
            .map(|(color, addr)| ColorRoute {
                color: (*color).into(),
                weight: 100 / colors.len() as u32,
                endpoints: vec![Endpoint {
                    address: (*addr).into(),
                    pod_name: String::new(),
                }],
                model_name: "effnet".into(),
                model_version: format!("{color}-1"),
            })
            .collect(),
        shadow: None,
    };
    Control(Arc::clone(svc))
        .set_routes(Request::new(SetRoutesRequest { table: Some(table) }))
        .await
        .unwrap();
}

/// The mismatches `GetStats` reports once every routed color's check has answered.
async fn settled_mismatches(svc: &Arc<Service>, checked: &[&str]) -> Vec<ModelMismatch> {
    for _ in 0..100 {
        let stats = Control(Arc::clone(svc))
            .get_stats(Request::new(GetStatsRequest {}))
            .await
            .unwrap()
            .into_inner();
        let reported: Vec<&str> = stats
            .model_mismatches
            .iter()
            .map(|m| m.color.as_str())
            .collect();
        if reported == checked {
            return stats.model_mismatches;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the model checks did not report {checked:?}");
}

#[tokio::test]
async fn a_color_whose_model_takes_another_size_is_reported_with_both_shapes_until_it_is_routed_no_more()
 {
    let svc = service();
    let (fits, too_small) = (start_pod(224).await, start_pod(192).await);

    route(&svc, 1, &[("blue", &fits), ("green", &too_small)]).await;
    let found = settled_mismatches(&svc, &["green"]).await;
    assert_eq!(
        found,
        vec![ModelMismatch {
            color: "green".into(),
            model_name: "effnet".into(),
            model_version: "green-1".into(),
            message: "input \"input\": sent as [N, 3, 224, 224], the model takes [-1, 3, 192, 192]"
                .into(),
        }]
    );

    // The mismatched color leaves the table: nothing is reported any more.
    route(&svc, 2, &[("blue", &fits)]).await;
    assert!(settled_mismatches(&svc, &[]).await.is_empty());
}
