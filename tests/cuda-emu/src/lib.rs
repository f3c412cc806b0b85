//! Test-only: the CUDA engine's kernels (`engine/src/cuda/kernels.cu`) compiled as C++ and
//! run on the CPU, each CUDA thread an OS thread, `__syncthreads()` a barrier over the block
//! (`emu/`). The safe wrappers below take the launch configurations from the engine's own
//! `cuda::launch` functions, as the engine does, so `tests/kernels.rs` checks each kernel's
//! numerics and indexing, and the launches it is given, against the CPU engine without a
//! GPU. What this cannot show: that the driver, cuBLAS and real warps behave as the
//! stand-in does (memory ordering, `__expf`'s reduced precision, launch limits).

use tandem_engine::cuda::launch::Launch;

/// A launch as the C++ side reads it (`EmuLaunch` in `emu/emu.h`).
#[repr(C)]
#[derive(Clone, Copy)]
struct EmuLaunch {
    grid: [u32; 3],
    block: [u32; 3],
    shared_bytes: u32,
}

impl From<Launch> for EmuLaunch {
    fn from(l: Launch) -> Self {
        Self {
            grid: [l.grid.0, l.grid.1, l.grid.2],
            block: [l.block.0, l.block.1, l.block.2],
            shared_bytes: l.shared_bytes,
        }
    }
}

unsafe extern "C" {
    fn emu_embedding_gather(
        l: EmuLaunch,
        ids: *const i64,
        types: *const i64,
        word: *const f32,
        pos: *const f32,
        type_emb: *const f32,
        out: *mut f32,
        seq_len: i32,
        hidden: i32,
        rows: i32,
    );
    fn emu_layer_norm(
        l: EmuLaunch,
        x: *mut f32,
        gamma: *const f32,
        beta: *const f32,
        dim: i32,
        eps: f32,
    );
    fn emu_bias_gelu(l: EmuLaunch, x: *mut f32, bias: *const f32, width: i32, n: i64);
    fn emu_masked_softmax(
        l: EmuLaunch,
        scores: *mut f32,
        mask: *const i64,
        heads: i32,
        len: i32,
        scale: f32,
    );
    fn emu_mean_pool_normalize(
        l: EmuLaunch,
        x: *const f32,
        mask: *const i64,
        out: *mut f32,
        len: i32,
        hidden: i32,
    );
    fn emu_bias_act_nchw(
        l: EmuLaunch,
        x: *mut f32,
        bias: *const f32,
        channels: i32,
        hw: i32,
        act: i32,
        n: i64,
    );
    fn emu_depthwise_conv(
        l: EmuLaunch,
        x: *const f32,
        w: *const f32,
        bias: *const f32,
        y: *mut f32,
        c: i32,
        h: i32,
        wd: i32,
        ho: i32,
        wo: i32,
        k: i32,
        stride: i32,
        pad: i32,
        act: i32,
        n: i64,
    );
    fn emu_im2col(
        l: EmuLaunch,
        x: *const f32,
        cols: *mut f32,
        c: i32,
        h: i32,
        w: i32,
        ho: i32,
        wo: i32,
        k: i32,
        stride: i32,
        pad: i32,
        n: i64,
    );
    fn emu_u8_normalize(
        l: EmuLaunch,
        x: *const u8,
        y: *mut f32,
        m0: f32,
        m1: f32,
        m2: f32,
        s0: f32,
        s1: f32,
        s2: f32,
        hw: i32,
        n: i64,
    );
    fn emu_global_avg_pool(l: EmuLaunch, x: *const f32, y: *mut f32, hw: i32);
    fn emu_add_inplace(l: EmuLaunch, x: *mut f32, r: *const f32, relu: i32, n: i64);
}

fn i32_of(v: usize) -> i32 {
    i32::try_from(v).expect("test sizes fit in i32")
}

fn elementwise(n: usize) -> EmuLaunch {
    tandem_engine::cuda::launch::elementwise(n as u64)
        .expect("a non-empty test tensor")
        .into()
}

/// The activation codes of `bias_act_nchw` and `depthwise_conv`.
#[derive(Clone, Copy, Debug)]
pub enum Act {
    /// 0: identity.
    None = 0,
    /// 1: `max(x, 0)`.
    Relu = 1,
    /// 2: `min(max(x, 0), 6)`.
    Relu6 = 2,
}

