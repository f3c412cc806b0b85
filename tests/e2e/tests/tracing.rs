//! Tier 4: OpenTelemetry traces from a real pipeline reach an OTLP/gRPC receiver (the standard
//! `TraceService`, `tandem_e2e::otlp`) listening on the cluster's bridge address.
//!
//! The operator runs with `OTEL_EXPORTER_OTLP_ENDPOINT` (its own spans) and
//! `--worker-otlp-endpoint` (which it hands to the worker pods). One MiniLM text pipeline (CPU),
//! one request sent with a W3C `traceparent` to the preprocess pod over gRPC. The receiver must
//! then hold, in the client's trace:
//!
//! - the preprocess pod's `infer` span, child of the client's span, with its phases (`preprocess`
//!   → `queue_wait`, `tokenize`; `forward`) below it;
//! - the inference pod's `infer` span, child of the preprocess pod's `forward` span — the
//!   `traceparent` the preprocess worker sends names its exported span;
//!
//! and the operator's `reconcile` spans for the pipeline.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::Context;
use tandem_e2e::otlp::{ExportedSpan, Receiver};
use tandem_e2e::{Operator, WorkerTest, wait_until};
use tandem_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use tandem_proto::inference::model_infer_request::InferInputTensor;
use tandem_proto::inference::{InferTensorContents, ModelInferRequest};

/// The client's trace and span (what a traced caller would send).
const TRACE_ID: &str = "5c0ffee0000000000000000000e2e7ac";
const CLIENT_SPAN_ID: &str = "00000000c11e0001";

/// The spans of one request, found in what the receiver holds.
#[derive(Debug)]
struct RequestTrace {
    preprocess_infer: ExportedSpan,
    phases: Vec<ExportedSpan>,
    forward: ExportedSpan,
    inference_infer: ExportedSpan,
}

fn child<'a>(
    spans: &'a [ExportedSpan],
    parent: &ExportedSpan,
    service: &str,
    name: &str,
) -> Option<&'a ExportedSpan> {
    spans.iter().find(|s| {
        s.trace_id == parent.trace_id
            && s.parent_span_id == parent.span_id
            && s.service == service
            && s.name == name
    })
}

fn request_trace(spans: &[ExportedSpan]) -> Option<RequestTrace> {
    let preprocess_infer = spans.iter().find(|s| {
        s.trace_id == TRACE_ID
            && s.parent_span_id == CLIENT_SPAN_ID
            && s.service == "tandem-preprocess"
            && s.name == "infer"
    })?;
    let pre = "tandem-preprocess";
    let preprocess = child(spans, preprocess_infer, pre, "preprocess")?;
    let queue_wait = child(spans, preprocess, pre, "queue_wait")?;
    let tokenize = child(spans, preprocess, pre, "tokenize")?;
    let forward = child(spans, preprocess_infer, pre, "forward")?;
    let inference_infer = child(spans, forward, "tandem-inference", "infer")?;
    Some(RequestTrace {
        preprocess_infer: preprocess_infer.clone(),
        phases: vec![preprocess.clone(), queue_wait.clone(), tokenize.clone()],
        forward: forward.clone(),
        inference_infer: inference_infer.clone(),
    })
}

