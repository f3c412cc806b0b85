//! The `InferencePipeline` API (`tandem.dev/v1alpha1`): Rust types, defaults, server-side
//! validation rules and printer columns. The CRD YAML in `crds/` is generated from this file.
//!
//! `///` comments here are user documentation (they become `kubectl explain` output); notes for
//! maintainers use `//`. CEL rules sit next to the field they guard, each with a message that says
//! what to change.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of every Tandem resource.
pub const GROUP: &str = "tandem.dev";
/// Served and stored version of `InferencePipeline`.
pub const VERSION: &str = "v1alpha1";

/// Longest pipeline name: derived object names such as `<name>-inference-green` must stay
/// within the 63 characters of a DNS label (Services, label values).
pub const MAX_PIPELINE_NAME_LEN: usize = 47;

// CEL fragments reused by several fields. Kubernetes' CEL cost estimator needs bounded string
// lengths, which is one more reason every string below carries a `maxLength`.
macro_rules! duration_pattern {
    () => {
        "^([0-9]+(ms|s|m|h))+$"
    };
}
const DURATION_RULE: &str = concat!("self.matches('", duration_pattern!(), "')");
// An upper bound for a duration field, in a rule of its own so a malformed value gets only the
// format message. CEL's `duration()` fails to evaluate past Go's ~2,562,047h, which would put an
// evaluation error in front of the user instead of the message, so the value is first held to
// digit counts whose sum cannot overflow in 32 characters (at most ~0.9M hours); anything with
// more digits is far above every bound here anyway.
macro_rules! duration_at_most {
    ($max:literal) => {
        concat!(
            "!self.matches('",
            duration_pattern!(),
            "') || (self.matches('^(0*[0-9]{1,5}h|0*[0-9]{1,7}m|0*[0-9]{1,9}s|0*[0-9]{1,12}ms)+$') && duration(self) <= duration('",
            $max,
            "'))"
        )
    };
}
// A URI the workers can fetch: a path after `file://`, a host after `http://` or `https://`
// (the scheme alone passed a prefix check, then failed in the operator and the pods).
const URI_RULE: &str = "self.matches('^(file://.+|https?://[^/].*)$')";
// A label key (`nvidia.com/gpu.product`): an optional DNS-subdomain prefix and `/`, then a name of
// at most 63 characters (317 in all: 253 + 1 + 63; the prefix's own bound is left to that).
// `[.]` rather than `\.`: the node selector's rule puts it in a CEL string literal, where `\.`
// is no escape.
macro_rules! label_key_pattern {
    () => {
        "^([a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
    };
}
/// A label key, as the CRD's node selector rule and toleration `key` check it
/// (`crate::validate::is_label_key` checks the same, with the prefix's own bound).
pub const LABEL_KEY_PATTERN: &str = label_key_pattern!();
/// A label value: empty, or at most 63 letters, digits, `-`, `_` and `.`, starting and ending
/// with a letter or digit.
pub const LABEL_VALUE_PATTERN: &str = "^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$";

/// A two-stage AI inference pipeline: CPU preprocess workers in front of (GPU) inference workers,
/// each stage autoscaled on its own queue depth, with blue-green model rollouts.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "tandem.dev",
    version = "v1alpha1",
    kind = "InferencePipeline",
    plural = "inferencepipelines",
    shortname = "ipl",
    namespaced,
    status = "InferencePipelineStatus",
    derive = "PartialEq",
    doc = "InferencePipeline runs a model behind a preprocess stage (tokenize or decode/resize/normalize) on the Open Inference Protocol v2, scaling both stages on their queue depth and swapping models blue-green.",
    validation = Rule::new("size(self.metadata.name) <= 47").message("metadata.name must be at most 47 characters: the operator derives object names such as <name>-inference-green from it, and those must fit in 63"),
    printcolumn(name = "Model", type_ = "string", json_path = ".status.summary.model", description = "Active model as name:version"),
    printcolumn(name = "Active", type_ = "string", json_path = ".status.activeColor", description = "Color that serves live traffic"),
    printcolumn(name = "Traffic", type_ = "string", json_path = ".status.summary.traffic", description = "Live traffic split between colors"),
    printcolumn(name = "Preprocess", type_ = "string", json_path = ".status.summary.preprocess", description = "Ready/desired preprocess pods"),
    printcolumn(name = "Inference", type_ = "string", json_path = ".status.summary.inference", description = "Ready/desired inference pods"),
    printcolumn(name = "Queue", type_ = "integer", json_path = ".status.summary.queueDepth", description = "Requests queued across both stages"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase", description = "Lifecycle phase"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct InferencePipelineSpec {
    /// The CPU stage in front of the model: the client-facing Open Inference Protocol endpoint
    /// that turns raw text or images into tensors, forwards them to the inference stage and
    /// post-processes the outputs.
    pub preprocess: PreprocessSpec,
    /// The model-serving stage: one Deployment per color (blue/green), batching requests onto a
    /// CUDA GPU or the CPU.
    pub inference: InferenceSpec,
    /// How a new model in `inference.model` replaces the serving one: shadow comparison, then
    /// traffic steps, with automatic rollback.
    #[serde(default)]
    pub rollout: RolloutSpec,
}

/// The preprocess stage.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.text) != has(self.image)").message("preprocess must set exactly one of text or image"),
    validation = Rule::new("self.replicas.min >= 1").message("preprocess.replicas.min must be at least 1: the preprocess stage is the pipeline's front door and cannot scale to zero"),
    validation = Rule::new("self.targetQueueDepth <= self.maxQueueDepth").message("preprocess.targetQueueDepth must not exceed preprocess.maxQueueDepth")
)]
pub struct PreprocessSpec {
    /// Text input: tokenize strings for a transformer encoder and pool its outputs into
    /// sentence embeddings. Exactly one of `text` and `image` must be set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<TextPreprocess>,
    /// Image input: decode, resize and normalize images into the model's input tensor and turn
    /// logits into top-k classes. Exactly one of `text` and `image` must be set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImagePreprocess>,
    /// Bounds for the number of preprocess pods; the autoscaler moves within them.
    #[serde(default = "default_preprocess_replicas")]
    pub replicas: ReplicaRange,
    /// Queued requests per pod the autoscaler aims for; more queued work adds pods.
    #[serde(default = "default_preprocess_target_queue_depth")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 100000").message("preprocess.targetQueueDepth must be between 1 and 100000"))]
    pub target_queue_depth: i32,
    /// Requests a pod holds at most; beyond this it answers RESOURCE_EXHAUSTED instead of
    /// growing its memory.
    #[serde(default = "default_max_queue_depth")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 1000000").message("preprocess.maxQueueDepth must be between 1 and 1000000"))]
    pub max_queue_depth: i32,
    /// CPU and memory for each preprocess pod. When unset, the pod requests 100m CPU and 128Mi
    /// memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    /// Which nodes the preprocess pods may run on: a node selector and tolerations. When
    /// unset, the pods carry neither.
    // Boxed: most pipelines have none, and a cached pipeline then pays 8 bytes for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduling: Option<Box<Scheduling>>,
}

