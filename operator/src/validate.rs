//! Turns an `InferencePipeline` into a [`ValidatedPipeline`] once, so builders never re-check.
//!
//! The API server already enforces the CRD's schema and CEL rules; this module repeats the checks
//! that builders depend on (an older CRD may be installed, or the object may predate a rule) and
//! parses strings such as durations into typed values. Pure: no I/O.

use std::time::Duration;

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};
use kube::ResourceExt;

use crate::crd::{
    Device, ImagePreprocess, InferencePipeline, MAX_PIPELINE_NAME_LEN, ModelSpec, ReplicaRange,
    TaintEffect, TextPreprocess, TolerationOperator,
};

/// Why a spec cannot be served. The `Display` text goes into the Degraded condition, so it
/// says what to change.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ValidateError {
    /// The object has no namespace (the CRD is namespaced, so only a malformed object lacks one).
    #[error("the pipeline has no namespace")]
    MissingNamespace,
    /// The object has no UID yet, so owner references cannot point at it.
    #[error("the pipeline has no metadata.uid")]
    MissingUid,
    /// The name is too long for derived object names.
    #[error(
        "metadata.name {name:?} is {len} characters; at most {MAX_PIPELINE_NAME_LEN} fit derived names such as <name>-inference-green"
    )]
    NameTooLong {
        /// The offending name.
        name: String,
        /// Its length.
        len: usize,
    },
    /// Neither or both of `preprocess.text` and `preprocess.image` are set.
    #[error("preprocess must set exactly one of text or image")]
    PreprocessInput,
    /// `min > max`, or out of bounds.
    #[error(
        "{stage}.replicas must satisfy 0 <= min <= max and max >= 1 (got min {min}, max {max})"
    )]
    ReplicaRange {
        /// `preprocess` or `inference`.
        stage: &'static str,
        /// Given minimum.
        min: i32,
        /// Given maximum.
        max: i32,
    },
    /// The preprocess stage is the front door and cannot scale to zero.
    #[error(
        "preprocess.replicas.min must be at least 1: the preprocess stage cannot scale to zero"
    )]
    PreprocessScaleToZero,
    /// A count that must be positive is not.
    #[error("{field} must be at least 1 (got {value})")]
    NotPositive {
        /// Field path.
        field: &'static str,
        /// Given value.
        value: i64,
    },
    /// `preprocess.text.maxLength` leaves no room for a token beside the tokenizer's special
    /// tokens (the worker refuses such a config at start).
    #[error(
        "preprocess.text.maxLength must be at least 2: the special tokens the tokenizer adds take two (got {0})"
    )]
    MaxLengthTooShort(i32),
    /// A target queue depth above the maximum can never be reached.
    #[error("{stage}.targetQueueDepth ({target}) must not exceed {stage}.maxQueueDepth ({max})")]
    TargetAboveMax {
        /// `preprocess` or `inference`.
        stage: &'static str,
        /// Given target.
        target: i32,
        /// Given maximum.
        max: i32,
    },
    /// A URI with a scheme the workers cannot fetch.
    #[error("{field} must be a file://, http:// or https:// URI (got {value:?})")]
    UriScheme {
        /// Field path.
        field: &'static str,
        /// Given value.
        value: String,
    },
    /// A URI that is only its scheme, or an `http(s)://` URI without a host.
    #[error("{field} names no {what} after {scheme} (got {value:?})")]
    UriIncomplete {
        /// Field path.
        field: &'static str,
        /// The scheme it starts with.
        scheme: &'static str,
        /// What is missing: `path` for `file://`, `host` for `http(s)://`.
        what: &'static str,
        /// Given value.
        value: String,
    },
    /// A resource amount that is not a Kubernetes quantity.
    #[error("{field}.{resource} must be a quantity such as 500m, 2 or 1Gi (got {value:?})")]
    Quantity {
        /// `preprocess.resources.requests` and so on.
        field: String,
        /// The resource name.
        resource: String,
        /// Given value.
        value: String,
    },
    /// A node selector key or toleration key that is not a label key (the pod would be refused).
    #[error(
        "{field} must be a label key such as nvidia.com/gpu.product: an optional DNS subdomain and '/', then at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit (got {value:?})"
    )]
    LabelKey {
        /// `inference.scheduling.nodeSelector key` and so on.
        field: String,
        /// Given key.
        value: String,
    },
    /// A node selector value or toleration value that is not a label value.
    #[error(
        "{field} must be a label value: at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit (got {value:?})"
    )]
    LabelValue {
        /// `inference.scheduling.nodeSelector["zone"]` and so on.
        field: String,
        /// Given value.
        value: String,
    },
    /// A toleration that breaks one of the CRD's toleration rules.
    #[error("{field}: {rule}")]
    Toleration {
        /// `inference.scheduling.tolerations[0]` and so on.
        field: String,
        /// The rule's message, as the CRD gives it.
        rule: &'static str,
    },
    /// Not a SHA-256 hex digest.
    #[error("inference.model.sha256 must be exactly 64 hexadecimal characters")]
    Sha256,
    /// An unparsable duration.
    #[error("{field} must be a duration such as 2ms, 30s or 5m (got {value:?})")]
    Duration {
        /// Field path.
        field: &'static str,
        /// Given value.
        value: String,
    },
    /// A duration above its field's bound (or too long to represent at all).
    #[error("{field} must be at most {max} (got {value:?})")]
    DurationTooLong {
        /// Field path.
        field: &'static str,
        /// The bound, as the CRD writes it.
        max: &'static str,
        /// Given value.
        value: String,
    },
    /// Rollout steps not strictly ascending, out of range or not ending at 100.
    #[error(
        "rollout.steps must be strictly ascending percentages between 1 and 100 ending at 100 (got {0:?})"
    )]
    Steps(Vec<i32>),
    /// Normalization vectors of different lengths or a non-positive std.
    #[error("preprocess.image.normalize needs 3 mean and 3 std values (R, G, B), std positive")]
    Normalize,
}

