//! Row-major GEMMs on column-major cuBLAS (pure parameter mapping, unit-tested).
//!
//! cuBLAS is column-major; our tensors are row-major. A row-major `[R, C]`
//! matrix with row stride `ld` is, byte for byte, a column-major `[C, R]`
//! matrix with leading dimension `ld`, i.e. its transpose. So to get the
//! row-major `C = A · op(B)` we ask cuBLAS for the column-major
//! `Cᵀ = op(B)ᵀ · Aᵀ`: swap the operands, swap `m` and `n`, and keep every
//! leading dimension equal to the row stride of the row-major matrix. No data
//! is ever transposed.

/// Whether cuBLAS reads an operand as stored or transposed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// As stored (`CUBLAS_OP_N`).
    N,
    /// Transposed (`CUBLAS_OP_T`).
    T,
}

/// Arguments of one column-major `cublasSgemm` call. `first` names which
/// row-major operand goes in cuBLAS's `A` slot (always ours `B`; see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ColMajorGemm {
    /// Operation on cuBLAS's `A` (our row-major `B`).
    pub transa: Op,
    /// Operation on cuBLAS's `B` (our row-major `A`).
    pub transb: Op,
    /// Rows of cuBLAS's `C` (= columns of our row-major `C`).
    pub m: i32,
    /// Columns of cuBLAS's `C` (= rows of our row-major `C`).
    pub n: i32,
    /// Shared dimension.
    pub k: i32,
    /// Leading dimension of cuBLAS's `A` (row stride of our `B`).
    pub lda: i32,
    /// Leading dimension of cuBLAS's `B` (row stride of our `A`).
    pub ldb: i32,
    /// Leading dimension of cuBLAS's `C` (row stride of our `C`).
    pub ldc: i32,
}

/// Row-major shapes and row strides of `C[m, n] = A[m, k] · op(B)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowMajor {
    /// Rows of `A` and `C`.
    pub m: usize,
    /// Columns of `C`.
    pub n: usize,
    /// Columns of `A`.
    pub k: usize,
    /// Row stride of `A` (≥ k).
    pub lda: usize,
    /// Row stride of `B` (≥ k when `B` is `[n, k]`, ≥ n when `[k, n]`).
    pub ldb: usize,
    /// Row stride of `C` (≥ n).
    pub ldc: usize,
}

/// A dimension does not fit cuBLAS's 32-bit ints, or a stride is too small.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("GEMM shape not expressible for cuBLAS: {0}")]
pub struct GemmShapeError(pub String);

fn int(v: usize, what: &str) -> Result<i32, GemmShapeError> {
    i32::try_from(v).map_err(|_| GemmShapeError(format!("{what} = {v} exceeds i32")))
}

impl RowMajor {
    /// Tightly packed `C[m, n] = A[m, k] · B`.
    pub fn packed(m: usize, n: usize, k: usize, b_transposed: bool) -> Self {
        Self {
            m,
            n,
            k,
            lda: k,
            ldb: if b_transposed { k } else { n },
            ldc: n,
        }
    }

    /// `C = A · Bᵀ` with `B` stored `[n, k]` (a PyTorch `Linear` weight, or
    /// the keys of attention scores).
    pub fn times_transposed(&self) -> Result<ColMajorGemm, GemmShapeError> {
        self.check(self.k)?;
        Ok(ColMajorGemm {
            transa: Op::T,
            transb: Op::N,
            m: int(self.n, "n")?,
            n: int(self.m, "m")?,
            k: int(self.k, "k")?,
            lda: int(self.ldb, "ldb")?,
            ldb: int(self.lda, "lda")?,
            ldc: int(self.ldc, "ldc")?,
        })
    }

    /// `C = A · B` with `B` stored `[k, n]` (attention probabilities × values).
    pub fn times(&self) -> Result<ColMajorGemm, GemmShapeError> {
        self.check(self.n)?;
        Ok(ColMajorGemm {
            transa: Op::N,
            transb: Op::N,
            m: int(self.n, "n")?,
            n: int(self.m, "m")?,
            k: int(self.k, "k")?,
            lda: int(self.ldb, "ldb")?,
            ldb: int(self.lda, "lda")?,
            ldc: int(self.ldc, "ldc")?,
        })
    }

    fn check(&self, b_row_len: usize) -> Result<(), GemmShapeError> {
        if self.m == 0 || self.n == 0 || self.k == 0 {
            return Err(GemmShapeError(format!("empty GEMM {self:?}")));
        }
        if self.lda < self.k || self.ldb < b_row_len || self.ldc < self.n {
            return Err(GemmShapeError(format!("row stride too small in {self:?}")));
        }
        Ok(())
    }
}

/// One strided-batched GEMM: the per-entry GEMM and the element strides
/// between consecutive batch entries of cuBLAS's `A`, `B` and `C` slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batched {
    /// The GEMM of one batch entry.
    pub gemm: ColMajorGemm,
    /// Number of entries.
    pub batch: i32,
    /// Stride of cuBLAS's `A` slot.
    pub stride_a: i64,
    /// Stride of cuBLAS's `B` slot.
    pub stride_b: i64,
    /// Stride of cuBLAS's `C` slot.
    pub stride_c: i64,
}