/// Tokenization and pooling for text models.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TextPreprocess {
    /// Where the Hugging Face `tokenizer.json` comes from: a `file://` path, or an `http://` or
    /// `https://` URL.
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(validation = Rule::new(URI_RULE).message("preprocess.text.tokenizer must be a file://, http:// or https:// URI with a path after file:// or a host after http(s)://, e.g. file:///models/minilm/tokenizer.json"))]
    pub tokenizer: String,
    /// Longest input in tokens, the special tokens the tokenizer adds included (2 to 8192);
    /// longer inputs are truncated.
    #[serde(default = "default_text_max_length")]
    #[x_kube(validation = Rule::new("self >= 2 && self <= 8192").message("preprocess.text.maxLength must be between 2 and 8192 tokens (the special tokens the tokenizer adds take two)"))]
    pub max_length: i32,
}

/// Image decoding, resizing and normalization.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ImagePreprocess {
    /// Target size and method. It must be the model's input size: 224×224 for Tandem's
    /// EfficientNet-Lite0 and ResNet-50. With another size every request is refused by the
    /// inference worker, and the pipeline is Degraded with reason `ModelMismatch`.
    pub resize: Resize,
    /// Per-channel normalization applied after scaling pixels to [0, 1]: `(x - mean) / std`.
    #[serde(default)]
    pub normalize: Normalize,
    /// Memory layout of the input tensor. Tandem's own vision models take `NCHW`; with `NHWC`
    /// every request is refused by the inference worker, and the pipeline is Degraded with
    /// reason `ModelMismatch`.
    #[serde(default)]
    pub layout: TensorLayout,
    /// Element type of the tensor sent to inference: `FP32` (normalized here) or `UINT8` (raw
    /// pixels, a quarter of the bytes on the wire; the inference worker normalizes them with
    /// the model's own mean and std, and `normalize` is not used).
    #[serde(default)]
    pub dtype: ImageDtype,
    /// How far a JPEG may be scaled down while it is decoded (libjpeg-turbo's scaled inverse
    /// DCT, like Pillow's `draft`), which skips most of the decoding work for pixels the resize
    /// would throw away. `Fast` (default): while the decoded crop keeps at least one pixel per
    /// output pixel; a 1080p JPEG to 224×224 decodes at 1/4 scale, about half the CPU of a full
    /// decode, at the quality of Pillow's draft mode. `Quality`: at least two pixels per output
    /// pixel in each direction (1/2 scale there), close to a full decode's quality for 25–40 %
    /// less CPU. `Off`: always decode at full size, as Pillow does without `draft`. Other formats are always decoded at full size.
    #[serde(default)]
    pub jpeg_draft: JpegDraft,
    /// Where class names come from: `imagenet` (built in) or the path of a file with one label
    /// per line inside the worker container (the operator mounts no volume for it, so the file
    /// must be in the worker image). Without labels, classes are reported by index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048))]
    pub labels: Option<String>,
    /// Classes to return per image, by descending probability.
    #[serde(default = "default_top_k")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 1000").message("preprocess.image.topK must be between 1 and 1000"))]
    pub top_k: i32,
}

/// Resize parameters.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Resize {
    /// Output width in pixels.
    #[x_kube(validation = Rule::new("self >= 1 && self <= 8192").message("preprocess.image.resize.width must be between 1 and 8192 pixels"))]
    pub width: i32,
    /// Output height in pixels.
    #[x_kube(validation = Rule::new("self >= 1 && self <= 8192").message("preprocess.image.resize.height must be between 1 and 8192 pixels"))]
    pub height: i32,
    /// How the aspect ratio is handled.
    #[serde(default)]
    pub mode: ResizeMode,
    /// Resampling filter.
    #[serde(default)]
    pub filter: ResizeFilter,
}

/// Aspect-ratio handling when resizing.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ResizeMode {
    /// Scale to cover the output, keep the aspect ratio, crop the overflow around the center.
    #[default]
    CenterCrop,
    /// Scale to fit inside the output, keep the aspect ratio, pad the rest with black.
    FitPad,
    /// Scale each axis independently to exactly width x height (distorts the aspect ratio).
    Stretch,
}

/// Element type of an image tensor.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ImageDtype {
    /// 32-bit floats, normalized by the preprocess stage.
    #[default]
    #[serde(rename = "FP32")]
    Fp32,
    /// Raw 0..255 pixels.
    #[serde(rename = "UINT8")]
    Uint8,
}

/// Resampling filter.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ResizeFilter {
    /// Bilinear (triangle) filter, antialiased when downscaling; matches Pillow's `BILINEAR`.
    #[default]
    Bilinear,
    /// Lanczos with a window of 3: sharpest, slowest; matches Pillow's `LANCZOS`.
    Lanczos3,
}

/// Per-channel normalization (R, G, B).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Normalize {
    /// Mean per channel (R, G, B), subtracted after scaling pixels to [0, 1]. ImageNet's by
    /// default.
    #[x_kube(validation = Rule::new("size(self) == 3").message("preprocess.image.normalize.mean must list 3 values (R, G, B)"))]
    #[schemars(length(max = 3))]
    pub mean: Vec<f64>,
    /// Standard deviation per channel (R, G, B), divided by after subtracting the mean.
    /// ImageNet's by default.
    #[schemars(length(max = 3))]
    #[x_kube(validation = Rule::new("size(self) == 3").message("preprocess.image.normalize.std must list 3 values (R, G, B)"))]
    #[x_kube(validation = Rule::new("self.all(s, s > 0.0)").message("preprocess.image.normalize.std values must be positive"))]
    pub std: Vec<f64>,
}

impl Default for Normalize {
    fn default() -> Self {
        Self {
            mean: vec![0.485, 0.456, 0.406],
            std: vec![0.229, 0.224, 0.225],
        }
    }
}

/// How far a JPEG may be scaled down while it is decoded.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum JpegDraft {
    /// While the decoded crop keeps at least one pixel per output pixel (Pillow's rule).
    #[default]
    Fast,
    /// While it keeps at least two pixels per output pixel in each direction.
    Quality,
    /// Never: always decode at full size.
    Off,
}

/// Memory layout of an image tensor.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TensorLayout {
    /// Batch, channels, height, width (PyTorch convention).
    #[default]
    #[serde(rename = "NCHW")]
    Nchw,
    /// Batch, height, width, channels (TensorFlow convention).
    #[serde(rename = "NHWC")]
    Nhwc,
}

