//! `config.json` (Hugging Face style, or Tandem's own `model_type`s for the
//! converted vision models) plus the optional sentence-transformers pooling
//! config → a validated [`Architecture`]. Pure: takes the file contents.

use serde::Deserialize;

/// Why a model's configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `config.json` is not valid JSON or misses a required field.
    #[error("config.json is invalid: {0}")]
    Parse(#[source] serde_json::Error),
    /// The pooling config is not valid JSON.
    #[error("1_Pooling/config.json is invalid: {0}")]
    PoolingParse(#[source] serde_json::Error),
    /// The architecture is not one this engine implements.
    #[error(
        "unsupported architecture: model_type {model_type:?}, architectures {architectures:?} \
         (supported: bert/BertModel, tandem-efficientnet-lite, tandem-resnet)"
    )]
    Unsupported {
        /// `model_type` from config.json.
        model_type: String,
        /// `architectures` from config.json.
        architectures: Vec<String>,
    },
    /// A field holds a value the implementation cannot run.
    #[error("unsupported config value: {0}")]
    Value(String),
}

/// BERT encoder hyper-parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct BertConfig {
    /// Hidden width (384 for MiniLM-L6).
    pub hidden_size: usize,
    /// Encoder layers.
    pub num_layers: usize,
    /// Attention heads; divides `hidden_size`.
    pub num_heads: usize,
    /// Feed-forward width.
    pub intermediate_size: usize,
    /// Vocabulary size (rows of the word embedding).
    pub vocab_size: usize,
    /// Longest sequence the position embedding covers.
    pub max_position_embeddings: usize,
    /// Token type vocabulary.
    pub type_vocab_size: usize,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f32,
    /// How token states become one sentence vector.
    pub pooling: Pooling,
}

/// Sentence pooling over the attention-masked tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// Mean of the unmasked token states (all-MiniLM-L6-v2).
    Mean,
    /// The `[CLS]` token state.
    Cls,
}

/// Image normalization applied by the engine to UINT8 input:
/// `(x / 255 - mean[c]) / std[c]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageNorm {
    /// Per-channel mean (RGB, 0..1 scale).
    pub mean: [f32; 3],
    /// Per-channel standard deviation.
    pub std: [f32; 3],
}

/// Image classifier hyper-parameters shared by the vision models.
#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    /// Square input size (224).
    pub image_size: usize,
    /// Classes (1000).
    pub num_classes: usize,
    /// BatchNorm epsilon used when folding BN into convs.
    pub bn_eps: f32,
    /// UINT8 input normalization.
    pub norm: ImageNorm,
}

/// A model architecture this crate can run.
#[derive(Debug, Clone, PartialEq)]
pub enum Architecture {
    /// BERT-family sentence embedding (`model_type: bert`).
    Bert(BertConfig),
    /// EfficientNet-Lite0 (`model_type: tandem-efficientnet-lite`, `variant: lite0`).
    EfficientNetLite0(VisionConfig),
    /// ResNet in torchvision layout (`model_type: tandem-resnet`, bottleneck `depths`).
    ResNet {
        /// Shared vision settings.
        vision: VisionConfig,
        /// Bottleneck blocks per stage (`[3, 4, 6, 3]` = ResNet-50).
        depths: [usize; 4],
    },
}

impl Architecture {
    /// A short human name for logs and status.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Bert(_) => "bert",
            Self::EfficientNetLite0(_) => "efficientnet-lite0",
            Self::ResNet { .. } => "resnet",
        }
    }
}

#[derive(Debug, Deserialize)]
struct RawConfig {
    #[serde(default)]
    model_type: String,
    #[serde(default)]
    architectures: Vec<String>,
    // BERT
    hidden_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    intermediate_size: Option<usize>,
    vocab_size: Option<usize>,
    max_position_embeddings: Option<usize>,
    type_vocab_size: Option<usize>,
    layer_norm_eps: Option<f32>,
    hidden_act: Option<String>,
    position_embedding_type: Option<String>,
    // Tandem vision
    variant: Option<String>,
    num_classes: Option<usize>,
    bn_eps: Option<f32>,
    image_size: Option<usize>,
    image_mean: Option<[f32; 3]>,
    image_std: Option<[f32; 3]>,
    depths: Option<Vec<usize>>,
}

#[derive(Debug, Deserialize)]
struct RawPooling {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
}

const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

fn need<T>(v: Option<T>, field: &str) -> Result<T, ConfigError> {
    v.ok_or_else(|| ConfigError::Value(format!("config.json lacks `{field}`")))
}

/// Parses `config.json` (and, for BERT, the optional `1_Pooling/config.json`;
/// without it pooling is mean, the sentence-transformers default).
pub fn parse(config_json: &str, pooling_json: Option<&str>) -> Result<Architecture, ConfigError> {
    let raw: RawConfig = serde_json::from_str(config_json).map_err(ConfigError::Parse)?;
    let is_bert = raw.model_type == "bert"
        || (raw.model_type.is_empty() && raw.architectures.iter().any(|a| a.starts_with("Bert")));
    match raw.model_type.as_str() {
        _ if is_bert => parse_bert(&raw, pooling_json).map(Architecture::Bert),
        "tandem-efficientnet-lite" => {
            let variant = raw.variant.as_deref().unwrap_or("lite0");
            if variant != "lite0" {
                return Err(ConfigError::Value(format!(
                    "efficientnet-lite variant {variant:?} (only lite0 is implemented)"
                )));
            }
            Ok(Architecture::EfficientNetLite0(vision(&raw, 1e-3)?))
        }
        "tandem-resnet" => {
            let depths = raw.depths.clone().unwrap_or_else(|| vec![3, 4, 6, 3]);
            let depths: [usize; 4] = depths.try_into().map_err(|d| {
                ConfigError::Value(format!("resnet depths {d:?} must have 4 stages"))
            })?;
            if depths.contains(&0) {
                return Err(ConfigError::Value(format!(
                    "resnet depths {depths:?} must be positive"
                )));
            }
            Ok(Architecture::ResNet {
                vision: vision(&raw, 1e-5)?,
                depths,
            })
        }
        _ => Err(ConfigError::Unsupported {
            model_type: raw.model_type.clone(),
            architectures: raw.architectures.clone(),
        }),
    }
}