/// `out[row] = word[ids[row]] + pos[row % seq_len] + type_emb[types[row]]`.
pub fn embedding_gather(
    ids: &[i64],
    types: &[i64],
    word: &[f32],
    pos: &[f32],
    type_emb: &[f32],
    seq_len: usize,
    hidden: usize,
) -> Vec<f32> {
    let rows = ids.len();
    assert_eq!(types.len(), rows);
    let mut out = vec![0.0f32; rows * hidden];
    let l = tandem_engine::cuda::launch::row_gather(rows as u32, hidden);
    // SAFETY: the buffers are as long as the kernel indexes for these sizes (asserted above;
    // ids and types index `word` / `type_emb` rows the caller provides).
    unsafe {
        emu_embedding_gather(
            l.into(),
            ids.as_ptr(),
            types.as_ptr(),
            word.as_ptr(),
            pos.as_ptr(),
            type_emb.as_ptr(),
            out.as_mut_ptr(),
            i32_of(seq_len),
            i32_of(hidden),
            i32_of(rows),
        );
    }
    out
}

/// LayerNorm of each row of width `dim`, in place.
pub fn layer_norm(x: &mut [f32], dim: usize, gamma: &[f32], beta: &[f32], eps: f32) {
    assert!(x.len().is_multiple_of(dim) && gamma.len() == dim && beta.len() == dim);
    let l = tandem_engine::cuda::launch::per_row((x.len() / dim) as u32, dim);
    // SAFETY: one block per row of `dim` values of `x`; gamma and beta have `dim` values.
    unsafe {
        emu_layer_norm(
            l.into(),
            x.as_mut_ptr(),
            gamma.as_ptr(),
            beta.as_ptr(),
            i32_of(dim),
            eps,
        );
    }
}

/// `x = gelu(x + bias)` over rows of `bias.len()`, in place.
pub fn bias_gelu(x: &mut [f32], bias: &[f32]) {
    assert!(x.len().is_multiple_of(bias.len()));
    // SAFETY: one thread per element of `x`; `bias` has `width` values.
    unsafe {
        emu_bias_gelu(
            elementwise(x.len()),
            x.as_mut_ptr(),
            bias.as_ptr(),
            i32_of(bias.len()),
            x.len() as i64,
        );
    }
}

/// Softmax of `scale * scores` over unmasked keys of each query row, in place; `scores` is
/// `[batch*heads, len, len]`, `mask` `[batch, len]`.
pub fn masked_softmax(scores: &mut [f32], mask: &[i64], heads: usize, len: usize, scale: f32) {
    let batch_heads = scores.len() / (len * len);
    assert_eq!(scores.len(), batch_heads * len * len);
    assert_eq!(mask.len(), batch_heads / heads * len);
    let l = tandem_engine::cuda::launch::softmax(batch_heads as u32, len as u32);
    // SAFETY: sizes asserted above.
    unsafe {
        emu_masked_softmax(
            l.into(),
            scores.as_mut_ptr(),
            mask.as_ptr(),
            i32_of(heads),
            i32_of(len),
            scale,
        );
    }
}

/// Masked mean over tokens of `x` `[batch, len, hidden]`, then L2 normalization.
pub fn mean_pool_normalize(x: &[f32], mask: &[i64], len: usize, hidden: usize) -> Vec<f32> {
    let batch = mask.len() / len;
    assert_eq!(x.len(), batch * len * hidden);
    let mut out = vec![0.0f32; batch * hidden];
    let l = tandem_engine::cuda::launch::per_row(batch as u32, hidden);
    // SAFETY: sizes asserted above; one block per sequence.
    unsafe {
        emu_mean_pool_normalize(
            l.into(),
            x.as_ptr(),
            mask.as_ptr(),
            out.as_mut_ptr(),
            i32_of(len),
            i32_of(hidden),
        );
    }
    out
}

/// `x = act(x + bias[channel])` for `x` `[N, C, hw]`, in place.
pub fn bias_act_nchw(x: &mut [f32], bias: &[f32], hw: usize, act: Act) {
    assert!(x.len().is_multiple_of(bias.len() * hw));
    // SAFETY: one thread per element; `bias` has `channels` values.
    unsafe {
        emu_bias_act_nchw(
            elementwise(x.len()),
            x.as_mut_ptr(),
            bias.as_ptr(),
            i32_of(bias.len()),
            i32_of(hw),
            act as i32,
            x.len() as i64,
        );
    }
}