/// The inference stage.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.targetQueueDepth <= self.maxQueueDepth").message("inference.targetQueueDepth must not exceed inference.maxQueueDepth")
)]
pub struct InferenceSpec {
    /// The model to serve. Changing it starts a blue-green rollout.
    pub model: ModelSpec,
    /// Where the model runs. `CUDA` pods request one `nvidia.com/gpu` each.
    #[serde(default)]
    pub device: Device,
    /// Dynamic batching of concurrent requests.
    #[serde(default)]
    pub batching: Batching,
    /// Bounds for the number of inference pods per color; `min: 0` lets the stage scale to
    /// zero when idle.
    #[serde(default = "default_inference_replicas")]
    pub replicas: ReplicaRange,
    /// Queued requests per pod the autoscaler aims for.
    #[serde(default = "default_inference_target_queue_depth")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 100000").message("inference.targetQueueDepth must be between 1 and 100000"))]
    pub target_queue_depth: i32,
    /// Requests a pod holds at most; beyond this it answers RESOURCE_EXHAUSTED.
    #[serde(default = "default_max_queue_depth")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 1000000").message("inference.maxQueueDepth must be between 1 and 1000000"))]
    pub max_queue_depth: i32,
    /// CPU and memory for each inference pod. When unset, the pod requests 500m CPU and 1Gi
    /// memory. `nvidia.com/gpu: 1` is added for `CUDA` unless set here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    /// Which nodes the inference pods may run on: a node selector and tolerations, such as
    /// `nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3` and a toleration of the GPU nodes'
    /// taint. When unset, the pods carry neither (`CUDA` pods still go only to nodes with a free
    /// `nvidia.com/gpu`).
    // Boxed, as in `PreprocessSpec`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduling: Option<Box<Scheduling>>,
}

/// Compute resources of each pod of a stage, as in a container's `resources`.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct Resources {
    /// The least of each resource a pod needs (such as `cpu: 500m`, `memory: 1Gi`); the
    /// scheduler places it only on a node that has that much free. Defaults to `limits`
    /// where only limits are given.
    #[serde(default, skip_serializing_if = "ResourceList::is_empty")]
    pub requests: ResourceList,
    /// The most of each resource a pod may use: more CPU is throttled, more memory ends the
    /// pod (OOMKilled).
    #[serde(default, skip_serializing_if = "ResourceList::is_empty")]
    pub limits: ResourceList,
}

impl From<&Resources> for ResourceRequirements {
    fn from(r: &Resources) -> Self {
        let list = |l: &ResourceList| (!l.is_empty()).then(|| l.to_map());
        ResourceRequirements {
            requests: list(&r.requests),
            limits: list(&r.limits),
            ..ResourceRequirements::default()
        }
    }
}

/// Resource name to quantity (`cpu: 500m`), in the JSON and schema of a container's
/// `resources.requests` or `limits`. Held as a sorted boxed slice rather than a `BTreeMap`:
/// a stage names one to three resources, and a B-tree's smallest node is about 0.5 KB, which
/// every pipeline in the operator's cache carried once per list.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ResourceList(Box<[(Box<str>, Quantity)]>);

impl ResourceList {
    /// Whether it names no resource.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The quantity of `resource`, if listed.
    pub fn get(&self, resource: &str) -> Option<&Quantity> {
        self.0
            .binary_search_by(|(name, _)| (**name).cmp(resource))
            .ok()
            .map(|i| &self.0[i].1)
    }

    /// As a container's resource map.
    pub fn to_map(&self) -> BTreeMap<String, Quantity> {
        self.0
            .iter()
            .map(|(name, q)| (name.to_string(), q.clone()))
            .collect()
    }
}

impl<N: Into<Box<str>>> FromIterator<(N, Quantity)> for ResourceList {
    /// Sorted by name; the last quantity given for a name wins.
    fn from_iter<I: IntoIterator<Item = (N, Quantity)>>(iter: I) -> Self {
        let map: BTreeMap<Box<str>, Quantity> =
            iter.into_iter().map(|(n, q)| (n.into(), q)).collect();
        Self(map.into_iter().collect())
    }
}

impl Serialize for ResourceList {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter().map(|(name, q)| (&**name, q)))
    }
}

impl<'de> Deserialize<'de> for ResourceList {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        BTreeMap::<String, Quantity>::deserialize(deserializer).map(ResourceList::from_iter)
    }
}

/// A Kubernetes quantity as a string: a signed decimal number with an optional binary,
/// decimal or exponent suffix (`crate::validate::is_quantity` checks the same).
pub const QUANTITY_PATTERN: &str = r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$";

impl JsonSchema for ResourceList {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "ResourceList".into()
    }

    /// The schema of a container's resource map: quantities, integer or string, the strings
    /// checked against [`QUANTITY_PATTERN`] (Kubernetes' own schemas for quantities carry
    /// the same pattern) so that `cpu: lots` is refused when applied.
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "object",
            "additionalProperties": {
                "description": "An amount such as 500m, 2 or 1Gi (a Kubernetes quantity).",
                "anyOf": [{"type": "integer"}, {"type": "string"}],
                "pattern": QUANTITY_PATTERN,
                "x-kubernetes-int-or-string": true
            }
        })
    }

    fn inline_schema() -> bool {
        true
    }
}

/// Where the pods of a stage may run, copied into each pod's spec. Affinity and topology
/// spread constraints are not offered; an admission policy can add them.
// Not `k8s_openapi`'s `Toleration` and `BTreeMap<String, String>`: their schemas bound no string
// (the CEL cost estimator and the API server's limits want bounds) and carry the pod's docs, and a
// `BTreeMap` costs ~0.5 KB per cached pipeline (see `ResourceList`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Scheduling {
    /// Node labels a node must carry, every one of them, to run the stage's pods, such as
    /// `nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3`. At most 32.
    #[serde(default, skip_serializing_if = "NodeSelector::is_empty")]
    #[x_kube(validation = Rule::new(concat!("self.all(k, size(k) <= 317 && k.matches('", label_key_pattern!(), "'))")).message("scheduling.nodeSelector keys must be label keys such as nvidia.com/gpu.product: an optional DNS subdomain and '/', then at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit (317 characters in all)"))]
    pub node_selector: NodeSelector,
    /// Taints the stage's pods tolerate, so that they may run on nodes that carry them (such
    /// as GPU nodes tainted `nvidia.com/gpu:NoSchedule`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub tolerations: Vec<Toleration>,
}

// The messages of the toleration rules; `validate` gives the same.
/// Why a toleration without a key is refused.
pub const TOLERATION_WITHOUT_KEY: &str =
    "a toleration without a key must have operator: Exists (it then tolerates every taint)";
/// Why an `Exists` toleration with a value is refused.
pub const TOLERATION_EXISTS_WITH_VALUE: &str = "a toleration with operator: Exists must not set a value: it matches every value of its key (use operator: Equal to match one value)";
/// Why `tolerationSeconds` without `effect: NoExecute` is refused.
pub const TOLERATION_SECONDS_WITHOUT_NO_EXECUTE: &str = "tolerationSeconds applies only to effect: NoExecute (how long a pod stays on a node after such a taint is added)";

