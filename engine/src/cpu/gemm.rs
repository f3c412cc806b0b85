//! The one place the CPU engine calls a GEMM.
//!
//! Choice: the `gemm` crate (sarah-quinones) over `matrixmultiply`: it detects
//! AVX2/FMA and AVX-512 at run time (`x86-v4`; matrixmultiply stops at AVX2),
//! runs its own rayon parallelism, and is maintained as the GEMM of faer and
//! candle. Its API takes raw pointers and strides, so this wrapper checks every
//! length first and is the only `unsafe` in the CPU engine.

/// How the right-hand matrix `B` (`k × n`) is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RhsLayout {
    /// Row-major `k × n`.
    Kn,
    /// Row-major `n × k` (a PyTorch `Linear` weight `[out, in]`), used as its transpose.
    NkTransposed,
}

/// `c[m×n] (=|+=) a[m×k] · b`, all row-major. `threads > 1` lets gemm split the
/// work on the current rayon pool.
///
/// # Panics
/// When a slice is shorter than its dimensions say (a bug in the caller, never input-dependent).
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    c: &mut [f32],
    a: &[f32],
    b: &[f32],
    m: usize,
    k: usize,
    n: usize,
    layout: RhsLayout,
    accumulate: bool,
    threads: usize,
) {
    assert!(
        c.len() >= m * n && a.len() >= m * k && b.len() >= k * n,
        "matmul: slice shorter than m/k/n"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(0.0);
        }
        return;
    }
    let (rhs_rs, rhs_cs) = match layout {
        RhsLayout::Kn => (n as isize, 1),
        RhsLayout::NkTransposed => (1, k as isize),
    };
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the assert above guarantees every element addressed by
    // (m, n, k) and the row-major strides lies inside `c`, `a` and `b`;
    // `c` is exclusively borrowed and does not alias the inputs.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            rhs_cs,
            rhs_rs,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b_kn: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a[i * k + p] * b_kn[p * n + j]).sum();
            }
        }
        c
    }

    #[test]
    fn matmul_matches_a_naive_triple_loop_for_both_layouts() {
        let (m, k, n) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b_kn: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
        let mut b_nk = vec![0.0; n * k];
        for p in 0..k {
            for j in 0..n {
                b_nk[j * k + p] = b_kn[p * n + j];
            }
        }
        let want = naive(&a, &b_kn, m, k, n);
        for (b, layout) in [(&b_kn, RhsLayout::Kn), (&b_nk, RhsLayout::NkTransposed)] {
            let mut c = vec![f32::NAN; m * n];
            matmul(&mut c, &a, b, m, k, n, layout, false, 1);
            for (x, y) in c.iter().zip(&want) {
                assert!((x - y).abs() < 1e-5, "{x} vs {y}");
            }
        }
    }

    #[test]
    fn accumulate_adds_to_the_existing_output() {
        let mut c = vec![1.0; 4];
        matmul(
            &mut c,
            &[1.0, 0.0, 0.0, 1.0],
            &[2.0, 0.0, 0.0, 2.0],
            2,
            2,
            2,
            RhsLayout::Kn,
            true,
            1,
        );
        assert_eq!(c, vec![3.0, 1.0, 1.0, 3.0]);
    }
}
