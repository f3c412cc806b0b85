//! The synchronous engine trait every backend implements, and the device choice.

use crate::spec::ModelSpec;
use crate::tensor::Tensor;

/// Where a model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// CPU threads (gemm crate + our ops).
    Cpu,
    /// An NVIDIA GPU through cudarc.
    Cuda,
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Cpu => "cpu",
            Self::Cuda => "cuda",
        })
    }
}

/// Why a forward pass failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// The batch's tensors do not fit the model (bad ids, shapes, types).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The device failed (CUDA errors, out of memory...).
    #[error("device error: {0}")]
    Device(String),
    /// The engine panicked or broke its contract: a bug, answered as an error instead of
    /// ending the engine thread.
    #[error("engine failed: {0}")]
    Panic(String),
}

/// A loaded model that runs whole batches, synchronously, on the thread that
/// calls it. Inputs arrive in [`ModelSpec::inputs`] order, already joined into
/// one batch; outputs come back in [`ModelSpec::outputs`] order, one row per
/// input row.
pub trait Engine: Send {
    /// The model's OIP v2 signature.
    fn spec(&self) -> &ModelSpec;

    /// Runs one batch.
    fn forward(&mut self, inputs: &[Tensor]) -> Result<Vec<Tensor>, EngineError>;

    /// The device actually used.
    fn device(&self) -> Device {
        Device::Cpu
    }
}