/// A taint the pods tolerate, as in a pod's `tolerations`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.key) || self.operator == 'Exists'").message(TOLERATION_WITHOUT_KEY),
    validation = Rule::new("self.operator != 'Exists' || !has(self.value) || self.value == ''").message(TOLERATION_EXISTS_WITH_VALUE),
    validation = Rule::new("!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')").message(TOLERATION_SECONDS_WITHOUT_NO_EXECUTE)
)]
pub struct Toleration {
    /// The taint key it matches, such as `nvidia.com/gpu`. Without a key, `operator` must be
    /// `Exists`, and every taint is tolerated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 317), pattern(LABEL_KEY_PATTERN))]
    pub key: Option<String>,
    /// `Equal`: the taint's value must be `value`. `Exists`: any value (set no `value`).
    #[serde(default)]
    pub operator: TolerationOperator,
    /// The taint value `operator: Equal` matches; unset matches an empty value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63), pattern(LABEL_VALUE_PATTERN))]
    pub value: Option<String>,
    /// The taint effect it matches; unset matches every effect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effect: Option<TaintEffect>,
    /// With `effect: NoExecute` only: how many seconds a running pod stays on a node after a
    /// matching taint is added (0 or less: it is evicted at once). Unset: it stays.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub toleration_seconds: Option<i64>,
}

/// How a toleration matches a taint's value.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TolerationOperator {
    /// The taint's value equals the toleration's `value`.
    #[default]
    Equal,
    /// The taint has the key, with any value.
    Exists,
}

impl TolerationOperator {
    /// Name as written in a pod's toleration.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Equal => "Equal",
            Self::Exists => "Exists",
        }
    }
}

// What a taint does to pods that do not tolerate it. A `//` comment: kube's schema transform for
// an `Option` of an enum copies the enum's description over the field's (as it does for
// `status.phase`), and `kubectl explain` should show the field's.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaintEffect {
    /// New pods are not scheduled onto the node.
    NoSchedule,
    /// The scheduler avoids the node for new pods when it can.
    PreferNoSchedule,
    /// New pods are not scheduled, and running pods are evicted.
    NoExecute,
}

impl TaintEffect {
    /// Name as written in a pod's toleration.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoSchedule => "NoSchedule",
            Self::PreferNoSchedule => "PreferNoSchedule",
            Self::NoExecute => "NoExecute",
        }
    }
}

impl From<&Toleration> for k8s_openapi::api::core::v1::Toleration {
    fn from(t: &Toleration) -> Self {
        Self {
            key: t.key.clone(),
            operator: Some(t.operator.as_str().to_owned()),
            value: t.value.clone(),
            effect: t.effect.map(|e| e.as_str().to_owned()),
            toleration_seconds: t.toleration_seconds,
        }
    }
}

/// Node label to value, in the JSON of a pod's `nodeSelector`. A sorted boxed slice, for the
/// reason given at [`ResourceList`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeSelector(Box<[(Box<str>, Box<str>)]>);

impl NodeSelector {
    /// Whether it names no label.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// As a pod's node selector.
    pub fn to_map(&self) -> BTreeMap<String, String> {
        self.0
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }
}

impl<K: Into<Box<str>>, V: Into<Box<str>>> FromIterator<(K, V)> for NodeSelector {
    /// Sorted by key; the last value given for a key wins.
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let map: BTreeMap<Box<str>, Box<str>> = iter
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        Self(map.into_iter().collect())
    }
}

impl Serialize for NodeSelector {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter().map(|(k, v)| (&**k, &**v)))
    }
}

impl<'de> Deserialize<'de> for NodeSelector {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        BTreeMap::<String, String>::deserialize(deserializer).map(NodeSelector::from_iter)
    }
}

impl JsonSchema for NodeSelector {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "NodeSelector".into()
    }

    /// A map of at most 32 label values (the keys are checked by the field's CEL rule: a
    /// structural schema cannot constrain them).
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "object",
            "maxProperties": 32,
            "additionalProperties": {
                "description": "A label value: at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit.",
                "type": "string",
                "maxLength": 63,
                "pattern": LABEL_VALUE_PATTERN
            }
        })
    }

    fn inline_schema() -> bool {
        true
    }
}

/// A model: safetensors weights plus a Hugging Face `config.json` next to them.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ModelSpec {
    /// Model name as clients address it on the Open Inference Protocol.
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9._]*[a-z0-9])?$')").message("inference.model.name must be lowercase letters, digits, '-', '.' or '_', starting and ending with a letter or digit"))]
    pub name: String,
    /// Model version; a new version (or URI) in the spec starts a rollout.
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z0-9]([-A-Za-z0-9._]*[A-Za-z0-9])?$')").message("inference.model.version must be letters, digits, '-', '.' or '_', starting and ending with a letter or digit"))]
    pub version: String,
    /// Where the weights (`model.safetensors`) come from: a `file://` path, or an `http://` or
    /// `https://` URL. Downloaded when the pod starts and checked against `sha256`.
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(validation = Rule::new(URI_RULE).message("inference.model.uri must be a file://, http:// or https:// URI with a path after file:// or a host after http(s)://, e.g. file:///models/minilm/model.safetensors"))]
    pub uri: String,
    /// SHA-256 of the weights file, 64 hexadecimal characters; a pod refuses weights that do
    /// not match.
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new("self.matches('^[0-9a-fA-F]{64}$')").message("inference.model.sha256 must be exactly 64 hexadecimal characters (the SHA-256 of the file at inference.model.uri)"))]
    pub sha256: String,
}

/// Compute device of the inference stage.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Device {
    /// An NVIDIA GPU through CUDA; each pod requests `nvidia.com/gpu: 1`.
    #[default]
    #[serde(rename = "CUDA")]
    Cuda,
    /// The CPU; no GPU requested.
    #[serde(rename = "CPU")]
    Cpu,
}

/// Dynamic batching.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Batching {
    /// Most requests merged into one model call.
    #[serde(default = "default_max_batch_size")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 4096").message("inference.batching.maxBatchSize must be between 1 and 4096"))]
    pub max_batch_size: i32,
    /// Longest a request waits for others to fill a batch, as a duration such as `2ms`; at most
    /// `1s`. A request that arrives alone waits this long before its model call, so at low load
    /// every request pays it: a few milliseconds is typical (Triton's
    /// `max_queue_delay_microseconds` is usually 100 µs to a few ms).
    // Bounded at 1s: past it the wait alone exceeds common client deadlines and dwarfs the model
    // call it is meant to amortize; a throughput job fills its batches by `maxBatchSize` long
    // before, and `20s` or `100000h` is a typo, not a tuning.
    #[serde(default = "default_max_delay")]
    #[schemars(length(min = 1, max = 32))]
    #[x_kube(
        validation = Rule::new(DURATION_RULE).message("inference.batching.maxDelay must be a duration such as 2ms, 10ms or 1s"),
        validation = Rule::new(duration_at_most!("1s")).message("inference.batching.maxDelay must be at most 1s: a lone request waits this long for a batch to fill, so every request at low load pays it (a few ms is typical)")
    )]
    pub max_delay: String,
}

impl Default for Batching {
    fn default() -> Self {
        Self {
            max_batch_size: default_max_batch_size(),
            max_delay: default_max_delay(),
        }
    }
}

/// Lower and upper bound for a stage's pod count.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.min <= self.max").message("replicas.min must be less than or equal to replicas.max"))]
pub struct ReplicaRange {
    /// Fewest pods; 0 allows scaling to zero (inference only).
    #[x_kube(validation = Rule::new("self >= 0 && self <= 1000").message("replicas.min must be between 0 and 1000"))]
    pub min: i32,
    /// Most pods.
    #[x_kube(validation = Rule::new("self >= 1 && self <= 1000").message("replicas.max must be between 1 and 1000"))]
    pub max: i32,
}

