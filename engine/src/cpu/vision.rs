//! Image classifiers on the CPU: EfficientNet-Lite0 and ResNet (torchvision
//! layout), built from BN-folded convs. Shared input handling: FP32 NCHW as
//! is, or UINT8 NCHW normalized here (`(x/255 - mean) / std`).

use rayon::prelude::*;

use super::gemm::{RhsLayout, matmul};
use super::ops::{Act, Conv, fold_bn, global_avg_pool, max_pool_3x3_s2};
use crate::config::{ImageNorm, VisionConfig};
use crate::tensor::TensorData;
use crate::weights::{Weights, WeightsError};

/// Input channels of every image model.
pub const CHANNELS: usize = 3;

/// Loads conv `conv` (bias-free) and folds BatchNorm `bn` into it.
#[allow(clippy::too_many_arguments)]
fn conv_bn(
    w: &mut Weights,
    conv: &str,
    bn: &str,
    (cin, cout, k, stride): (usize, usize, usize, usize),
    depthwise: bool,
    act: Act,
    eps: f32,
) -> Result<Conv, WeightsError> {
    let per_out = if depthwise { 1 } else { cin };
    let mut weight = w.take(&format!("{conv}.weight"), &[cout, per_out, k, k])?;
    let gamma = w.take(&format!("{bn}.weight"), &[cout])?;
    let beta = w.take(&format!("{bn}.bias"), &[cout])?;
    let mean = w.take(&format!("{bn}.running_mean"), &[cout])?;
    let var = w.take(&format!("{bn}.running_var"), &[cout])?;
    let bias = fold_bn(&mut weight, cout, &gamma, &beta, &mean, &var, eps);
    Ok(Conv {
        cout,
        cin,
        k,
        stride,
        pad: k / 2,
        depthwise,
        weight,
        bias,
        act,
    })
}

/// Converts an image batch to normalized FP32 NCHW.
pub fn to_f32(data: &TensorData, norm: &ImageNorm, hw: usize) -> Vec<f32> {
    match data {
        TensorData::F32(v) => v.clone(),
        TensorData::U8(v) => {
            let mut out = Vec::with_capacity(v.len());
            for (i, px) in v.iter().enumerate() {
                let c = (i / hw) % CHANNELS;
                out.push((f32::from(*px) / 255.0 - norm.mean[c]) / norm.std[c]);
            }
            out
        }
        TensorData::I64(v) => v.iter().map(|x| *x as f32).collect(),
    }
}

/// Runs `features` (one CHW image → pooled features) over a batch: images in
/// parallel when there are at least as many as threads, otherwise one after the
/// other with parallel ops inside.
fn batch_features<F>(
    x: &[f32],
    n: usize,
    image: usize,
    threads: usize,
    features: F,
) -> Vec<Vec<f32>>
where
    F: Fn(&[f32], usize) -> Vec<f32> + Sync,
{
    if threads > 1 && n >= threads {
        x.par_chunks(image).map(|img| features(img, 1)).collect()
    } else {
        x.chunks(image).map(|img| features(img, threads)).collect()
    }
}

fn classify(
    fc_w: &[f32],
    fc_b: &[f32],
    feats: &[Vec<f32>],
    classes: usize,
    threads: usize,
) -> Vec<f32> {
    let n = feats.len();
    let dim = feats.first().map_or(0, Vec::len);
    let flat: Vec<f32> = feats.iter().flatten().copied().collect();
    let mut out = vec![0.0f32; n * classes];
    matmul(
        &mut out,
        &flat,
        fc_w,
        n,
        dim,
        classes,
        RhsLayout::NkTransposed,
        false,
        threads,
    );
    super::ops::add_bias(&mut out, fc_b);
    out
}

struct MbBlock {
    expand: Option<Conv>,
    depthwise: Conv,
    project: Conv,
    skip: bool,
}

/// EfficientNet-Lite0 (no squeeze-excite, ReLU6, BN folded).
pub struct EfficientNetLite0 {
    cfg: VisionConfig,
    stem: Conv,
    blocks: Vec<MbBlock>,
    head: Conv,
    fc_w: Vec<f32>,
    fc_b: Vec<f32>,
}

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

