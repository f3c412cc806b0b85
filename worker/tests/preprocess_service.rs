//! In-process tests of the preprocess role: the gRPC adapter, the REST router
//! and `WorkerControl` as handlers, and the whole server on loopback ports
//! through a shutdown, forwarding to *fake* OIP inference servers on loopback
//! (test doubles for wiring only: they return deterministic outputs, not model
//! results).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tandem_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use tandem_proto::inference::grpc_inference_service_server::{
    GrpcInferenceService, GrpcInferenceServiceServer,
};
use tandem_proto::inference::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use tandem_proto::inference::model_infer_response::InferOutputTensor;
use tandem_proto::inference::*;
use tandem_proto::tandem::v1::worker_control_client::WorkerControlClient;
use tandem_proto::tandem::v1::worker_control_server::WorkerControl;
use tandem_proto::tandem::v1::{
    ColorRoute, Endpoint, GetStatsRequest, ParityTolerance, RoutingTable, SetRoutesRequest,
    ShadowPolicy,
};
use tandem_worker::common::control_auth::{self, ControlAuth, ControlToken};
use tandem_worker::common::oip::{Backend, Grpc, NotServed};
use tandem_worker::common::tensor::{
    decode_bytes_elements, encode_bytes_elements, le_bytes_to_f32,
};
use tandem_worker::config::PipelineConfig;
use tandem_worker::preprocess::Stop;
use tandem_worker::preprocess::control::Control;
use tandem_worker::preprocess::metrics::Metrics;
use tandem_worker::preprocess::service::{self, Pipeline, Service};
use tonic::{Code, Request, Response, Status};

/// What a fake inference server answers.
#[derive(Clone, Copy)]
enum Behaviour {
    /// logits[j] = j * slope for every row.
    Logits { slope: f32 },
    /// Always UNAVAILABLE.
    Unavailable,
}

/// (name, datatype, shape, raw byte length) of one forwarded input.
type SeenInput = (String, String, Vec<i64>, usize);

#[derive(Clone)]
struct Fake {
    behaviour: Behaviour,
    hits: Arc<AtomicU64>,
    traces: Arc<Mutex<Vec<String>>>,
    shapes: Arc<Mutex<Vec<SeenInput>>>,
    /// When set, each call records the flag's value as it arrives.
    probe: Arc<Mutex<Option<Arc<AtomicBool>>>>,
    probed: Arc<Mutex<Vec<bool>>>,
    /// When set, each call tells the sender it arrived, then waits until the gate opens.
    gate: Option<Gate>,
    /// What ModelMetadata answers (empty lists by default: the model check skips them).
    metadata: ModelMetadataResponse,
}

/// Holds calls until a permit is added; one permit opens it for every call.
#[derive(Clone)]
struct Gate {
    open: Arc<tokio::sync::Semaphore>,
    arrived: tokio::sync::mpsc::UnboundedSender<()>,
}

/// Serves any model; answers ModelInfer per its [`Behaviour`].
#[tonic::async_trait]
impl Backend for Fake {
    const SERVER_NAME: &'static str = "fake-inference";

    fn is_ready(&self) -> bool {
        true
    }

    fn check_served(&self, _: &str, _: &str) -> Result<(), NotServed> {
        Ok(())
    }

    fn model_metadata(&self) -> Result<ModelMetadataResponse, Status> {
        Ok(self.metadata.clone())
    }

    async fn infer(
        self: Arc<Self>,
        req: ModelInferRequest,
        traceparent: Option<String>,
    ) -> Result<ModelInferResponse, Status> {
        if let Some(gate) = &self.gate {
            let _ = gate.arrived.send(());
            // Given back at once: one permit opens the gate for every call.
            let _open = gate.open.acquire().await;
        }
        self.hits.fetch_add(1, Ordering::SeqCst);
        if let Some(flag) = self.probe.lock().unwrap().as_ref() {
            self.probed
                .lock()
                .unwrap()
                .push(flag.load(Ordering::SeqCst));
        }
        if let Some(t) = traceparent {
            self.traces.lock().unwrap().push(t);
        }
        for (i, input) in req.inputs.iter().enumerate() {
            self.shapes.lock().unwrap().push((
                input.name.clone(),
                input.datatype.clone(),
                input.shape.clone(),
                req.raw_input_contents[i].len(),
            ));
        }
        let slope = match self.behaviour {
            Behaviour::Unavailable => return Err(Status::unavailable("fake pod is down")),
            Behaviour::Logits { slope } => slope,
        };
        let n = req.inputs[0].shape[0] as usize;
        let classes = 5;
        let logits: Vec<f32> = (0..n)
            .flat_map(|_| (0..classes).map(move |j| j as f32 * slope))
            .collect();
        let name = if req.inputs[0].name == "input" {
            "logits"
        } else {
            "embedding"
        };
        Ok(ModelInferResponse {
            model_name: req.model_name,
            outputs: vec![InferOutputTensor {
                name: name.into(),
                datatype: "FP32".into(),
                shape: vec![n as i64, classes as i64],
                ..Default::default()
            }],
            raw_output_contents: vec![tandem_worker::common::tensor::f32_to_le_bytes(&logits)],
            ..Default::default()
        })
    }
}

async fn start_fake(behaviour: Behaviour) -> (String, Fake) {
    start(fake(behaviour)).await
}

/// A fake that answers per `behaviour`, with no gate and empty metadata.
fn fake(behaviour: Behaviour) -> Fake {
    Fake {
        behaviour,
        hits: Arc::default(),
        traces: Arc::default(),
        shapes: Arc::default(),
        probe: Arc::default(),
        probed: Arc::default(),
        gate: None,
        metadata: ModelMetadataResponse::default(),
    }
}

/// Serves `fake` on a loopback port: (address, fake).
async fn start(fake: Fake) -> (String, Fake) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let svc = GrpcInferenceServiceServer::new(Grpc(Arc::new(fake.clone())));
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
    });
    (addr, fake)
}

fn image_service(extra: &str) -> Arc<Service> {
    let extra = if extra.is_empty() {
        "  holdTimeoutMs: 3000\n"
    } else {
        extra
    };
    let yaml = format!(
        "pipeline: p\nmodel: {{name: effnet, version: \"1\"}}\npreprocess:\n  image:\n    resize: {{width: 16, height: 16}}\npostprocess: {{kind: Classification, topK: 2, labels: imagenet}}\nlimits:\n  maxRequestBytes: 200000\n  maxImagePixels: 1000000\n{extra}"
    );
    let cfg = PipelineConfig::parse(&yaml).unwrap();
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Metrics::register(&mut registry);
    let pipeline = service::build_pipeline(&cfg).unwrap();
    let labels = service::load_labels(&cfg).unwrap();
    Service::new(cfg, pipeline, labels, metrics)
}

fn text_service() -> Arc<Service> {
    text_service_limited("")
}

/// The text service with `limits` (YAML flow-map entries) in its config.
fn text_service_limited(limits: &str) -> Arc<Service> {
    use tokenizers::models::wordlevel::WordLevel;
    use tokenizers::pre_tokenizers::whitespace::Whitespace;
    let vocab = [("[UNK]", 0u32), ("hello", 1), ("world", 2)]
        .iter()
        .map(|(k, v)| (k.to_string(), *v))
        .collect();
    let model = WordLevel::builder()
        .vocab(vocab)
        .unk_token("[UNK]".into())
        .build()
        .unwrap();
    let mut tok = tokenizers::Tokenizer::new(model);
    tok.with_pre_tokenizer(Some(Whitespace {}));
    let text = tandem_worker::preprocess::text::TextPipeline::from_tokenizer(tok, 8).unwrap();
    let cfg = PipelineConfig::parse(&format!("pipeline: t\nmodel: {{name: minilm}}\npreprocess: {{text: {{tokenizer: unused, maxLength: 8}}}}\npostprocess: {{kind: Embedding}}\nlimits: {{{limits}}}\n")).unwrap();
    let mut registry = prometheus_client::registry::Registry::default();
    Service::new(
        cfg,
        Pipeline::Text(Arc::new(text)),
        vec![],
        Metrics::register(&mut registry),
    )
}