/// Blue-green model rollout.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RolloutSpec {
    /// Percentages of live traffic sent to the candidate, one step after another; strictly
    /// ascending and ending at 100 (full promotion).
    #[serde(default = "default_steps")]
    #[schemars(length(min = 1, max = 10))]
    #[x_kube(
        validation = Rule::new("self.all(s, s >= 1 && s <= 100)").message("rollout.steps must be percentages between 1 and 100"),
        validation = Rule::new("self.isSorted() && self.all(s, self.indexOf(s) == self.lastIndexOf(s))").message("rollout.steps must be strictly ascending, e.g. [10, 50, 100]"),
        // Guarded: the API server evaluates rules even when `minItems` already failed, and
        // `self[-1]` is then an evaluation error instead of an answer.
        validation = Rule::new("size(self) == 0 || self[size(self) - 1] == 100").message("rollout.steps must end at 100")
    )]
    pub steps: Vec<i32>,
    /// How long each traffic step lasts before the next, as a duration such as `30s`; at most
    /// `24h`.
    #[serde(default = "default_step_duration")]
    #[schemars(length(min = 1, max = 32))]
    #[x_kube(
        validation = Rule::new(DURATION_RULE).message("rollout.stepDuration must be a duration such as 30s, 5m or 1h"),
        validation = Rule::new(duration_at_most!("24h")).message("rollout.stepDuration must be at most 24h")
    )]
    pub step_duration: String,
    /// Shadow phase before any live traffic moves: requests are copied to the candidate and
    /// the outputs compared with the serving model's.
    #[serde(default)]
    pub shadow: ShadowSpec,
    /// Return all traffic to the serving color when the candidate fails (parity, errors).
    #[serde(default = "default_true")]
    pub auto_rollback: bool,
    /// How long the old color keeps running after promotion, for an instant rollback; at most
    /// `24h`.
    #[serde(default = "default_scale_down_delay")]
    #[schemars(length(min = 1, max = 32))]
    #[x_kube(
        validation = Rule::new(DURATION_RULE).message("rollout.scaleDownDelay must be a duration such as 30s, 5m or 1h"),
        validation = Rule::new(duration_at_most!("24h")).message("rollout.scaleDownDelay must be at most 24h")
    )]
    pub scale_down_delay: String,
    /// Stop the rollout moving forward: no traffic step and no promotion by the operator until
    /// this is false again (a candidate that becomes ready is still shadowed, which moves no
    /// traffic, and holds at the end of its shadow phase). Its failure checks keep running: a
    /// candidate that fails is rolled back (or halted) while paused. A `tandem.dev/promote` or
    /// `tandem.dev/abort` annotation still acts.
    #[serde(default)]
    pub paused: bool,
    /// Candidate pods started before any traffic moves (the candidate grows with its traffic
    /// share afterwards), so a swap needs `maxSurge` extra pods, not a second full copy.
    #[serde(default = "default_max_surge")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 100").message("rollout.maxSurge must be between 1 and 100"))]
    pub max_surge: i32,
    /// During traffic steps, the highest tolerated candidate error rate above the serving
    /// color's (0.01 = one percentage point).
    #[serde(default = "default_max_error_rate")]
    #[x_kube(validation = Rule::new("self >= 0.0 && self <= 1.0").message("rollout.maxErrorRate must be between 0 and 1"))]
    pub max_error_rate: f64,
    /// During traffic steps, the highest tolerated ratio of the candidate's p99 latency to the
    /// serving color's; 0 turns the latency check off.
    #[serde(default = "default_max_latency_ratio")]
    #[x_kube(validation = Rule::new("self == 0.0 || (self >= 1.0 && self <= 100.0)").message("rollout.maxLatencyRatio must be 0 (off) or between 1 and 100"))]
    pub max_latency_ratio: f64,
    /// How long candidate pods may take to load the model and become ready before the rollout
    /// fails (`ProgressDeadlineExceeded`); at most `24h`. Candidate pods that all crash-loop
    /// (none ready, each restarted at least 3 times, as a wrong URI or checksum makes them)
    /// fail it sooner, about a minute in (`CandidateCrashLoop`). A candidate that was ready and
    /// then has no ready pod gets as long again, from the loss, to have one
    /// (`CandidateUnavailable`).
    #[serde(default = "default_progress_deadline")]
    #[schemars(length(min = 1, max = 32))]
    #[x_kube(
        validation = Rule::new(DURATION_RULE).message("rollout.progressDeadline must be a duration such as 30s, 5m or 1h"),
        validation = Rule::new(duration_at_most!("24h")).message("rollout.progressDeadline must be at most 24h")
    )]
    pub progress_deadline: String,
}

impl Default for RolloutSpec {
    fn default() -> Self {
        Self {
            steps: default_steps(),
            step_duration: default_step_duration(),
            shadow: ShadowSpec::default(),
            auto_rollback: true,
            scale_down_delay: default_scale_down_delay(),
            paused: false,
            max_surge: default_max_surge(),
            max_error_rate: default_max_error_rate(),
            max_latency_ratio: default_max_latency_ratio(),
            progress_deadline: default_progress_deadline(),
        }
    }
}

/// Shadow comparison of candidate and serving outputs.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ShadowSpec {
    /// Requests to compare before moving live traffic; 0 skips the shadow phase.
    #[serde(default = "default_shadow_requests")]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 1000000").message("rollout.shadow.requests must be between 0 and 1000000"))]
    pub requests: i32,
    /// Highest tolerated fraction of compared requests whose outputs differ.
    #[serde(default = "default_max_mismatch_rate")]
    #[x_kube(validation = Rule::new("self >= 0.0 && self <= 1.0").message("rollout.shadow.maxMismatchRate must be between 0 and 1"))]
    pub max_mismatch_rate: f64,
    /// When two outputs count as equal.
    #[serde(default)]
    pub tolerance: Tolerance,
}

impl Default for ShadowSpec {
    fn default() -> Self {
        Self {
            requests: default_shadow_requests(),
            max_mismatch_rate: default_max_mismatch_rate(),
            tolerance: Tolerance::default(),
        }
    }
}

/// Output equality tolerance.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Tolerance {
    /// Smallest cosine similarity between the two output vectors that still counts as a match.
    #[serde(default = "default_cosine")]
    #[x_kube(validation = Rule::new("self >= -1.0 && self <= 1.0").message("rollout.shadow.tolerance.cosine must be between -1 and 1"))]
    pub cosine: f64,
    /// Largest absolute difference of any output element that still counts as a match
    /// (useful for logits); 0 turns this check off.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self >= 0.0").message("rollout.shadow.tolerance.maxAbsDiff must not be negative"))]
    pub max_abs_diff: f64,
    /// Classification: a compared request matches only when the top-1 class agrees.
    #[serde(default)]
    pub top1: bool,
}

impl Default for Tolerance {
    fn default() -> Self {
        Self {
            cosine: default_cosine(),
            max_abs_diff: 0.0,
            top1: false,
        }
    }
}

// ---- status ----