/// The input side of the preprocess stage.
#[derive(Clone, Debug, PartialEq)]
pub enum Input {
    /// Tokenize text.
    Text(TextPreprocess),
    /// Decode and resize images.
    Image(ImagePreprocess),
}

/// Replica bounds after validation: `min <= max`, `max >= 1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Replicas {
    /// Fewest pods.
    pub min: i32,
    /// Most pods.
    pub max: i32,
}

impl Replicas {
    /// The pod count to run for a desired count from status (written by the autoscaler):
    /// clamped into the bounds, the minimum when nothing is desired yet.
    pub fn clamp(self, desired: Option<i32>) -> i32 {
        desired.unwrap_or(self.min).clamp(self.min, self.max)
    }
}

/// The preprocess stage, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidPreprocess {
    /// Text or image input.
    pub input: Input,
    /// Pod bounds (`min >= 1`).
    pub replicas: Replicas,
    /// Autoscaler target per pod.
    pub target_queue_depth: u32,
    /// Admission bound per pod.
    pub max_queue_depth: u32,
    /// Pod resources as given.
    pub resources: Option<ResourceRequirements>,
    /// Node selector and tolerations as given.
    pub scheduling: PodScheduling,
}

/// The inference stage, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidInference {
    /// The model in the spec (the rollout target).
    pub model: ModelSpec,
    /// Compute device.
    pub device: Device,
    /// Largest batch.
    pub max_batch_size: u32,
    /// Batching window.
    pub max_delay: Duration,
    /// Pod bounds per color.
    pub replicas: Replicas,
    /// Autoscaler target per pod.
    pub target_queue_depth: u32,
    /// Admission bound per pod.
    pub max_queue_depth: u32,
    /// Pod resources as given.
    pub resources: Option<ResourceRequirements>,
    /// Node selector and tolerations as given.
    pub scheduling: PodScheduling,
}

/// A stage's `scheduling` as the pod spec's fields: `None` where the spec sets nothing, so a
/// pipeline without it builds the pod spec it built before the field existed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PodScheduling {
    /// The pod's `nodeSelector`.
    pub node_selector: Option<BTreeMap<String, String>>,
    /// The pod's `tolerations`.
    pub tolerations: Option<Vec<Toleration>>,
}

/// The rollout policy, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidRollout {
    /// Strictly ascending percentages ending at 100.
    pub steps: Vec<u8>,
    /// Duration of each step.
    pub step_duration: Duration,
    /// Requests to shadow-compare; 0 skips shadowing.
    pub shadow_requests: u32,
    /// Highest tolerated mismatch fraction.
    pub max_mismatch_rate: f64,
    /// Cosine similarity threshold.
    pub cosine_tolerance: f64,
    /// Roll back automatically on failure.
    pub auto_rollback: bool,
    /// How long the old color lingers after promotion.
    pub scale_down_delay: Duration,
    /// Largest tolerated absolute element difference; 0 = unused.
    pub max_abs_diff: f64,
    /// Require top-1 agreement.
    pub top1: bool,
    /// Hold the rollout where it is.
    pub paused: bool,
    /// Candidate pods started before traffic moves (at least 1).
    pub max_surge: u32,
    /// Tolerated candidate error rate above the active color's.
    pub max_error_rate: f64,
    /// Tolerated candidate/active p99 ratio; 0 = unused.
    pub max_latency_ratio: f64,
    /// How long candidate pods may take to become ready.
    pub progress_deadline: Duration,
}

/// Identity of the pipeline object, for names, labels and owner references.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PipelineMeta {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.uid`.
    pub uid: String,
    /// `metadata.generation`.
    pub generation: Option<i64>,
}

/// A spec that builders can turn into objects without further checks.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidatedPipeline {
    /// Object identity.
    pub meta: PipelineMeta,
    /// Preprocess stage.
    pub preprocess: ValidPreprocess,
    /// Inference stage.
    pub inference: ValidInference,
    /// Rollout policy.
    pub rollout: ValidRollout,
}