impl EfficientNetLite0 {
    /// Takes the converted checkpoint's tensors (`_conv_stem`, `_blocks.N.*`, `_fc`).
    pub fn load(cfg: &VisionConfig, mut w: Weights) -> Result<Self, WeightsError> {
        let eps = cfg.bn_eps;
        let stem = conv_bn(
            &mut w,
            "_conv_stem",
            "_bn0",
            (3, 32, 3, 2),
            false,
            Act::Relu6,
            eps,
        )?;
        let mut blocks = Vec::new();
        for (reps, k, stride, expand, cin0, cout) in LITE0_STAGES {
            for r in 0..reps {
                let (cin, s) = if r == 0 { (cin0, stride) } else { (cout, 1) };
                let p = format!("_blocks.{}", blocks.len());
                let mid = cin * expand;
                let expand_conv = if expand != 1 {
                    Some(conv_bn(
                        &mut w,
                        &format!("{p}._expand_conv"),
                        &format!("{p}._bn0"),
                        (cin, mid, 1, 1),
                        false,
                        Act::Relu6,
                        eps,
                    )?)
                } else {
                    None
                };
                let dw = conv_bn(
                    &mut w,
                    &format!("{p}._depthwise_conv"),
                    &format!("{p}._bn1"),
                    (mid, mid, k, s),
                    true,
                    Act::Relu6,
                    eps,
                )?;
                let project = conv_bn(
                    &mut w,
                    &format!("{p}._project_conv"),
                    &format!("{p}._bn2"),
                    (mid, cout, 1, 1),
                    false,
                    Act::None,
                    eps,
                )?;
                blocks.push(MbBlock {
                    expand: expand_conv,
                    depthwise: dw,
                    project,
                    skip: s == 1 && cin == cout,
                });
            }
        }
        let head = conv_bn(
            &mut w,
            "_conv_head",
            "_bn1",
            (320, 1280, 1, 1),
            false,
            Act::Relu6,
            eps,
        )?;
        let fc_w = w.take("_fc.weight", &[cfg.num_classes, 1280])?;
        let fc_b = w.take("_fc.bias", &[cfg.num_classes])?;
        Ok(Self {
            cfg: cfg.clone(),
            stem,
            blocks,
            head,
            fc_w,
            fc_b,
        })
    }

    fn features(&self, img: &[f32], threads: usize) -> Vec<f32> {
        let s = self.cfg.image_size;
        let (mut x, mut h, mut w) = self.stem.forward(img, s, s, threads);
        for b in &self.blocks {
            let input = x;
            let (mut y, mut yh, mut yw) = (input.clone(), h, w);
            if let Some(e) = &b.expand {
                (y, yh, yw) = e.forward(&y, yh, yw, threads);
            }
            (y, yh, yw) = b.depthwise.forward(&y, yh, yw, threads);
            (y, yh, yw) = b.project.forward(&y, yh, yw, threads);
            if b.skip {
                for (a, r) in y.iter_mut().zip(&input) {
                    *a += r;
                }
            }
            (x, h, w) = (y, yh, yw);
        }
        let (x, h, w) = self.head.forward(&x, h, w, threads);
        global_avg_pool(&x, self.head.cout, h * w)
    }

    /// Logits `[n, classes]` for `n` normalized FP32 CHW images.
    pub fn forward(&self, x: &[f32], n: usize, threads: usize) -> Vec<f32> {
        let image = CHANNELS * self.cfg.image_size * self.cfg.image_size;
        let feats = batch_features(x, n, image, threads, |img, t| self.features(img, t));
        classify(
            &self.fc_w,
            &self.fc_b,
            &feats,
            self.cfg.num_classes,
            threads,
        )
    }
}

struct Bottleneck {
    conv1: Conv,
    conv2: Conv,
    conv3: Conv,
    downsample: Option<Conv>,
}