/// Observed state, written by the operator. Holds everything needed to resume after an
/// operator restart.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct InferencePipelineStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// One-word lifecycle summary; the conditions say why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// `Ready`, `Progressing` and `Degraded`, each with a reason and a message that explains it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The color whose inference pods serve live traffic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_color: Option<Color>,
    /// The model the active color serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_model: Option<ModelRef>,
    /// The rollout in progress, if any.
    // Boxed: most cached pipelines have none, and inline it is 352 of the status's 792 bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<Box<RolloutStatus>>,
    /// Pods of the preprocess stage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preprocess: Option<StageStatus>,
    /// Pods of the inference stage. `replicas` and `readyReplicas` count the active color's
    /// pods; while a rollout runs two colors, `desiredReplicas` is the total split between them
    /// and `queueDepth` covers both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inference: Option<StageStatus>,
    /// Human-readable summaries shown by `kubectl get ipl`, derived from the fields above.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<StatusSummary>,
}

// Lifecycle phase of a pipeline. A `//` comment, as on `TaintEffect`: the schema of an
// `Option` of this enum would show this text instead of the field's own.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Objects created, pods not ready yet.
    Pending,
    /// Pods are starting or being replaced.
    Progressing,
    /// Every stage has its desired pods ready.
    Ready,
    /// Something prevents pods from becoming ready; see the Degraded condition.
    Degraded,
    /// The spec cannot be served; see the Degraded condition. Fix the spec.
    Invalid,
}

// A Deployment color of the inference stage (`//`, as on `Phase`).
#[derive(
    JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord,
)]
#[serde(rename_all = "lowercase")]
pub enum Color {
    /// The first color of every pipeline.
    Blue,
    /// The other color.
    Green,
}

impl Color {
    /// The other color.
    pub fn other(self) -> Self {
        match self {
            Self::Blue => Self::Green,
            Self::Green => Self::Blue,
        }
    }

    /// Lowercase name, as used in object names and the `tandem.dev/color` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Blue => "blue",
            Self::Green => "green",
        }
    }
}

/// A model identity as recorded in status.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ModelRef {
    /// Model name.
    pub name: String,
    /// Model version.
    pub version: String,
    /// Weights URI.
    pub uri: String,
    /// Weights SHA-256.
    pub sha256: String,
}

impl ModelRef {
    /// Whether this is the model `m` names (every field equal), without copying it.
    pub fn is(&self, m: &ModelSpec) -> bool {
        self.name == m.name
            && self.version == m.version
            && self.uri == m.uri
            && self.sha256 == m.sha256
    }
}

impl From<&ModelSpec> for ModelRef {
    fn from(m: &ModelSpec) -> Self {
        Self {
            name: m.name.clone(),
            version: m.version.clone(),
            uri: m.uri.clone(),
            sha256: m.sha256.clone(),
        }
    }
}

/// State of a blue-green rollout. The operator resumes from here after a restart.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    /// Where the rollout stands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<RolloutPhase>,
    /// The color being brought up with the new model; absent once the rollout has ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate_color: Option<Color>,
    /// The model being rolled out (kept after the rollout ends, to say which one it was).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate_model: Option<ModelRef>,
    /// Index into `spec.rollout.steps` of the current traffic step; absent before the first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<i32>,
    /// Percentage of live traffic on the candidate model: 0 while it starts and shadows, the
    /// current step's share while traffic shifts, 100 once it is promoted (and after), 0 again
    /// after a rollback or an abort.
    #[serde(default)]
    pub traffic_percent: i32,
    /// When the rollout began.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    /// When the current phase (or traffic step) began.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_started_at: Option<Time>,
    /// Shadow comparison counters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ShadowStatus>,
    /// After promotion: the color that served before, kept running until
    /// `spec.rollout.scaleDownDelay` has passed so an undo is instant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_color: Option<Color>,
    /// After promotion: the model served before. Setting `spec.inference.model` back to it
    /// undoes the rollout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_model: Option<ModelRef>,
    /// The routing generation every ready preprocess pod has applied for this state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routes_generation: Option<i64>,
    /// Set when the rollout failed with `autoRollback: false`: it holds its traffic and waits
    /// for an abort, a promotion or a spec change.
    #[serde(default)]
    pub halted: bool,
    /// Set while a candidate that had been ready has no ready pod (it crashed, was evicted or
    /// its node went away) during shadowing or traffic steps: since then all live traffic is on
    /// the active color, the candidate's current step starts over once a pod is ready again,
    /// and the rollout fails (`CandidateUnavailable`) when this is older than
    /// `progressDeadline`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate_unavailable_since: Option<Time>,
    /// What is happening or what went wrong, with the numbers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

// Phase of a rollout (`//`, as on `Phase`).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum RolloutPhase {
    /// Candidate pods are starting and loading the model.
    Provisioning,
    /// Live requests are mirrored to the candidate and outputs compared; no live traffic moved.
    Shadowing,
    /// A share of live traffic (`trafficPercent`) runs on the candidate.
    ShiftingTraffic,
    /// The candidate is now the active color; the previous color runs until `scaleDownDelay`.
    Promoted,
    /// Done: the previous color is gone.
    Complete,
    /// The candidate failed and all traffic went back to the active color; see `message`.
    RolledBack,
    /// Stopped by a person (`tandem.dev/abort` annotation); all traffic is on the active color.
    Aborted,
}

impl RolloutPhase {
    /// Whether a candidate color is running in this phase.
    pub fn in_progress(self) -> bool {
        matches!(
            self,
            Self::Provisioning | Self::Shadowing | Self::ShiftingTraffic
        )
    }

    /// Name as written in status.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Provisioning => "Provisioning",
            Self::Shadowing => "Shadowing",
            Self::ShiftingTraffic => "ShiftingTraffic",
            Self::Promoted => "Promoted",
            Self::Complete => "Complete",
            Self::RolledBack => "RolledBack",
            Self::Aborted => "Aborted",
        }
    }
}

/// Shadow comparison counters, summed over the preprocess pods.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ShadowStatus {
    /// Requests compared so far.
    #[serde(default)]
    pub compared: i64,
    /// Compared requests whose outputs differed beyond the tolerance.
    #[serde(default)]
    pub mismatches: i64,
    /// Mirrored requests the candidate failed outright.
    #[serde(default)]
    pub errors: i64,
    /// Lowest cosine similarity seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worst_cosine: Option<f64>,
    /// Largest absolute element difference seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_abs_diff: Option<f64>,
}

/// Pod counts of one stage.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct StageStatus {
    /// Pods that exist.
    #[serde(default)]
    pub replicas: i32,
    /// Pods that pass their readiness probe.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Pods wanted, within `spec.<stage>.replicas`. The autoscaler writes this; the operator
    /// sizes the Deployment from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_replicas: Option<i32>,
    /// Requests queued or being worked on in the stage at the autoscaler's last poll (for
    /// inference: across both colors).
    #[serde(default)]
    pub queue_depth: i64,
    /// When the autoscaler last changed `desiredReplicas`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<Time>,
    /// Why it did, as one word: `ScaledUp`, `ScaledDown`, `ScaledToZero` or `ScaledFromZero`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_reason: Option<String>,
    /// The numbers behind the last change, e.g. `queue 48 > 16 per pod: 1 → 3 pods`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_message: Option<String>,
    /// Preprocess only: why the active model cannot take what the preprocess pods send, as
    /// they found it in the model's metadata (e.g. `input "input": sent as [N, 3, 320, 320],
    /// the model takes [-1, 3, 224, 224]`). Every request fails while it is set; the pipeline
    /// is Degraded with reason `ModelMismatch`. Cleared once the pods find that the model fits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_mismatch: Option<String>,
}

