//! The CPU engine's own ops: normalization, activations, convolutions
//! (im2col then GEMM; depthwise direct), pooling. Layouts are row-major;
//! images are CHW per sample.

use rayon::prelude::*;

use super::gemm::{RhsLayout, matmul};

/// In-place LayerNorm over rows of width `dim`.
pub fn layer_norm(x: &mut [f32], dim: usize, gamma: &[f32], beta: &[f32], eps: f32) {
    for row in x.chunks_exact_mut(dim) {
        let mean = row.iter().sum::<f32>() / dim as f32;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / dim as f32;
        let inv = 1.0 / (var + eps).sqrt();
        for ((v, g), b) in row.iter_mut().zip(gamma).zip(beta) {
            *v = (*v - mean) * inv * g + b;
        }
    }
}

/// Adds `bias` to every row of width `bias.len()`.
pub fn add_bias(x: &mut [f32], bias: &[f32]) {
    for row in x.chunks_exact_mut(bias.len()) {
        for (v, b) in row.iter_mut().zip(bias) {
            *v += b;
        }
    }
}

/// `erf` with |error| < 1.2e-7 (W. J. Cody's rational approximations via
/// Numerical Recipes' erfc Chebyshev fit), computed in f64.
pub fn erf(x: f32) -> f32 {
    let x = f64::from(x);
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t
        * (-z * z - 1.265_512_23
            + t * (1.000_023_68
                + t * (0.374_091_96
                    + t * (0.096_784_18
                        + t * (-0.186_288_06
                            + t * (0.278_868_07
                                + t * (-1.135_203_98
                                    + t * (1.488_515_87
                                        + t * (-0.822_152_23 + t * 0.170_872_77)))))))))
            .exp();
    (if x >= 0.0 { 1.0 - r } else { r - 1.0 }) as f32
}

/// In-place exact (erf) GELU, as BERT's `hidden_act: gelu`.
pub fn gelu(x: &mut [f32]) {
    for v in x {
        *v = 0.5 * *v * (1.0 + erf(*v * std::f32::consts::FRAC_1_SQRT_2));
    }
}

/// In-place numerically stable softmax of one row.
pub fn softmax(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in row.iter_mut() {
        *v *= inv;
    }
}

/// Activation fused after a conv's bias.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    /// Identity.
    None,
    /// `max(x, 0)`.
    Relu,
    /// `min(max(x, 0), 6)`.
    Relu6,
}

impl Act {
    #[inline]
    fn apply(self, v: f32) -> f32 {
        match self {
            Self::None => v,
            Self::Relu => v.max(0.0),
            Self::Relu6 => v.clamp(0.0, 6.0),
        }
    }
}

/// A convolution with BatchNorm already folded in (so it has a bias).
#[derive(Debug, Clone)]
pub struct Conv {
    /// Output channels.
    pub cout: usize,
    /// Input channels.
    pub cin: usize,
    /// Square kernel size.
    pub k: usize,
    /// Stride.
    pub stride: usize,
    /// Symmetric zero padding.
    pub pad: usize,
    /// Depthwise (`groups == cin == cout`) instead of dense.
    pub depthwise: bool,
    /// `[cout, cin/groups, k, k]`.
    pub weight: Vec<f32>,
    /// `[cout]`.
    pub bias: Vec<f32>,
    /// Fused activation.
    pub act: Act,
}

/// Folds inference BatchNorm (`gamma`, `beta`, running `mean`/`var`, `eps`)
/// into a bias-less conv weight `[cout, ...]`; returns the new bias.
pub fn fold_bn(
    weight: &mut [f32],
    cout: usize,
    gamma: &[f32],
    beta: &[f32],
    mean: &[f32],
    var: &[f32],
    eps: f32,
) -> Vec<f32> {
    let per = weight.len() / cout;
    let mut bias = Vec::with_capacity(cout);
    for o in 0..cout {
        let scale = gamma[o] / (var[o] + eps).sqrt();
        for w in &mut weight[o * per..(o + 1) * per] {
            *w *= scale;
        }
        bias.push(beta[o] - mean[o] * scale);
    }
    bias
}

impl Conv {
    /// Output spatial size for an input of `h × w`.
    pub fn out_hw(&self, h: usize, w: usize) -> (usize, usize) {
        (
            (h + 2 * self.pad - self.k) / self.stride + 1,
            (w + 2 * self.pad - self.k) / self.stride + 1,
        )
    }

