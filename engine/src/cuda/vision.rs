//! EfficientNet-Lite0 on CUDA: the same BN-folded network as
//! [`crate::cpu::vision::EfficientNetLite0`], NCHW on the device. 1×1 convs
//! are cuBLAS strided-batched GEMMs over the images (the weight has batch
//! stride 0), the stem is im2col + GEMM per image, depthwise convs, bias +
//! ReLU6, residual adds and global average pooling are NVRTC kernels, the
//! classifier is one GEMM. Nothing here has run on a GPU (see [`super`]).

use std::sync::Arc;

use cudarc::cublas::{CudaBlas, Gemm, StridedBatchedConfig};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, LaunchConfig, PushKernelArg,
};

use super::CudaError;
use super::bert::{batched_cfg, gemm_cfg, to_cfg};
use super::gemm::{Batched, GemmShapeError, RowMajor};
use super::launch;
use crate::config::VisionConfig;
use crate::cpu::ops::{Act, Conv, fold_bn};
use crate::cpu::vision::CHANNELS;
use crate::engine::EngineError;
use crate::weights::{Weights, WeightsError};

/// Lite0 stages: (repeats, kernel, stride, expand ratio, in, out).
const LITE0_STAGES: [(usize, usize, usize, usize, usize, usize); 7] = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
];

/// Output size of a conv along one axis: `(size + 2·pad − k) / stride + 1`.
pub fn conv_out(size: usize, k: usize, stride: usize, pad: usize) -> usize {
    (size + 2 * pad).saturating_sub(k) / stride.max(1) + 1
}

/// A 1×1 conv over `n` NCHW images as one strided-batched GEMM: per image
/// `Y[cout, hw] = W[cout, cin] · X[cin, hw]`; cuBLAS `A` = X (stride
/// `cin·hw`), `B` = W (stride 0: shared), `C` = Y (stride `cout·hw`).
pub fn pointwise(n: usize, cin: usize, cout: usize, hw: usize) -> Result<Batched, GemmShapeError> {
    let long = |v: usize| i64::try_from(v).map_err(|_| GemmShapeError(format!("stride {v}")));
    Ok(Batched {
        gemm: RowMajor {
            m: cout,
            n: hw,
            k: cin,
            lda: cin,
            ldb: hw,
            ldc: hw,
        }
        .times()?,
        batch: i32::try_from(n).map_err(|_| GemmShapeError(format!("batch {n}")))?,
        stride_a: long(cin * hw)?,
        stride_b: 0,
        stride_c: long(cout * hw)?,
    })
}

/// Kernel activation code: 0 none, 1 ReLU, 2 ReLU6.
fn act_code(a: Act) -> i32 {
    match a {
        Act::None => 0,
        Act::Relu => 1,
        Act::Relu6 => 2,
    }
}

struct DevConv {
    host: Conv,
    weight: CudaSlice<f32>,
    bias: CudaSlice<f32>,
}

struct Block {
    expand: Option<DevConv>,
    depthwise: DevConv,
    project: DevConv,
    skip: bool,
}

struct Kernels {
    im2col: CudaFunction,
    bias_act: CudaFunction,
    depthwise: CudaFunction,
    add_inplace: CudaFunction,
    avg_pool: CudaFunction,
}

/// EfficientNet-Lite0 resident on one GPU.
pub struct CudaEfficientNet {
    cfg: VisionConfig,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    k: Kernels,
    stem: DevConv,
    blocks: Vec<Block>,
    head: DevConv,
    fc_w: CudaSlice<f32>,
    fc_b: CudaSlice<f32>,
}