/// Where one head's operands start (element offsets) in the attention buffers:
/// `qkv` `[n·l, 3h]` (Q | K | V), `scores` `[n·heads, l, l]`, `context` `[n·l, h]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadOffsets {
    /// Queries in `qkv`.
    pub q: usize,
    /// Keys in `qkv`.
    pub k: usize,
    /// Values in `qkv`.
    pub v: usize,
    /// This head's score matrix of sequence 0 in `scores`.
    pub scores: usize,
    /// This head's columns in `context`.
    pub context: usize,
}

/// Element offsets of `head` (head width `h / heads`).
pub fn head_offsets(head: usize, l: usize, h: usize, heads: usize) -> HeadOffsets {
    let d = h / heads;
    HeadOffsets {
        q: head * d,
        k: h + head * d,
        v: 2 * h + head * d,
        scores: head * l * l,
        context: head * d,
    }
}

/// The two attention GEMMs of one head, each batched over the `n` sequences:
/// `scores = Q·Kᵀ` (cuBLAS `A` = keys, `B` = queries, `C` = scores) and
/// `context = P·V` (`A` = values, `B` = probabilities, `C` = context), with
/// the operand starts of [`head_offsets`].
pub fn attention(
    n: usize,
    l: usize,
    h: usize,
    heads: usize,
) -> Result<(Batched, Batched), GemmShapeError> {
    if heads == 0 || !h.is_multiple_of(heads) {
        return Err(GemmShapeError(format!(
            "hidden {h} not divisible by {heads} heads"
        )));
    }
    let d = h / heads;
    let batch = int(n, "batch")?;
    let long = |v: usize| i64::try_from(v).map_err(|_| GemmShapeError(format!("stride {v}")));
    let seq_qkv = long(l * 3 * h)?;
    let scores = Batched {
        gemm: RowMajor {
            m: l,
            n: l,
            k: d,
            lda: 3 * h,
            ldb: 3 * h,
            ldc: l,
        }
        .times_transposed()?,
        batch,
        stride_a: seq_qkv,
        stride_b: seq_qkv,
        stride_c: long(heads * l * l)?,
    };
    let context = Batched {
        gemm: RowMajor {
            m: l,
            n: d,
            k: l,
            lda: l,
            ldb: 3 * h,
            ldc: h,
        }
        .times()?,
        batch,
        stride_a: seq_qkv,
        stride_b: long(heads * l * l)?,
        stride_c: long(l * h)?,
    };
    Ok((scores, context))
}

/// Host emulation of cuBLAS's column-major semantics, for tests.
#[cfg(test)]
pub(crate) mod emulate {
    use super::{Batched, ColMajorGemm, Op};

    /// What cuBLAS computes for `g` (column-major, alpha 1, beta 0), on host slices.
    pub(crate) fn cublas_reference(g: &ColMajorGemm, a: &[f32], b: &[f32], c: &mut [f32]) {
        let (m, n, k) = (g.m as usize, g.n as usize, g.k as usize);
        let (lda, ldb, ldc) = (g.lda as usize, g.ldb as usize, g.ldc as usize);
        let at = |i: usize, p: usize| match g.transa {
            Op::N => a[i + p * lda],
            Op::T => a[p + i * lda],
        };
        let bt = |p: usize, j: usize| match g.transb {
            Op::N => b[p + j * ldb],
            Op::T => b[j + p * ldb],
        };
        for j in 0..n {
            for i in 0..m {
                c[i + j * ldc] = (0..k).map(|p| at(i, p) * bt(p, j)).sum();
            }
        }
    }

