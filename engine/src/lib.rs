//! Model loading, inference engines and the dynamic batcher core. Knows
//! nothing about gRPC or Kubernetes.
//!
//! - [`source`]: model URIs (`file://`, `http(s)://`) → the files of a model,
//!   and sha256 verification (the download itself is the caller's I/O).
//! - [`config`]: `config.json` (+ pooling config) → a validated [`config::Architecture`].
//! - [`weights`]: safetensors → named f32 tensors with shape checks.
//! - [`load`]: a model directory → a ready [`Engine`] for a [`Device`].
//! - [`tensor`] / [`spec`]: the tensors an engine consumes and produces, and the
//!   OIP v2 metadata (names, datatypes, shapes) a model advertises.
//! - [`batch`]: joining requests into one batch (padding sequences) and splitting outputs.
//! - [`batcher`]: the dynamic batcher as a pure state machine (time is a parameter).
//! - [`runner`]: the engine thread fed by the batcher (queue, stats, drain).
//! - [`cpu`]: the CPU engine (gemm crate + our ops).
//! - `cuda`: the CUDA engine (cudarc; feature `cuda`).

pub mod batch;
pub mod batcher;
pub mod config;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod engine;
pub mod load;
pub mod runner;
pub mod source;
pub mod spec;
pub mod tensor;
pub mod weights;

pub use engine::{Device, Engine, EngineError};
pub use load::{LoadError, LoadOptions, load_engine};
pub use spec::{ModelSpec, TensorSpec};
pub use tensor::{DataType, Tensor, TensorData};