/// Why the weights could not be placed on the GPU.
#[derive(Debug, thiserror::Error)]
pub enum VisionLoadError {
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

fn i32_of(v: usize) -> Result<i32, EngineError> {
    i32::try_from(v).map_err(|_| EngineError::InvalidInput(format!("{v} exceeds i32")))
}

fn elementwise(n: usize) -> Result<LaunchConfig, EngineError> {
    launch::elementwise(n as u64)
        .map(to_cfg)
        .ok_or_else(|| EngineError::InvalidInput(format!("{n} elements: empty or too large")))
}

impl CudaEfficientNet {
    /// Takes the converted checkpoint's tensors, folds BN on the host, uploads.
    pub fn load(
        cfg: &VisionConfig,
        mut w: Weights,
        ctx: &Arc<CudaContext>,
        module: &Arc<CudaModule>,
    ) -> Result<Self, VisionLoadError> {
        let stream = ctx.new_stream().map_err(drv)?;
        let blas = CudaBlas::new(stream.clone()).map_err(drv)?;
        let f = |name: &str| module.load_function(name).map_err(drv);
        let k = Kernels {
            im2col: f("im2col")?,
            bias_act: f("bias_act_nchw")?,
            depthwise: f("depthwise_conv")?,
            add_inplace: f("add_inplace")?,
            avg_pool: f("global_avg_pool")?,
        };
        let eps = cfg.bn_eps;
        let mut conv = |conv: &str,
                        bn: &str,
                        (cin, cout, k, stride): (usize, usize, usize, usize),
                        depthwise: bool,
                        act: Act|
         -> Result<DevConv, VisionLoadError> {
            let per_out = if depthwise { 1 } else { cin };
            let mut weight = w.take(&format!("{conv}.weight"), &[cout, per_out, k, k])?;
            let gamma = w.take(&format!("{bn}.weight"), &[cout])?;
            let beta = w.take(&format!("{bn}.bias"), &[cout])?;
            let mean = w.take(&format!("{bn}.running_mean"), &[cout])?;
            let var = w.take(&format!("{bn}.running_var"), &[cout])?;
            let bias = fold_bn(&mut weight, cout, &gamma, &beta, &mean, &var, eps);
            Ok(DevConv {
                weight: stream.clone_htod(&weight).map_err(drv)?,
                bias: stream.clone_htod(&bias).map_err(drv)?,
                host: Conv {
                    cout,
                    cin,
                    k,
                    stride,
                    pad: k / 2,
                    depthwise,
                    weight: Vec::new(),
                    bias: Vec::new(),
                    act,
                },
            })
        };
        let stem = conv("_conv_stem", "_bn0", (3, 32, 3, 2), false, Act::Relu6)?;
        let mut blocks = Vec::new();
        for (reps, k, stride, expand, cin0, cout) in LITE0_STAGES {
            for r in 0..reps {
                let (cin, s) = if r == 0 { (cin0, stride) } else { (cout, 1) };
                let p = format!("_blocks.{}", blocks.len());
                let mid = cin * expand;
                let expand_conv = if expand != 1 {
                    Some(conv(
                        &format!("{p}._expand_conv"),
                        &format!("{p}._bn0"),
                        (cin, mid, 1, 1),
                        false,
                        Act::Relu6,
                    )?)
                } else {
                    None
                };
                let depthwise = conv(
                    &format!("{p}._depthwise_conv"),
                    &format!("{p}._bn1"),
                    (mid, mid, k, s),
                    true,
                    Act::Relu6,
                )?;
                let project = conv(
                    &format!("{p}._project_conv"),
                    &format!("{p}._bn2"),
                    (mid, cout, 1, 1),
                    false,
                    Act::None,
                )?;
                blocks.push(Block {
                    expand: expand_conv,
                    depthwise,
                    project,
                    skip: s == 1 && cin == cout,
                });
            }
        }
        let head = conv("_conv_head", "_bn1", (320, 1280, 1, 1), false, Act::Relu6)?;
        let fc_w = w.take("_fc.weight", &[cfg.num_classes, 1280])?;
        let fc_b = w.take("_fc.bias", &[cfg.num_classes])?;
        let fc_w = stream.clone_htod(&fc_w).map_err(drv)?;
        let fc_b = stream.clone_htod(&fc_b).map_err(drv)?;
        stream.synchronize().map_err(drv)?;
        Ok(Self {
            cfg: cfg.clone(),
            stream,
            blas,
            k,
            stem,
            blocks,
            head,
            fc_w,
            fc_b,
        })
    }

    /// Classes of the classifier.
    pub fn num_classes(&self) -> usize {
        self.cfg.num_classes
    }