/// The service's budget of request bytes in flight, as the worker sizes it.
fn budget(svc: &Service) -> tandem_worker::common::budget::Budget {
    tandem_worker::preprocess::request_budget(&svc.config().limits, Default::default())
}

/// The REST router over `svc`, with its budget.
fn rest_router(svc: &Arc<Service>) -> axum::Router {
    tandem_worker::preprocess::rest::router(Arc::clone(svc), budget(svc))
}

fn jpeg() -> Vec<u8> {
    std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/images/rgb.jpg"
    ))
    .unwrap()
}

fn request(model: &str, items: &[&[u8]]) -> ModelInferRequest {
    ModelInferRequest {
        model_name: model.into(),
        id: "req-1".into(),
        inputs: vec![InferInputTensor {
            name: "INPUT".into(),
            datatype: "BYTES".into(),
            shape: vec![items.len() as i64],
            ..Default::default()
        }],
        raw_input_contents: vec![encode_bytes_elements(items.iter())],
        ..Default::default()
    }
}

fn table(
    generation: u64,
    colors: &[(&str, u32, &[&str])],
    shadow: Option<ShadowPolicy>,
) -> RoutingTable {
    RoutingTable {
        generation,
        colors: colors
            .iter()
            .map(|(c, w, eps)| ColorRoute {
                color: c.to_string(),
                weight: *w,
                endpoints: eps
                    .iter()
                    .map(|a| Endpoint {
                        address: a.to_string(),
                        pod_name: String::new(),
                    })
                    .collect(),
                model_name: "effnet-backend".into(),
                model_version: String::new(),
            })
            .collect(),
        shadow,
    }
}

async fn set_routes(svc: &Arc<Service>, t: RoutingTable) -> u64 {
    push_routes(svc, t, false).await
}

async fn push_routes(svc: &Arc<Service>, t: RoutingTable, replace: bool) -> u64 {
    Control(Arc::clone(svc))
        .set_routes(Request::new(SetRoutesRequest {
            table: Some(t),
            replace,
        }))
        .await
        .unwrap()
        .into_inner()
        .applied_generation
}

async fn infer(svc: &Arc<Service>, req: ModelInferRequest) -> Result<ModelInferResponse, Status> {
    Grpc(Arc::clone(svc))
        .model_infer(Request::new(req))
        .await
        .map(Response::into_inner)
}

fn png_header_claiming(width: u32, height: u32) -> Vec<u8> {
    fn crc32(data: &[u8]) -> u32 {
        let mut c = 0xFFFF_FFFFu32;
        for &b in data {
            c ^= u32::from(b);
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
        }
        !c
    }
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend_from_slice(&13u32.to_be_bytes());
    png.extend_from_slice(&ihdr);
    png.extend_from_slice(&crc32(&ihdr).to_be_bytes());
    png.extend_from_slice(&[0, 0, 0, 0, b'I', b'E', b'N', b'D', 0xAE, 0x42, 0x60, 0x82]);
    png
}

#[tokio::test]
async fn a_classified_image_batch_comes_back_with_top_k_labels_and_the_tensor_sent_as_fp32_nchw() {
    let (addr, fake) = start_fake(Behaviour::Logits { slope: 1.0 }).await;
    let svc = image_service("");
    set_routes(&svc, table(1, &[("blue", 100, &[&addr])], None)).await;
    let img = jpeg();
    let resp = infer(&svc, request("effnet", &[&img, &img])).await.unwrap();
    assert_eq!(resp.model_name, "effnet");
    assert_eq!(resp.id, "req-1");
    let names: Vec<&str> = resp.outputs.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(names, ["probabilities", "labels", "logits"]);
    assert_eq!(resp.outputs[0].shape, vec![2, 2]);
    let labels = decode_bytes_elements(&resp.raw_output_contents[1]).unwrap();
    assert_eq!(
        labels[0],
        Bytes::from_static(b"hammerhead"),
        "class 4 of ImageNet"
    );
    let probs = le_bytes_to_f32(&resp.raw_output_contents[0]).unwrap();
    assert!(probs[0] > probs[1]);
    let shapes = fake.shapes.lock().unwrap().clone();
    assert_eq!(
        shapes[0],
        (
            "input".into(),
            "FP32".into(),
            vec![2, 3, 16, 16],
            2 * 3 * 16 * 16 * 4
        )
    );
}

#[tokio::test]
async fn hostile_inputs_get_invalid_argument_naming_the_problem_and_the_next_request_succeeds() {
    let (addr, _fake) = start_fake(Behaviour::Logits { slope: 1.0 }).await;
    let svc = image_service("");
    set_routes(&svc, table(1, &[("blue", 100, &[&addr])], None)).await;
    let img = jpeg();
    let truncated = img[..img.len() / 2].to_vec();
    let bomb = png_header_claiming(100_000, 100_000);
    let big = vec![0u8; 300_000];
    let mut wrong_type = request("effnet", &[&img]);
    wrong_type.inputs[0].datatype = "FP32".into();
    let mut wrong_shape = request("effnet", &[&img]);
    wrong_shape.inputs[0].shape = vec![1, 3];
    let mut count_mismatch = request("effnet", &[&img]);
    count_mismatch.inputs[0].shape = vec![2];
    let mut extra_raw = request("effnet", &[&img]);
    extra_raw
        .raw_input_contents
        .push(extra_raw.raw_input_contents[0].clone());
    let cases: Vec<(ModelInferRequest, &str)> = vec![
        (request("effnet", &[&truncated]), "truncated"),
        (request("effnet", &[b""]), "empty"),
        (request("effnet", &[&bomb]), "100000x100000"),
        (
            request("effnet", &[b"not an image at all"]),
            "unrecognized image format",
        ),
        (request("effnet", &[&big]), "over the limit"),
        (wrong_type, "expected BYTES"),
        (wrong_shape, "shape"),
        (count_mismatch, "2 elements"),
        (extra_raw, "one entry per input (1), got 2"),
    ];
    for (req, needle) in cases {
        let err = infer(&svc, req).await.unwrap_err();
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{needle}: {}",
            err.message()
        );
        assert!(
            err.message().contains(needle),
            "expected {needle:?} in {:?}",
            err.message()
        );
        infer(&svc, request("effnet", &[&img]))
            .await
            .expect("a valid request after a hostile one");
    }
    let err = infer(&svc, request("nope", &[&img])).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

