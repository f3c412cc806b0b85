//! BERT encoder + sentence pooling on the CPU: embeddings → N × (self-attention
//! with the attention mask honoured, GELU feed-forward, post-LayerNorm) →
//! masked mean (or CLS) pooling → L2 normalization.

use rayon::prelude::*;

use super::gemm::{RhsLayout, matmul};
use super::ops::{add_bias, gelu, layer_norm, softmax};
use crate::config::{BertConfig, Pooling};
use crate::engine::EngineError;
use crate::weights::{Weights, WeightsError};

struct Layer {
    /// Q, K and V weights stacked: `[3H, H]`, one GEMM per layer.
    qkv_w: Vec<f32>,
    qkv_b: Vec<f32>,
    o_w: Vec<f32>,
    o_b: Vec<f32>,
    ln1_g: Vec<f32>,
    ln1_b: Vec<f32>,
    i_w: Vec<f32>,
    i_b: Vec<f32>,
    out_w: Vec<f32>,
    out_b: Vec<f32>,
    ln2_g: Vec<f32>,
    ln2_b: Vec<f32>,
}

/// A loaded BERT sentence-embedding model.
pub struct Bert {
    cfg: BertConfig,
    word: Vec<f32>,
    pos: Vec<f32>,
    token_type: Vec<f32>,
    ln_g: Vec<f32>,
    ln_b: Vec<f32>,
    layers: Vec<Layer>,
}

