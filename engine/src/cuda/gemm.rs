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

#[cfg(test)]
mod tests {
    use super::*;

    /// What cuBLAS computes for `g` (column-major, alpha 1, beta 0), on host slices.
    fn cublas_reference(g: &ColMajorGemm, a: &[f32], b: &[f32], c: &mut [f32]) {
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