    /// Logits `[n, classes]` for `n` normalized FP32 NCHW images (one
    /// host→device and one device→host copy).
    pub fn forward(&self, x: &[f32], n: usize) -> Result<Vec<f32>, EngineError> {
        let s = self.cfg.image_size;
        if n == 0 || x.len() != n * CHANNELS * s * s {
            return Err(EngineError::InvalidInput(format!(
                "expected {n}×3×{s}×{s} values"
            )));
        }
        let st = &self.stream;
        let input = st.clone_htod(x).map_err(dev)?;
        let (mut x, mut h, mut w) = self.stem(&input, n, s)?;
        for b in &self.blocks {
            let mut y = None;
            let (mut yh, mut yw) = (h, w);
            if let Some(e) = &b.expand {
                y = Some(self.pointwise(e, &x, n, h * w)?);
            }
            let src = y.as_ref().unwrap_or(&x);
            let dw;
            (dw, yh, yw) = self.depthwise(&b.depthwise, src, n, yh, yw)?;
            let mut out = self.pointwise(&b.project, &dw, n, yh * yw)?;
            if b.skip {
                let count = n * b.project.host.cout * yh * yw;
                let (no_relu, len) = (0i32, count as i64);
                // SAFETY: skip blocks keep shape, so `out` and `x` both hold `count` values.
                unsafe {
                    st.launch_builder(&self.k.add_inplace)
                        .arg(&mut out)
                        .arg(&x)
                        .arg(&no_relu)
                        .arg(&len)
                        .launch(elementwise(count)?)
                }
                .map_err(dev)?;
            }
            (x, h, w) = (out, yh, yw);
        }
        let head = self.pointwise(&self.head, &x, n, h * w)?;
        let planes = n * self.head.host.cout;
        let mut feats = st.alloc_zeros::<f32>(planes).map_err(dev)?;
        let hw_i = i32_of(h * w)?;
        // SAFETY: `head` is [n·1280, h·w]; one block per plane writes one value of `feats`.
        unsafe {
            st.launch_builder(&self.k.avg_pool)
                .arg(&head)
                .arg(&mut feats)
                .arg(&hw_i)
                .launch(to_cfg(launch::per_row(planes as u32, h * w)))
        }
        .map_err(dev)?;
        let classes = self.cfg.num_classes;
        let g = gemm_cfg(
            RowMajor::packed(n, classes, self.head.host.cout, true)
                .times_transposed()
                .map_err(shape)?,
        );
        let mut logits = st.alloc_zeros::<f32>(n * classes).map_err(dev)?;
        // SAFETY: feats is [n, 1280], fc_w [classes, 1280], logits [n, classes],
        // matching the checked GEMM configuration.
        unsafe { self.blas.gemm(g, &self.fc_w, &feats, &mut logits) }.map_err(dev)?;
        self.bias_act(&mut logits, &self.fc_b, classes, 1, 0, n * classes)?;
        st.clone_dtoh(&logits).map_err(dev)
    }

    /// Stem: im2col + GEMM per image, then bias + activation over the batch.
    fn stem(
        &self,
        input: &CudaSlice<f32>,
        n: usize,
        s: usize,
    ) -> Result<(CudaSlice<f32>, usize, usize), EngineError> {
        let c = &self.stem.host;
        let (ho, wo) = (
            conv_out(s, c.k, c.stride, c.pad),
            conv_out(s, c.k, c.stride, c.pad),
        );
        let rows = c.cin * c.k * c.k;
        let st = &self.stream;
        let mut cols = st.alloc_zeros::<f32>(rows * ho * wo).map_err(dev)?;
        let mut y = st.alloc_zeros::<f32>(n * c.cout * ho * wo).map_err(dev)?;
        let g = gemm_cfg(
            RowMajor::packed(c.cout, ho * wo, rows, false)
                .times()
                .map_err(shape)?,
        );
        let (ci, si, hoi, woi, ki, stri, padi) = (
            i32_of(c.cin)?,
            i32_of(s)?,
            i32_of(ho)?,
            i32_of(wo)?,
            i32_of(c.k)?,
            i32_of(c.stride)?,
            i32_of(c.pad)?,
        );
        let count = rows * ho * wo;
        let len = count as i64;
        let image = c.cin * s * s;
        let out_image = c.cout * ho * wo;
        for i in 0..n {
            let img = input.slice(i * image..(i + 1) * image);
            // SAFETY: `img` is one [cin, s, s] image and `cols` holds cin·k·k·ho·wo values,
            // one thread per column element (the kernel bounds-checks the input).
            unsafe {
                st.launch_builder(&self.k.im2col)
                    .arg(&img)
                    .arg(&mut cols)
                    .arg(&ci)
                    .arg(&si)
                    .arg(&si)
                    .arg(&hoi)
                    .arg(&woi)
                    .arg(&ki)
                    .arg(&stri)
                    .arg(&padi)
                    .arg(&len)
                    .launch(elementwise(count)?)
            }
            .map_err(dev)?;
            let mut out = y.slice_mut(i * out_image..(i + 1) * out_image);
            // SAFETY: Y[cout, ho·wo] = W[cout, cin·k·k] · cols, shapes checked by `RowMajor`.
            unsafe { self.blas.gemm(g, &cols, &self.stem.weight, &mut out) }.map_err(dev)?;
        }
        self.bias_act(
            &mut y,
            &self.stem.bias,
            c.cout,
            ho * wo,
            act_code(c.act),
            n * out_image,
        )?;
        Ok((y, ho, wo))
    }

    /// A 1×1 conv (stride 1) over the batch, with bias and activation.
    fn pointwise(
        &self,
        c: &DevConv,
        x: &CudaSlice<f32>,
        n: usize,
        hw: usize,
    ) -> Result<CudaSlice<f32>, EngineError> {
        let h = &c.host;
        let mut y = self
            .stream
            .alloc_zeros::<f32>(n * h.cout * hw)
            .map_err(dev)?;
        let b: StridedBatchedConfig<f32> =
            batched_cfg(pointwise(n, h.cin, h.cout, hw).map_err(shape)?);
        // SAFETY: x is [n, cin, hw], weight [cout, cin], y [n, cout, hw]; the
        // batched configuration was derived from exactly these shapes.
        unsafe { self.blas.gemm_strided_batched(b, x, &c.weight, &mut y) }.map_err(dev)?;
        self.bias_act(
            &mut y,
            &c.bias,
            h.cout,
            hw,
            act_code(h.act),
            n * h.cout * hw,
        )?;
        Ok(y)
    }

