//! The CUDA engine (cudarc 0.19; libcuda, cuBLAS and NVRTC loaded at run time,
//! so the binary builds and runs without CUDA installed).
//!
//! Status: BERT (MiniLM, mean pooling) has a complete CUDA forward pass
//! ([`bert`]): weights uploaded once at load, cuBLAS GEMMs with the row-major
//! mapping of [`gemm`], the NVRTC kernels of [`kernels`] (compiled once per
//! source/options/arch and cached on disk by [`ptx_cache`]), launch
//! configurations from [`launch`] and activation buffers sized by [`plan`].
//! EfficientNet-Lite0 has one too ([`vision`]): BN folded on the host at
//! load, 1×1 convs as strided-batched GEMMs with a shared (stride-0) weight,
//! the stem as im2col + GEMM per image, depthwise conv, bias + ReLU6,
//! residual add and global average pooling kernels, the classifier as one
//! GEMM; UINT8 input is normalized on the host before the one upload (the
//! `u8_normalize` kernel is unused). ResNet and CLS pooling return
//! [`CudaError::NotImplemented`] at load (`--device cuda` fails clearly, or
//! runs on the CPU with `--allow-cpu-fallback`).
//!
//! # What is unverified
//!
//! **None of this has run on a GPU** (the machines this was written and
//! tested on have no NVIDIA GPU and no CUDA). Unit tests cover only host-side
//! logic: launch configurations, the row-major→column-major GEMM parameter
//! mapping (against a host emulation of cuBLAS semantics, including the
//! strided per-head views into the fused QKV buffer), the memory plan, input
//! validation and packing, conv output sizes and the 1×1-conv GEMM
//! parameters, PTX cache keys, and that every kernel name is defined in the
//! source. Unverified, in particular:
//! - that the driver loads the PTX and `load_module`/`load_function` find every
//!   entry point. (NVRTC itself does compile [`kernels::SOURCE`]: `scripts/test.sh`
//!   runs `engine/examples/nvrtc_check.rs` with NVRTC 13.5 for compute 8.0–9.0 and
//!   checks the PTX's entry points);
//! - every kernel's numerics and indexing *on a GPU*. On the CPU they are
//!   checked: `tests/cuda-emu` compiles `kernels.cu` as C++ with a stand-in
//!   for CUDA (an OS thread per CUDA thread, a barrier for `__syncthreads`),
//!   runs each kernel with the launch from [`launch`], and compares it with
//!   the CPU engine's op. Real warps, memory ordering, `__expf`'s reduced
//!   precision and the engine's argument passing at each call site are not
//!   covered by that;
//! - the cuBLAS calls themselves (`sgemm`, `sgemm_strided_batched` with
//!   offset views and batch strides), stream ordering and synchronization;
//! - agreement of [`bert::CudaBert`] embeddings with the CPU engine and the
//!   sentence-transformers fixtures (expected cosine ≥ 0.9999, not measured),
//!   and of [`vision::CudaEfficientNet`] logits with the CPU engine / PyTorch
//!   fixture (max |Δ| < 2e-3 expected, not measured);
//! - behaviour on out-of-memory, multi-threaded callers, and performance.
//!
//! The first GPU check to run: load all-MiniLM-L6-v2 and EfficientNet-Lite0
//! with `--device cuda` and compare against the `tests/python/inference`
//! fixtures as the CPU tests do.

pub mod bert;
pub mod gemm;
pub mod kernels;
pub mod launch;
pub mod plan;
pub mod ptx_cache;
pub mod vision;

use std::path::PathBuf;

use crate::config::Architecture;
use crate::engine::{Device, Engine, EngineError};
use crate::spec::ModelSpec;
use crate::tensor::{Tensor, TensorData};
use crate::weights::Weights;

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
    /// NVRTC could not compile the kernels.
    #[error("NVRTC compilation failed: {0}")]
    Compile(String),
    /// The weights do not fit the architecture.
    #[error("weights: {0}")]
    Weights(String),
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

/// NVRTC options for every compilation (part of the PTX cache key).
fn nvrtc_options(arch: (i32, i32)) -> Vec<String> {
    vec![
        format!("--gpu-architecture=compute_{}{}", arch.0, arch.1),
        "--std=c++17".into(),
    ]
}

/// Compiles [`kernels::SOURCE`] to PTX for the compute capability `arch` with NVRTC. Needs
/// only libnvrtc (no driver, no GPU), so the source can be checked on any machine that has it
/// (`engine/examples/nvrtc_check.rs`).
pub fn compile_kernels(arch: (i32, i32)) -> Result<cudarc::nvrtc::Ptx, CudaError> {
    // SAFETY: only tries to dlopen libnvrtc; cudarc panics on first use of a missing library.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(CudaError::LibraryMissing("libnvrtc"));
    }
    let opts = cudarc::nvrtc::CompileOptions {
        options: nvrtc_options(arch),
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(kernels::SOURCE, opts).map_err(|e| match e {
        cudarc::nvrtc::CompileError::CompileError { nvrtc, log, .. } => {
            CudaError::Compile(format!("{nvrtc:?}:\n{}", log.to_string_lossy()))
        }
        other => CudaError::Compile(other.to_string()),
    })
}

