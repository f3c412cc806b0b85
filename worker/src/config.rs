//! The preprocess worker's pipeline configuration: the YAML/JSON file the
//! operator renders into a ConfigMap (path via `--config` / `TANDEM_CONFIG`).
//!
//! The schema mirrors the `InferencePipeline` CRD's `spec.preprocess` plus the
//! model and post-processing facts the worker needs. Field names are camelCase;
//! unknown fields are rejected so a typo fails at start, not silently.
//! `docs/worker-config.md` documents every field; `worker/examples/*.yaml` are
//! checked by tests.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Errors loading or validating the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("read config file {path}")]
    Read {
        /// Path tried.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid YAML/JSON for the schema.
    #[error("parse config file {path}")]
    Parse {
        /// Path tried.
        path: String,
        /// Cause.
        #[source]
        source: serde_yaml_ng::Error,
    },
    /// The values are inconsistent.
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// The whole pipeline configuration for one preprocess worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PipelineConfig {
    /// Pipeline name (the `InferencePipeline` object's name); used in logs.
    pub pipeline: String,
    /// The model clients address (OIP v2 model name/version).
    pub model: ModelRef,
    /// What to do to each request before inference.
    pub preprocess: Preprocess,
    /// What to do to inference outputs before answering (default: pass through).
    #[serde(default)]
    pub postprocess: Postprocess,
    /// Listening ports (defaults 8000/8001/9090/9091).
    #[serde(default)]
    pub ports: Ports,
    /// Admission, size and timing limits.
    #[serde(default)]
    pub limits: Limits,
    /// Static inference endpoints (`host:port`), for standalone use without the
    /// operator's routing table. When set, the worker is ready at once.
    #[serde(default)]
    pub inference_endpoints: Vec<String>,
}

/// Model name and version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ModelRef {
    /// Name clients use in `/v2/models/{name}`, and the default name sent to
    /// inference pods when the routing table names none.
    pub name: String,
    /// Version string (may be empty).
    #[serde(default)]
    pub version: String,
}

/// Exactly one of `text` or `image` (in the file: a map with one of the two
/// keys, as in the CRD's `spec.preprocess`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "PreprocessRepr", into = "PreprocessRepr")]
pub enum Preprocess {
    /// Tokenize UTF-8 text.
    Text(TextConfig),
    /// Decode, resize and normalize images.
    Image(ImageConfig),
}

/// The on-disk form of [`Preprocess`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PreprocessRepr {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    text: Option<TextConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    image: Option<ImageConfig>,
}

impl TryFrom<PreprocessRepr> for Preprocess {
    type Error = String;
    fn try_from(r: PreprocessRepr) -> Result<Self, String> {
        match (r.text, r.image) {
            (Some(t), None) => Ok(Self::Text(t)),
            (None, Some(i)) => Ok(Self::Image(i)),
            _ => Err("preprocess must set exactly one of `text` or `image`".into()),
        }
    }
}

impl From<Preprocess> for PreprocessRepr {
    fn from(p: Preprocess) -> Self {
        match p {
            Preprocess::Text(t) => Self {
                text: Some(t),
                image: None,
            },
            Preprocess::Image(i) => Self {
                text: None,
                image: Some(i),
            },
        }
    }
}

/// Text pipeline settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TextConfig {
    /// `tokenizer.json` location: a file path, a `file://` URL or an `http(s)://` URL.
    pub tokenizer: String,
    /// Sequences longer than this (in tokens, special tokens included) are truncated.
    pub max_length: usize,
}

/// Image pipeline settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ImageConfig {
    /// Output size and how the source is mapped onto it.
    pub resize: Resize,
    /// Per-channel normalization `(x/255 - mean) / std`; ignored for UINT8 output.
    #[serde(default)]
    pub normalize: Normalize,
    /// Tensor layout.
    #[serde(default)]
    pub layout: Layout,
    /// Tensor element type.
    #[serde(default)]
    pub dtype: ImageDtype,
    /// How far a JPEG may be scaled down while it is decoded.
    #[serde(default)]
    pub jpeg_draft: JpegDraft,
}

