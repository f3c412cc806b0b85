//! BERT sentence embedding on CUDA: the same math as [`crate::cpu::bert`],
//! with the GEMMs on cuBLAS (row-major mapping in [`super::gemm`]) and every
//! other op in the NVRTC kernels of [`super::kernels`].
//!
//! Per forward: one host→device copy of the packed `ids | mask | types`
//! (`3 × [n·l]` i64), then per layer a fused QKV GEMM, per-head strided-batched
//! score and context GEMMs around the masked softmax, and the output/FFN GEMMs
//! with bias, GELU, residual and LayerNorm kernels; finally masked mean pooling
//! with L2 normalization and one device→host copy of `[n, hidden]`.
//! Nothing here has run on a GPU (see the module docs of [`super`]).

use std::sync::Arc;

use cudarc::cublas::{CudaBlas, Gemm, GemmConfig, StridedBatchedConfig, sys::cublasOperation_t};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, LaunchConfig, PushKernelArg,
};

use super::CudaError;
use super::gemm::{self, Batched, ColMajorGemm, Op, RowMajor};
use super::launch::{self, Launch};
use super::plan::BertPlan;
use crate::config::{BertConfig, Pooling};
use crate::engine::EngineError;
use crate::weights::{Weights, WeightsError};

struct Layer {
    qkv_w: CudaSlice<f32>,
    qkv_b: CudaSlice<f32>,
    o_w: CudaSlice<f32>,
    o_b: CudaSlice<f32>,
    ln1_g: CudaSlice<f32>,
    ln1_b: CudaSlice<f32>,
    i_w: CudaSlice<f32>,
    i_b: CudaSlice<f32>,
    out_w: CudaSlice<f32>,
    out_b: CudaSlice<f32>,
    ln2_g: CudaSlice<f32>,
    ln2_b: CudaSlice<f32>,
}

struct Kernels {
    embedding_gather: CudaFunction,
    layer_norm: CudaFunction,
    bias_gelu: CudaFunction,
    bias_act: CudaFunction,
    add_inplace: CudaFunction,
    masked_softmax: CudaFunction,
    mean_pool_normalize: CudaFunction,
}

/// Activation buffers for one `(n, l)` shape, reused while the shape repeats.
struct Activations {
    n: usize,
    l: usize,
    inputs: CudaSlice<i64>,
    hidden: CudaSlice<f32>,
    qkv: CudaSlice<f32>,
    scores: CudaSlice<f32>,
    context: CudaSlice<f32>,
    tmp: CudaSlice<f32>,
    intermediate: CudaSlice<f32>,
    output: CudaSlice<f32>,
}

/// A BERT encoder resident on one GPU.
pub struct CudaBert {
    cfg: BertConfig,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    k: Kernels,
    word: CudaSlice<f32>,
    pos: CudaSlice<f32>,
    token_type: CudaSlice<f32>,
    ln_g: CudaSlice<f32>,
    ln_b: CudaSlice<f32>,
    layers: Vec<Layer>,
    acts: Option<Activations>,
}