/// Loads the kernel module, compiling with NVRTC only when the PTX cache has
/// no entry for this source, these options and this device architecture.
pub fn load_kernels(
    ctx: &std::sync::Arc<cudarc::driver::CudaContext>,
    cache_dir: Option<&std::path::Path>,
) -> Result<std::sync::Arc<cudarc::driver::CudaModule>, CudaError> {
    let arch = ctx
        .compute_capability()
        .map_err(|e| CudaError::Driver(e.to_string()))?;
    let options = nvrtc_options(arch);
    let option_refs: Vec<&str> = options.iter().map(String::as_str).collect();
    let key = ptx_cache::key(kernels::SOURCE, arch, &option_refs);
    let cached = cache_dir.and_then(|d| ptx_cache::load(d, kernels::MODULE_NAME, &key));
    let ptx = match cached {
        Some(text) => cudarc::nvrtc::Ptx::from_src(text),
        None => {
            let ptx = compile_kernels(arch)?;
            if let Some(d) = cache_dir
                && let Err(e) = ptx_cache::store(d, kernels::MODULE_NAME, &key, &ptx.to_src())
            {
                tracing::warn!(error = %e, "PTX cache not written");
            }
            ptx
        }
    };
    ctx.load_module(ptx)
        .map_err(|e| CudaError::Driver(e.to_string()))
}

/// The model a [`CudaEngine`] runs.
enum Model {
    Bert(Box<bert::CudaBert>),
    EfficientNet(Box<(vision::CudaEfficientNet, crate::config::VisionConfig)>),
}

/// A model on an NVIDIA GPU.
pub struct CudaEngine {
    spec: ModelSpec,
    model: Model,
    _module: std::sync::Arc<cudarc::driver::CudaModule>,
    _ctx: std::sync::Arc<cudarc::driver::CudaContext>,
}

impl CudaEngine {
    /// Probes the GPU, compiles (or loads cached) kernels and uploads the
    /// weights of `arch` (safetensors bytes) to device 0.
    pub fn new(
        arch: &Architecture,
        spec: ModelSpec,
        weights: &[u8],
        kernel_cache_dir: Option<PathBuf>,
    ) -> Result<Self, CudaError> {
        if !matches!(
            arch,
            Architecture::Bert(_) | Architecture::EfficientNetLite0(_)
        ) {
            return Err(CudaError::NotImplemented(arch.name()));
        }
        if let Architecture::Bert(cfg) = arch
            && cfg.pooling != crate::config::Pooling::Mean
        {
            return Err(CudaError::NotImplemented("bert with CLS pooling"));
        }
        probe_libraries()?;
        let ctx =
            cudarc::driver::CudaContext::new(0).map_err(|e| CudaError::Driver(e.to_string()))?;
        let module = load_kernels(&ctx, kernel_cache_dir.as_deref())?;
        let w = Weights::from_bytes(weights).map_err(|e| CudaError::Weights(e.to_string()))?;
        let model = match arch {
            Architecture::Bert(cfg) => Model::Bert(Box::new(
                bert::CudaBert::load(cfg, w, &ctx, &module).map_err(|e| match e {
                    bert::BertLoadError::Cuda(c) => c,
                    bert::BertLoadError::Weights(w) => CudaError::Weights(w.to_string()),
                })?,
            )),
            Architecture::EfficientNetLite0(v) => Model::EfficientNet(Box::new((
                vision::CudaEfficientNet::load(v, w, &ctx, &module).map_err(|e| match e {
                    vision::VisionLoadError::Cuda(c) => c,
                    vision::VisionLoadError::Weights(w) => CudaError::Weights(w.to_string()),
                })?,
                v.clone(),
            ))),
            Architecture::ResNet { .. } => return Err(CudaError::NotImplemented(arch.name())),
        };
        Ok(Self {
            spec,
            model,
            _module: module,
            _ctx: ctx,
        })
    }
}

fn i64s<'a>(t: &'a Tensor, name: &str) -> Result<&'a [i64], EngineError> {
    match &t.data {
        TensorData::I64(v) => Ok(v),
        _ => Err(EngineError::InvalidInput(format!("{name} must be INT64"))),
    }
}

impl Engine for CudaEngine {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn forward(&mut self, inputs: &[Tensor]) -> Result<Vec<Tensor>, EngineError> {
        match &mut self.model {
            Model::Bert(m) => {
                let [ids, mask, types] = inputs else {
                    return Err(EngineError::InvalidInput(
                        "expected input_ids, attention_mask, token_type_ids".into(),
                    ));
                };
                let (n, l) = match ids.shape[..] {
                    [n, l] => (n, l),
                    _ => return Err(EngineError::InvalidInput("input_ids must be [N, L]".into())),
                };
                if mask.shape != ids.shape || types.shape != ids.shape {
                    return Err(EngineError::InvalidInput(
                        "input_ids, attention_mask and token_type_ids must have the same shape"
                            .into(),
                    ));
                }
                let out = m.forward(
                    i64s(ids, "input_ids")?,
                    i64s(mask, "attention_mask")?,
                    i64s(types, "token_type_ids")?,
                    n,
                    l,
                )?;
                Ok(vec![Tensor::f32(vec![n, m.hidden_size()], out)])
            }
            Model::EfficientNet(boxed) => {
                let (m, v) = &**boxed;
                let [x] = inputs else {
                    return Err(EngineError::InvalidInput("expected one image input".into()));
                };
                let s = v.image_size;
                let channels = crate::cpu::vision::CHANNELS;
                let n = x.rows();
                if x.shape != [n, channels, s, s] || !x.is_consistent() {
                    return Err(EngineError::InvalidInput(format!(
                        "input must be [N, 3, {s}, {s}], got {:?}",
                        x.shape
                    )));
                }
                let xf = crate::cpu::vision::to_f32(&x.data, &v.norm, s * s);
                let out = m.forward(&xf, n)?;
                Ok(vec![Tensor::f32(vec![n, m.num_classes()], out)])
            }
        }
    }

    fn device(&self) -> Device {
        Device::Cuda
    }
}