impl Bert {
    /// Takes the encoder's tensors (HF names, optional `bert.` prefix) from `w`.
    pub fn load(cfg: &BertConfig, w: Weights) -> Result<Self, WeightsError> {
        let mut w = w.with_prefix_if_present("bert.", "embeddings.word_embeddings.weight");
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let word = w.take("embeddings.word_embeddings.weight", &[cfg.vocab_size, h])?;
        let pos = w.take(
            "embeddings.position_embeddings.weight",
            &[cfg.max_position_embeddings, h],
        )?;
        let token_type = w.take(
            "embeddings.token_type_embeddings.weight",
            &[cfg.type_vocab_size, h],
        )?;
        let ln_g = w.take("embeddings.LayerNorm.weight", &[h])?;
        let ln_b = w.take("embeddings.LayerNorm.bias", &[h])?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let p = format!("encoder.layer.{l}.");
            let mut qkv_w = Vec::with_capacity(3 * h * h);
            let mut qkv_b = Vec::with_capacity(3 * h);
            for part in ["query", "key", "value"] {
                qkv_w.extend(w.take(&format!("{p}attention.self.{part}.weight"), &[h, h])?);
                qkv_b.extend(w.take(&format!("{p}attention.self.{part}.bias"), &[h])?);
            }
            layers.push(Layer {
                qkv_w,
                qkv_b,
                o_w: w.take(&format!("{p}attention.output.dense.weight"), &[h, h])?,
                o_b: w.take(&format!("{p}attention.output.dense.bias"), &[h])?,
                ln1_g: w.take(&format!("{p}attention.output.LayerNorm.weight"), &[h])?,
                ln1_b: w.take(&format!("{p}attention.output.LayerNorm.bias"), &[h])?,
                i_w: w.take(&format!("{p}intermediate.dense.weight"), &[i, h])?,
                i_b: w.take(&format!("{p}intermediate.dense.bias"), &[i])?,
                out_w: w.take(&format!("{p}output.dense.weight"), &[h, i])?,
                out_b: w.take(&format!("{p}output.dense.bias"), &[h])?,
                ln2_g: w.take(&format!("{p}output.LayerNorm.weight"), &[h])?,
                ln2_b: w.take(&format!("{p}output.LayerNorm.bias"), &[h])?,
            });
        }
        Ok(Self {
            cfg: cfg.clone(),
            word,
            pos,
            token_type,
            ln_g,
            ln_b,
            layers,
        })
    }

    /// Hidden width (the embedding size).
    pub fn hidden_size(&self) -> usize {
        self.cfg.hidden_size
    }

    /// Embeds `n` sequences of length `l` (row-major `[n, l]` inputs); returns
    /// `[n, hidden]` L2-normalized sentence embeddings.
    pub fn forward(
        &self,
        ids: &[i64],
        mask: &[i64],
        types: &[i64],
        n: usize,
        l: usize,
        threads: usize,
    ) -> Result<Vec<f32>, EngineError> {
        let c = &self.cfg;
        let h = c.hidden_size;
        if l > c.max_position_embeddings {
            return Err(EngineError::InvalidInput(format!(
                "sequence length {l} exceeds max_position_embeddings {}",
                c.max_position_embeddings
            )));
        }
        let t = n * l;
        // Embeddings.
        let mut x = vec![0.0f32; t * h];
        for (row, dst) in x.chunks_exact_mut(h).enumerate() {
            let (id, ty) = (ids[row], types[row]);
            if id < 0 || id as usize >= c.vocab_size {
                return Err(EngineError::InvalidInput(format!(
                    "input_ids value {id} outside vocabulary 0..{}",
                    c.vocab_size
                )));
            }
            if ty < 0 || ty as usize >= c.type_vocab_size {
                return Err(EngineError::InvalidInput(format!(
                    "token_type_ids value {ty} outside 0..{}",
                    c.type_vocab_size
                )));
            }
            let wv = &self.word[id as usize * h..][..h];
            let pv = &self.pos[(row % l) * h..][..h];
            let tv = &self.token_type[ty as usize * h..][..h];
            for j in 0..h {
                dst[j] = wv[j] + pv[j] + tv[j];
            }
        }
        layer_norm(&mut x, h, &self.ln_g, &self.ln_b, c.layer_norm_eps);

        let mut qkv = vec![0.0f32; t * 3 * h];
        let mut ctx = vec![0.0f32; t * h];
        let mut tmp = vec![0.0f32; t * h];
        let mut inter = vec![0.0f32; t * c.intermediate_size];
        for layer in &self.layers {
            matmul(
                &mut qkv,
                &x,
                &layer.qkv_w,
                t,
                h,
                3 * h,
                RhsLayout::NkTransposed,
                false,
                threads,
            );
            add_bias(&mut qkv, &layer.qkv_b);
            attention(&qkv, mask, &mut ctx, l, h, c.num_heads, threads);
            matmul(
                &mut tmp,
                &ctx,
                &layer.o_w,
                t,
                h,
                h,
                RhsLayout::NkTransposed,
                false,
                threads,
            );
            add_bias(&mut tmp, &layer.o_b);
            for (a, b) in x.iter_mut().zip(&tmp) {
                *a += b;
            }
            layer_norm(&mut x, h, &layer.ln1_g, &layer.ln1_b, c.layer_norm_eps);
            let is = c.intermediate_size;
            matmul(
                &mut inter,
                &x,
                &layer.i_w,
                t,
                h,
                is,
                RhsLayout::NkTransposed,
                false,
                threads,
            );
            add_bias(&mut inter, &layer.i_b);
            if threads > 1 {
                inter.par_chunks_mut(4096).for_each(gelu);
            } else {
                gelu(&mut inter);
            }
            matmul(
                &mut tmp,
                &inter,
                &layer.out_w,
                t,
                is,
                h,
                RhsLayout::NkTransposed,
                false,
                threads,
            );
            add_bias(&mut tmp, &layer.out_b);
            for (a, b) in x.iter_mut().zip(&tmp) {
                *a += b;
            }
            layer_norm(&mut x, h, &layer.ln2_g, &layer.ln2_b, c.layer_norm_eps);
        }
        Ok(pool_and_normalize(&x, mask, n, l, h, c.pooling))
    }
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent partial sums so the compiler can vectorize.
    let mut acc = [0.0f32; 8];
    let chunks = a.len() / 8;
    for i in 0..chunks {
        for j in 0..8 {
            acc[j] += a[i * 8 + j] * b[i * 8 + j];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in chunks * 8..a.len() {
        s += a[i] * b[i];
    }
    s
}

/// Multi-head self-attention over `qkv` (`[n*l, 3h]`, Q|K|V), writing `[n*l, h]`.
/// Keys with mask 0 get no weight; padded query rows produce zeros (they are
/// never pooled).
fn attention(
    qkv: &[f32],
    mask: &[i64],
    ctx: &mut [f32],
    l: usize,
    h: usize,
    heads: usize,
    threads: usize,
) {
    let d = h / heads;
    let scale = 1.0 / (d as f32).sqrt();
    let per_seq = |(b, out): (usize, &mut [f32])| {
        let m = &mask[b * l..(b + 1) * l];
        let keys: Vec<usize> = (0..l).filter(|&j| m[j] != 0).collect();
        let mut scores = vec![0.0f32; keys.len()];
        out.fill(0.0);
        for head in 0..heads {
            for i in 0..l {
                if m[i] == 0 {
                    continue;
                }
                let q = &qkv[(b * l + i) * 3 * h + head * d..][..d];
                for (s, &j) in scores.iter_mut().zip(&keys) {
                    let k = &qkv[(b * l + j) * 3 * h + h + head * d..][..d];
                    *s = dot(q, k) * scale;
                }
                softmax(&mut scores);
                let o = &mut out[i * h + head * d..][..d];
                for (&p, &j) in scores.iter().zip(&keys) {
                    let v = &qkv[(b * l + j) * 3 * h + 2 * h + head * d..][..d];
                    for (ov, vv) in o.iter_mut().zip(v) {
                        *ov += p * vv;
                    }
                }
            }
        }
    };
    if threads > 1 {
        ctx.par_chunks_mut(l * h).enumerate().for_each(per_seq);
    } else {
        ctx.chunks_mut(l * h).enumerate().for_each(per_seq);
    }
}

/// Pools token states into one vector per sequence and L2-normalizes it
/// (`x / max(‖x‖, 1e-12)`, as `torch.nn.functional.normalize`).
fn pool_and_normalize(
    x: &[f32],
    mask: &[i64],
    n: usize,
    l: usize,
    h: usize,
    pooling: Pooling,
) -> Vec<f32> {
    let mut out = vec![0.0f32; n * h];
    for (b, dst) in out.chunks_exact_mut(h).enumerate() {
        match pooling {
            Pooling::Cls => dst.copy_from_slice(&x[b * l * h..][..h]),
            Pooling::Mean => {
                let mut count = 0.0f32;
                for i in 0..l {
                    if mask[b * l + i] != 0 {
                        count += 1.0;
                        for (dv, xv) in dst.iter_mut().zip(&x[(b * l + i) * h..][..h]) {
                            *dv += xv;
                        }
                    }
                }
                let inv = 1.0 / count.max(1e-9);
                dst.iter_mut().for_each(|v| *v *= inv);
            }
        }
        let norm = dst.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
        dst.iter_mut().for_each(|v| *v /= norm);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_pooling_ignores_masked_tokens_and_normalizes() {
        // two tokens of width 2; the second is padding and must not count.
        let x = [3.0, 4.0, 100.0, -100.0];
        let out = pool_and_normalize(&x, &[1, 0], 1, 2, 2, Pooling::Mean);
        assert!((out[0] - 0.6).abs() < 1e-6 && (out[1] - 0.8).abs() < 1e-6);
    }

    #[test]
    fn attention_gives_padded_keys_no_weight() {
        // l = 2, h = 1, one head; key 1 is padding with a huge value.
        let qkv = [1.0, 1.0, 2.0, 1.0, 50.0, 1000.0];
        let mut ctx = [0.0; 2];
        attention(&qkv, &[1, 0], &mut ctx, 2, 1, 1, 1);
        assert_eq!(ctx, [2.0, 0.0]);
    }
}