/// gRPC carries the error message in a response header, and grpc-core clients refuse headers
/// over 16 KiB (8 KiB soft): a message quoting a 20 KB model name or a 3,000-dimension shape
/// whole reached tritonclient as `RESOURCE_EXHAUSTED: received metadata size exceeds hard
/// limit`, not as the error.
#[tokio::test]
async fn errors_quoting_huge_client_values_stay_small_enough_for_grpc_clients_and_name_the_problem()
{
    let (addr, _fake) = start_fake(Behaviour::Logits { slope: 1.0 }).await;
    let svc = image_service("");
    set_routes(&svc, table(1, &[("blue", 100, &[&addr])], None)).await;
    let img = jpeg();
    let limit = tandem_worker::common::MAX_ERROR_MESSAGE + 32;

    let err = infer(&svc, request(&"A".repeat(20_000), &[&img]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(
        err.message().len() <= limit,
        "{} bytes",
        err.message().len()
    );
    assert!(
        err.message().ends_with("is not served here"),
        "{}",
        err.message()
    );

    let mut deep = request("effnet", &[&img]);
    deep.inputs[0].shape = vec![1; 3000];
    let err = infer(&svc, deep).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().len() <= limit,
        "{} bytes",
        err.message().len()
    );
    assert!(
        err.message().starts_with("input \"INPUT\" has shape [1, 1"),
        "{}",
        err.message()
    );

    infer(&svc, request("effnet", &[&img]))
        .await
        .expect("a valid request after them");
}

/// Prost allocates about 300 bytes per `inputs` entry, which is 2 bytes on the wire when
/// empty: a request of 2^18 empty inputs is 512 KiB sent and would be 80 MB decoded.
#[tokio::test]
async fn a_request_too_costly_to_decode_is_refused_before_decoding_and_the_next_is_served() {
    let (addr, _fake) = start_fake(Behaviour::Logits { slope: 1.0 }).await;
    let svc = image_service("");
    set_routes(&svc, table(1, &[("blue", 100, &[&addr])], None)).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = tandem_worker::preprocess::grpc::server(Arc::clone(&svc), budget(&svc));
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(server)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
    });
    let mut client = GrpcInferenceServiceClient::connect(url)
        .await
        .unwrap()
        .max_encoding_message_size(usize::MAX);
    let costly = ModelInferRequest {
        model_name: "effnet".into(),
        inputs: vec![InferInputTensor::default(); 1 << 18],
        ..Default::default()
    };
    let err = client.model_infer(costly).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(
        err.message().contains("262144 inputs") && err.message().contains("to decode"),
        "{}",
        err.message()
    );
    let img = jpeg();
    client
        .model_infer(request("effnet", &[&img]))
        .await
        .expect("a valid request after the costly one");
}