/// A stage's resources, each amount checked to be a quantity (the API server would refuse
/// the Deployment with a message about the Deployment, not the pipeline).
fn resources(
    stage: &str,
    r: Option<&crate::crd::Resources>,
) -> Result<Option<ResourceRequirements>, ValidateError> {
    let Some(r) = r else { return Ok(None) };
    for (kind, list) in [("requests", &r.requests), ("limits", &r.limits)] {
        for (resource, q) in list.to_map() {
            if !is_quantity(&q.0) {
                return Err(ValidateError::Quantity {
                    field: format!("{stage}.resources.{kind}"),
                    resource,
                    value: q.0,
                });
            }
        }
    }
    Ok(Some(ResourceRequirements::from(r)))
}

/// A stage's scheduling as pod spec fields, each label and toleration checked as the CRD does
/// (the API server would refuse the Deployment with a message about the Deployment, not the
/// pipeline).
fn scheduling(
    stage: &str,
    s: Option<&crate::crd::Scheduling>,
) -> Result<PodScheduling, ValidateError> {
    let Some(s) = s else {
        return Ok(PodScheduling::default());
    };
    let node_selector = s.node_selector.to_map();
    for (key, value) in &node_selector {
        if !is_label_key(key) {
            return Err(ValidateError::LabelKey {
                field: format!("{stage}.scheduling.nodeSelector key"),
                value: key.clone(),
            });
        }
        if !is_label_value(value) {
            return Err(ValidateError::LabelValue {
                field: format!("{stage}.scheduling.nodeSelector[{key:?}]"),
                value: value.clone(),
            });
        }
    }
    for (i, t) in s.tolerations.iter().enumerate() {
        let field = format!("{stage}.scheduling.tolerations[{i}]");
        let exists = t.operator == TolerationOperator::Exists;
        let value = t.value.as_deref().unwrap_or_default();
        let rule = match &t.key {
            Some(key) if !is_label_key(key) => {
                return Err(ValidateError::LabelKey {
                    field: format!("{field}.key"),
                    value: key.clone(),
                });
            }
            None if !exists => Some(crate::crd::TOLERATION_WITHOUT_KEY),
            _ if exists && !value.is_empty() => Some(crate::crd::TOLERATION_EXISTS_WITH_VALUE),
            _ if t.toleration_seconds.is_some() && t.effect != Some(TaintEffect::NoExecute) => {
                Some(crate::crd::TOLERATION_SECONDS_WITHOUT_NO_EXECUTE)
            }
            _ => None,
        };
        if let Some(rule) = rule {
            return Err(ValidateError::Toleration { field, rule });
        }
        if !is_label_value(value) {
            return Err(ValidateError::LabelValue {
                field: format!("{field}.value"),
                value: value.to_owned(),
            });
        }
    }
    Ok(PodScheduling {
        node_selector: (!node_selector.is_empty()).then_some(node_selector),
        tolerations: (!s.tolerations.is_empty())
            .then(|| s.tolerations.iter().map(Toleration::from).collect()),
    })
}

/// Whether `s` is a label key (a qualified name): an optional DNS subdomain of at most 253
/// characters and `/`, then a name of at most 63 — the CRD's [`crate::crd::LABEL_KEY_PATTERN`]
/// with the prefix's own bound.
pub fn is_label_key(s: &str) -> bool {
    let (prefix, name) = match s.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, s),
    };
    let dns_label = |l: &str| {
        l.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && l.starts_with(|c: char| c.is_ascii_alphanumeric())
            && l.ends_with(|c: char| c.is_ascii_alphanumeric())
    };
    let subdomain = |p: &str| p.len() <= 253 && p.split('.').all(dns_label);
    !name.is_empty() && is_label_value(name) && prefix.is_none_or(subdomain)
}

/// Whether `s` is a label value: empty, or at most 63 letters, digits, `-`, `_` and `.`,
/// starting and ending with a letter or digit ([`crate::crd::LABEL_VALUE_PATTERN`]).
pub fn is_label_value(s: &str) -> bool {
    s.is_empty()
        || (s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            && s.starts_with(|c: char| c.is_ascii_alphanumeric())
            && s.ends_with(|c: char| c.is_ascii_alphanumeric()))
}