/// How far a JPEG may be downscaled while it is decoded (scaled inverse DCT:
/// the decoder reconstructs each 8×8 block at 4×4, 2×2 or 1×1, skipping the
/// colour conversion and resize work for pixels that would be thrown away).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum JpegDraft {
    /// Always decode at full size.
    Off,
    /// Scale down while the decoded crop keeps at least twice the output's
    /// pixels in each direction, so the antialiased resize after it still
    /// averages over ≥ 2 source pixels: quality close to a full decode. For
    /// a 1080p frame to 224×224 this decodes at 1/2 scale: 25–40 % less CPU
    /// than a full decode (PSNR 40.9 vs 41.3 dB against a Lanczos reference;
    /// docs/benchmarks.md).
    Quality,
    /// Pillow's `draft` rule: scale down while the decoded crop is at least
    /// as large as the output. For a 1080p frame to 224×224 this decodes at
    /// 1/4 scale: about half the CPU of a full decode, at the quality of
    /// Pillow's draft mode (PSNR 39.0 dB, the same as Pillow's; a full decode
    /// gives 41.3 dB; docs/benchmarks.md).
    #[default]
    Fast,
}

/// Output size and mapping.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Resize {
    /// Output width in pixels.
    pub width: u32,
    /// Output height in pixels.
    pub height: u32,
    /// How the source aspect ratio is handled.
    #[serde(default)]
    pub mode: ResizeMode,
    /// Resampling filter (both antialias when downscaling).
    #[serde(default)]
    pub filter: ResizeFilter,
}

/// How the source is mapped onto the output rectangle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum ResizeMode {
    /// Scale each axis independently to fill the output.
    Stretch,
    /// Scale to fit inside, keep aspect ratio, pad the rest with black, centered.
    FitPad,
    /// Scale to cover, keep aspect ratio, crop the overflow, centered.
    #[default]
    CenterCrop,
}

/// Resampling filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum ResizeFilter {
    /// Triangle filter (Pillow `BILINEAR`).
    #[default]
    Bilinear,
    /// Lanczos, a = 3 (Pillow `LANCZOS`).
    Lanczos3,
}

/// Per-channel normalization.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Normalize {
    /// Channel means (R, G, B) on the 0..1 scale.
    pub mean: [f32; 3],
    /// Channel standard deviations (R, G, B) on the 0..1 scale.
    pub std: [f32; 3],
}

impl Default for Normalize {
    /// ImageNet statistics.
    fn default() -> Self {
        Self {
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
        }
    }
}

/// Tensor layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Layout {
    /// `[N, 3, H, W]`.
    #[default]
    #[serde(rename = "NCHW")]
    Nchw,
    /// `[N, H, W, 3]`.
    #[serde(rename = "NHWC")]
    Nhwc,
}

/// Tensor element type sent to inference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum ImageDtype {
    /// Normalized floats.
    #[default]
    #[serde(rename = "FP32")]
    Fp32,
    /// Raw 0..255 pixels; normalization happens on the inference device.
    #[serde(rename = "UINT8")]
    Uint8,
}

/// Post-processing of inference outputs.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all_fields = "camelCase", deny_unknown_fields)]
pub enum Postprocess {
    /// Return inference outputs unchanged.
    #[default]
    None,
    /// `embedding` FP32 `[N, D]` passed through.
    Embedding,
    /// Softmax over `logits` `[N, C]`, top-k with labels.
    Classification {
        /// How many classes to return per item.
        #[serde(default = "default_top_k")]
        top_k: usize,
        /// Label source: `imagenet` (built in) or a file path with one label per line.
        #[serde(default)]
        labels: Option<String>,
    },
}

fn default_top_k() -> usize {
    5
}

/// Listening ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Ports {
    /// OIP v2 REST and health probes.
    pub http: u16,
    /// OIP v2 gRPC.
    pub grpc: u16,
    /// Prometheus `/metrics`.
    pub metrics: u16,
    /// `tandem.v1.WorkerControl` gRPC.
    pub control: u16,
}

impl Default for Ports {
    fn default() -> Self {
        Self {
            http: 8000,
            grpc: 8001,
            metrics: 9090,
            control: 9091,
        }
    }
}