    /// cuBLAS strided-batched semantics on host slices.
    pub(crate) fn batched_reference(b: &Batched, a: &[f32], bb: &[f32], c: &mut [f32]) {
        for e in 0..b.batch as usize {
            let (sa, sb, sc) = (
                e * b.stride_a as usize,
                e * b.stride_b as usize,
                e * b.stride_c as usize,
            );
            cublas_reference(&b.gemm, &a[sa..], &bb[sb..], &mut c[sc..]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::emulate::{batched_reference, cublas_reference};
    use super::*;

    fn values(len: usize, seed: f32) -> Vec<f32> {
        (0..len).map(|i| (i as f32 * 0.37 + seed).sin()).collect()
    }

    #[test]
    fn a_linear_layer_maps_to_a_transposed_first_operand_with_swapped_m_and_n() {
        let (m, n, k) = (3, 5, 4);
        let x = values(m * k, 0.1);
        let w = values(n * k, 0.7); // [n, k] like a PyTorch Linear weight
        let g = RowMajor::packed(m, n, k, true).times_transposed().unwrap();
        assert_eq!((g.transa, g.transb, g.m, g.n, g.k), (Op::T, Op::N, 5, 3, 4));
        let mut c = vec![0.0; m * n];
        cublas_reference(&g, &w, &x, &mut c);
        for i in 0..m {
            for j in 0..n {
                let want: f32 = (0..k).map(|p| x[i * k + p] * w[j * k + p]).sum();
                assert!((c[i * n + j] - want).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn strided_views_like_attention_heads_inside_a_fused_qkv_buffer_multiply_correctly() {
        // Q and K of one head live in a [l, 3h] buffer: row stride 3h, width d.
        let (l, d, h3) = (4, 2, 12);
        let qkv = values(l * h3, 0.3);
        let (q_off, k_off) = (2, 6);
        let g = RowMajor {
            m: l,
            n: l,
            k: d,
            lda: h3,
            ldb: h3,
            ldc: l,
        }
        .times_transposed()
        .unwrap();
        let mut s = vec![0.0; l * l];
        cublas_reference(&g, &qkv[k_off..], &qkv[q_off..], &mut s);
        for i in 0..l {
            for j in 0..l {
                let want: f32 = (0..d)
                    .map(|p| qkv[i * h3 + q_off + p] * qkv[j * h3 + k_off + p])
                    .sum();
                assert!((s[i * l + j] - want).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn a_plain_product_maps_to_no_transposes() {
        let (m, n, k, ldb, ldc) = (3, 2, 4, 7, 5);
        let a = values(m * k, 0.2);
        let b = values(k * ldb, 0.9);
        let g = RowMajor {
            m,
            n,
            k,
            lda: k,
            ldb,
            ldc,
        }
        .times()
        .unwrap();
        assert_eq!((g.transa, g.transb), (Op::N, Op::N));
        let mut c = vec![0.0; m * ldc];
        cublas_reference(&g, &b, &a, &mut c);
        for i in 0..m {
            for j in 0..n {
                let want: f32 = (0..k).map(|p| a[i * k + p] * b[p * ldb + j]).sum();
                assert!((c[i * ldc + j] - want).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn batched_attention_gemms_with_a_host_softmax_match_naive_masked_attention() {
        let (n, l, h, heads) = (2, 3, 4, 2);
        let d = h / heads;
        let qkv = values(n * l * 3 * h, 0.5);
        let mask = [1i64, 1, 0, 1, 1, 1];
        let (sg, cg) = attention(n, l, h, heads).unwrap();
        let mut scores = vec![0.0; n * heads * l * l];
        let mut ctx = vec![0.0; n * l * h];
        let scale = 1.0 / (d as f32).sqrt();
        for head in 0..heads {
            let o = head_offsets(head, l, h, heads);
            batched_reference(&sg, &qkv[o.k..], &qkv[o.q..], &mut scores[o.scores..]);
        }
        // The masked_softmax kernel's math, per (sequence·head, query row).
        for (r, row) in scores.chunks_mut(l).enumerate() {
            let b = r / (heads * l);
            let m = &mask[b * l..][..l];
            let mx = (0..l)
                .filter(|&k| m[k] != 0)
                .map(|k| row[k] * scale)
                .fold(f32::MIN, f32::max);
            let e: Vec<f32> = (0..l)
                .map(|k| {
                    if m[k] != 0 {
                        (row[k] * scale - mx).exp()
                    } else {
                        0.0
                    }
                })
                .collect();
            let sum: f32 = e.iter().sum();
            row.iter_mut().zip(&e).for_each(|(x, v)| *x = v / sum);
        }
        for head in 0..heads {
            let o = head_offsets(head, l, h, heads);
            batched_reference(&cg, &qkv[o.v..], &scores[o.scores..], &mut ctx[o.context..]);
        }
        for b in 0..n {
            for head in 0..heads {
                for i in 0..l {
                    let at = |row: usize, part: usize, p: usize| {
                        qkv[(b * l + row) * 3 * h + part * h + head * d + p]
                    };
                    let s: Vec<f32> = (0..l)
                        .map(|j| (0..d).map(|p| at(i, 0, p) * at(j, 1, p)).sum::<f32>() * scale)
                        .collect();
                    let keys: Vec<usize> = (0..l).filter(|&j| mask[b * l + j] != 0).collect();
                    let mx = keys.iter().map(|&j| s[j]).fold(f32::MIN, f32::max);
                    let z: f32 = keys.iter().map(|&j| (s[j] - mx).exp()).sum();
                    for p in 0..d {
                        let want: f32 = keys
                            .iter()
                            .map(|&j| (s[j] - mx).exp() / z * at(j, 2, p))
                            .sum();
                        let got = ctx[(b * l + i) * h + head * d + p];
                        assert!((got - want).abs() < 1e-5, "b{b} h{head} i{i} p{p}");
                    }
                }
            }
        }
    }

    #[test]
    fn attention_rejects_a_hidden_size_not_divisible_by_the_heads() {
        assert!(attention(1, 4, 10, 3).is_err());
        assert!(attention(1, 4, 10, 0).is_err());
    }

    #[test]
    fn empty_or_inconsistent_shapes_are_rejected_before_reaching_cublas() {
        assert!(RowMajor::packed(0, 2, 2, true).times_transposed().is_err());
        let bad = RowMajor {
            lda: 1,
            ..RowMajor::packed(2, 2, 2, true)
        };
        assert!(bad.times_transposed().is_err());
        assert!(
            RowMajor::packed(1 << 31, 2, 2, true)
                .times_transposed()
                .is_err()
        );
    }
}