fn describe(spans: &[ExportedSpan]) -> String {
    spans
        .iter()
        .map(|s| {
            format!(
                "{} {} trace={} span={} parent={}",
                s.service, s.name, s.trace_id, s.span_id, s.parent_span_id
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Sends one text request with the client's `traceparent` and checks that it succeeds.
fn traced_request(address: &str) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))?
            .connect()
            .await?;
        let mut client = GrpcInferenceServiceClient::new(channel);
        let mut req = tonic::Request::new(ModelInferRequest {
            model_name: "minilm".into(),
            inputs: vec![InferInputTensor {
                name: "TEXT".into(),
                datatype: "BYTES".into(),
                shape: vec![1],
                contents: Some(InferTensorContents {
                    bytes_contents: vec![bytes::Bytes::from_static(b"a traced sentence")],
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        });
        req.metadata_mut().insert(
            "traceparent",
            format!("00-{TRACE_ID}-{CLIENT_SPAN_ID}-01").parse()?,
        );
        req.set_timeout(Duration::from_secs(60));
        let resp = client.model_infer(req).await?.into_inner();
        anyhow::ensure!(
            resp.outputs.iter().any(|o| o.name == "embedding"),
            "no embedding in {:?}",
            resp.outputs
        );
        Ok(())
    })
}

#[test]
fn a_client_request_is_one_trace_through_both_worker_pods_and_the_operator_exports_its_reconciles()
-> anyhow::Result<()> {
    // The namespace is deleted (with everything in it) when `t` drops.
    let t = WorkerTest::start("tracing")?;
    let (cluster, ns) = (&t.cluster, t.namespace.name().to_owned());
    let (base, sha) = (&t.models.base, &t.models.minilm_sha256);
    // Pods reach the host on the bridge address the file server listens on.
    let bridge: IpAddr = base
        .strip_prefix("http://")
        .and_then(|h| h.rsplit_once(':'))
        .map(|(host, _)| host)
        .with_context(|| format!("bridge address in {base:?}"))?
        .parse()?;

    let receiver = Receiver::start(bridge)?;
    let endpoint = receiver.endpoint();
    let op = Operator::start_with_env(
        cluster,
        &ns,
        "tracing-e2e",
        &[format!("--worker-otlp-endpoint={endpoint}")],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
        ],
    );
    cluster.apply(&format!(
        r#"
apiVersion: tandem.dev/v1alpha1
kind: InferencePipeline
metadata: {{name: traced, namespace: {ns}}}
spec:
  preprocess:
    text: {{tokenizer: "{base}/minilm/tokenizer.json", maxLength: 32}}
    replicas: {{min: 1, max: 1}}
    resources: {{requests: {{cpu: 10m, memory: 64Mi}}}}
  inference:
    model: {{name: minilm, version: "1", uri: "{base}/minilm/model.safetensors", sha256: {sha}}}
    device: CPU
    replicas: {{min: 1, max: 1}}
    resources: {{requests: {{cpu: 10m, memory: 64Mi}}}}
"#
    ))?;
    let with_log = |e: anyhow::Error| anyhow::anyhow!("{e:#}\n{}", op.log_tail());

    // The operator hands the collector to both stages' pods.
    let deployments = cluster.get_json(&["deployments", "-n", &ns])?;
    for d in deployments["items"].as_array().into_iter().flatten() {
        let env = &d["spec"]["template"]["spec"]["containers"][0]["env"];
        let otlp = env
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["name"] == "OTEL_EXPORTER_OTLP_ENDPOINT");
        assert_eq!(
            otlp.and_then(|e| e["value"].as_str()),
            Some(endpoint.as_str()),
            "{}: {env}",
            d["metadata"]["name"]
        );
    }

    let address = cluster
        .ready_preprocess_address(&ns, "traced")
        .map_err(with_log)?;
    wait_until("a ready inference pod", Duration::from_secs(180), || {
        Ok(cluster
            .worker_pods(&ns, "traced", "inference")?
            .iter()
            .any(|p| p.ready)
            .then_some(()))
    })
    .map_err(with_log)?;
    traced_request(&address).context("the traced request")?;

    // Workers batch spans for up to 5 s (the SDK default) before exporting them.
    let trace = wait_until(
        "the request's spans from both workers",
        Duration::from_secs(60),
        || Ok(request_trace(&receiver.spans())),
    )
    .map_err(|e| anyhow::anyhow!("{e:#}\nreceived:\n{}", describe(&receiver.spans())))?;
    println!(
        "trace {TRACE_ID}: preprocess infer {} → phases {:?}, forward {} → inference infer {}",
        trace.preprocess_infer.span_id,
        trace
            .phases
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>(),
        trace.forward.span_id,
        trace.inference_infer.span_id
    );
    assert_eq!(
        trace
            .preprocess_infer
            .attributes
            .get("model")
            .map(String::as_str),
        Some("minilm")
    );

    wait_until(
        "the operator's reconcile span",
        Duration::from_secs(30),
        || {
            Ok(receiver.spans().into_iter().find(|s| {
                s.service == "tandem-operator"
                    && s.name == "reconcile"
                    && s.attributes.get("pipeline").map(String::as_str) == Some("traced")
                    && s.attributes.get("namespace") == Some(&ns)
            }))
        },
    )
    .map_err(|e| anyhow::anyhow!("{e:#}\nreceived:\n{}", describe(&receiver.spans())))?;
    Ok(())
}