#[tokio::test]
async fn an_unknown_output_is_refused_before_any_work_reaches_inference() {
    let (addr, fake) = start_fake(Behaviour::Logits { slope: 1.0 }).await;
    let svc = image_service("");
    set_routes(&svc, table(1, &[("blue", 100, &[&addr])], None)).await;
    let img = jpeg();
    let mut req = request("effnet", &[&img]);
    req.outputs = vec![InferRequestedOutputTensor {
        name: "embedding".into(),
        ..Default::default()
    }];
    let err = infer(&svc, req).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        err.message(),
        "requested output \"embedding\" does not exist; available: [\"probabilities\", \"labels\", \"logits\"]"
    );
    assert_eq!(fake.hits.load(Ordering::SeqCst), 0);
    let mut req = request("effnet", &[&img]);
    req.outputs = vec![InferRequestedOutputTensor {
        name: "labels".into(),
        ..Default::default()
    }];
    let resp = infer(&svc, req).await.unwrap();
    assert_eq!(resp.outputs.len(), 1);
    assert_eq!(fake.hits.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn text_is_tokenized_forwarded_as_int64_and_invalid_utf8_is_refused() {
    let (addr, fake) = start_fake(Behaviour::Logits { slope: 1.0 }).await;
    let svc = text_service();
    set_routes(&svc, table(1, &[("blue", 100, &[&addr])], None)).await;
    let resp = infer(&svc, request("minilm", &[b"hello world", b"hello"]))
        .await
        .unwrap();
    assert_eq!(resp.outputs.len(), 1);
    assert_eq!(resp.outputs[0].name, "embedding");
    assert_eq!(resp.outputs[0].shape, vec![2, 5]);
    let shapes = fake.shapes.lock().unwrap().clone();
    let names: Vec<&str> = shapes.iter().map(|s| s.0.as_str()).collect();
    assert_eq!(names, ["input_ids", "attention_mask", "token_type_ids"]);
    assert!(
        shapes
            .iter()
            .all(|s| s.1 == "INT64" && s.2 == vec![2, 2] && s.3 == 2 * 2 * 8)
    );
    let err = infer(&svc, request("minilm", &[b"ok", b"\xc3\x28"]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("text item 1") && err.message().contains("UTF-8"),
        "{}",
        err.message()
    );
}

/// The upload's bytes, which tells when the last reference to them is dropped.
struct TrackedUpload {
    data: Vec<u8>,
    dropped: Arc<AtomicBool>,
}

impl AsRef<[u8]> for TrackedUpload {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl Drop for TrackedUpload {
    fn drop(&mut self) {
        self.dropped.store(true, Ordering::SeqCst);
    }
}

#[tokio::test]
async fn a_requests_own_bytes_are_released_before_the_inference_call() {
    // An upload can be 64 MiB of text of which 8 tokens are forwarded: it must not stay in
    // memory while the inference pod works on them.
    let (addr, fake) = start_fake(Behaviour::Logits { slope: 1.0 }).await;
    let svc = text_service();
    set_routes(&svc, table(1, &[("blue", 100, &[&addr])], None)).await;
    let dropped = Arc::new(AtomicBool::new(false));
    *fake.probe.lock().unwrap() = Some(Arc::clone(&dropped));
    let mut req = request("minilm", &[b"hello world hello"]);
    req.raw_input_contents[0] = Bytes::from_owner(TrackedUpload {
        data: req.raw_input_contents[0].to_vec(),
        dropped: Arc::clone(&dropped),
    });
    let resp = infer(&svc, req).await.unwrap();
    assert_eq!(resp.outputs[0].name, "embedding");
    assert_eq!(
        *fake.probed.lock().unwrap(),
        [true],
        "the upload was still held when the inference call arrived"
    );
}

#[tokio::test]
async fn not_ready_until_routes_arrive_and_a_held_request_completes_once_they_do() {
    let (addr, _fake) = start_fake(Behaviour::Logits { slope: 1.0 }).await;
    let svc = image_service("");
    assert!(!svc.is_ready());
    let img = jpeg();
    let s = Arc::clone(&svc);
    let held = tokio::spawn(async move { infer(&s, request("effnet", &[&img])).await });
    while svc.router().held_now() == 0 {
        tokio::task::yield_now().await;
    }
    let stats = Control(Arc::clone(&svc))
        .get_stats(Request::new(GetStatsRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.held_requests, 1);
    assert!(!stats.ready);
    assert_eq!(
        set_routes(&svc, table(3, &[("blue", 100, &[&addr])], None)).await,
        3
    );
    assert!(svc.is_ready());
    held.await
        .unwrap()
        .expect("held request served after routes arrived");
    // An older generation is ignored.
    assert_eq!(set_routes(&svc, table(2, &[], None)).await, 3);
    assert!(svc.is_ready());
}

/// A table numbered past anything the operator will number (pushed by anyone who can reach the
/// control port) made the pod ignore the operator's tables for good; the operator now pushes
/// its table with `replace` when a pod reports a generation it never numbered.
#[tokio::test]
async fn a_table_pushed_with_replace_takes_over_from_one_with_any_higher_generation() {
    let svc = image_service("");
    let (addr, _) = start(fake(Behaviour::Logits { slope: 1.0 })).await;
    let pinned = table(u64::MAX, &[("blue", 100, &["127.0.0.1:1"])], None);
    assert_eq!(set_routes(&svc, pinned).await, u64::MAX);
    let operators = || table(1_765_000_000_000, &[("blue", 100, &[&addr])], None);
    assert_eq!(set_routes(&svc, operators()).await, u64::MAX, "ignored");
    assert_eq!(
        push_routes(&svc, operators(), true).await,
        1_765_000_000_000
    );
    let img = jpeg();
    infer(&svc, request("effnet", &[&img]))
        .await
        .expect("served through the replacing table's endpoint");
}

/// A loopback port nothing listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Polls `f` every 20 ms until it gives `Some`, for at most 10 s.
async fn eventually<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    mut f: impl FnMut() -> F,
) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A scale-down can remove a preprocess pod while it holds requests for an inference stage
/// at zero. After SIGTERM it turns not ready at once but keeps taking requests for the
/// shutdown delay (endpoints drop a terminating pod asynchronously); then its client port
/// closes. Only the operator can tell it where inference came up, so its control port must
/// keep taking `SetRoutes` (and answering `GetStats`, which keeps that demand counted) until
/// what it holds is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_sigterm_a_worker_takes_requests_for_the_delay_then_serves_what_it_holds_once_routes_arrive()
 {
    let (inference, fake) = start_fake(Behaviour::Logits { slope: 1.0 }).await;
    let (grpc, control) = (free_port(), free_port());
    let yaml = format!(
        "pipeline: p\nmodel: {{name: effnet, version: \"1\"}}\npreprocess:\n  image:\n    resize: {{width: 16, height: 16}}\npostprocess: {{kind: Classification, topK: 2, labels: imagenet}}\nports: {{http: {}, grpc: {grpc}, metrics: {}, control: {control}}}\nlimits:\n  holdTimeoutMs: 30000\n",
        free_port(),
        free_port()
    );
    let cfg = PipelineConfig::parse(&yaml).unwrap();
    let signal = tandem_worker::common::shutdown::Shutdown::new();
    let delay = Duration::from_secs(5);
    let server = tokio::spawn(tandem_worker::preprocess::serve(
        cfg,
        [127, 0, 0, 1].into(),
        None,
        Stop {
            signal: signal.clone(),
            delay,
            drain: Duration::from_secs(30),
        },
    ));
    let grpc_url = format!("http://127.0.0.1:{grpc}");
    let control_url = format!("http://127.0.0.1:{control}");
    let connect = || {
        let url = grpc_url.clone();
        async move { GrpcInferenceServiceClient::connect(url).await.ok() }
    };
    let mut client = eventually("the gRPC port", connect).await;
    let stats = || {
        let url = control_url.clone();
        // A new connection each time, as the operator's first call to a pod makes.
        async move {
            let mut c = WorkerControlClient::connect(url).await.ok()?;
            c.get_stats(GetStatsRequest {})
                .await
                .ok()
                .map(Response::into_inner)
        }
    };
    let img = jpeg();
    let i1 = img.clone();
    let first = tokio::spawn(async move { client.model_infer(request("effnet", &[&i1])).await });
    eventually("the first request to be held", || async {
        stats().await.filter(|s| s.held_requests == 1)
    })
    .await;

    signal.trigger();
    let signalled = tokio::time::Instant::now();
    // Within the delay: not ready, yet a new connection's request is taken (held, as there
    // is no inference endpoint yet).
    let mut late = connect()
        .await
        .expect("the client port accepts a new connection during the shutdown delay");
    let second = tokio::spawn(async move { late.model_infer(request("effnet", &[&img])).await });
    let during = eventually("the second request to be held", || async {
        stats().await.filter(|s| s.held_requests == 2)
    })
    .await;
    assert!(!during.ready, "not ready once the signal fired");

    // After it: the client port refuses connections, the control port still answers.
    eventually("the client port to refuse connections", || async {
        connect().await.is_none().then_some(())
    })
    .await;
    assert!(signalled.elapsed() >= delay, "not before the delay ended");
    let draining = stats().await.expect("GetStats answers while draining");
    assert_eq!(draining.held_requests, 2);
    let applied = WorkerControlClient::connect(control_url.clone())
        .await
        .expect("the control port accepts connections while draining")
        .set_routes(SetRoutesRequest {
            table: Some(table(5, &[("blue", 100, &[&inference])], None)),
            replace: false,
        })
        .await
        .expect("SetRoutes while draining")
        .into_inner()
        .applied_generation;
    assert_eq!(applied, 5);
    for (which, held) in [("first", first), ("second", second)] {
        let answer = held
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("the {which} request failed: {e}"))
            .into_inner();
        assert_eq!(answer.outputs[1].name, "labels");
    }
    assert_eq!(fake.hits.load(Ordering::SeqCst), 2);

    // Nothing is left to drain: the worker exits, and its control port with it.
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("the worker exits once drained")
        .unwrap()
        .expect("a clean exit");
    assert!(
        WorkerControlClient::connect(control_url).await.is_err(),
        "the control port closed after the drain"
    );
}

#[tokio::test]
async fn a_full_queue_answers_resource_exhausted_and_holding_times_out_as_unavailable() {
    let svc = image_service("  maxQueueDepth: 1\n  holdTimeoutMs: 300\n");
    let img = jpeg();
    let s = Arc::clone(&svc);
    let i2 = img.clone();
    let first = tokio::spawn(async move { infer(&s, request("effnet", &[&i2])).await });
    while svc.router().held_now() == 0 {
        tokio::task::yield_now().await;
    }
    let err = infer(&svc, request("effnet", &[&img])).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
    let err = first.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(
        err.message().contains("no inference endpoint"),
        "{}",
        err.message()
    );
    let stats = Control(Arc::clone(&svc))
        .get_stats(Request::new(GetStatsRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.rejected_total, 1);
}

/// An inference pod that goes away mid-request: it accepts connections, reads what the caller
/// sends, and closes the connection without an answer.
async fn start_vanishing() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                use tokio::io::AsyncReadExt;
                let mut buf = vec![0u8; 64 << 10];
                let _ = tokio::time::timeout(Duration::from_millis(200), conn.read(&mut buf)).await;
                drop(conn);
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_request_whose_inference_pod_closes_the_connection_is_retried_on_another() {
    let gone = start_vanishing().await;
    let (up, up_fake) = start_fake(Behaviour::Logits { slope: 1.0 }).await;
    let svc = image_service("");
    set_routes(&svc, table(1, &[("blue", 100, &[&gone, &up])], None)).await;
    let img = jpeg();
    for i in 0..6 {
        Grpc(Arc::clone(&svc))
            .model_infer(Request::new(request("effnet", &[&img])))
            .await
            .unwrap_or_else(|e| panic!("request {i}: {e:?}"));
    }
    assert_eq!(up_fake.hits.load(Ordering::SeqCst), 6);
}

#[tokio::test]
async fn an_unavailable_endpoint_is_retried_once_on_another_and_traceparent_is_propagated() {
    let (down, down_fake) = start_fake(Behaviour::Unavailable).await;
    let (up, up_fake) = start_fake(Behaviour::Logits { slope: 1.0 }).await;
    let svc = image_service("");
    set_routes(&svc, table(1, &[("blue", 100, &[&down, &up])], None)).await;
    let img = jpeg();
    for _ in 0..4 {
        let mut req = Request::new(request("effnet", &[&img]));
        req.metadata_mut().insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        Grpc(Arc::clone(&svc))
            .model_infer(req)
            .await
            .expect("retry succeeds");
    }
    assert_eq!(up_fake.hits.load(Ordering::SeqCst), 4);
    assert!(down_fake.hits.load(Ordering::SeqCst) >= 1);
    let traces = up_fake.traces.lock().unwrap().clone();
    assert!(
        traces
            .iter()
            .all(|t| t.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-")
                && !t.contains("00f067aa0ba902b7"))
    );
    let stats = Control(Arc::clone(&svc))
        .get_stats(Request::new(GetStatsRequest {}))
        .await
        .unwrap()
        .into_inner();
    let blue = stats.colors.iter().find(|c| c.color == "blue").unwrap();
    assert!(blue.errors >= 1);
    assert_eq!(stats.routes_generation, 1);
}

#[tokio::test]
async fn traffic_splits_by_weight_and_shadow_mismatches_are_counted() {
    let (blue, blue_fake) = start_fake(Behaviour::Logits { slope: 1.0 }).await;
    let (green, green_fake) = start_fake(Behaviour::Logits { slope: -1.0 }).await;
    let svc = image_service("");
    set_routes(
        &svc,
        table(1, &[("blue", 75, &[&blue]), ("green", 25, &[&green])], None),
    )
    .await;
    let img = jpeg();
    for _ in 0..8 {
        infer(&svc, request("effnet", &[&img])).await.unwrap();
    }
    assert_eq!(blue_fake.hits.load(Ordering::SeqCst), 6);
    assert_eq!(green_fake.hits.load(Ordering::SeqCst), 2);

    let shadow = ShadowPolicy {
        color: "green".into(),
        sample_rate: 1.0,
        tolerance: Some(ParityTolerance {
            min_cosine: 0.99,
            max_abs: 0.0,
            require_top1: true,
        }),
        epoch: "green/2/1".into(),
    };
    set_routes(
        &svc,
        table(
            2,
            &[("blue", 100, &[&blue]), ("green", 0, &[&green])],
            Some(shadow),
        ),
    )
    .await;
    for _ in 0..4 {
        infer(&svc, request("effnet", &[&img])).await.unwrap();
    }
    let control = Control(Arc::clone(&svc));
    let mut shadow_stats = None;
    for _ in 0..200 {
        let s = control
            .get_stats(Request::new(GetStatsRequest {}))
            .await
            .unwrap()
            .into_inner()
            .shadow
            .unwrap();
        if s.compared + s.errors >= 4 {
            shadow_stats = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let s = shadow_stats.expect("shadow comparisons recorded");
    assert_eq!(s.color, "green");
    assert_eq!(s.compared, 4);
    assert_eq!(s.mismatches, 4);
    assert_eq!(s.top1_disagreements, 4);
    assert!(s.min_cosine < 0.0);
    assert_eq!(blue_fake.hits.load(Ordering::SeqCst), 10);
    assert_eq!(green_fake.hits.load(Ordering::SeqCst), 6);

    // The same color with a new rollout epoch starts its comparison from zero.
    let next_rollout = ShadowPolicy {
        color: "green".into(),
        sample_rate: 1.0,
        tolerance: None,
        epoch: "green/3/2".into(),
    };
    set_routes(
        &svc,
        table(
            3,
            &[("blue", 100, &[&blue]), ("green", 0, &[&green])],
            Some(next_rollout),
        ),
    )
    .await;
    let s = control
        .get_stats(Request::new(GetStatsRequest {}))
        .await
        .unwrap()
        .into_inner()
        .shadow
        .unwrap();
    assert_eq!((s.compared, s.mismatches, s.errors), (0, 0, 0));
}

#[tokio::test]
async fn rest_health_infer_and_errors_follow_the_oip_v2_http_form() {
    use axum::body::Body;
    use tower::ServiceExt;
    let (addr, _fake) = start_fake(Behaviour::Logits { slope: 1.0 }).await;
    let svc = text_service();
    let app = rest_router(&svc);
    let get = |uri: &str| axum::http::Request::get(uri).body(Body::empty()).unwrap();
    // The protocol's health answers: the status code, and an empty body.
    let health = |uri: &'static str| {
        let app = app.clone();
        async move {
            let resp = app.oneshot(get(uri)).await.unwrap();
            let status = resp.status();
            let body = axum::body::to_bytes(resp.into_body(), 1 << 10)
                .await
                .unwrap();
            (status.as_u16(), body.len())
        }
    };
    assert_eq!(health("/v2/health/live").await, (200, 0));
    assert_eq!(health("/v2/health/ready").await, (503, 0));
    set_routes(&svc, table(1, &[("blue", 100, &[&addr])], None)).await;
    assert_eq!(health("/v2/health/ready").await, (200, 0));
    assert_eq!(
        app.clone()
            .oneshot(get("/v2/models/minilm"))
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        app.clone()
            .oneshot(get("/v2/models/other"))
            .await
            .unwrap()
            .status(),
        404
    );

    let post = |body: String| {
        axum::http::Request::post("/v2/models/minilm/infer")
            .header("content-type", "application/json")
            .body(Body::from(body))
            .unwrap()
    };
    let ok = app
        .clone()
        .oneshot(post(r#"{"id":"a","inputs":[{"name":"TEXT","shape":[2],"datatype":"BYTES","data":["hello","world hello"]}]}"#.into()))
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let body: serde_json::Value =
        serde_json::from_slice(&axum::body::to_bytes(ok.into_body(), 1 << 20).await.unwrap())
            .unwrap();
    assert_eq!(body["outputs"][0]["name"], "embedding");
    assert_eq!(body["outputs"][0]["shape"], serde_json::json!([2, 5]));
    assert_eq!(body["id"], "a");

    let bad = app
        .clone()
        .oneshot(post(
            r#"{"inputs":[{"name":"TEXT","shape":[1],"datatype":"FP32","data":[1.0]}]}"#.into(),
        ))
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let body: serde_json::Value = serde_json::from_slice(
        &axum::body::to_bytes(bad.into_body(), 1 << 20)
            .await
            .unwrap(),
    )
    .unwrap();
    assert!(body["error"].as_str().unwrap().contains("expected BYTES"));
    let garbage = app.clone().oneshot(post("{not json".into())).await.unwrap();
    assert_eq!(garbage.status(), 400);

    // Binary tensor extension, as tritonclient.http sends it.
    let raw = encode_bytes_elements([&b"hello"[..]]);
    let header = format!(
        r#"{{"inputs":[{{"name":"TEXT","shape":[1],"datatype":"BYTES","parameters":{{"binary_data_size":{}}}}}],"parameters":{{"binary_data_output":true}}}}"#,
        raw.len()
    );
    let mut body = header.clone().into_bytes();
    body.extend_from_slice(&raw);
    let req = axum::http::Request::post("/v2/models/minilm/infer")
        .header("Inference-Header-Content-Length", header.len())
        .body(Body::from(body))
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let json_len: usize = resp.headers()["inference-header-content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    let head: serde_json::Value = serde_json::from_slice(&bytes[..json_len]).unwrap();
    assert_eq!(head["outputs"][0]["parameters"]["binary_data_size"], 20);
    assert_eq!(bytes.len() - json_len, 20);
}

async fn worker_stats(svc: &Arc<Service>) -> tandem_proto::tandem::v1::WorkerStats {
    Control(Arc::clone(svc))
        .get_stats(Request::new(GetStatsRequest {}))
        .await
        .unwrap()
        .into_inner()
}

async fn rest_call(
    app: &axum::Router,
    req: axum::http::Request<axum::body::Body>,
) -> (u16, serde_json::Value) {
    use tower::ServiceExt;
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    (
        status,
        serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
    )
}

#[tokio::test]
async fn a_version_not_served_is_refused_naming_the_version_asked_and_the_one_served() {
    use axum::body::Body;
    let svc = image_service("");
    let says = |v: &str| {
        format!(
            "model \"effnet\" version \"{v}\" is not served here (this worker serves version \"1\")"
        )
    };
    let mut req = request("effnet", &[&jpeg()]);
    req.model_version = "7".into();
    let err = infer(&svc, req).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(err.message(), says("7"));
    let oip = Grpc(Arc::clone(&svc));
    let err = oip
        .model_metadata(Request::new(ModelMetadataRequest {
            name: "effnet".into(),
            version: "7".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::NotFound, says("7").as_str())
    );
    let err = oip
        .model_ready(Request::new(ModelReadyRequest {
            name: "effnet".into(),
            version: "7".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::NotFound, says("7").as_str())
    );

    let app = rest_router(&svc);
    let get = |uri: &str| axum::http::Request::get(uri).body(Body::empty()).unwrap();
    for uri in [
        "/v2/models/effnet/versions/2",
        "/v2/models/effnet/versions/2/ready",
    ] {
        let (status, body) = rest_call(&app, get(uri)).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (404, Some(says("2").as_str()))
        );
    }
    let post = axum::http::Request::post("/v2/models/effnet/versions/2/infer")
        .body(Body::from(
            r#"{"inputs":[{"name":"INPUT","shape":[1],"datatype":"BYTES","data":["x"]}]}"#,
        ))
        .unwrap();
    let (status, body) = rest_call(&app, post).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (404, Some(says("2").as_str()))
    );
    // Both infer calls are counted, as errors.
    let stats = worker_stats(&svc).await;
    assert_eq!((stats.requests_total, stats.errors_total), (2, 2));
}

#[tokio::test]
async fn an_output_asking_for_the_classification_extension_is_refused_pointing_at_the_pipelines_own()
 {
    use axum::body::Body;
    let svc = image_service("");
    let mut req = request("effnet", &[&jpeg()]);
    req.outputs = vec![InferRequestedOutputTensor {
        name: "logits".into(),
        parameters: [(
            "classification".to_owned(),
            InferParameter {
                parameter_choice: Some(infer_parameter::ParameterChoice::Int64Param(3)),
            },
        )]
        .into(),
    }];
    let err = infer(&svc, req).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message()
            .contains("asks for the classification extension")
            && err.message().contains("`postprocess: Classification`"),
        "{}",
        err.message()
    );
    let app = rest_router(&svc);
    let post = axum::http::Request::post("/v2/models/effnet/infer")
        .body(Body::from(
            r#"{"inputs":[{"name":"INPUT","shape":[1],"datatype":"BYTES","data":["x"]}],"outputs":[{"name":"logits","parameters":{"classification":3}}]}"#,
        ))
        .unwrap();
    let (status, body) = rest_call(&app, post).await;
    assert_eq!(status, 400);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("classification extension"),
        "{body}"
    );
    let stats = worker_stats(&svc).await;
    assert_eq!((stats.requests_total, stats.errors_total), (2, 2));
}

#[tokio::test]
async fn rest_paths_and_methods_not_served_get_a_json_error_naming_them() {
    use axum::body::Body;
    let app = rest_router(&text_service());
    let get = |uri: &str| axum::http::Request::get(uri).body(Body::empty()).unwrap();
    for (req, status, says) in [
        (get("/unknown"), 404, "no such endpoint: GET /unknown"),
        (
            get("/v2/models/minilm/config"),
            404,
            "model configuration (GET /v2/models/minilm/config) is not supported by Tandem",
        ),
        (
            get("/v2/models/minilm/stats"),
            404,
            "model statistics (GET /v2/models/minilm/stats) is not supported by Tandem",
        ),
        (
            get("/v2/models/stats"),
            404,
            "model statistics (GET /v2/models/stats) is not supported by Tandem",
        ),
        (
            axum::http::Request::post("/v2/repository/index")
                .body(Body::empty())
                .unwrap(),
            404,
            "the model repository extension (POST /v2/repository/index) is not supported by Tandem",
        ),
        (
            get("/v2/models/minilm/infer"),
            405,
            "method GET is not allowed on /v2/models/minilm/infer; use POST",
        ),
    ] {
        let (got, body) = rest_call(&app, req).await;
        assert_eq!((got, body["error"].as_str()), (status, Some(says)));
    }
}

/// A text service whose budget of request bytes in flight (3 MiB) holds one 2 MiB request
/// but not two, routed to a gated [`Fake`] pod: (service, gate, arrivals).
async fn budgeted_text_service() -> (
    Arc<Service>,
    Arc<tokio::sync::Semaphore>,
    tokio::sync::mpsc::UnboundedReceiver<()>,
) {
    let (arrived_tx, arrived) = tokio::sync::mpsc::unbounded_channel();
    let gate = Gate {
        open: Arc::new(tokio::sync::Semaphore::new(0)),
        arrived: arrived_tx,
    };
    let open = Arc::clone(&gate.open);
    let (addr, _) = start(Fake {
        gate: Some(gate),
        ..fake(Behaviour::Logits { slope: 1.0 })
    })
    .await;
    let svc = text_service_limited("maxRequestBytes: 2097152, maxRequestBytesInFlight: 3145728");
    set_routes(&svc, table(1, &[("blue", 100, &[&addr])], None)).await;
    (svc, open, arrived)
}

/// Text of 1.9 MiB: two are over the 3 MiB budget, one is within the 2 MiB request limit.
fn big_text() -> String {
    "hello ".repeat(330_000)
}

/// After the held request and the refused one sent again were answered: nothing is left
/// reserved, and `GetStats` counted the refusal as a request, an error and a rejection (as a
/// full queue's), beside the two answered requests.
async fn released_and_counted_once(
    svc: &Arc<Service>,
    budget: &tandem_worker::common::budget::Budget,
) {
    assert_eq!(budget.reserved(), 0);
    let stats = worker_stats(svc).await;
    assert_eq!(
        (
            stats.requests_total,
            stats.errors_total,
            stats.rejected_total
        ),
        (3, 1, 1)
    );
}

/// The refusal of a second big request while one is held: both sizes rounded, as the worker
/// words them.
const REFUSAL: &str = "worker is receiving 1.9 MiB of request bodies; this request's 1.9 MiB \
                       would pass its budget of 3 MiB (limits.maxRequestBytesInFlight); retry \
                       later";

#[tokio::test]
async fn over_grpc_a_request_that_would_pass_the_bytes_in_flight_budget_is_refused_until_the_one_held_is_answered()
 {
    let (svc, gate, mut arrived) = budgeted_text_service().await;
    let budget = budget(&svc);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = tandem_worker::preprocess::grpc::server(Arc::clone(&svc), budget.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(server)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let mut client = GrpcInferenceServiceClient::connect(url).await.unwrap();
    let text = big_text();
    let big = request("minilm", &[text.as_bytes()]);
    let mut c = client.clone();
    let held = big.clone();
    let first = tokio::spawn(async move { c.model_infer(held).await });
    // Forwarded: its message was decoded long ago, and is still budgeted.
    arrived.recv().await.unwrap();
    assert!(budget.reserved() > text.len(), "{}", budget.reserved());

    let refused = tokio::time::timeout(Duration::from_secs(10), client.model_infer(big.clone()))
        .await
        .expect("refused at once, not forwarded")
        .unwrap_err();
    assert_eq!(
        (refused.code(), refused.message()),
        (Code::ResourceExhausted, REFUSAL)
    );

    gate.add_permits(1);
    first.await.unwrap().expect("the held request is answered");
    client
        .model_infer(big)
        .await
        .expect("the refused request, sent again");
    released_and_counted_once(&svc, &budget).await;
}

#[tokio::test]
async fn over_rest_a_body_that_would_pass_the_bytes_in_flight_budget_is_refused_with_429_until_the_one_held_is_answered()
 {
    let (svc, gate, mut arrived) = budgeted_text_service().await;
    let budget = budget(&svc);
    let app = tandem_worker::preprocess::rest::router(Arc::clone(&svc), budget.clone());
    let text = big_text();
    let big = || {
        let body = serde_json::json!({
            "inputs": [{"name": "INPUT", "datatype": "BYTES", "shape": [1], "data": [&text]}]
        })
        .to_string();
        axum::http::Request::post("/v2/models/minilm/infer")
            .header(axum::http::header::CONTENT_LENGTH, body.len())
            .body(axum::body::Body::from(body))
            .unwrap()
    };
    let held = app.clone();
    let first_req = big();
    let first = tokio::spawn(async move { rest_call(&held, first_req).await });
    arrived.recv().await.unwrap();
    assert!(budget.reserved() > text.len(), "{}", budget.reserved());

    let (status, body) = tokio::time::timeout(Duration::from_secs(10), rest_call(&app, big()))
        .await
        .expect("refused at once, not forwarded");
    assert_eq!((status, body["error"].as_str()), (429, Some(REFUSAL)));

    gate.add_permits(1);
    assert_eq!(first.await.unwrap().0, 200);
    assert_eq!(rest_call(&app, big()).await.0, 200);
    released_and_counted_once(&svc, &budget).await;
}

/// An HTTP/1.1 client such as Python's `http.client` sends its whole body before it reads the
/// answer; a refusal sent without reading the body, on a connection then closed under it, reached
/// such a client as a reset (`BrokenPipeError`), not as the 429.
#[tokio::test]
async fn an_http1_client_that_sends_its_whole_body_before_reading_gets_the_429() {
    let svc = text_service_limited("maxRequestBytes: 16777216, maxRequestBytesInFlight: 16777216");
    let budget = budget(&svc);
    let _full = budget.try_reserve(16 << 20).unwrap();
    let answer = send_whole_body_then_read(&svc, budget, 16 << 20).await;
    assert!(
        answer.starts_with("HTTP/1.1 429 Too Many Requests"),
        "{answer}"
    );
}

/// The same client with a body over `limits.maxRequestBytes` got a reset instead of the 413.
#[tokio::test]
async fn an_http1_client_that_sends_its_whole_oversized_body_before_reading_gets_the_413() {
    let svc = text_service_limited("maxRequestBytes: 4194304");
    let answer = send_whole_body_then_read(&svc, budget(&svc), 12 << 20).await;
    assert!(
        answer.starts_with("HTTP/1.1 413 Payload Too Large"),
        "{answer}"
    );
    assert!(answer.contains("limits.maxRequestBytes"), "{answer}");
}

/// Writes an HTTP/1.1 request with a body of `len` bytes to the preprocess REST server (with
/// `budget`), all of it before reading anything, then reads the whole answer.
async fn send_whole_body_then_read(
    svc: &Arc<Service>,
    budget: tandem_worker::common::budget::Budget,
    len: usize,
) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(tandem_worker::common::net::serve_http(
        listener,
        tandem_worker::preprocess::rest::router(Arc::clone(svc), budget),
        tandem_worker::common::net::HEADER_READ_TIMEOUT,
        std::future::pending(),
    ));
    let body = vec![b'x'; len];
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v2/models/minilm/infer HTTP/1.1\r\nHost: worker\r\nContent-Length: {len}\r\n\r\n"
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(&body)
        .await
        .expect("the body is taken, not cut off");
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&answer);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap())
                })
                .expect("a Content-Length");
            if body.len() >= length {
                return text.into_owned();
            }
        }
        let n = conn.read(&mut buf).await.expect("the answer, not a reset");
        assert!(n > 0, "closed before the whole answer: {text}");
        answer.extend_from_slice(&buf[..n]);
    }
}