/// Strings for `kubectl get` columns.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct StatusSummary {
    /// Active model as `name:version`.
    pub model: String,
    /// Live traffic split, e.g. `blue 100%` or `blue 90% green 10%`.
    pub traffic: String,
    /// Ready/desired preprocess pods, e.g. `2/2`.
    pub preprocess: String,
    /// Ready/desired inference pods of the active color, e.g. `0/1`.
    pub inference: String,
    /// Requests queued across both stages.
    #[serde(default)]
    pub queue_depth: i64,
}

/// The CRD as YAML, exactly as committed in `crds/` (the drift test compares the two).
pub fn crd_yaml() -> Result<String, serde_yaml_ng::Error> {
    let mut crd = serde_yaml_ng::to_value(InferencePipeline::crd())?;
    for version in crd["spec"]["versions"]
        .as_sequence_mut()
        .into_iter()
        .flatten()
    {
        if let Some(schema) = version
            .get_mut("schema")
            .and_then(|s| s.get_mut("openAPIV3Schema"))
        {
            for_explain(schema);
        }
    }
    // serde_yaml is archived upstream; serde_yaml_ng is its maintained fork with the same API.
    serde_yaml_ng::to_string(&crd)
}

/// Makes a schema's descriptions read well in `kubectl explain`, which prints them as they are:
/// each paragraph on one line (doc comments are wrapped at 100 columns, and those breaks
/// showed up mid-sentence), and a field with a default says so at the end, since explain does
/// not show `default:` (Kubernetes 1.36).
fn for_explain(schema: &mut serde_yaml_ng::Value) {
    use serde_yaml_ng::Value;
    let Some(map) = schema.as_mapping_mut() else {
        return;
    };
    let mut text = map
        .get("description")
        .and_then(Value::as_str)
        .map(single_spaced)
        .unwrap_or_default();
    // An object whose every field carries the same default itself says nothing new (the
    // whole `rollout` default was a 280-character blob); one such as `replicas`, whose fields
    // have none of their own, does.
    let fields_carry_it = map
        .get("default")
        .and_then(Value::as_mapping)
        .is_some_and(|d| {
            d.iter().all(|(k, v)| {
                map.get("properties")
                    .and_then(|p| p.get(k))
                    .and_then(|f| f.get("default"))
                    == Some(v)
            })
        });
    if let Some(default) = map.get("default").filter(|_| !fields_carry_it) {
        // A string as itself (`2ms`), anything else as compact JSON (`[10,50,100]`).
        let default = match default.as_str() {
            Some(s) => s.to_owned(),
            None => serde_json::to_string(default).unwrap_or_default(),
        };
        let sep = if text.is_empty() { "" } else { " " };
        text = format!("{text}{sep}Defaults to `{default}`.");
    }
    if !text.is_empty() {
        map.insert("description".into(), Value::String(text));
    }
    for key in ["properties", "patternProperties"] {
        if let Some(props) = map.get_mut(key).and_then(Value::as_mapping_mut) {
            props.values_mut().for_each(for_explain);
        }
    }
    for key in ["items", "additionalProperties"] {
        if let Some(sub) = map.get_mut(key) {
            for_explain(sub);
        }
    }
}

