//! Device memory planning: the activation buffers a batch needs, computed on
//! the host before any allocation so one arena per (batch, length) bucket can
//! be reused without reallocation.

use crate::config::BertConfig;

/// Bytes per f32.
const F32: usize = 4;

/// Activation buffers of one BERT forward pass, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BertPlan {
    /// Token states `[n·l, h]`.
    pub hidden: usize,
    /// Fused Q|K|V `[n·l, 3h]`.
    pub qkv: usize,
    /// Attention scores `[n·heads, l, l]`.
    pub scores: usize,
    /// Attention context `[n·l, h]`.
    pub context: usize,
    /// Feed-forward intermediate `[n·l, i]`.
    pub intermediate: usize,
    /// Token ids, types and mask `3 × [n·l]` i64.
    pub inputs: usize,
    /// Pooled output `[n, h]`.
    pub output: usize,
}

impl BertPlan {
    /// The plan for `n` sequences padded to `l` tokens.
    pub fn new(c: &BertConfig, n: usize, l: usize) -> Self {
        let t = n * l;
        let h = c.hidden_size;
        Self {
            hidden: t * h * F32,
            qkv: t * 3 * h * F32,
            scores: n * c.num_heads * l * l * F32,
            context: t * h * F32,
            intermediate: t * c.intermediate_size * F32,
            inputs: 3 * t * 8,
            output: n * h * F32,
        }
    }

    /// Total bytes, each buffer aligned to 256 bytes (cudaMalloc alignment).
    pub fn total(&self) -> usize {
        [
            self.hidden,
            self.qkv,
            self.scores,
            self.context,
            self.intermediate,
            self.inputs,
            self.output,
        ]
        .iter()
        .map(|b| b.next_multiple_of(256))
        .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Pooling;

    fn minilm() -> BertConfig {
        BertConfig {
            hidden_size: 384,
            num_layers: 6,
            num_heads: 12,
            intermediate_size: 1536,
            vocab_size: 30522,
            max_position_embeddings: 512,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            pooling: Pooling::Mean,
        }
    }

    #[test]
    fn minilm_batch_of_32_by_128_needs_the_expected_buffers() {
        let p = BertPlan::new(&minilm(), 32, 128);
        assert_eq!(p.hidden, 32 * 128 * 384 * 4);
        assert_eq!(p.scores, 32 * 12 * 128 * 128 * 4);
        assert_eq!(p.intermediate, 32 * 128 * 1536 * 4);
        assert!(
            p.total()
                >= p.hidden + p.qkv + p.scores + p.context + p.intermediate + p.inputs + p.output
        );
    }

    #[test]
    fn the_plan_grows_quadratically_in_length_only_for_scores() {
        let a = BertPlan::new(&minilm(), 8, 64);
        let b = BertPlan::new(&minilm(), 8, 128);
        assert_eq!(b.scores, 4 * a.scores);
        assert_eq!(b.hidden, 2 * a.hidden);
    }
}
