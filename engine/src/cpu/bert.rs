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
    /// `[n, hidden]` L2-normalized sentence embeddings. Only the tokens the attention mask
    /// keeps are computed ([`Packed`]), so a batch padded to its longest row costs what its
    /// real tokens cost. Values (token ids, token types, sequence length) must have passed the
    /// model's [`ModelSpec::check_values`](crate::spec::ModelSpec::check_values), as
    /// [`CpuEngine`](super::CpuEngine) does before calling this.
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
        let cells = n.checked_mul(l);
        if [ids.len(), mask.len(), types.len()]
            .iter()
            .any(|&len| Some(len) != cells)
        {
            return Err(EngineError::InvalidInput(format!(
                "input_ids, attention_mask and token_type_ids must each hold {n} x {l} values"
            )));
        }
        let packed = Packed::new(mask, n, l, c.pooling);
        let t = packed.src.len();
        // Embeddings, each token at its position in its row.
        let mut x = vec![0.0f32; t * h];
        for (dst, &src) in x.chunks_exact_mut(h).zip(&packed.src) {
            let wv = &self.word[ids[src] as usize * h..][..h];
            let pv = &self.pos[(src % l) * h..][..h];
            let tv = &self.token_type[types[src] as usize * h..][..h];
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
            attention(&qkv, &packed, &mut ctx, h, c.num_heads, threads);
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
        Ok(pool_and_normalize(&x, &packed, h, c.pooling))
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

/// The tokens a forward pass computes, row after row: those the attention mask keeps and,
/// under CLS pooling, each row's first token. Every layer but attention works token by token,
/// and attention gives masked keys no weight, so a masked token changes no other token; it is
/// not pooled either, so leaving it out changes no output.
#[derive(Debug, PartialEq)]
struct Packed {
    /// Index into the `[n, l]` inputs of each packed token.
    src: Vec<usize>,
    /// Whether each packed token's mask is set. Only those are keys and are pooled by the
    /// mean; every packed token attends as a query, so a masked first token kept for CLS
    /// pooling attends to the row's unmasked tokens, as it does in the padded batch (the mask
    /// hides keys, not queries).
    kept: Vec<bool>,
    /// Where each row's packed tokens end (exclusive); the next row's start there.
    ends: Vec<usize>,
}

impl Packed {
    fn new(mask: &[i64], n: usize, l: usize, pooling: Pooling) -> Self {
        let mut p = Packed {
            src: Vec::with_capacity(mask.len()),
            kept: Vec::with_capacity(mask.len()),
            ends: Vec::with_capacity(n),
        };
        for (b, row) in mask.chunks_exact(l.max(1)).take(n).enumerate() {
            for (i, &m) in row.iter().enumerate() {
                if m != 0 || (i == 0 && pooling == Pooling::Cls) {
                    p.src.push(b * l + i);
                    p.kept.push(m != 0);
                }
            }
            p.ends.push(p.src.len());
        }
        p.ends.resize(n, p.src.len());
        p
    }

    /// Each row's first packed token and how many it has.
    fn rows(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.ends
            .iter()
            .scan(0, |start, &end| Some((std::mem::replace(start, end), end)))
            .map(|(start, end)| (start, end - start))
    }
}

/// Multi-head self-attention over `qkv` (`[t, 3h]`, Q|K|V, `t` packed tokens), writing
/// `[t, h]`. Each row attends within itself; keys with mask 0 get no weight (a row without
/// any unmasked key gets zeros).
fn attention(qkv: &[f32], p: &Packed, ctx: &mut [f32], h: usize, heads: usize, threads: usize) {
    let d = h / heads;
    let scale = 1.0 / (d as f32).sqrt();
    let per_row = |(start, out): (usize, &mut [f32])| {
        let kept = &p.kept[start..start + out.len() / h];
        let keys: Vec<usize> = (0..kept.len()).filter(|&j| kept[j]).collect();
        let mut scores = vec![0.0f32; keys.len()];
        out.fill(0.0);
        for head in 0..heads {
            for i in 0..kept.len() {
                let q = &qkv[(start + i) * 3 * h + head * d..][..d];
                for (s, &j) in scores.iter_mut().zip(&keys) {
                    let k = &qkv[(start + j) * 3 * h + h + head * d..][..d];
                    *s = dot(q, k) * scale;
                }
                softmax(&mut scores);
                let o = &mut out[i * h + head * d..][..d];
                for (&w, &j) in scores.iter().zip(&keys) {
                    let v = &qkv[(start + j) * 3 * h + 2 * h + head * d..][..d];
                    for (ov, vv) in o.iter_mut().zip(v) {
                        *ov += w * vv;
                    }
                }
            }
        }
    };
    let mut rows = Vec::with_capacity(p.ends.len());
    let mut rest = ctx;
    for (start, len) in p.rows() {
        let (row, tail) = std::mem::take(&mut rest).split_at_mut(len * h);
        rows.push((start, row));
        rest = tail;
    }
    if threads > 1 {
        rows.into_par_iter().for_each(per_row);
    } else {
        rows.into_iter().for_each(per_row);
    }
}

/// Pools each row's packed token states into one vector and L2-normalizes it
/// (`x / max(‖x‖, 1e-12)`, as `torch.nn.functional.normalize`).
fn pool_and_normalize(x: &[f32], p: &Packed, h: usize, pooling: Pooling) -> Vec<f32> {
    let mut out = vec![0.0f32; p.ends.len() * h];
    for (dst, (start, len)) in out.chunks_exact_mut(h).zip(p.rows()) {
        match pooling {
            Pooling::Cls => {
                if len > 0 {
                    dst.copy_from_slice(&x[start * h..][..h]);
                }
            }
            Pooling::Mean => {
                let mut count = 0.0f32;
                for i in (start..start + len).filter(|&i| p.kept[i]) {
                    count += 1.0;
                    for (dv, xv) in dst.iter_mut().zip(&x[i * h..][..h]) {
                        *dv += xv;
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
    fn packing_drops_masked_tokens_but_keeps_each_rows_first_token_for_cls_pooling() {
        // two rows of three: [1, 1, 0] and [0, 1, 0]
        let mask = [1, 1, 0, 0, 1, 0];
        let mean = Packed::new(&mask, 2, 3, Pooling::Mean);
        assert_eq!(mean.src, [0, 1, 4]);
        assert_eq!(mean.kept, [true, true, true]);
        assert_eq!(mean.ends, [2, 3]);
        let cls = Packed::new(&mask, 2, 3, Pooling::Cls);
        assert_eq!(cls.src, [0, 1, 3, 4]);
        assert_eq!(cls.kept, [true, true, false, true]);
        assert_eq!(cls.ends, [2, 4]);
        let empty = Packed::new(&[], 2, 0, Pooling::Cls);
        assert_eq!(empty.ends, [0, 0]);
    }

    #[test]
    fn mean_pooling_ignores_masked_tokens_and_normalizes() {
        // one row of two tokens of width 2, packed under CLS pooling so the masked first
        // token is present; the mean must not count it.
        let p = Packed::new(&[0, 1], 1, 2, Pooling::Cls);
        let x = [100.0, -100.0, 3.0, 4.0];
        let out = pool_and_normalize(&x, &p, 2, Pooling::Mean);
        assert!((out[0] - 0.6).abs() < 1e-6 && (out[1] - 0.8).abs() < 1e-6);
    }

    #[test]
    fn attention_stays_within_each_row_and_gives_masked_keys_no_weight() {
        // h = 1, one head. Row 0: a masked first token (kept for CLS pooling) with a huge
        // value, then a token with value 2. Row 1: one token with value 7. The masked token
        // is no key, but as a query it attends to its row's unmasked token.
        let p = Packed::new(&[0, 1, 1, 0], 2, 2, Pooling::Cls);
        assert_eq!(p.src, [0, 1, 2]);
        // q, k, v per packed token
        let qkv = [1.0, 50.0, 1000.0, 1.0, 1.0, 2.0, 1.0, 1.0, 7.0];
        for threads in [1, 2] {
            let mut ctx = [-1.0; 3];
            attention(&qkv, &p, &mut ctx, 1, 1, threads);
            assert_eq!(ctx, [2.0, 2.0, 7.0], "threads {threads}");
        }
    }
}