    /// Runs the conv on one CHW image; `threads > 1` parallelizes inside.
    pub fn forward(
        &self,
        x: &[f32],
        h: usize,
        w: usize,
        threads: usize,
    ) -> (Vec<f32>, usize, usize) {
        let (ho, wo) = self.out_hw(h, w);
        let mut out = vec![0.0f32; self.cout * ho * wo];
        if self.depthwise {
            self.depthwise_into(x, h, w, &mut out, ho, wo, threads);
        } else {
            let kk = self.cin * self.k * self.k;
            let direct = self.k == 1 && self.stride == 1 && self.pad == 0;
            let cols_buf;
            let cols: &[f32] = if direct {
                x
            } else {
                cols_buf = im2col(x, self.cin, h, w, self.k, self.stride, self.pad, ho, wo);
                &cols_buf
            };
            matmul(
                &mut out,
                &self.weight,
                cols,
                self.cout,
                kk,
                ho * wo,
                RhsLayout::Kn,
                false,
                threads,
            );
            let hw = ho * wo;
            let finish = |(o, plane): (usize, &mut [f32])| {
                let b = self.bias[o];
                for v in plane {
                    *v = self.act.apply(*v + b);
                }
            };
            if threads > 1 {
                out.par_chunks_mut(hw).enumerate().for_each(finish);
            } else {
                out.chunks_mut(hw).enumerate().for_each(finish);
            }
        }
        (out, ho, wo)
    }

    #[allow(clippy::too_many_arguments)]
    fn depthwise_into(
        &self,
        x: &[f32],
        h: usize,
        w: usize,
        out: &mut [f32],
        ho: usize,
        wo: usize,
        threads: usize,
    ) {
        let (k, s, p) = (self.k, self.stride, self.pad);
        let channel = |(c, dst): (usize, &mut [f32])| {
            let src = &x[c * h * w..(c + 1) * h * w];
            let wt = &self.weight[c * k * k..(c + 1) * k * k];
            let b = self.bias[c];
            for oy in 0..ho {
                let iy0 = (oy * s) as isize - p as isize;
                let ky_lo = (-iy0).max(0) as usize;
                let ky_hi = ((h as isize - iy0).min(k as isize)).max(0) as usize;
                for ox in 0..wo {
                    let ix0 = (ox * s) as isize - p as isize;
                    let kx_lo = (-ix0).max(0) as usize;
                    let kx_hi = ((w as isize - ix0).min(k as isize)).max(0) as usize;
                    let mut acc = 0.0f32;
                    for ky in ky_lo..ky_hi {
                        let row = ((iy0 + ky as isize) as usize) * w;
                        let wrow = &wt[ky * k..ky * k + k];
                        for kx in kx_lo..kx_hi {
                            acc += src[row + (ix0 + kx as isize) as usize] * wrow[kx];
                        }
                    }
                    dst[oy * wo + ox] = self.act.apply(acc + b);
                }
            }
        };
        if threads > 1 {
            out.par_chunks_mut(ho * wo).enumerate().for_each(channel);
        } else {
            out.chunks_mut(ho * wo).enumerate().for_each(channel);
        }
    }
}

/// Unfolds a CHW image into `[cin*k*k, ho*wo]` columns (zero padding).
#[allow(clippy::too_many_arguments)]
pub fn im2col(
    x: &[f32],
    cin: usize,
    h: usize,
    w: usize,
    k: usize,
    s: usize,
    p: usize,
    ho: usize,
    wo: usize,
) -> Vec<f32> {
    let mut cols = vec![0.0f32; cin * k * k * ho * wo];
    for c in 0..cin {
        let src = &x[c * h * w..(c + 1) * h * w];
        for ky in 0..k {
            for kx in 0..k {
                let row = &mut cols[((c * k + ky) * k + kx) * ho * wo..][..ho * wo];
                for oy in 0..ho {
                    let iy = (oy * s + ky) as isize - p as isize;
                    if iy < 0 || iy >= h as isize {
                        continue;
                    }
                    let srow = &src[iy as usize * w..(iy as usize + 1) * w];
                    for ox in 0..wo {
                        let ix = (ox * s + kx) as isize - p as isize;
                        if ix >= 0 && ix < w as isize {
                            row[oy * wo + ox] = srow[ix as usize];
                        }
                    }
                }
            }
        }
    }
    cols
}

/// 3×3 stride-2 pad-1 max pooling of a CHW image (ResNet's stem).
pub fn max_pool_3x3_s2(x: &[f32], c: usize, h: usize, w: usize) -> (Vec<f32>, usize, usize) {
    let (ho, wo) = ((h + 2 - 3) / 2 + 1, (w + 2 - 3) / 2 + 1);
    let mut out = vec![f32::NEG_INFINITY; c * ho * wo];
    for ch in 0..c {
        for oy in 0..ho {
            for ox in 0..wo {
                let mut m = f32::NEG_INFINITY;
                for ky in 0..3 {
                    let iy = (oy * 2 + ky) as isize - 1;
                    if iy < 0 || iy >= h as isize {
                        continue;
                    }
                    for kx in 0..3 {
                        let ix = (ox * 2 + kx) as isize - 1;
                        if ix >= 0 && ix < w as isize {
                            m = m.max(x[ch * h * w + iy as usize * w + ix as usize]);
                        }
                    }
                }
                out[ch * ho * wo + oy * wo + ox] = m;
            }
        }
    }
    (out, ho, wo)
}