/// Joins the lines of each paragraph with one space; blank lines still separate paragraphs.
fn single_spaced(text: &str) -> String {
    text.split("\n\n")
        .map(|para| {
            para.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join("\n\n")
}

fn default_true() -> bool {
    true
}
fn default_preprocess_replicas() -> ReplicaRange {
    ReplicaRange { min: 1, max: 8 }
}
fn default_inference_replicas() -> ReplicaRange {
    ReplicaRange { min: 1, max: 4 }
}
fn default_preprocess_target_queue_depth() -> i32 {
    16
}
fn default_inference_target_queue_depth() -> i32 {
    64
}
fn default_max_queue_depth() -> i32 {
    1024
}
fn default_text_max_length() -> i32 {
    256
}
fn default_top_k() -> i32 {
    5
}
fn default_max_batch_size() -> i32 {
    32
}
fn default_max_delay() -> String {
    "2ms".to_owned()
}
fn default_steps() -> Vec<i32> {
    vec![10, 50, 100]
}
fn default_step_duration() -> String {
    "30s".to_owned()
}
fn default_scale_down_delay() -> String {
    "5m".to_owned()
}
fn default_shadow_requests() -> i32 {
    500
}
fn default_max_mismatch_rate() -> f64 {
    0.01
}
fn default_cosine() -> f64 {
    0.999
}
fn default_max_surge() -> i32 {
    1
}
fn default_max_error_rate() -> f64 {
    0.01
}
fn default_max_latency_ratio() -> f64 {
    3.0
}
fn default_progress_deadline() -> String {
    "10m".to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resource_list_reads_and_writes_the_json_of_a_container_resource_map() {
        let json = serde_json::json!({"requests": {"memory": "64Mi", "cpu": "1000"}, "limits": {"nvidia.com/gpu": 2}});
        let r: Resources = serde_json::from_value(json).expect("decodes");
        assert_eq!(r.requests.get("cpu"), Some(&Quantity("1000".into())));
        assert_eq!(r.requests.get("memory"), Some(&Quantity("64Mi".into())));
        assert_eq!(r.requests.get("nvidia.com/gpu"), None);
        assert_eq!(r.limits.get("nvidia.com/gpu"), Some(&Quantity("2".into())));
        assert_eq!(
            serde_json::to_value(&r).expect("encodes"),
            serde_json::json!({"requests": {"cpu": "1000", "memory": "64Mi"}, "limits": {"nvidia.com/gpu": "2"}})
        );
        let k8s = ResourceRequirements::from(&r);
        assert_eq!(k8s.requests.as_ref().map(BTreeMap::len), Some(2));
        assert_eq!(
            k8s.limits.expect("limits")["nvidia.com/gpu"],
            Quantity("2".into())
        );
        // An empty list is left out, as in a container's resources.
        let only_limits: Resources =
            serde_json::from_value(serde_json::json!({"limits": {"cpu": "1"}})).expect("decodes");
        assert_eq!(
            serde_json::to_value(&only_limits).expect("encodes"),
            serde_json::json!({"limits": {"cpu": "1"}})
        );
        assert_eq!(ResourceRequirements::from(&only_limits).requests, None);
    }

    #[test]
    fn a_resource_list_is_a_map_of_quantities_integer_or_patterned_string() {
        let ours = schemars::SchemaGenerator::default().into_root_schema_for::<ResourceList>();
        assert_eq!(ours.get("type"), Some(&serde_json::json!("object")));
        let value = ours.get("additionalProperties").expect("values");
        assert_eq!(value["x-kubernetes-int-or-string"], true);
        assert_eq!(
            value["anyOf"],
            serde_json::json!([{"type": "integer"}, {"type": "string"}])
        );
        assert_eq!(value["pattern"], QUANTITY_PATTERN);
    }

    #[test]
    fn scheduling_reads_and_writes_the_json_of_a_pod_s_node_selector_and_tolerations() {
        let json = serde_json::json!({
            "nodeSelector": {"zone": "b", "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
            "tolerations": [
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                {"key": "maintenance", "value": "soon", "effect": "NoExecute", "tolerationSeconds": 60},
            ],
        });
        let s: Scheduling = serde_json::from_value(json.clone()).expect("decodes");
        // Sorted by key, as a pod's map is written.
        assert_eq!(
            s.node_selector.to_map().into_iter().collect::<Vec<_>>(),
            [
                (
                    "nvidia.com/gpu.product".to_owned(),
                    "NVIDIA-H100-80GB-HBM3".to_owned()
                ),
                ("zone".to_owned(), "b".to_owned())
            ]
        );
        assert_eq!(
            s.tolerations[1].operator,
            TolerationOperator::Equal,
            "the default"
        );
        let mut written = json;
        written["tolerations"][1]["operator"] = "Equal".into();
        assert_eq!(serde_json::to_value(&s).expect("encodes"), written);
        let k8s = k8s_openapi::api::core::v1::Toleration::from(&s.tolerations[1]);
        assert_eq!(
            serde_json::to_value(k8s).expect("encodes"),
            written["tolerations"][1]
        );
        // Nothing set, nothing written; and a stage without it pays one pointer.
        assert_eq!(
            serde_json::to_value(Scheduling::default()).expect("encodes"),
            serde_json::json!({})
        );
        let spec = crate::test_fixtures::text_pipeline().spec;
        let written = serde_json::to_value(&spec).expect("encodes");
        assert!(written["preprocess"].get("scheduling").is_none());
        assert!(written["inference"].get("scheduling").is_none());
        assert_eq!(std::mem::size_of::<Option<Box<Scheduling>>>(), 8);
    }

    #[test]
    fn scheduling_is_bounded_in_the_schema_of_both_stages() {
        let crd: serde_json::Value =
            serde_yaml_ng::from_str(&crd_yaml().expect("yaml")).expect("parses");
        let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
        for stage in ["preprocess", "inference"] {
            let s = &spec[stage]["properties"]["scheduling"]["properties"];
            let selector = &s["nodeSelector"];
            assert_eq!(selector["maxProperties"], 32, "{stage}");
            assert_eq!(selector["additionalProperties"]["maxLength"], 63, "{stage}");
            assert_eq!(
                selector["additionalProperties"]["pattern"], LABEL_VALUE_PATTERN,
                "{stage}"
            );
            assert!(
                selector["x-kubernetes-validations"][0]["rule"]
                    .as_str()
                    .is_some_and(|r| r.contains(LABEL_KEY_PATTERN) && r.contains("<= 317")),
                "{stage}"
            );
            assert_eq!(
                selector["x-kubernetes-validations"]
                    .as_array()
                    .map(Vec::len),
                Some(1),
                "{stage}: the key rule"
            );
            let tolerations = &s["tolerations"];
            assert_eq!(tolerations["maxItems"], 32, "{stage}");
            let t = &tolerations["items"];
            assert_eq!(t["properties"]["key"]["maxLength"], 317, "{stage}");
            assert_eq!(
                t["properties"]["key"]["pattern"], LABEL_KEY_PATTERN,
                "{stage}"
            );
            assert_eq!(
                t["properties"]["value"]["pattern"], LABEL_VALUE_PATTERN,
                "{stage}"
            );
            assert_eq!(t["properties"]["value"]["maxLength"], 63, "{stage}");
            assert_eq!(t["properties"]["operator"]["default"], "Equal", "{stage}");
            assert_eq!(
                t["x-kubernetes-validations"].as_array().map(Vec::len),
                Some(3),
                "{stage}: key or Exists, no value with Exists, seconds only with NoExecute"
            );
        }
    }

    #[test]
    fn crd_descriptions_are_single_spaced_paragraphs_that_name_their_defaults() {
        let crd: serde_json::Value =
            serde_yaml_ng::from_str(&crd_yaml().expect("yaml")).expect("parses");
        let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
        let steps = spec["rollout"]["properties"]["steps"]["description"]
            .as_str()
            .expect("steps");
        assert_eq!(
            steps,
            "Percentages of live traffic sent to the candidate, one step after another; strictly \
             ascending and ending at 100 (full promotion). Defaults to `[10,50,100]`."
        );
        assert!(
            spec["inference"]["properties"]["device"]["description"]
                .as_str()
                .is_some_and(|d| d.ends_with("each. Defaults to `CUDA`.")),
            "{}",
            spec["inference"]["properties"]["device"]
        );
        // Everywhere: no line break inside a paragraph, and every default named.
        fn check(s: &serde_json::Value, path: &str) {
            let d = s["description"].as_str().unwrap_or_default();
            assert!(
                !d.replace("\n\n", "").contains('\n'),
                "{path}: a line break inside a paragraph: {d:?}"
            );
            let own = s["default"].as_object().is_some_and(|d| {
                d.iter()
                    .all(|(k, v)| s["properties"][k.as_str()]["default"] == *v)
            });
            if !s["default"].is_null() && !own {
                assert!(
                    d.contains("Defaults to `"),
                    "{path}: default not named: {d:?}"
                );
            }
            for (name, sub) in s["properties"].as_object().into_iter().flatten() {
                check(sub, &format!("{path}.{name}"));
            }
            check_opt(&s["items"], &format!("{path}[]"));
            check_opt(&s["additionalProperties"], &format!("{path}{{}}"));
        }
        fn check_opt(s: &serde_json::Value, path: &str) {
            if s.is_object() {
                check(s, path);
            }
        }
        check(&crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"], "");
        // Paragraphs stay apart, lines within one are joined.
        assert_eq!(
            single_spaced("First line\nwraps here.\n\nSecond paragraph\n  too."),
            "First line wraps here.\n\nSecond paragraph too."
        );
    }

    #[test]
    fn a_model_ref_is_the_spec_it_came_from_and_no_spec_differing_in_any_field() {
        let spec = crate::test_fixtures::text_pipeline().spec.inference.model;
        let r = ModelRef::from(&spec);
        assert!(r.is(&spec));
        let edits: [fn(&mut ModelSpec); 4] = [
            |m| m.name.push('x'),
            |m| m.version.push('x'),
            |m| m.uri.push('x'),
            |m| m.sha256 = "0".repeat(64),
        ];
        for edit in edits {
            let mut other = spec.clone();
            edit(&mut other);
            assert!(!r.is(&other), "{other:?}");
            // The same verdict as comparing full copies, which `is` replaces on hot paths.
            assert_eq!(r.is(&other), r == ModelRef::from(&other));
        }
    }
}