/// Admission, size and timing limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Limits {
    /// Requests admitted at once (queued + in flight); beyond it
    /// `RESOURCE_EXHAUSTED` / HTTP 429.
    pub max_queue_depth: usize,
    /// Largest request body accepted, in bytes.
    pub max_request_bytes: usize,
    /// Bytes of request bodies received and held at once, over all requests (REST and gRPC);
    /// a request whose body does not fit is refused at once with `RESOURCE_EXHAUSTED` / 429.
    /// At least `maxRequestBytes`.
    pub max_request_bytes_in_flight: usize,
    /// Largest batch (N) accepted in one request.
    pub max_batch: usize,
    /// Largest decoded image, in pixels (width × height), checked from the header.
    pub max_image_pixels: u64,
    /// Requests held while no inference endpoint exists.
    pub max_held_requests: usize,
    /// How long a held request waits for an endpoint, in milliseconds.
    pub hold_timeout_ms: u64,
    /// Deadline for one call to an inference pod, in milliseconds.
    pub forward_timeout_ms: u64,
    /// CPU worker threads (0 = one per core).
    pub cpu_threads: usize,
}

impl Limits {
    /// The longest an accepted request may take: held for an endpoint until the hold timeout,
    /// then forwarded until the forward deadline. A draining worker waits this long.
    pub fn longest_request(&self) -> Duration {
        Duration::from_millis(self.hold_timeout_ms.saturating_add(self.forward_timeout_ms))
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_queue_depth: 1024,
            max_request_bytes: 64 << 20,
            max_request_bytes_in_flight: 256 << 20,
            max_batch: 256,
            max_image_pixels: 50_000_000,
            max_held_requests: 256,
            hold_timeout_ms: 60_000,
            forward_timeout_ms: 30_000,
            cpu_threads: 0,
        }
    }
}