/// Global average pooling of a CHW image into `c` values.
pub fn global_avg_pool(x: &[f32], c: usize, hw: usize) -> Vec<f32> {
    (0..c)
        .map(|ch| x[ch * hw..(ch + 1) * hw].iter().sum::<f32>() / hw as f32)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_matches_known_values() {
        for (x, want) in [
            (0.0f32, 0.0f32),
            (0.5, 0.520_499_9),
            (1.0, 0.842_700_8),
            (-2.0, -0.995_322_3),
            (3.0, 0.999_977_9),
        ] {
            assert!(
                (erf(x) - want).abs() < 2e-7,
                "erf({x}) = {} want {want}",
                erf(x)
            );
        }
    }

    #[test]
    fn softmax_rows_sum_to_one_and_keep_order() {
        let mut r = vec![1.0, 2.0, 3.0, 9.0];
        softmax(&mut r);
        assert!((r.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(r[3] > 0.99 && r[0] < r[1] && r[1] < r[2]);
    }

    #[test]
    fn layer_norm_gives_zero_mean_unit_variance() {
        let mut x = vec![1.0, 2.0, 3.0, 4.0];
        layer_norm(&mut x, 4, &[1.0; 4], &[0.0; 4], 1e-12);
        let mean: f32 = x.iter().sum::<f32>() / 4.0;
        let var: f32 = x.iter().map(|v| v * v).sum::<f32>() / 4.0;
        assert!(mean.abs() < 1e-6 && (var - 1.0).abs() < 1e-5);
    }

    fn naive_conv(x: &[f32], cin: usize, h: usize, w: usize, conv: &Conv) -> Vec<f32> {
        let (ho, wo) = conv.out_hw(h, w);
        let mut out = vec![0.0; conv.cout * ho * wo];
        for o in 0..conv.cout {
            for oy in 0..ho {
                for ox in 0..wo {
                    let mut acc = conv.bias[o];
                    let chans: Vec<usize> = if conv.depthwise {
                        vec![o]
                    } else {
                        (0..cin).collect()
                    };
                    for (ci_idx, &ci) in chans.iter().enumerate() {
                        for ky in 0..conv.k {
                            for kx in 0..conv.k {
                                let iy = (oy * conv.stride + ky) as isize - conv.pad as isize;
                                let ix = (ox * conv.stride + kx) as isize - conv.pad as isize;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                    continue;
                                }
                                let wi = if conv.depthwise { ci_idx } else { ci };
                                let wpc = if conv.depthwise { 1 } else { cin };
                                acc += x[ci * h * w + iy as usize * w + ix as usize]
                                    * conv.weight[((o * wpc + wi) * conv.k + ky) * conv.k + kx];
                            }
                        }
                    }
                    out[(o * ho + oy) * wo + ox] = conv.act.apply(acc);
                }
            }
        }
        out
    }

    fn conv(cin: usize, cout: usize, k: usize, stride: usize, depthwise: bool) -> Conv {
        let per = if depthwise { k * k } else { cin * k * k };
        Conv {
            cout,
            cin,
            k,
            stride,
            pad: k / 2,
            depthwise,
            weight: (0..cout * per)
                .map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.1)
                .collect(),
            bias: (0..cout).map(|i| i as f32 * 0.01).collect(),
            act: Act::Relu6,
        }
    }

    #[test]
    fn dense_and_depthwise_convs_match_a_naive_convolution() {
        let (cin, h, w) = (4, 9, 7);
        let x: Vec<f32> = (0..cin * h * w).map(|i| (i as f32 * 0.3).sin()).collect();
        for c in [
            conv(cin, 5, 3, 2, false),
            conv(cin, 6, 1, 1, false),
            conv(cin, cin, 5, 2, true),
            conv(cin, cin, 3, 1, true),
        ] {
            let want = naive_conv(&x, cin, h, w, &c);
            for threads in [1, 2] {
                let (got, _, _) = c.forward(&x, h, w, threads);
                assert_eq!(got.len(), want.len());
                for (a, b) in got.iter().zip(&want) {
                    assert!((a - b).abs() < 1e-4, "{a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn folding_batch_norm_equals_applying_it_after_the_conv() {
        let mut wt = vec![1.0, 2.0, 3.0, 4.0];
        let bias = fold_bn(
            &mut wt,
            2,
            &[2.0, 0.5],
            &[1.0, -1.0],
            &[0.5, 1.0],
            &[4.0, 0.25],
            0.0,
        );
        // channel 0: scale 2/2 = 1; channel 1: scale 0.5/0.5 = 1
        assert_eq!(wt, vec![1.0, 2.0, 3.0, 4.0]);
        assert_eq!(bias, vec![0.5, -2.0]);
    }

    #[test]
    fn max_pool_halves_the_spatial_size() {
        let x: Vec<f32> = (0..16).map(|i| i as f32).collect();
        let (out, ho, wo) = max_pool_3x3_s2(&x, 1, 4, 4);
        assert_eq!((ho, wo), (2, 2));
        assert_eq!(out, vec![5.0, 7.0, 13.0, 15.0]);
    }
}
