//! A model directory → a ready [`Engine`]: verify the weights' digest, parse
//! `config.json` (+ pooling config), read the safetensors, build the engine for
//! the requested device. Every failure names what is wrong, for the operator.

use std::path::{Path, PathBuf};

use crate::config::{self, Architecture, ConfigError};
use crate::cpu::{CpuBuildError, CpuEngine};
use crate::engine::{Device, Engine};
use crate::source::{self, CONFIG_FILE, POOLING_FILE, SourceError};
use crate::spec::{InputKind, ModelSpec, TensorSpec};
use crate::tensor::DataType;
use crate::weights::{Weights, WeightsError};

/// Why a model could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A file is missing, unreadable, or fails its digest.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// `config.json` is missing.
    #[error("config.json not found beside the weights: {0}")]
    MissingConfig(PathBuf),
    /// The configuration is invalid or unsupported.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The weights do not match the architecture.
    #[error(transparent)]
    Weights(#[from] WeightsError),
    /// The CPU engine could not start.
    #[error(transparent)]
    Cpu(#[from] CpuBuildError),
    /// `device: cuda` was asked for but no usable GPU exists (and CPU fallback is off).
    #[error(
        "device cuda requested but unusable: {0} (pass --allow-cpu-fallback to run on CPU instead)"
    )]
    CudaUnavailable(String),
}

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Requested device.
    pub device: Device,
    /// Run on the CPU when CUDA is requested but unusable.
    pub allow_cpu_fallback: bool,
    /// CPU threads for the CPU engine.
    pub cpu_threads: usize,
    /// Datatype advertised for image inputs (FP32 or UINT8; the other is accepted too).
    pub image_input: DataType,
    /// Expected sha256 of the weights file.
    pub sha256: Option<String>,
    /// Where compiled GPU kernels are cached.
    pub kernel_cache_dir: Option<PathBuf>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            allow_cpu_fallback: false,
            cpu_threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            image_input: DataType::Fp32,
            sha256: None,
            kernel_cache_dir: None,
        }
    }
}

/// A loaded model and facts about how it was loaded.
pub struct Loaded {
    /// The engine, ready for batches.
    pub engine: Box<dyn Engine>,
    /// The architecture served.
    pub architecture: Architecture,
    /// Why the engine runs on the CPU although CUDA was asked for (fallback).
    pub fallback_reason: Option<String>,
}

/// The OIP v2 signature of an architecture.
pub fn spec_for(arch: &Architecture, image_input: DataType) -> ModelSpec {
    match arch {
        Architecture::Bert(c) => ModelSpec::bert(
            c.hidden_size,
            c.vocab_size,
            c.type_vocab_size,
            c.max_position_embeddings,
        ),
        Architecture::EfficientNetLite0(v) | Architecture::ResNet { vision: v, .. } => {
            let s = v.image_size as i64;
            let other = if image_input == DataType::Uint8 {
                DataType::Fp32
            } else {
                DataType::Uint8
            };
            let advertised = if image_input == DataType::Uint8 {
                DataType::Uint8
            } else {
                DataType::Fp32
            };
            ModelSpec {
                inputs: vec![TensorSpec::new("input", advertised, &[-1, 3, s, s])],
                outputs: vec![TensorSpec::new(
                    "logits",
                    DataType::Fp32,
                    &[-1, v.num_classes as i64],
                )],
                kind: InputKind::Fixed,
                also_accepts: vec![("input".to_owned(), other)],
                value_ranges: vec![],
                max_sequence_len: None,
            }
        }
    }
}

/// Reads and parses `dir/config.json` and, if present, `dir/1_Pooling/config.json`.
pub fn read_architecture(dir: &Path) -> Result<Architecture, LoadError> {
    let config_path = dir.join(CONFIG_FILE);
    let config_text = std::fs::read_to_string(&config_path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => LoadError::MissingConfig(config_path.clone()),
        _ => LoadError::Source(SourceError::Read {
            path: config_path.clone(),
            source: e,
        }),
    })?;
    let pooling_path = dir.join(POOLING_FILE);
    let pooling_text = match std::fs::read_to_string(&pooling_path) {
        Ok(t) => Some(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            return Err(SourceError::Read {
                path: pooling_path,
                source: e,
            }
            .into());
        }
    };
    Ok(config::parse(&config_text, pooling_text.as_deref())?)
}

/// Loads the model whose config lives in `dir` and weights in `weights`.
pub fn load_engine(dir: &Path, weights: &Path, opts: &LoadOptions) -> Result<Loaded, LoadError> {
    source::verify_sha256(weights, opts.sha256.as_deref())?;
    let architecture = read_architecture(dir)?;
    let bytes = std::fs::read(weights).map_err(|e| SourceError::Read {
        path: weights.to_path_buf(),
        source: e,
    })?;
    let w = Weights::from_bytes(&bytes)?;
    let spec = spec_for(&architecture, opts.image_input);
    let mut fallback_reason = None;
    if opts.device == Device::Cuda {
        match cuda_engine(&architecture, &spec, &bytes, opts) {
            Ok(engine) => {
                return Ok(Loaded {
                    engine,
                    architecture,
                    fallback_reason,
                });
            }
            Err(reason) if opts.allow_cpu_fallback => fallback_reason = Some(reason),
            Err(reason) => return Err(LoadError::CudaUnavailable(reason)),
        }
    }
    drop(bytes);
    let engine = CpuEngine::new(&architecture, spec, w, opts.cpu_threads)?;
    Ok(Loaded {
        engine: Box::new(engine),
        architecture,
        fallback_reason,
    })
}

#[cfg(feature = "cuda")]
fn cuda_engine(
    arch: &Architecture,
    spec: &ModelSpec,
    weights: &[u8],
    opts: &LoadOptions,
) -> Result<Box<dyn Engine>, String> {
    crate::cuda::CudaEngine::new(arch, spec.clone(), weights, opts.kernel_cache_dir.clone())
        .map(|e| Box::new(e) as Box<dyn Engine>)
        .map_err(|e| e.to_string())
}

#[cfg(not(feature = "cuda"))]
fn cuda_engine(
    _arch: &Architecture,
    _spec: &ModelSpec,
    _weights: &[u8],
    _opts: &LoadOptions,
) -> Result<Box<dyn Engine>, String> {
    Err("this build has no CUDA support (feature `cuda` of tandem-engine is off)".into())
}