impl PipelineConfig {
    /// Reads and validates a YAML (or JSON, a subset of YAML) file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { source, .. } => ConfigError::Parse {
                path: path.display().to_string(),
                source,
            },
            other => other,
        })
    }

    /// Parses and validates configuration text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let cfg: Self = serde_yaml_ng::from_str(text).map_err(|source| ConfigError::Parse {
            path: "<inline>".into(),
            source,
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the cross-field rules serde cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
        if self.model.name.is_empty() {
            return bad("model.name must not be empty");
        }
        match &self.preprocess {
            Preprocess::Text(t) => {
                if t.max_length < 2 {
                    return bad("preprocess.text.maxLength must be at least 2");
                }
                if t.tokenizer.is_empty() {
                    return bad("preprocess.text.tokenizer must not be empty");
                }
            }
            Preprocess::Image(i) => {
                let r = i.resize;
                if r.width == 0 || r.height == 0 || r.width > 8192 || r.height > 8192 {
                    return bad("preprocess.image.resize width and height must be in 1..=8192");
                }
                if i.normalize.std.iter().any(|s| !s.is_finite() || *s <= 0.0)
                    || i.normalize.mean.iter().any(|m| !m.is_finite())
                {
                    return bad("preprocess.image.normalize std must be > 0 and mean finite");
                }
            }
        }
        if let Postprocess::Classification { top_k, .. } = self.postprocess
            && top_k == 0
        {
            return bad("postprocess.topK must be at least 1");
        }
        if self.limits.max_queue_depth == 0 || self.limits.max_batch == 0 {
            return bad("limits.maxQueueDepth and limits.maxBatch must be at least 1");
        }
        let Limits {
            max_request_bytes: one,
            max_request_bytes_in_flight: all,
            ..
        } = self.limits;
        if all < one {
            return bad(&format!(
                "limits.maxRequestBytesInFlight ({all}) is less than limits.maxRequestBytes \
                 ({one}): no request of the largest size could ever be received; raise the \
                 first or lower the second"
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_committed_examples_parse_and_validate() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
        let mut n = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml") {
                PipelineConfig::load(&path).unwrap_or_else(|e| panic!("{}: {e:?}", path.display()));
                n += 1;
            }
        }
        assert!(n >= 2);
    }

    #[test]
    fn jpeg_draft_defaults_to_fast_and_names_its_three_policies() {
        let parse = |extra: &str| {
            let cfg = PipelineConfig::parse(&format!(
                "pipeline: p\nmodel: {{name: m}}\npreprocess:\n  image:\n    resize: {{width: 224, height: 224}}\n{extra}"
            ));
            cfg.map(|c| match c.preprocess {
                Preprocess::Image(i) => i.jpeg_draft,
                Preprocess::Text(_) => unreachable!("an image config"),
            })
        };
        assert_eq!(parse("").unwrap(), JpegDraft::Fast);
        assert_eq!(parse("    jpegDraft: Off\n").unwrap(), JpegDraft::Off);
        assert_eq!(
            parse("    jpegDraft: Quality\n").unwrap(),
            JpegDraft::Quality
        );
        let err = parse("    jpegDraft: Best\n").unwrap_err();
        let why = std::error::Error::source(&err).map(ToString::to_string);
        assert!(
            why.as_deref()
                .is_some_and(|w| w.contains("unknown variant `Best`")),
            "{why:?}"
        );
    }

    #[test]
    fn image_defaults_are_center_crop_bilinear_imagenet_nchw_fp32() {
        let cfg = PipelineConfig::parse(
            "pipeline: p\nmodel: {name: m}\npreprocess:\n  image:\n    resize: {width: 224, height: 224}\n",
        )
        .unwrap();
        let Preprocess::Image(img) = cfg.preprocess else {
            panic!()
        };
        assert_eq!(img.resize.mode, ResizeMode::CenterCrop);
        assert_eq!(img.resize.filter, ResizeFilter::Bilinear);
        assert_eq!(img.layout, Layout::Nchw);
        assert_eq!(img.dtype, ImageDtype::Fp32);
        assert_eq!(img.normalize, Normalize::default());
        assert_eq!(cfg.ports, Ports::default());
        assert_eq!(cfg.postprocess, Postprocess::None);
    }

    #[test]
    fn unknown_fields_and_bad_values_are_rejected() {
        assert!(PipelineConfig::parse("pipeline: p\nmodel: {name: m}\npreprocess: {text: {tokenizer: t, maxLength: 8, maxLen: 3}}\n").is_err());
        let err = PipelineConfig::parse(
            "pipeline: p\nmodel: {name: m}\npreprocess: {text: {tokenizer: t, maxLength: 1}}\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("maxLength"), "{err}");
    }

    #[test]
    fn a_budget_of_bytes_in_flight_smaller_than_one_request_is_refused_naming_both() {
        let text = |limits: &str| {
            format!(
                "pipeline: p\nmodel: {{name: m}}\npreprocess: {{text: {{tokenizer: t, maxLength: 8}}}}\nlimits: {{{limits}}}\n"
            )
        };
        let err = PipelineConfig::parse(&text(
            "maxRequestBytes: 2097152, maxRequestBytesInFlight: 1048576",
        ))
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid config: limits.maxRequestBytesInFlight (1048576) is less than \
             limits.maxRequestBytes (2097152): no request of the largest size could ever be \
             received; raise the first or lower the second"
        );
        let cfg = PipelineConfig::parse(&text(
            "maxRequestBytes: 2097152, maxRequestBytesInFlight: 2097152",
        ))
        .unwrap();
        assert_eq!(cfg.limits.max_request_bytes_in_flight, 2 << 20);
        let cfg = PipelineConfig::parse(&text("")).unwrap();
        assert_eq!(cfg.limits.max_request_bytes_in_flight, 256 << 20);
    }

    #[test]
    fn classification_postprocess_parses_with_labels_and_top_k() {
        let cfg = PipelineConfig::parse(
            "pipeline: p\nmodel: {name: m}\npreprocess: {text: {tokenizer: t, maxLength: 8}}\npostprocess: {kind: Classification, topK: 3, labels: imagenet}\n",
        )
        .unwrap();
        assert_eq!(
            cfg.postprocess,
            Postprocess::Classification {
                top_k: 3,
                labels: Some("imagenet".into())
            }
        );
    }
}
