//! The CUDA engine (cudarc 0.19; libcuda, cuBLAS and NVRTC loaded at run time,
//! so the binary builds and runs without CUDA installed).
//!
//! Status: device probing, kernel sources, the on-disk PTX cache, launch
//! configurations and the activation memory plan are implemented and their
//! host-side logic unit-tested (this project's CI has no GPU). The device
//! forward passes are not implemented yet: [`CudaEngine::new`] returns
//! [`CudaError::NotImplemented`] after a successful probe, so `--device cuda`
//! fails with a clear message (or falls back to the CPU when allowed).

pub mod kernels;
pub mod launch;
pub mod plan;
pub mod ptx_cache;

use std::path::PathBuf;

use crate::config::Architecture;
use crate::engine::{Device, Engine, EngineError};
use crate::spec::ModelSpec;
use crate::tensor::Tensor;

/// Why the CUDA engine is unusable.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// A CUDA library could not be loaded.
    #[error(
        "{0} not found (is the NVIDIA driver / CUDA 13 runtime installed and on LD_LIBRARY_PATH?)"
    )]
    LibraryMissing(&'static str),
    /// The driver refused (no device, driver too old...).
    #[error("CUDA driver error: {0}")]
    Driver(String),
    /// The architecture has no CUDA forward pass yet.
    #[error("the CUDA forward pass for {0} is not implemented yet")]
    NotImplemented(&'static str),
}

/// Checks that the driver, NVRTC and cuBLAS libraries can be loaded, without
/// panicking (cudarc panics on first use of a missing library).
pub fn probe_libraries() -> Result<(), CudaError> {
    // SAFETY: these only try to dlopen the libraries and report success.
    unsafe {
        if !cudarc::driver::sys::is_culib_present() {
            return Err(CudaError::LibraryMissing("libcuda (NVIDIA driver)"));
        }
        if !cudarc::nvrtc::sys::is_culib_present() {
            return Err(CudaError::LibraryMissing("libnvrtc"));
        }
        if !cudarc::cublas::sys::is_culib_present() {
            return Err(CudaError::LibraryMissing("libcublas"));
        }
    }
    Ok(())
}

/// A model on an NVIDIA GPU.
pub struct CudaEngine {
    spec: ModelSpec,
    _ctx: std::sync::Arc<cudarc::driver::CudaContext>,
}

impl CudaEngine {
    /// Probes the GPU and prepares `arch` on device 0.
    pub fn new(
        arch: &Architecture,
        spec: ModelSpec,
        kernel_cache_dir: Option<PathBuf>,
    ) -> Result<Self, CudaError> {
        probe_libraries()?;
        let ctx =
            cudarc::driver::CudaContext::new(0).map_err(|e| CudaError::Driver(e.to_string()))?;
        let _ = (&spec, kernel_cache_dir, &ctx);
        Err(CudaError::NotImplemented(arch.name()))
    }
}

impl Engine for CudaEngine {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn forward(&mut self, _inputs: &[Tensor]) -> Result<Vec<Tensor>, EngineError> {
        Err(EngineError::Device("CUDA forward not implemented".into()))
    }

    fn device(&self) -> Device {
        Device::Cuda
    }
}