/// Depthwise conv of `x` `[N, C, h, w]` with `w` `[C, k, k]`, `bias` `[C]`, fused `act`;
/// returns `(y, ho, wo)`.
#[allow(clippy::too_many_arguments)]
pub fn depthwise_conv(
    x: &[f32],
    weight: &[f32],
    bias: &[f32],
    h: usize,
    w: usize,
    k: usize,
    stride: usize,
    pad: usize,
    act: Act,
) -> (Vec<f32>, usize, usize) {
    let c = bias.len();
    assert_eq!(weight.len(), c * k * k);
    assert!(x.len().is_multiple_of(c * h * w));
    let n_img = x.len() / (c * h * w);
    let (ho, wo) = (
        (h + 2 * pad - k) / stride + 1,
        (w + 2 * pad - k) / stride + 1,
    );
    let mut y = vec![0.0f32; n_img * c * ho * wo];
    // SAFETY: one thread per output element; the kernel reads only inside `x` (bounds
    // checked against h and w) and `weight`.
    unsafe {
        emu_depthwise_conv(
            elementwise(y.len()),
            x.as_ptr(),
            weight.as_ptr(),
            bias.as_ptr(),
            y.as_mut_ptr(),
            i32_of(c),
            i32_of(h),
            i32_of(w),
            i32_of(ho),
            i32_of(wo),
            i32_of(k),
            i32_of(stride),
            i32_of(pad),
            act as i32,
            y.len() as i64,
        );
    }
    (y, ho, wo)
}

/// Unfolds one CHW image into `[c*k*k, ho*wo]` columns.
#[allow(clippy::too_many_arguments)]
pub fn im2col(
    x: &[f32],
    c: usize,
    h: usize,
    w: usize,
    k: usize,
    stride: usize,
    pad: usize,
    ho: usize,
    wo: usize,
) -> Vec<f32> {
    assert_eq!(x.len(), c * h * w);
    let mut cols = vec![0.0f32; c * k * k * ho * wo];
    // SAFETY: one thread per column element; reads bounds-checked against h and w.
    unsafe {
        emu_im2col(
            elementwise(cols.len()),
            x.as_ptr(),
            cols.as_mut_ptr(),
            i32_of(c),
            i32_of(h),
            i32_of(w),
            i32_of(ho),
            i32_of(wo),
            i32_of(k),
            i32_of(stride),
            i32_of(pad),
            cols.len() as i64,
        );
    }
    cols
}

/// `(x / 255 - mean[c]) / std[c]` for UINT8 `x` `[N, 3, hw]`.
pub fn u8_normalize(x: &[u8], mean: [f32; 3], std: [f32; 3], hw: usize) -> Vec<f32> {
    assert!(x.len().is_multiple_of(3 * hw));
    let mut y = vec![0.0f32; x.len()];
    // SAFETY: one thread per element of `x` and `y` (same length).
    unsafe {
        emu_u8_normalize(
            elementwise(x.len()),
            x.as_ptr(),
            y.as_mut_ptr(),
            mean[0],
            mean[1],
            mean[2],
            std[0],
            std[1],
            std[2],
            i32_of(hw),
            x.len() as i64,
        );
    }
    y
}

/// The mean of each plane of `hw` values.
pub fn global_avg_pool(x: &[f32], hw: usize) -> Vec<f32> {
    assert!(x.len().is_multiple_of(hw));
    let planes = x.len() / hw;
    let mut y = vec![0.0f32; planes];
    let l = tandem_engine::cuda::launch::per_row(planes as u32, hw);
    // SAFETY: one block per plane of `hw` values; one output per plane.
    unsafe {
        emu_global_avg_pool(l.into(), x.as_ptr(), y.as_mut_ptr(), i32_of(hw));
    }
    y
}

/// `x += r` (then ReLU when `relu`), in place.
pub fn add_inplace(x: &mut [f32], r: &[f32], relu: bool) {
    assert_eq!(x.len(), r.len());
    // SAFETY: one thread per element of `x` and `r` (same length).
    unsafe {
        emu_add_inplace(
            elementwise(x.len()),
            x.as_mut_ptr(),
            r.as_ptr(),
            i32::from(relu),
            x.len() as i64,
        );
    }
}