    /// A depthwise conv (BN folded, fused activation).
    fn depthwise(
        &self,
        c: &DevConv,
        x: &CudaSlice<f32>,
        n: usize,
        hh: usize,
        ww: usize,
    ) -> Result<(CudaSlice<f32>, usize, usize), EngineError> {
        let h = &c.host;
        let (ho, wo) = (
            conv_out(hh, h.k, h.stride, h.pad),
            conv_out(ww, h.k, h.stride, h.pad),
        );
        let count = n * h.cout * ho * wo;
        let mut y = self.stream.alloc_zeros::<f32>(count).map_err(dev)?;
        let args = [h.cout, hh, ww, ho, wo, h.k, h.stride, h.pad]
            .map(|v| i32::try_from(v).unwrap_or(i32::MAX));
        let (act, len) = (act_code(h.act), count as i64);
        // SAFETY: x is [n, c, hh, ww], weight [c, k, k], bias [c], y [n, c, ho, wo];
        // one thread per output element, input reads bounds-checked in the kernel.
        unsafe {
            self.stream
                .launch_builder(&self.k.depthwise)
                .arg(x)
                .arg(&c.weight)
                .arg(&c.bias)
                .arg(&mut y)
                .arg(&args[0])
                .arg(&args[1])
                .arg(&args[2])
                .arg(&args[3])
                .arg(&args[4])
                .arg(&args[5])
                .arg(&args[6])
                .arg(&args[7])
                .arg(&act)
                .arg(&len)
                .launch(elementwise(count)?)
        }
        .map_err(dev)?;
        Ok((y, ho, wo))
    }

    fn bias_act(
        &self,
        x: &mut CudaSlice<f32>,
        bias: &CudaSlice<f32>,
        channels: usize,
        hw: usize,
        act: i32,
        count: usize,
    ) -> Result<(), EngineError> {
        let (c, p, len) = (i32_of(channels)?, i32_of(hw)?, count as i64);
        // SAFETY: x holds `count` = n·channels·hw values and bias `channels`.
        unsafe {
            self.stream
                .launch_builder(&self.k.bias_act)
                .arg(x)
                .arg(bias)
                .arg(&c)
                .arg(&p)
                .arg(&act)
                .arg(&len)
                .launch(elementwise(count)?)
        }
        .map(drop)
        .map_err(dev)
    }
}

fn shape(e: GemmShapeError) -> EngineError {
    EngineError::InvalidInput(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conv_output_sizes_follow_the_lite0_stem_and_stages() {
        assert_eq!(conv_out(224, 3, 2, 1), 112);
        assert_eq!(conv_out(112, 3, 1, 1), 112);
        assert_eq!(conv_out(56, 5, 2, 2), 28);
        assert_eq!(conv_out(7, 1, 1, 0), 7);
    }

    #[test]
    fn the_pointwise_batched_gemm_equals_a_naive_1x1_conv_on_every_image() {
        use super::super::gemm::emulate::batched_reference;
        let (n, cin, cout, hw) = (3, 4, 5, 6);
        let x: Vec<f32> = (0..n * cin * hw).map(|i| (i as f32 * 0.31).sin()).collect();
        let w: Vec<f32> = (0..cout * cin).map(|i| (i as f32 * 0.77).cos()).collect();
        let mut y = vec![0.0; n * cout * hw];
        batched_reference(&pointwise(n, cin, cout, hw).unwrap(), &x, &w, &mut y);
        for b in 0..n {
            for o in 0..cout {
                for p in 0..hw {
                    let want: f32 = (0..cin)
                        .map(|c| w[o * cin + c] * x[(b * cin + c) * hw + p])
                        .sum();
                    assert!((y[(b * cout + o) * hw + p] - want).abs() < 1e-5);
                }
            }
        }
    }

    #[test]
    fn a_pointwise_conv_shares_the_weight_across_images_and_strides_over_planes() {
        let b = pointwise(4, 16, 24, 49).unwrap();
        assert_eq!(
            (b.batch, b.stride_a, b.stride_b, b.stride_c),
            (4, 16 * 49, 0, 24 * 49)
        );
        // cuBLAS C (column-major) is [hw, cout] = our row-major [cout, hw].
        assert_eq!((b.gemm.m, b.gemm.n, b.gemm.k), (49, 24, 16));
        assert_eq!((b.gemm.lda, b.gemm.ldb, b.gemm.ldc), (49, 16, 49));
    }
}
