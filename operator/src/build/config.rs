//! Renders `pipeline.yaml`, the preprocess workers' configuration.
//!
//! The schema is owned by the worker (`worker/src/config.rs`, `docs/worker-config.md`), which
//! rejects unknown fields; the types here mirror the subset the operator sets, and the tests pin
//! the exact YAML. The operator does not depend on the worker crate (crate = layer), so a
//! schema change there must be mirrored here.

use serde::Serialize;

use crate::build::{PORT_CONTROL, PORT_GRPC, PORT_HTTP, PORT_METRICS};
use crate::crd::{ImageDtype, JpegDraft, Normalize, ResizeFilter, ResizeMode, TensorLayout};
use crate::quantity;
use crate::validate::{Input, ValidatedPipeline};

/// Key of the config file inside the ConfigMap.
pub const CONFIG_FILE: &str = "pipeline.yaml";
/// Where the ConfigMap is mounted in preprocess pods.
pub const CONFIG_MOUNT_DIR: &str = "/etc/tandem";

/// The worker configuration as rendered into the ConfigMap.
#[derive(Serialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkerConfig {
    /// Pipeline name.
    pub pipeline: String,
    /// Model clients address.
    pub model: WorkerModel,
    /// Input processing.
    pub preprocess: WorkerPreprocess,
    /// Output processing.
    pub postprocess: WorkerPostprocess,
    /// Listening ports.
    pub ports: WorkerPorts,
    /// Admission limits.
    pub limits: WorkerLimits,
}

/// `model` section.
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct WorkerModel {
    /// OIP model name.
    pub name: String,
    /// OIP model version; empty (omitted) when the routing table names it per color.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub version: String,
}

/// `preprocess` section: exactly one of text or image. A struct of two options rather than an
/// enum because serde_yaml_ng writes enums as YAML tags (`!text`), while the worker's examples
/// and docs use the plain `text:` / `image:` map form.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct WorkerPreprocess {
    /// Tokenize text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<WorkerText>,
    /// Decode and resize images.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<WorkerImage>,
}

/// `preprocess.text`.
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct WorkerText {
    /// `tokenizer.json` location.
    pub tokenizer: String,
    /// Truncation length in tokens.
    pub max_length: i32,
}

/// `preprocess.image`.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct WorkerImage {
    /// Output size and mapping.
    pub resize: WorkerResize,
    /// Per-channel normalization.
    pub normalize: Normalize,
    /// Tensor layout.
    pub layout: TensorLayout,
    /// Tensor element type.
    pub dtype: ImageDtype,
    /// JPEG decode-time downscaling; left out at its default, so that pipelines that never
    /// set it keep their config hash (and their pods) across an operator upgrade.
    #[serde(rename = "jpegDraft", skip_serializing_if = "is_fast")]
    pub jpeg_draft: JpegDraft,
}

fn is_fast(d: &JpegDraft) -> bool {
    *d == JpegDraft::Fast
}

/// `preprocess.image.resize`.
#[derive(Serialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerResize {
    /// Width in pixels.
    pub width: i32,
    /// Height in pixels.
    pub height: i32,
    /// Aspect-ratio handling.
    pub mode: ResizeMode,
    /// Resampling filter.
    pub filter: ResizeFilter,
}

/// `postprocess` section.
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
#[serde(tag = "kind")]
pub enum WorkerPostprocess {
    /// Embeddings passed through.
    Embedding,
    /// Softmax and top-k.
    Classification {
        /// Classes per item.
        #[serde(rename = "topK")]
        top_k: i32,
        /// Label source.
        #[serde(skip_serializing_if = "Option::is_none")]
        labels: Option<String>,
    },
}

/// `ports` section.
#[derive(Serialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerPorts {
    /// HTTP (REST, probes).
    pub http: i32,
    /// gRPC (OIP).
    pub grpc: i32,
    /// Prometheus.
    pub metrics: i32,
    /// WorkerControl.
    pub control: i32,
}

