//! Pipelines shared by the unit tests.

use kube::api::ObjectMeta;

use crate::crd::{
    Batching, Device, ImageDtype, ImagePreprocess, InferencePipeline, InferencePipelineSpec,
    InferenceSpec, ModelSpec, Normalize, PreprocessSpec, ReplicaRange, Resize, ResizeFilter,
    ResizeMode, RolloutSpec, Scheduling, TensorLayout, TextPreprocess,
};

pub const SHA: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

pub fn text_pipeline() -> InferencePipeline {
    let mut p = InferencePipeline::new(
        "minilm",
        InferencePipelineSpec {
            preprocess: PreprocessSpec {
                text: Some(TextPreprocess {
                    tokenizer: "file:///models/minilm/tokenizer.json".into(),
                    max_length: 256,
                }),
                image: None,
                replicas: ReplicaRange { min: 1, max: 8 },
                target_queue_depth: 16,
                max_queue_depth: 1024,
                resources: None,
                scheduling: None,
            },
            inference: InferenceSpec {
                model: ModelSpec {
                    name: "minilm".into(),
                    version: "2".into(),
                    uri: "file:///models/minilm/model.safetensors".into(),
                    sha256: SHA.into(),
                },
                device: Device::Cuda,
                batching: Batching::default(),
                replicas: ReplicaRange { min: 1, max: 4 },
                target_queue_depth: 64,
                max_queue_depth: 1024,
                resources: None,
                scheduling: None,
            },
            rollout: RolloutSpec::default(),
        },
    );
    p.metadata = ObjectMeta {
        name: Some("minilm".into()),
        namespace: Some("ml".into()),
        uid: Some("6f1c1b2e-0000-4000-8000-000000000001".into()),
        generation: Some(3),
        ..ObjectMeta::default()
    };
    p
}

pub fn image_preprocess() -> ImagePreprocess {
    ImagePreprocess {
        resize: Resize {
            width: 224,
            height: 224,
            mode: ResizeMode::CenterCrop,
            filter: ResizeFilter::Bilinear,
        },
        normalize: Normalize::default(),
        layout: TensorLayout::Nchw,
        dtype: ImageDtype::Fp32,
        jpeg_draft: Default::default(),
        labels: Some("imagenet".into()),
        top_k: 5,
    }
}

pub fn image_pipeline() -> InferencePipeline {
    let mut p = text_pipeline();
    p.metadata.name = Some("effnet".into());
    p.spec.preprocess.text = None;
    p.spec.preprocess.image = Some(image_preprocess());
    p.spec.inference.device = Device::Cpu;
    p.spec.inference.model.name = "efficientnet-lite0".into();
    p
}

/// The `scheduling` of docs/operations.md's GPU example: an H100 node, tolerating the GPU
/// nodes' taint.
pub fn gpu_scheduling() -> Box<Scheduling> {
    Box::new(
        serde_json::from_value(serde_json::json!({
            "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        }))
        .expect("a valid scheduling"),
    )
}

/// The log lines `f` emits, as the operator writes them with `logging.format: json` (fields
/// flattened beside `message`, `main.rs`), each still raw so duplicate keys stay visible.
pub fn json_log_lines(f: impl FnOnce()) -> Vec<String> {
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("log buffer").extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buf = Buf::default();
    let writer = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_writer(move || writer.clone())
        .finish();
    tracing::subscriber::with_default(subscriber, f);
    let bytes = buf.0.lock().expect("log buffer").clone();
    String::from_utf8(bytes)
        .expect("UTF-8 logs")
        .lines()
        .map(str::to_owned)
        .collect()
}