/// Whether `s` is a Kubernetes quantity: a signed decimal number with an optional binary
/// (`Ki` … `Ei`), decimal (`n u m k M G T P E`) or exponent (`e3`, `E-2`) suffix — the CRD's
/// [`crate::crd::QUANTITY_PATTERN`].
pub fn is_quantity(s: &str) -> bool {
    fn number(s: &str) -> Option<&str> {
        let digits = |s: &str| s.bytes().take_while(u8::is_ascii_digit).count();
        let whole = digits(s);
        let rest = &s[whole..];
        let (frac, rest) = match rest.strip_prefix('.') {
            Some(r) => (digits(r), &r[digits(r)..]),
            None => (0, rest),
        };
        (whole + frac > 0).then_some(rest)
    }
    let unsigned = s.strip_prefix(['+', '-']).unwrap_or(s);
    let Some(suffix) = number(unsigned) else {
        return false;
    };
    match suffix {
        "" | "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei" | "n" | "u" | "m" | "k" | "M" | "G" | "T"
        | "P" | "E" => true,
        exp => exp
            .strip_prefix(['e', 'E'])
            .map(|e| e.strip_prefix(['+', '-']).unwrap_or(e))
            .and_then(number)
            .is_some_and(str::is_empty),
    }
}

/// Validates a pipeline, returning the first problem found.
pub fn validate(p: &InferencePipeline) -> Result<ValidatedPipeline, ValidateError> {
    let name = p.name_any();
    if name.len() > MAX_PIPELINE_NAME_LEN {
        return Err(ValidateError::NameTooLong {
            len: name.len(),
            name,
        });
    }
    let namespace = p.namespace().ok_or(ValidateError::MissingNamespace)?;
    let uid = p.uid().ok_or(ValidateError::MissingUid)?;
    let meta = PipelineMeta {
        name,
        namespace,
        uid,
        generation: p.metadata.generation,
    };

    let spec = &p.spec;
    let pre = &spec.preprocess;
    let input = match (&pre.text, &pre.image) {
        (Some(text), None) => {
            check_uri("preprocess.text.tokenizer", &text.tokenizer)?;
            if text.max_length < 2 {
                return Err(ValidateError::MaxLengthTooShort(text.max_length));
            }
            Input::Text(text.clone())
        }
        (None, Some(image)) => {
            positive("preprocess.image.resize.width", image.resize.width.into())?;
            positive("preprocess.image.resize.height", image.resize.height.into())?;
            positive("preprocess.image.topK", image.top_k.into())?;
            let n = &image.normalize;
            if n.mean.len() != 3
                || n.std.len() != 3
                || n.std.iter().any(|s| *s <= 0.0 || !s.is_finite())
                || n.mean.iter().any(|m| !m.is_finite())
            {
                return Err(ValidateError::Normalize);
            }
            Input::Image(image.clone())
        }
        _ => return Err(ValidateError::PreprocessInput),
    };
    let pre_replicas = replicas("preprocess", pre.replicas)?;
    if pre_replicas.min < 1 {
        return Err(ValidateError::PreprocessScaleToZero);
    }
    let preprocess = ValidPreprocess {
        input,
        replicas: pre_replicas,
        target_queue_depth: positive("preprocess.targetQueueDepth", pre.target_queue_depth.into())?,
        max_queue_depth: positive("preprocess.maxQueueDepth", pre.max_queue_depth.into())?,
        resources: resources("preprocess", pre.resources.as_ref())?,
        scheduling: scheduling("preprocess", pre.scheduling.as_deref())?,
    };
    target_within_max("preprocess", pre.target_queue_depth, pre.max_queue_depth)?;

    let inf = &spec.inference;
    check_uri("inference.model.uri", &inf.model.uri)?;
    if inf.model.sha256.len() != 64 || !inf.model.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ValidateError::Sha256);
    }
    target_within_max("inference", inf.target_queue_depth, inf.max_queue_depth)?;
    let inference = ValidInference {
        model: inf.model.clone(),
        device: inf.device,
        max_batch_size: positive(
            "inference.batching.maxBatchSize",
            inf.batching.max_batch_size.into(),
        )?,
        max_delay: duration("inference.batching.maxDelay", &inf.batching.max_delay, "1s")?,
        replicas: replicas("inference", inf.replicas)?,
        target_queue_depth: positive("inference.targetQueueDepth", inf.target_queue_depth.into())?,
        max_queue_depth: positive("inference.maxQueueDepth", inf.max_queue_depth.into())?,
        resources: resources("inference", inf.resources.as_ref())?,
        scheduling: scheduling("inference", inf.scheduling.as_deref())?,
    };

    let r = &spec.rollout;
    let rollout = ValidRollout {
        steps: steps(&r.steps)?,
        step_duration: duration("rollout.stepDuration", &r.step_duration, "24h")?,
        shadow_requests: u32::try_from(r.shadow.requests).map_err(|_| {
            ValidateError::NotPositive {
                field: "rollout.shadow.requests",
                value: r.shadow.requests.into(),
            }
        })?,
        max_mismatch_rate: r.shadow.max_mismatch_rate.clamp(0.0, 1.0),
        cosine_tolerance: r.shadow.tolerance.cosine.clamp(-1.0, 1.0),
        auto_rollback: r.auto_rollback,
        scale_down_delay: duration("rollout.scaleDownDelay", &r.scale_down_delay, "24h")?,
        max_abs_diff: r.shadow.tolerance.max_abs_diff.max(0.0),
        top1: r.shadow.tolerance.top1,
        paused: r.paused,
        max_surge: u32::try_from(r.max_surge.max(1)).unwrap_or(1),
        max_error_rate: r.max_error_rate.clamp(0.0, 1.0),
        max_latency_ratio: r.max_latency_ratio.max(0.0),
        progress_deadline: duration("rollout.progressDeadline", &r.progress_deadline, "24h")?,
    };

    Ok(ValidatedPipeline {
        meta,
        preprocess,
        inference,
        rollout,
    })
}