/// ResNet with bottleneck blocks (ResNet-50/101/152), torchvision names.
pub struct ResNet {
    cfg: VisionConfig,
    stem: Conv,
    blocks: Vec<Bottleneck>,
    fc_w: Vec<f32>,
    fc_b: Vec<f32>,
}

impl ResNet {
    /// Takes torchvision-named tensors (`conv1`, `layerN.M.*`, `fc`).
    pub fn load(
        cfg: &VisionConfig,
        depths: [usize; 4],
        mut w: Weights,
    ) -> Result<Self, WeightsError> {
        let eps = cfg.bn_eps;
        let mut stem = conv_bn(&mut w, "conv1", "bn1", (3, 64, 7, 2), false, Act::Relu, eps)?;
        stem.pad = 3;
        let mut blocks = Vec::new();
        let mut cin = 64;
        for (stage, &depth) in depths.iter().enumerate() {
            let width = 64 << stage;
            for b in 0..depth {
                let p = format!("layer{}.{b}", stage + 1);
                let stride = if b == 0 && stage > 0 { 2 } else { 1 };
                let conv1 = conv_bn(
                    &mut w,
                    &format!("{p}.conv1"),
                    &format!("{p}.bn1"),
                    (cin, width, 1, 1),
                    false,
                    Act::Relu,
                    eps,
                )?;
                let conv2 = conv_bn(
                    &mut w,
                    &format!("{p}.conv2"),
                    &format!("{p}.bn2"),
                    (width, width, 3, stride),
                    false,
                    Act::Relu,
                    eps,
                )?;
                let conv3 = conv_bn(
                    &mut w,
                    &format!("{p}.conv3"),
                    &format!("{p}.bn3"),
                    (width, width * 4, 1, 1),
                    false,
                    Act::None,
                    eps,
                )?;
                let downsample = if b == 0 {
                    Some(conv_bn(
                        &mut w,
                        &format!("{p}.downsample.0"),
                        &format!("{p}.downsample.1"),
                        (cin, width * 4, 1, stride),
                        false,
                        Act::None,
                        eps,
                    )?)
                } else {
                    None
                };
                blocks.push(Bottleneck {
                    conv1,
                    conv2,
                    conv3,
                    downsample,
                });
                cin = width * 4;
            }
        }
        let fc_w = w.take("fc.weight", &[cfg.num_classes, cin])?;
        let fc_b = w.take("fc.bias", &[cfg.num_classes])?;
        Ok(Self {
            cfg: cfg.clone(),
            stem,
            blocks,
            fc_w,
            fc_b,
        })
    }

    fn features(&self, img: &[f32], threads: usize) -> Vec<f32> {
        let s = self.cfg.image_size;
        let (x, h, w) = self.stem.forward(img, s, s, threads);
        let (mut x, mut h, mut w) = max_pool_3x3_s2(&x, 64, h, w);
        let mut c = 64;
        for b in &self.blocks {
            let (y, yh, yw) = b.conv1.forward(&x, h, w, threads);
            let (y, yh, yw) = b.conv2.forward(&y, yh, yw, threads);
            let (mut y, yh, yw) = b.conv3.forward(&y, yh, yw, threads);
            let identity = match &b.downsample {
                Some(d) => d.forward(&x, h, w, threads).0,
                None => x,
            };
            for (a, r) in y.iter_mut().zip(&identity) {
                *a = (*a + r).max(0.0);
            }
            (x, h, w, c) = (y, yh, yw, b.conv3.cout);
        }
        global_avg_pool(&x, c, h * w)
    }

    /// Logits `[n, classes]` for `n` normalized FP32 CHW images.
    pub fn forward(&self, x: &[f32], n: usize, threads: usize) -> Vec<f32> {
        let image = CHANNELS * self.cfg.image_size * self.cfg.image_size;
        let feats = batch_features(x, n, image, threads, |img, t| self.features(img, t));
        classify(
            &self.fc_w,
            &self.fc_b,
            &feats,
            self.cfg.num_classes,
            threads,
        )
    }
}