/// `limits` section.
#[derive(Serialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct WorkerLimits {
    /// Admission bound.
    pub max_queue_depth: u32,
    /// Largest request; omitted for the worker's default ([`WORKER_MAX_REQUEST_BYTES`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_request_bytes: Option<u64>,
    /// Request-body bytes in flight per pod; omitted for the worker's default (256 MiB).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_request_bytes_in_flight: Option<u64>,
}

/// The worker's default `limits.maxRequestBytes` (`worker/src/config.rs`).
pub const WORKER_MAX_REQUEST_BYTES: u64 = 64 << 20;

impl WorkerLimits {
    /// The request-size limits for a preprocess pod with `memory_limit` (a quantity): half of
    /// it for request bodies in flight, the other half left for the decoded images or tokens,
    /// the tensors forwarded and the process itself; and no request larger than that half,
    /// which the worker would refuse to start with. Without a limit (or with one the operator
    /// cannot read) the worker's defaults stand.
    fn sized_for(max_queue_depth: u32, memory_limit: Option<&str>) -> Self {
        let in_flight = memory_limit.and_then(quantity::bytes).map(|b| b / 2);
        Self {
            max_queue_depth,
            max_request_bytes: in_flight.filter(|b| *b < WORKER_MAX_REQUEST_BYTES),
            max_request_bytes_in_flight: in_flight,
        }
    }
}

impl WorkerConfig {
    /// The configuration for a validated pipeline.
    pub fn for_pipeline(v: &ValidatedPipeline) -> Self {
        let (preprocess, postprocess) = match &v.preprocess.input {
            Input::Text(t) => (
                WorkerPreprocess {
                    text: Some(WorkerText {
                        tokenizer: t.tokenizer.clone(),
                        max_length: t.max_length,
                    }),
                    image: None,
                },
                WorkerPostprocess::Embedding,
            ),
            Input::Image(i) => (
                WorkerPreprocess {
                    text: None,
                    image: Some(WorkerImage {
                        resize: WorkerResize {
                            width: i.resize.width,
                            height: i.resize.height,
                            mode: i.resize.mode,
                            filter: i.resize.filter,
                        },
                        normalize: i.normalize.clone(),
                        layout: i.layout,
                        dtype: i.dtype,
                        jpeg_draft: i.jpeg_draft,
                    }),
                },
                WorkerPostprocess::Classification {
                    top_k: i.top_k,
                    labels: i.labels.clone(),
                },
            ),
        };
        Self {
            pipeline: v.meta.name.clone(),
            // No version: each routing-table color names the version it serves. Rendering it
            // here would change the config hash, and so roll every preprocess pod (dropping
            // their connections) on each model swap.
            model: WorkerModel {
                name: v.inference.model.name.clone(),
                version: String::new(),
            },
            preprocess,
            postprocess,
            ports: WorkerPorts {
                http: PORT_HTTP,
                grpc: PORT_GRPC,
                metrics: PORT_METRICS,
                control: PORT_CONTROL,
            },
            limits: WorkerLimits::sized_for(v.preprocess.max_queue_depth, memory_limit(v)),
        }
    }
}

/// The preprocess pods' memory limit, as written in the spec.
fn memory_limit(v: &ValidatedPipeline) -> Option<&str> {
    let limits = v.preprocess.resources.as_ref()?.limits.as_ref()?;
    limits.get("memory").map(|q| q.0.as_str())
}