fn replicas(stage: &'static str, r: ReplicaRange) -> Result<Replicas, ValidateError> {
    if r.min < 0 || r.max < 1 || r.min > r.max {
        return Err(ValidateError::ReplicaRange {
            stage,
            min: r.min,
            max: r.max,
        });
    }
    Ok(Replicas {
        min: r.min,
        max: r.max,
    })
}

fn positive(field: &'static str, value: i64) -> Result<u32, ValidateError> {
    match u32::try_from(value) {
        Ok(v) if v >= 1 => Ok(v),
        _ => Err(ValidateError::NotPositive { field, value }),
    }
}

fn target_within_max(stage: &'static str, target: i32, max: i32) -> Result<(), ValidateError> {
    if target > max {
        return Err(ValidateError::TargetAboveMax { stage, target, max });
    }
    Ok(())
}

fn check_uri(field: &'static str, value: &str) -> Result<(), ValidateError> {
    // The same test as the CRD's URI rule: a path after file://, a host after http(s)://.
    for (scheme, what) in [
        ("file://", "path"),
        ("http://", "host"),
        ("https://", "host"),
    ] {
        if let Some(rest) = value.strip_prefix(scheme) {
            let named = !rest.is_empty() && (what == "path" || !rest.starts_with('/'));
            return if named {
                Ok(())
            } else {
                Err(ValidateError::UriIncomplete {
                    field,
                    scheme,
                    what,
                    value: value.to_owned(),
                })
            };
        }
    }
    Err(ValidateError::UriScheme {
        field,
        value: value.to_owned(),
    })
}

fn steps(steps: &[i32]) -> Result<Vec<u8>, ValidateError> {
    let invalid = || ValidateError::Steps(steps.to_vec());
    let ascending = steps.windows(2).all(|w| w[0] < w[1]);
    if !ascending || steps.last() != Some(&100) || steps.first().is_some_and(|s| *s < 1) {
        return Err(invalid());
    }
    steps
        .iter()
        .map(|s| u8::try_from(*s).map_err(|_| invalid()))
        .collect()
}

/// Parses a duration field and holds it to the CRD's bound `max` (a duration literal).
fn duration(
    field: &'static str,
    value: &str,
    max: &'static str,
) -> Result<Duration, ValidateError> {
    let too_long = || ValidateError::DurationTooLong {
        field,
        max,
        value: value.to_owned(),
    };
    match parse_duration(value) {
        Some(d) if parse_duration(max).is_some_and(|m| d <= m) => Ok(d),
        Some(_) => Err(too_long()),
        // Well-formed but past what a Duration holds: too long, not malformed.
        None if !value.is_empty()
            && value
                .bytes()
                .all(|b| b.is_ascii_digit() || b"mhs".contains(&b))
            && value.as_bytes()[0].is_ascii_digit()
            && parse_duration(&value.replace(|c: char| c.is_ascii_digit(), "0")).is_some() =>
        {
            Err(too_long())
        }
        None => Err(ValidateError::Duration {
            field,
            value: value.to_owned(),
        }),
    }
}