/// A fake pod whose ModelMetadata advertises an image model taking `side`×`side` NCHW.
async fn start_advertising(side: i64) -> String {
    use tandem_proto::inference::model_metadata_response::TensorMetadata;
    let t = |name: &str, shape: Vec<i64>| TensorMetadata {
        name: name.into(),
        datatype: "FP32".into(),
        shape,
    };
    let metadata = ModelMetadataResponse {
        name: "effnet-backend".into(),
        inputs: vec![t("input", vec![-1, 3, side, side])],
        outputs: vec![t("logits", vec![-1, 1000])],
        ..Default::default()
    };
    start(Fake {
        metadata,
        ..fake(Behaviour::Logits { slope: 1.0 })
    })
    .await
    .0
}

/// The model mismatches `GetStats` reports once they name exactly `colors`.
async fn settled_mismatches(
    svc: &Arc<Service>,
    colors: &[&str],
) -> Vec<tandem_proto::tandem::v1::ModelMismatch> {
    for _ in 0..100 {
        let stats = worker_stats(svc).await;
        let reported: Vec<&str> = stats
            .model_mismatches
            .iter()
            .map(|m| m.color.as_str())
            .collect();
        if reported == colors {
            return stats.model_mismatches;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the model checks did not report {colors:?}");
}

#[tokio::test]
async fn a_color_whose_model_takes_another_size_is_reported_with_both_shapes_even_at_zero_pods_until_it_is_routed_no_more()
 {
    // The pipeline sends 16×16 NCHW.
    let svc = image_service("");
    let (fits, too_small) = (start_advertising(16).await, start_advertising(12).await);

    set_routes(
        &svc,
        table(
            1,
            &[("blue", 50, &[&fits]), ("green", 50, &[&too_small])],
            None,
        ),
    )
    .await;
    let found = settled_mismatches(&svc, &["green"]).await;
    assert_eq!(
        found,
        vec![tandem_proto::tandem::v1::ModelMismatch {
            color: "green".into(),
            model_name: "effnet-backend".into(),
            model_version: String::new(),
            message: "input \"input\": sent as [N, 3, 16, 16], the model takes [-1, 3, 12, 12]"
                .into(),
        }]
    );

    // Green scaled to zero: its model is unchanged, so the mismatch is still reported.
    set_routes(
        &svc,
        table(2, &[("blue", 100, &[&fits]), ("green", 0, &[])], None),
    )
    .await;
    assert_eq!(worker_stats(&svc).await.model_mismatches, found);

    // The mismatched color leaves the table: nothing is reported any more.
    set_routes(&svc, table(3, &[("blue", 100, &[&fits])], None)).await;
    assert!(settled_mismatches(&svc, &[]).await.is_empty());
}

/// The token of the control tests: 64 hex characters, as the operator derives them.
const CONTROL_TOKEN: &str = "5f0e3c1a9b7d24e68a1f0c3b5d7e9a2c4b6d8f0a1c3e5b7d9f2a4c6e8b0d1f3a";

/// `message` with `authorization: <value>` when there is a value.
fn authorized<T>(message: T, value: Option<&str>) -> Request<T> {
    let mut r = Request::new(message);
    if let Some(v) = value {
        r.metadata_mut()
            .insert("authorization", v.parse().expect("ASCII metadata"));
    }
    r
}

/// `svc`'s control server behind `token` on a loopback port: (URL, the registry holding the
/// refusal counter).
async fn start_control(
    svc: &Arc<Service>,
    token: Option<&str>,
) -> (String, prometheus_client::registry::Registry) {
    let mut registry = prometheus_client::registry::Registry::default();
    let token = token.map(|t| ControlToken::from(t.to_owned()));
    let auth = ControlAuth::new(token.as_ref(), control_auth::register(&mut registry))
        .expect("a valid token");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = tandem_worker::preprocess::control::server(Arc::clone(svc), auth);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(server)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (url, registry)
}

fn assert_unauthenticated(result: Result<impl std::fmt::Debug, Status>, message: &str) {
    let e = result.expect_err("refused");
    assert_eq!(e.code(), Code::Unauthenticated, "{}", e.message());
    assert_eq!(e.message(), message);
    assert!(!e.message().contains(CONTROL_TOKEN));
}

/// Whoever can push a routing table decides where a pipeline's inference traffic goes, so a
/// pod started with a control token takes `SetRoutes` and `GetStats` only from a caller that
/// sends it; a refusal leaves the table as it was, and is counted.
#[tokio::test]
async fn with_a_control_token_worker_control_takes_only_calls_that_carry_it_and_counts_the_others()
{
    let svc = image_service("");
    let (inference, fake) = start_fake(Behaviour::Logits { slope: 1.0 }).await;
    let (url, registry) = start_control(&svc, Some(CONTROL_TOKEN)).await;
    let mut client = WorkerControlClient::connect(url).await.unwrap();
    let push = |auth: Option<&str>| {
        authorized(
            SetRoutesRequest {
                table: Some(table(7, &[("blue", 100, &[&inference])], None)),
                replace: true,
            },
            auth,
        )
    };
    let missing = "WorkerControl needs \"authorization: Bearer <token>\" (this pod was started \
                   with a control token)";
    let wrong = format!("Bearer {}", CONTROL_TOKEN.replace('f', "0"));
    let right = format!("Bearer {CONTROL_TOKEN}");

    assert_unauthenticated(
        client.get_stats(authorized(GetStatsRequest {}, None)).await,
        missing,
    );
    assert_unauthenticated(client.set_routes(push(None)).await, missing);
    assert_unauthenticated(
        client
            .get_stats(authorized(GetStatsRequest {}, Some(&wrong)))
            .await,
        "wrong control token",
    );
    assert_unauthenticated(
        client.set_routes(push(Some(&wrong))).await,
        "wrong control token",
    );
    // The token alone, without the scheme, is not the metadata asked for.
    assert_unauthenticated(
        client.set_routes(push(Some(CONTROL_TOKEN))).await,
        "wrong control token",
    );
    assert!(!svc.is_ready(), "no refused table was applied");
    assert_eq!(worker_stats(&svc).await.routes_generation, 0);

    let applied = client
        .set_routes(push(Some(&right)))
        .await
        .expect("SetRoutes with the token")
        .into_inner()
        .applied_generation;
    assert_eq!(applied, 7);
    let stats = client
        .get_stats(authorized(GetStatsRequest {}, Some(&right)))
        .await
        .expect("GetStats with the token")
        .into_inner();
    assert_eq!(stats.routes_generation, 7);
    assert!(stats.ready);
    let img = jpeg();
    infer(&svc, request("effnet", &[&img]))
        .await
        .expect("served through the pushed table's endpoint");
    assert_eq!(fake.hits.load(Ordering::SeqCst), 1);

    let metrics = tandem_worker::common::metrics::render(&registry).unwrap();
    for line in [
        "tandem_worker_control_unauthenticated_total{reason=\"missing\"} 2",
        "tandem_worker_control_unauthenticated_total{reason=\"wrong\"} 3",
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
    assert!(!metrics.contains(CONTROL_TOKEN));
}

/// Standalone workers and operators that send no token keep working: without a token (or
/// with an empty one) the control port takes calls without metadata.
#[tokio::test]
async fn without_a_control_token_worker_control_takes_calls_without_metadata() {
    for token in [None, Some("")] {
        let svc = image_service("");
        let (url, registry) = start_control(&svc, token).await;
        let mut client = WorkerControlClient::connect(url).await.unwrap();
        let applied = client
            .set_routes(SetRoutesRequest {
                table: Some(table(3, &[("blue", 100, &["127.0.0.1:1"])], None)),
                replace: false,
            })
            .await
            .unwrap_or_else(|e| panic!("SetRoutes without metadata ({token:?}): {e}"))
            .into_inner()
            .applied_generation;
        assert_eq!(applied, 3);
        let stats = client
            .get_stats(GetStatsRequest {})
            .await
            .expect("GetStats without metadata")
            .into_inner();
        assert_eq!(stats.routes_generation, 3);
        let metrics = tandem_worker::common::metrics::render(&registry).unwrap();
        assert!(
            !metrics.contains("tandem_worker_control_unauthenticated_total{"),
            "{metrics}"
        );
    }
}

/// The pipeline config of a whole worker on loopback ports: (config, gRPC port, control port).
fn whole_worker_config(endpoints: &[&str]) -> (PipelineConfig, u16, u16) {
    let (grpc, control) = (free_port(), free_port());
    let yaml = format!(
        "pipeline: p\nmodel: {{name: effnet, version: \"1\"}}\npreprocess:\n  image:\n    resize: {{width: 16, height: 16}}\npostprocess: {{kind: Classification, topK: 2, labels: imagenet}}\nports: {{http: {}, grpc: {grpc}, metrics: {}, control: {control}}}\ninferenceEndpoints: {endpoints:?}\n",
        free_port(),
        free_port()
    );
    (PipelineConfig::parse(&yaml).unwrap(), grpc, control)
}

/// The token guards the control port only: the OIP port serves clients, which hold none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_started_with_a_control_token_guards_its_control_port_and_not_its_oip_port() {
    let (inference, fake) = start_fake(Behaviour::Logits { slope: 1.0 }).await;
    let (cfg, grpc, control) = whole_worker_config(&[&inference]);
    let signal = tandem_worker::common::shutdown::Shutdown::new();
    let token = ControlToken::from(CONTROL_TOKEN.to_owned());
    let stop = signal.clone();
    let server = tokio::spawn(async move {
        tandem_worker::preprocess::serve(
            cfg,
            [127, 0, 0, 1].into(),
            Some(&token),
            Stop {
                signal: stop,
                delay: Duration::ZERO,
                drain: Duration::from_secs(5),
            },
        )
        .await
    });
    let control_url = format!("http://127.0.0.1:{control}");
    let mut control = eventually("the control port", || {
        let url = control_url.clone();
        async move { WorkerControlClient::connect(url).await.ok() }
    })
    .await;
    assert_unauthenticated(
        control.get_stats(GetStatsRequest {}).await,
        "WorkerControl needs \"authorization: Bearer <token>\" (this pod was started with a \
         control token)",
    );
    let stats = control
        .get_stats(authorized(
            GetStatsRequest {},
            Some(&format!("Bearer {CONTROL_TOKEN}")),
        ))
        .await
        .expect("GetStats with the token")
        .into_inner();
    assert!(stats.ready, "ready on its static endpoint");

    let grpc_url = format!("http://127.0.0.1:{grpc}");
    let mut client = eventually("the gRPC port", || {
        let url = grpc_url.clone();
        async move { GrpcInferenceServiceClient::connect(url).await.ok() }
    })
    .await;
    assert!(
        client
            .server_ready(ServerReadyRequest {})
            .await
            .expect("ServerReady without a token")
            .into_inner()
            .ready
    );
    let img = jpeg();
    client
        .model_infer(request("effnet", &[&img]))
        .await
        .expect("ModelInfer without a token");
    assert_eq!(fake.hits.load(Ordering::SeqCst), 1);

    signal.trigger();
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("the worker exits")
        .unwrap()
        .expect("a clean exit");
}

/// The operator's tokens are 64 hex characters; a short one is a mistake, and a guessable
/// secret. The worker refuses it before it opens a port, and the message (which the termination
/// log and the pipeline's `Degraded` condition show) does not quote it.
#[tokio::test]
async fn a_control_token_under_16_bytes_fails_the_start_naming_the_flag_not_the_token() {
    let (cfg, _, control) = whole_worker_config(&["127.0.0.1:1"]);
    let token = ControlToken::from("hunter2-hunter2".to_owned());
    let e = tandem_worker::preprocess::serve(
        cfg,
        [127, 0, 0, 1].into(),
        Some(&token),
        Stop {
            signal: tandem_worker::common::shutdown::Shutdown::new(),
            delay: Duration::ZERO,
            drain: Duration::ZERO,
        },
    )
    .await
    .expect_err("a 15-byte token is refused");
    assert_eq!(
        format!("{e:#}"),
        "the control token (--control-token, TANDEM_CONTROL_TOKEN) is 15 bytes long; it must be \
         at least 16 (the operator gives each pipeline a 64-hex-character HMAC), or empty to take \
         WorkerControl calls without one"
    );
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", control))
            .await
            .is_err(),
        "no port was opened"
    );
}