fn vision(raw: &RawConfig, default_eps: f32) -> Result<VisionConfig, ConfigError> {
    let image_size = raw.image_size.unwrap_or(224);
    if image_size != 224 {
        return Err(ConfigError::Value(format!(
            "image_size {image_size} (only 224 is supported)"
        )));
    }
    let std = raw.image_std.unwrap_or(IMAGENET_STD);
    if std.iter().any(|s| *s <= 0.0 || !s.is_finite()) {
        return Err(ConfigError::Value(format!(
            "image_std {std:?} must be positive"
        )));
    }
    Ok(VisionConfig {
        image_size,
        num_classes: raw.num_classes.unwrap_or(1000),
        bn_eps: raw.bn_eps.unwrap_or(default_eps),
        norm: ImageNorm {
            mean: raw.image_mean.unwrap_or(IMAGENET_MEAN),
            std,
        },
    })
}

fn parse_bert(raw: &RawConfig, pooling_json: Option<&str>) -> Result<BertConfig, ConfigError> {
    if let Some(act) = &raw.hidden_act
        && act != "gelu"
    {
        return Err(ConfigError::Value(format!(
            "hidden_act {act:?} (only gelu is implemented)"
        )));
    }
    if let Some(p) = &raw.position_embedding_type
        && p != "absolute"
    {
        return Err(ConfigError::Value(format!(
            "position_embedding_type {p:?} (only absolute)"
        )));
    }
    let hidden_size = need(raw.hidden_size, "hidden_size")?;
    let num_heads = need(raw.num_attention_heads, "num_attention_heads")?;
    if num_heads == 0 || hidden_size % num_heads != 0 {
        return Err(ConfigError::Value(format!(
            "hidden_size {hidden_size} is not divisible by num_attention_heads {num_heads}"
        )));
    }
    let pooling = match pooling_json {
        None => Pooling::Mean,
        Some(text) => {
            let p: RawPooling = serde_json::from_str(text).map_err(ConfigError::PoolingParse)?;
            match (
                p.pooling_mode_mean_tokens,
                p.pooling_mode_cls_token,
                p.pooling_mode_max_tokens || p.pooling_mode_mean_sqrt_len_tokens,
            ) {
                (true, false, false) => Pooling::Mean,
                (false, true, false) => Pooling::Cls,
                _ => {
                    return Err(ConfigError::Value(
                        "pooling config: exactly one of mean or cls pooling is supported".into(),
                    ));
                }
            }
        }
    };
    Ok(BertConfig {
        hidden_size,
        num_layers: need(raw.num_hidden_layers, "num_hidden_layers")?,
        num_heads,
        intermediate_size: need(raw.intermediate_size, "intermediate_size")?,
        vocab_size: need(raw.vocab_size, "vocab_size")?,
        max_position_embeddings: raw.max_position_embeddings.unwrap_or(512),
        type_vocab_size: raw.type_vocab_size.unwrap_or(2),
        layer_norm_eps: raw.layer_norm_eps.unwrap_or(1e-12),
        pooling,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINILM: &str = r#"{"architectures":["BertModel"],"model_type":"bert","hidden_size":384,
        "num_hidden_layers":6,"num_attention_heads":12,"intermediate_size":1536,"vocab_size":30522,
        "max_position_embeddings":512,"type_vocab_size":2,"layer_norm_eps":1e-12,"hidden_act":"gelu"}"#;

    #[test]
    fn minilm_config_parses_as_bert_with_mean_pooling() {
        let arch = parse(MINILM, Some(r#"{"pooling_mode_mean_tokens": true}"#)).unwrap();
        let Architecture::Bert(c) = arch else {
            panic!("not bert")
        };
        assert_eq!((c.hidden_size, c.num_layers, c.num_heads), (384, 6, 12));
        assert_eq!(c.pooling, Pooling::Mean);
    }

    #[test]
    fn unknown_model_type_is_an_unsupported_architecture_naming_it() {
        let err = parse(
            r#"{"model_type":"gpt2","architectures":["GPT2LMHeadModel"]}"#,
            None,
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("unsupported architecture") && msg.contains("gpt2"),
            "{msg}"
        );
    }

    #[test]
    fn max_pooling_is_refused() {
        let err = parse(MINILM, Some(r#"{"pooling_mode_max_tokens": true}"#)).unwrap_err();
        assert!(err.to_string().contains("pooling"));
    }

    #[test]
    fn resnet_defaults_to_resnet50_depths() {
        let arch = parse(r#"{"model_type":"tandem-resnet"}"#, None).unwrap();
        assert!(matches!(
            arch,
            Architecture::ResNet {
                depths: [3, 4, 6, 3],
                ..
            }
        ));
    }

    #[test]
    fn non_json_config_is_a_parse_error() {
        assert!(matches!(
            parse("not json", None),
            Err(ConfigError::Parse(_))
        ));
    }
}