/// Parses the duration grammar the CRD accepts: one or more `<digits><unit>` with unit `ms`,
/// `s`, `m` or `h` (e.g. `1m30s`). `None` for anything else, including overflow.
pub fn parse_duration(s: &str) -> Option<Duration> {
    if s.is_empty() {
        return None;
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let value: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit_ms, len) = if rest.starts_with("ms") {
            (1u64, 2)
        } else if rest.starts_with('s') {
            (1_000, 1)
        } else if rest.starts_with('m') {
            (60_000, 1)
        } else if rest.starts_with('h') {
            (3_600_000, 1)
        } else {
            return None;
        };
        rest = &rest[len..];
        total = total.checked_add(Duration::from_millis(value.checked_mul(unit_ms)?))?;
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_fixtures::text_pipeline;

    #[test]
    fn quantities_follow_the_kubernetes_grammar() {
        for ok in [
            "1",
            "500m",
            "1Gi",
            "0.5",
            ".5",
            "1.",
            "+2",
            "-1",
            "1e3",
            "1E-2",
            "2.5e+1",
            "100k",
            "1E",
            "128974848",
        ] {
            assert!(is_quantity(ok), "{ok}");
        }
        for bad in [
            "lots", "", "1 Gi", "1gi", "1GiB", "e3", "1e", "1.2.3", "--1", "Gi",
        ] {
            assert!(!is_quantity(bad), "{bad}");
        }
        let pattern = regex::Regex::new(crate::crd::QUANTITY_PATTERN).unwrap();
        for s in [
            "1", "500m", "1Gi", ".5", "1e3", "1E", "lots", "1gi", "1e", "Gi", "1.2.3",
        ] {
            assert_eq!(
                is_quantity(s),
                pattern.is_match(s),
                "{s}: the CRD and the operator agree"
            );
        }
    }

    #[test]
    fn a_resource_amount_that_is_not_a_quantity_is_named_with_its_stage() {
        let mut p = text_pipeline();
        p.spec.inference.resources = Some(crate::crd::Resources {
            requests: [(
                "cpu",
                k8s_openapi::apimachinery::pkg::api::resource::Quantity("lots".into()),
            )]
            .into_iter()
            .collect(),
            ..Default::default()
        });
        assert_eq!(
            validate(&p).unwrap_err().to_string(),
            "inference.resources.requests.cpu must be a quantity such as 500m, 2 or 1Gi (got \"lots\")"
        );
    }

    #[test]
    fn scheduling_is_carried_into_its_own_stage_as_pod_spec_fields_and_none_when_empty() {
        let v = validate(&text_pipeline()).expect("valid");
        assert_eq!(v.preprocess.scheduling, PodScheduling::default());
        assert_eq!(v.inference.scheduling, PodScheduling::default());

        let mut p = text_pipeline();
        p.spec.inference.scheduling = Some(crate::test_fixtures::gpu_scheduling());
        p.spec.preprocess.scheduling = Some(Box::default());
        let v = validate(&p).expect("valid");
        assert_eq!(
            v.preprocess.scheduling,
            PodScheduling::default(),
            "an empty scheduling sets nothing"
        );
        let s = &v.inference.scheduling;
        assert_eq!(
            s.node_selector,
            Some(BTreeMap::from([(
                "nvidia.com/gpu.product".to_owned(),
                "NVIDIA-H100-80GB-HBM3".to_owned()
            )]))
        );
        assert_eq!(
            s.tolerations,
            Some(vec![Toleration {
                key: Some("nvidia.com/gpu".into()),
                operator: Some("Exists".into()),
                effect: Some("NoSchedule".into()),
                ..Toleration::default()
            }])
        );
    }

    #[test]
    fn a_label_or_toleration_the_crd_refuses_is_refused_naming_its_stage_and_place() {
        let with = |stage: &str, scheduling: serde_json::Value| {
            let mut p = text_pipeline();
            let s = Some(Box::new(
                serde_json::from_value(scheduling).expect("decodes"),
            ));
            match stage {
                "preprocess" => p.spec.preprocess.scheduling = s,
                _ => p.spec.inference.scheduling = s,
            }
            validate(&p).map(|_| ()).map_err(|e| e.to_string())
        };
        let cases = [
            (
                serde_json::json!({"nodeSelector": {"has space": "x"}}),
                r#"inference.scheduling.nodeSelector key must be a label key such as nvidia.com/gpu.product: an optional DNS subdomain and '/', then at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit (got "has space")"#,
            ),
            (
                serde_json::json!({"nodeSelector": {"zone": "a/b"}}),
                r#"inference.scheduling.nodeSelector["zone"] must be a label value: at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit (got "a/b")"#,
            ),
            (
                serde_json::json!({"tolerations": [{"operator": "Exists"}, {"value": "v"}]}),
                "inference.scheduling.tolerations[1]: a toleration without a key must have operator: Exists (it then tolerates every taint)",
            ),
            (
                serde_json::json!({"tolerations": [{"key": "k", "operator": "Exists", "value": "v"}]}),
                "inference.scheduling.tolerations[0]: a toleration with operator: Exists must not set a value: it matches every value of its key (use operator: Equal to match one value)",
            ),
            (
                serde_json::json!({"tolerations": [{"key": "k", "effect": "NoSchedule", "tolerationSeconds": 5}]}),
                "inference.scheduling.tolerations[0]: tolerationSeconds applies only to effect: NoExecute (how long a pod stays on a node after such a taint is added)",
            ),
            (
                serde_json::json!({"tolerations": [{"key": "-k"}]}),
                r#"inference.scheduling.tolerations[0].key must be a label key such as nvidia.com/gpu.product: an optional DNS subdomain and '/', then at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit (got "-k")"#,
            ),
            (
                serde_json::json!({"tolerations": [{"key": "k", "value": "v!"}]}),
                r#"inference.scheduling.tolerations[0].value must be a label value: at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit (got "v!")"#,
            ),
        ];
        for (scheduling, message) in cases {
            assert_eq!(
                with("inference", scheduling.clone()),
                Err(message.to_owned())
            );
            assert_eq!(
                with("preprocess", scheduling),
                Err(message.replacen("inference", "preprocess", 1))
            );
        }
        for ok in [
            serde_json::json!({"tolerations": [{"operator": "Exists"}]}),
            serde_json::json!({"tolerations": [{"key": "k", "operator": "Exists", "value": ""}]}),
            serde_json::json!({"tolerations": [{"key": "k", "effect": "NoExecute", "tolerationSeconds": 0}]}),
            serde_json::json!({"nodeSelector": {"zone": ""}}),
        ] {
            assert_eq!(with("inference", ok.clone()), Ok(()), "{ok}");
        }
    }

    #[test]
    fn label_keys_and_values_follow_the_kubernetes_grammar_and_the_crd_patterns() {
        let prefix = format!("{0}.{0}.{0}.{1}", "a".repeat(63), "b".repeat(61));
        assert_eq!(prefix.len(), 253);
        let longest = format!("{prefix}/{}", "c".repeat(63));
        let key = regex::Regex::new(crate::crd::LABEL_KEY_PATTERN).unwrap();
        let value = regex::Regex::new(crate::crd::LABEL_VALUE_PATTERN).unwrap();
        for ok in [
            "zone",
            "nvidia.com/gpu.product",
            "node-role.kubernetes.io/gpu",
            "Zone_1.a",
            longest.as_str(),
        ] {
            assert!(is_label_key(ok), "{ok}");
            assert!(key.is_match(ok), "{ok}: the CRD and the operator agree");
        }
        for bad in [
            "",
            "/gpu",
            "nvidia.com/",
            "Nvidia.com/gpu",
            "nvidia..com/gpu",
            "-nvidia.com/gpu",
            "a/b/c",
            "-zone",
            "zone.",
            "has space",
            &"n".repeat(64),
        ] {
            assert!(!is_label_key(bad), "{bad}");
            assert!(!key.is_match(bad), "{bad}: the CRD and the operator agree");
        }
        // Only the operator holds the prefix to 253 (the CRD bounds the whole key at 317).
        assert!(!is_label_key(&format!("a{prefix}/c")));
        for ok in ["", "a", "NVIDIA-H100-80GB-HBM3", "1.2_3", &"v".repeat(63)] {
            assert!(is_label_value(ok), "{ok}");
            assert!(value.is_match(ok), "{ok}: the CRD and the operator agree");
        }
        for bad in ["-a", "a-", "a/b", "with space", "v!", &"v".repeat(64)] {
            assert!(!is_label_value(bad), "{bad}");
            assert!(
                !value.is_match(bad),
                "{bad}: the CRD and the operator agree"
            );
        }
    }

    #[test]
    fn a_valid_text_pipeline_validates_with_parsed_durations() {
        let v = validate(&text_pipeline()).expect("valid");
        assert_eq!(v.meta.name, "minilm");
        assert_eq!(v.inference.max_delay, Duration::from_millis(2));
        assert_eq!(v.rollout.step_duration, Duration::from_secs(30));
        assert_eq!(v.rollout.scale_down_delay, Duration::from_secs(300));
        assert_eq!(v.rollout.steps, vec![10, 50, 100]);
        assert!(matches!(v.preprocess.input, Input::Text(_)));
    }

    #[test]
    fn a_text_max_length_below_two_is_rejected_as_the_worker_would_refuse_it() {
        let mut p = text_pipeline();
        if let Some(t) = p.spec.preprocess.text.as_mut() {
            t.max_length = 1;
        }
        let e = validate(&p).unwrap_err();
        assert_eq!(
            e.to_string(),
            "preprocess.text.maxLength must be at least 2: the special tokens the tokenizer adds take two (got 1)"
        );
        if let Some(t) = p.spec.preprocess.text.as_mut() {
            t.max_length = 2;
        }
        assert!(validate(&p).is_ok());
    }

    #[test]
    fn both_text_and_image_is_rejected() {
        let mut p = text_pipeline();
        p.spec.preprocess.image = Some(crate::test_fixtures::image_preprocess());
        assert_eq!(validate(&p), Err(ValidateError::PreprocessInput));
    }

    #[test]
    fn neither_text_nor_image_is_rejected() {
        let mut p = text_pipeline();
        p.spec.preprocess.text = None;
        assert_eq!(validate(&p), Err(ValidateError::PreprocessInput));
    }

    #[test]
    fn min_above_max_is_rejected_with_both_numbers() {
        let mut p = text_pipeline();
        p.spec.inference.replicas = ReplicaRange { min: 5, max: 2 };
        let err = validate(&p).unwrap_err();
        assert_eq!(
            err.to_string(),
            "inference.replicas must satisfy 0 <= min <= max and max >= 1 (got min 5, max 2)"
        );
    }

    #[test]
    fn preprocess_cannot_scale_to_zero_but_inference_can() {
        let mut p = text_pipeline();
        p.spec.inference.replicas = ReplicaRange { min: 0, max: 2 };
        assert!(validate(&p).is_ok());
        p.spec.preprocess.replicas = ReplicaRange { min: 0, max: 2 };
        assert_eq!(validate(&p), Err(ValidateError::PreprocessScaleToZero));
    }

    #[test]
    fn steps_must_ascend_strictly_and_end_at_100() {
        for bad in [
            vec![50, 10, 100],
            vec![10, 10, 100],
            vec![10, 50],
            vec![],
            vec![0, 100],
            vec![10, 101],
        ] {
            let mut p = text_pipeline();
            p.spec.rollout.steps = bad.clone();
            assert_eq!(validate(&p), Err(ValidateError::Steps(bad)));
        }
        let mut p = text_pipeline();
        p.spec.rollout.steps = vec![100];
        assert!(validate(&p).is_ok());
    }

    #[test]
    fn unknown_uri_schemes_are_rejected() {
        let mut p = text_pipeline();
        p.spec.inference.model.uri = "s3://bucket/model.safetensors".into();
        assert!(matches!(
            validate(&p),
            Err(ValidateError::UriScheme {
                field: "inference.model.uri",
                ..
            })
        ));
    }

    #[test]
    fn a_uri_that_is_only_its_scheme_is_rejected_saying_what_is_missing() {
        for (uri, message) in [
            (
                "file://",
                r#"inference.model.uri names no path after file:// (got "file://")"#,
            ),
            (
                "http://",
                r#"inference.model.uri names no host after http:// (got "http://")"#,
            ),
            (
                "https:///model.safetensors",
                r#"inference.model.uri names no host after https:// (got "https:///model.safetensors")"#,
            ),
        ] {
            let mut p = text_pipeline();
            p.spec.inference.model.uri = uri.into();
            let err = validate(&p).expect_err(uri);
            assert_eq!(err.to_string(), message);
        }
        let mut p = text_pipeline();
        p.spec.preprocess.text.as_mut().expect("text").tokenizer = "file://".into();
        assert!(matches!(
            validate(&p),
            Err(ValidateError::UriIncomplete {
                field: "preprocess.text.tokenizer",
                what: "path",
                ..
            })
        ));
        let mut p = text_pipeline();
        p.spec.inference.model.uri = "file:///m/model.safetensors".into();
        p.spec.preprocess.text.as_mut().expect("text").tokenizer =
            "https://h/tokenizer.json".into();
        assert!(validate(&p).is_ok());
    }

    #[test]
    fn sha256_must_be_64_hex_characters() {
        let mut p = text_pipeline();
        p.spec.inference.model.sha256 = "abc".into();
        assert_eq!(validate(&p), Err(ValidateError::Sha256));
        p.spec.inference.model.sha256 = "g".repeat(64);
        assert_eq!(validate(&p), Err(ValidateError::Sha256));
    }

    #[test]
    fn a_target_queue_depth_above_the_maximum_is_rejected() {
        let mut p = text_pipeline();
        p.spec.preprocess.target_queue_depth = 2000;
        assert!(matches!(
            validate(&p),
            Err(ValidateError::TargetAboveMax {
                stage: "preprocess",
                ..
            })
        ));
    }

    #[test]
    fn names_longer_than_47_characters_are_rejected() {
        let mut p = text_pipeline();
        p.metadata.name = Some("a".repeat(48));
        assert!(matches!(
            validate(&p),
            Err(ValidateError::NameTooLong { len: 48, .. })
        ));
    }

    #[test]
    fn durations_parse_compound_forms_and_reject_others() {
        assert_eq!(parse_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("2h"), Some(Duration::from_secs(7200)));
        for bad in ["", "5", "s", "1.5s", "1d", "-1s", "99999999999999999999h"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn durations_above_their_bound_are_rejected_with_the_bound() {
        let mut p = text_pipeline();
        p.spec.inference.batching.max_delay = "20s".into();
        assert_eq!(
            validate(&p).map(|_| ()).unwrap_err().to_string(),
            r#"inference.batching.maxDelay must be at most 1s (got "20s")"#
        );
        p.spec.inference.batching.max_delay = "1s".into();
        assert!(validate(&p).is_ok());
        p.spec.rollout.step_duration = "99999999999999999999h".into();
        assert_eq!(
            validate(&p).map(|_| ()).unwrap_err().to_string(),
            r#"rollout.stepDuration must be at most 24h (got "99999999999999999999h")"#
        );
        p.spec.rollout.step_duration = "24h".into();
        p.spec.rollout.scale_down_delay = "1441m".into();
        assert!(matches!(
            validate(&p),
            Err(ValidateError::DurationTooLong {
                field: "rollout.scaleDownDelay",
                ..
            })
        ));
        p.spec.rollout.scale_down_delay = "5x".into();
        assert!(matches!(validate(&p), Err(ValidateError::Duration { .. })));
    }

    #[test]
    fn clamp_uses_min_when_nothing_is_desired_and_stays_within_bounds() {
        let r = Replicas { min: 1, max: 4 };
        assert_eq!(r.clamp(None), 1);
        assert_eq!(r.clamp(Some(9)), 4);
        assert_eq!(r.clamp(Some(0)), 1);
        assert_eq!(r.clamp(Some(3)), 3);
    }
}