/// Why the weights could not be placed on the GPU.
#[derive(Debug, thiserror::Error)]
pub enum BertLoadError {
    /// A tensor is missing or has the wrong shape.
    #[error(transparent)]
    Weights(#[from] WeightsError),
    /// The driver or cuBLAS failed.
    #[error(transparent)]
    Cuda(#[from] CudaError),
}

fn drv(e: impl std::fmt::Display) -> CudaError {
    CudaError::Driver(e.to_string())
}

fn dev(e: impl std::fmt::Display) -> EngineError {
    EngineError::Device(e.to_string())
}

/// Checks token ids and types against the vocabulary on the host, since an
/// out-of-range id would make the gather kernel read out of bounds.
pub fn validate_inputs(
    cfg: &BertConfig,
    ids: &[i64],
    types: &[i64],
    l: usize,
) -> Result<(), EngineError> {
    if l > cfg.max_position_embeddings {
        return Err(EngineError::InvalidInput(format!(
            "sequence length {l} exceeds max_position_embeddings {}",
            cfg.max_position_embeddings
        )));
    }
    if let Some(id) = ids.iter().find(|&&v| v < 0 || v as usize >= cfg.vocab_size) {
        return Err(EngineError::InvalidInput(format!(
            "input_ids value {id} outside vocabulary 0..{}",
            cfg.vocab_size
        )));
    }
    if let Some(ty) = types
        .iter()
        .find(|&&v| v < 0 || v as usize >= cfg.type_vocab_size)
    {
        return Err(EngineError::InvalidInput(format!(
            "token_type_ids value {ty} outside 0..{}",
            cfg.type_vocab_size
        )));
    }
    Ok(())
}

/// Packs the three `[n·l]` inputs into one buffer (ids | mask | types) so
/// one host→device copy carries them all.
pub fn pack_inputs(ids: &[i64], mask: &[i64], types: &[i64]) -> Vec<i64> {
    let mut packed = Vec::with_capacity(ids.len() * 3);
    packed.extend_from_slice(ids);
    packed.extend_from_slice(mask);
    packed.extend_from_slice(types);
    packed
}

pub(super) fn to_cfg(l: Launch) -> LaunchConfig {
    LaunchConfig {
        grid_dim: l.grid,
        block_dim: l.block,
        shared_mem_bytes: l.shared_bytes,
    }
}

fn op(o: Op) -> cublasOperation_t {
    match o {
        Op::N => cublasOperation_t::CUBLAS_OP_N,
        Op::T => cublasOperation_t::CUBLAS_OP_T,
    }
}

pub(super) fn gemm_cfg(g: ColMajorGemm) -> GemmConfig<f32> {
    GemmConfig {
        transa: op(g.transa),
        transb: op(g.transb),
        m: g.m,
        n: g.n,
        k: g.k,
        alpha: 1.0,
        lda: g.lda,
        ldb: g.ldb,
        beta: 0.0,
        ldc: g.ldc,
    }
}

pub(super) fn batched_cfg(b: Batched) -> StridedBatchedConfig<f32> {
    StridedBatchedConfig {
        gemm: gemm_cfg(b.gemm),
        batch_size: b.batch,
        stride_a: b.stride_a,
        stride_b: b.stride_b,
        stride_c: b.stride_c,
    }
}

fn elementwise(n: usize) -> Result<LaunchConfig, EngineError> {
    launch::elementwise(n as u64)
        .map(to_cfg)
        .ok_or_else(|| EngineError::InvalidInput(format!("{n} elements: empty or too large")))
}

fn i32_of(v: usize, what: &str) -> Result<i32, EngineError> {
    i32::try_from(v).map_err(|_| EngineError::InvalidInput(format!("{what} = {v} exceeds i32")))
}

impl CudaBert {
    /// Uploads the encoder's tensors (HF names, optional `bert.` prefix).
    pub fn load(
        cfg: &BertConfig,
        w: Weights,
        ctx: &Arc<CudaContext>,
        module: &Arc<CudaModule>,
    ) -> Result<Self, BertLoadError> {
        if cfg.pooling != Pooling::Mean {
            return Err(CudaError::NotImplemented("bert with CLS pooling").into());
        }
        let stream = ctx.new_stream().map_err(drv)?;
        let blas = CudaBlas::new(stream.clone()).map_err(drv)?;
        let f = |name: &str| module.load_function(name).map_err(drv);
        let k = Kernels {
            embedding_gather: f("embedding_gather")?,
            layer_norm: f("layer_norm")?,
            bias_gelu: f("bias_gelu")?,
            bias_act: f("bias_act_nchw")?,
            add_inplace: f("add_inplace")?,
            masked_softmax: f("masked_softmax")?,
            mean_pool_normalize: f("mean_pool_normalize")?,
        };
        let mut w = w.with_prefix_if_present("bert.", "embeddings.word_embeddings.weight");
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let mut up = |name: &str, shape: &[usize]| -> Result<CudaSlice<f32>, BertLoadError> {
            let host = w.take(name, shape)?;
            Ok(stream.clone_htod(&host).map_err(drv)?)
        };
        let word = up("embeddings.word_embeddings.weight", &[cfg.vocab_size, h])?;
        let pos = up(
            "embeddings.position_embeddings.weight",
            &[cfg.max_position_embeddings, h],
        )?;
        let token_type = up(
            "embeddings.token_type_embeddings.weight",
            &[cfg.type_vocab_size, h],
        )?;
        let ln_g = up("embeddings.LayerNorm.weight", &[h])?;
        let ln_b = up("embeddings.LayerNorm.bias", &[h])?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let p = format!("encoder.layer.{l}.");
            let mut qkv_w = Vec::with_capacity(3 * h * h);
            let mut qkv_b = Vec::with_capacity(3 * h);
            for part in ["query", "key", "value"] {
                qkv_w.extend(w.take(&format!("{p}attention.self.{part}.weight"), &[h, h])?);
                qkv_b.extend(w.take(&format!("{p}attention.self.{part}.bias"), &[h])?);
            }
            let mut up = |name: &str, shape: &[usize]| -> Result<CudaSlice<f32>, BertLoadError> {
                let host = w.take(&format!("{p}{name}"), shape)?;
                Ok(stream.clone_htod(&host).map_err(drv)?)
            };
            let o_w = up("attention.output.dense.weight", &[h, h])?;
            let o_b = up("attention.output.dense.bias", &[h])?;
            let ln1_g = up("attention.output.LayerNorm.weight", &[h])?;
            let ln1_b = up("attention.output.LayerNorm.bias", &[h])?;
            let i_w = up("intermediate.dense.weight", &[i, h])?;
            let i_b = up("intermediate.dense.bias", &[i])?;
            let out_w = up("output.dense.weight", &[h, i])?;
            let out_b = up("output.dense.bias", &[h])?;
            let ln2_g = up("output.LayerNorm.weight", &[h])?;
            let ln2_b = up("output.LayerNorm.bias", &[h])?;
            layers.push(Layer {
                qkv_w: stream.clone_htod(&qkv_w).map_err(drv)?,
                qkv_b: stream.clone_htod(&qkv_b).map_err(drv)?,
                o_w,
                o_b,
                ln1_g,
                ln1_b,
                i_w,
                i_b,
                out_w,
                out_b,
                ln2_g,
                ln2_b,
            });
        }
        stream.synchronize().map_err(drv)?;
        Ok(Self {
            cfg: cfg.clone(),
            stream,
            blas,
            k,
            word,
            pos,
            token_type,
            ln_g,
            ln_b,
            layers,
            acts: None,
        })
    }

    /// Hidden width (the embedding size).
    pub fn hidden_size(&self) -> usize {
        self.cfg.hidden_size
    }

    fn activations(&mut self, n: usize, l: usize) -> Result<Activations, EngineError> {
        if let Some(a) = self.acts.take()
            && a.n == n
            && a.l == l
        {
            return Ok(a);
        }
        let p = BertPlan::new(&self.cfg, n, l);
        let s = &self.stream;
        let f = |bytes: usize| s.alloc_zeros::<f32>(bytes / 4).map_err(dev);
        Ok(Activations {
            n,
            l,
            inputs: s.alloc_zeros::<i64>(p.inputs / 8).map_err(dev)?,
            hidden: f(p.hidden)?,
            qkv: f(p.qkv)?,
            scores: f(p.scores)?,
            context: f(p.context)?,
            tmp: f(p.hidden)?,
            intermediate: f(p.intermediate)?,
            output: f(p.output)?,
        })
    }

    /// Embeds `n` sequences of length `l`; returns `[n, hidden]` L2-normalized
    /// sentence embeddings (one device→host copy).
    pub fn forward(
        &mut self,
        ids: &[i64],
        mask: &[i64],
        types: &[i64],
        n: usize,
        l: usize,
    ) -> Result<Vec<f32>, EngineError> {
        validate_inputs(&self.cfg, ids, types, l)?;
        let t = n * l;
        if ids.len() != t || mask.len() != t || types.len() != t || t == 0 {
            return Err(EngineError::InvalidInput(format!(
                "inputs must hold {n}×{l} > 0 values"
            )));
        }
        let mut a = self.activations(n, l)?;
        let result = self.run(&mut a, ids, mask, types);
        self.acts = Some(a);
        result
    }

    fn run(
        &self,
        a: &mut Activations,
        ids: &[i64],
        mask: &[i64],
        types: &[i64],
    ) -> Result<Vec<f32>, EngineError> {
        let c = &self.cfg;
        let (n, l) = (a.n, a.l);
        let t = n * l;
        let (h, is, heads) = (c.hidden_size, c.intermediate_size, c.num_heads);
        let d = h / heads;
        let s = &self.stream;
        s.memcpy_htod(&pack_inputs(ids, mask, types), &mut a.inputs)
            .map_err(dev)?;
        let ids_d = a.inputs.slice(0..t);
        let mask_d = a.inputs.slice(t..2 * t);
        let types_d = a.inputs.slice(2 * t..3 * t);
        let (l_i, h_i, t_i) = (i32_of(l, "l")?, i32_of(h, "hidden")?, i32_of(t, "tokens")?);
        let heads_i = i32_of(heads, "heads")?;
        let eps = c.layer_norm_eps;

        // SAFETY: ids/types were validated against the table sizes on the host;
        // every buffer holds t·h (or the table) f32 values, matching the kernel's indexing.
        unsafe {
            s.launch_builder(&self.k.embedding_gather)
                .arg(&ids_d)
                .arg(&types_d)
                .arg(&self.word)
                .arg(&self.pos)
                .arg(&self.token_type)
                .arg(&mut a.hidden)
                .arg(&l_i)
                .arg(&h_i)
                .arg(&t_i)
                .launch(to_cfg(launch::row_gather(t as u32, h)))
        }
        .map_err(dev)?;
        self.layer_norm(&mut a.hidden, &self.ln_g, &self.ln_b, t, h, eps)?;

        let qkv_g = gemm_cfg(
            RowMajor::packed(t, 3 * h, h, true)
                .times_transposed()
                .map_err(shape)?,
        );
        let o_g = gemm_cfg(
            RowMajor::packed(t, h, h, true)
                .times_transposed()
                .map_err(shape)?,
        );
        let i_g = gemm_cfg(
            RowMajor::packed(t, is, h, true)
                .times_transposed()
                .map_err(shape)?,
        );
        let out_g = gemm_cfg(
            RowMajor::packed(t, h, is, true)
                .times_transposed()
                .map_err(shape)?,
        );
        // Per head, batched over sequences: scores[b, head] = Q·Kᵀ and context = P·V.
        let (score_b, ctx_b) = gemm::attention(n, l, h, heads).map_err(shape)?;
        let (score_g, ctx_g) = (batched_cfg(score_b), batched_cfg(ctx_b));
        let scale = 1.0 / (d as f32).sqrt();

        for layer in &self.layers {
            self.linear(qkv_g, &layer.qkv_w, &a.hidden, &mut a.qkv)?;
            self.bias_act(&mut a.qkv, &layer.qkv_b, t * 3 * h, 3 * h)?;
            for head in 0..heads {
                let o = gemm::head_offsets(head, l, h, heads);
                let q = a.qkv.slice(o.q..);
                let k = a.qkv.slice(o.k..);
                let mut sc = a.scores.slice_mut(o.scores..);
                // cuBLAS A slot = keys (our B), B slot = queries (our A).
                // SAFETY: `score_g` comes from `RowMajor` (strides checked); the views
                // start inside qkv [n·l, 3h] and scores [n·heads, l, l], and the last
                // batch entry ends within them (batch stride · (n-1) + l rows).
                unsafe { self.blas.gemm_strided_batched(score_g, &k, &q, &mut sc) }.map_err(dev)?;
            }
            // SAFETY: scores is [n·heads, l, l], mask is [n, l]: the grid covers exactly that.
            unsafe {
                s.launch_builder(&self.k.masked_softmax)
                    .arg(&mut a.scores)
                    .arg(&mask_d)
                    .arg(&heads_i)
                    .arg(&l_i)
                    .arg(&scale)
                    .launch(to_cfg(launch::softmax((n * heads) as u32, l as u32)))
            }
            .map_err(dev)?;
            for head in 0..heads {
                let o = gemm::head_offsets(head, l, h, heads);
                let v = a.qkv.slice(o.v..);
                let p = a.scores.slice(o.scores..);
                let mut out = a.context.slice_mut(o.context..);
                // cuBLAS A slot = values (our B), B slot = probabilities (our A).
                // SAFETY: as for the scores: `ctx_g` strides were checked and every
                // batch entry lies inside qkv, scores and context [n·l, h].
                unsafe { self.blas.gemm_strided_batched(ctx_g, &v, &p, &mut out) }.map_err(dev)?;
            }
            self.linear(o_g, &layer.o_w, &a.context, &mut a.tmp)?;
            self.bias_act(&mut a.tmp, &layer.o_b, t * h, h)?;
            self.add(&mut a.hidden, &a.tmp, t * h)?;
            self.layer_norm(&mut a.hidden, &layer.ln1_g, &layer.ln1_b, t, h, eps)?;
            self.linear(i_g, &layer.i_w, &a.hidden, &mut a.intermediate)?;
            let count = t * is;
            let (w_i, n_i) = (i32_of(is, "intermediate")?, count as i64);
            // SAFETY: intermediate holds t·is values, bias holds is.
            unsafe {
                s.launch_builder(&self.k.bias_gelu)
                    .arg(&mut a.intermediate)
                    .arg(&layer.i_b)
                    .arg(&w_i)
                    .arg(&n_i)
                    .launch(elementwise(count)?)
            }
            .map_err(dev)?;
            self.linear(out_g, &layer.out_w, &a.intermediate, &mut a.tmp)?;
            self.bias_act(&mut a.tmp, &layer.out_b, t * h, h)?;
            self.add(&mut a.hidden, &a.tmp, t * h)?;
            self.layer_norm(&mut a.hidden, &layer.ln2_g, &layer.ln2_b, t, h, eps)?;
        }

        // SAFETY: hidden is [n·l, h], mask [n, l], output [n, h]; one block per sequence.
        unsafe {
            s.launch_builder(&self.k.mean_pool_normalize)
                .arg(&a.hidden)
                .arg(&mask_d)
                .arg(&mut a.output)
                .arg(&l_i)
                .arg(&h_i)
                .launch(to_cfg(launch::per_row(n as u32, h)))
        }
        .map_err(dev)?;
        s.clone_dtoh(&a.output).map_err(dev)
    }

    /// `y = x · wᵀ` for a packed row-major `x` and a `[out, in]` weight.
    fn linear(
        &self,
        g: GemmConfig<f32>,
        w: &CudaSlice<f32>,
        x: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
    ) -> Result<(), EngineError> {
        // SAFETY: `g` comes from `RowMajor::packed(..).times_transposed()` for the
        // very shapes these buffers were allocated with (weights at load, activations
        // from `BertPlan`), so cuBLAS reads and writes only inside them.
        unsafe { self.blas.gemm(g, w, x, y) }.map_err(dev)
    }

    fn layer_norm(
        &self,
        x: &mut CudaSlice<f32>,
        g: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        rows: usize,
        width: usize,
        eps: f32,
    ) -> Result<(), EngineError> {
        let w = i32_of(width, "width")?;
        // SAFETY: x holds rows·width values, g and b hold width; one block per row
        // with a power-of-two block and matching shared memory (launch::per_row).
        unsafe {
            self.stream
                .launch_builder(&self.k.layer_norm)
                .arg(x)
                .arg(g)
                .arg(b)
                .arg(&w)
                .arg(&eps)
                .launch(to_cfg(launch::per_row(rows as u32, width)))
        }
        .map(drop)
        .map_err(dev)
    }

    /// `x[i] += bias[i % width]` (the NCHW bias kernel with one pixel per channel).
    fn bias_act(
        &self,
        x: &mut CudaSlice<f32>,
        bias: &CudaSlice<f32>,
        count: usize,
        width: usize,
    ) -> Result<(), EngineError> {
        let (w, one, none, n) = (i32_of(width, "width")?, 1i32, 0i32, count as i64);
        // SAFETY: x holds `count` values and bias `width`; act 0 is "no activation".
        unsafe {
            self.stream
                .launch_builder(&self.k.bias_act)
                .arg(x)
                .arg(bias)
                .arg(&w)
                .arg(&one)
                .arg(&none)
                .arg(&n)
                .launch(elementwise(count)?)
        }
        .map(drop)
        .map_err(dev)
    }

    /// `x += r` elementwise.
    fn add(
        &self,
        x: &mut CudaSlice<f32>,
        r: &CudaSlice<f32>,
        count: usize,
    ) -> Result<(), EngineError> {
        let (no_relu, n) = (0i32, count as i64);
        // SAFETY: x and r both hold at least `count` values.
        unsafe {
            self.stream
                .launch_builder(&self.k.add_inplace)
                .arg(x)
                .arg(r)
                .arg(&no_relu)
                .arg(&n)
                .launch(elementwise(count)?)
        }
        .map(drop)
        .map_err(dev)
    }
}

fn shape(e: super::gemm::GemmShapeError) -> EngineError {
    EngineError::InvalidInput(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> BertConfig {
        BertConfig {
            hidden_size: 8,
            num_layers: 1,
            num_heads: 2,
            intermediate_size: 16,
            vocab_size: 10,
            max_position_embeddings: 4,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            pooling: Pooling::Mean,
        }
    }

    #[test]
    fn ids_outside_the_vocabulary_are_rejected_before_any_upload() {
        assert!(validate_inputs(&cfg(), &[0, 9], &[0, 1], 2).is_ok());
        assert!(validate_inputs(&cfg(), &[0, 10], &[0, 0], 2).is_err());
        assert!(validate_inputs(&cfg(), &[-1, 0], &[0, 0], 2).is_err());
        assert!(validate_inputs(&cfg(), &[0, 0], &[0, 2], 2).is_err());
    }

    #[test]
    fn sequences_longer_than_the_position_table_are_rejected() {
        assert!(validate_inputs(&cfg(), &[0; 5], &[0; 5], 5).is_err());
    }

    #[test]
    fn packed_inputs_hold_ids_then_mask_then_types() {
        assert_eq!(pack_inputs(&[1, 2], &[1, 0], &[0, 1]), [1, 2, 1, 0, 0, 1]);
    }

    #[test]
    fn the_packed_input_buffer_matches_the_memory_plan() {
        let p = BertPlan::new(&cfg(), 3, 4);
        assert_eq!(
            p.inputs / 8,
            pack_inputs(&[0; 12], &[0; 12], &[0; 12]).len()
        );
    }
}