/// `pipeline.yaml` for a validated pipeline.
pub fn render_worker_config(v: &ValidatedPipeline) -> Result<String, serde_yaml_ng::Error> {
    // serde_yaml is archived upstream; serde_yaml_ng is the maintained fork with the same API,
    // and the worker parses this file with it too.
    serde_yaml_ng::to_string(&WorkerConfig::for_pipeline(v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_fixtures::{image_pipeline, text_pipeline};
    use crate::validate::validate;

    #[test]
    fn a_text_pipeline_renders_the_worker_schema_with_embedding_postprocess() {
        let v = validate(&text_pipeline()).unwrap();
        let yaml = render_worker_config(&v).unwrap();
        assert_eq!(
            yaml,
            "pipeline: minilm
model:
  name: minilm
preprocess:
  text:
    tokenizer: file:///models/minilm/tokenizer.json
    maxLength: 256
postprocess:
  kind: Embedding
ports:
  http: 8000
  grpc: 8001
  metrics: 9090
  control: 9091
limits:
  maxQueueDepth: 1024
"
        );
    }

    #[test]
    fn a_new_model_version_leaves_the_preprocess_config_unchanged() {
        let mut p = text_pipeline();
        let before = render_worker_config(&validate(&p).unwrap()).unwrap();
        p.spec.inference.model.version = "3".into();
        p.spec.inference.model.uri = "https://models.example/minilm/3/model.safetensors".into();
        let after = render_worker_config(&validate(&p).unwrap()).unwrap();
        assert_eq!(before, after, "a model swap must not roll preprocess pods");
    }

    #[test]
    fn an_image_pipeline_renders_resize_normalize_and_classification() {
        let v = validate(&image_pipeline()).unwrap();
        let yaml = render_worker_config(&v).unwrap();
        let expected = "preprocess:
  image:
    resize:
      width: 224
      height: 224
      mode: CenterCrop
      filter: Bilinear
    normalize:
      mean:
      - 0.485
      - 0.456
      - 0.406
      std:
      - 0.229
      - 0.224
      - 0.225
    layout: NCHW
    dtype: FP32
postprocess:
  kind: Classification
  topK: 5
  labels: imagenet
";
        assert!(yaml.contains(expected), "{yaml}");
    }

    #[test]
    fn a_jpeg_draft_policy_is_rendered_only_when_it_is_not_the_default() {
        let mut p = image_pipeline();
        let mut rendered = |draft| {
            if let Some(i) = p.spec.preprocess.image.as_mut() {
                i.jpeg_draft = draft;
            }
            render_worker_config(&validate(&p).unwrap()).unwrap()
        };
        assert!(rendered(JpegDraft::Off).contains("    dtype: FP32\n    jpegDraft: Off\n"));
        assert!(rendered(JpegDraft::Quality).contains("    jpegDraft: Quality\n"));
        // The default keeps the config (and its hash) as it was before the field existed.
        assert!(!rendered(JpegDraft::Fast).contains("jpegDraft"));
    }

    /// The text pipeline's rendered config with preprocess `resources` of `kind` (`limits` or
    /// `requests`) `memory`.
    fn with_preprocess_memory(kind: &str, memory: &str) -> String {
        let mut p = text_pipeline();
        let list: crate::crd::ResourceList = [(
            "memory",
            k8s_openapi::apimachinery::pkg::api::resource::Quantity(memory.into()),
        )]
        .into_iter()
        .collect();
        let mut r = crate::crd::Resources::default();
        match kind {
            "limits" => r.limits = list,
            _ => r.requests = list,
        }
        p.spec.preprocess.resources = Some(r);
        render_worker_config(&validate(&p).unwrap()).unwrap()
    }

    #[test]
    fn a_preprocess_memory_limit_gives_half_of_it_to_request_bytes_in_flight() {
        let yaml = with_preprocess_memory("limits", "1Gi");
        assert!(
            yaml.ends_with(
                "limits:\n  maxQueueDepth: 1024\n  maxRequestBytesInFlight: 536870912\n"
            ),
            "{yaml}"
        );
    }

    #[test]
    fn a_memory_limit_under_twice_the_largest_request_lowers_that_to_the_half_too() {
        let yaml = with_preprocess_memory("limits", "100M");
        assert!(
            yaml.ends_with(
                "limits:\n  maxQueueDepth: 1024\n  maxRequestBytes: 50000000\n  maxRequestBytesInFlight: 50000000\n"
            ),
            "{yaml}"
        );
        // Exactly twice: the worker's default request limit stands.
        let yaml = with_preprocess_memory("limits", "128Mi");
        assert!(
            yaml.ends_with("limits:\n  maxQueueDepth: 1024\n  maxRequestBytesInFlight: 67108864\n"),
            "{yaml}"
        );
    }

    #[test]
    fn a_memory_request_without_a_limit_leaves_the_workers_defaults() {
        let yaml = with_preprocess_memory("requests", "1Gi");
        assert!(yaml.ends_with("limits:\n  maxQueueDepth: 1024\n"), "{yaml}");
    }
}
