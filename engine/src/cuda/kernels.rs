//! NVRTC kernel sources (CUDA C as Rust string constants), compiled once per
//! device architecture and cached (see [`super::ptx_cache`]). GEMMs go to
//! cuBLAS; these are the ops around them.

/// Name of the compilation unit holding every kernel.
pub const MODULE_NAME: &str = "tandem_kernels";

/// Kernel entry points defined in [`SOURCE`].
pub const KERNELS: &[&str] = &[
    "embedding_gather",
    "layer_norm",
    "bias_gelu",
    "masked_softmax",
    "mean_pool_normalize",
    "bias_act_nchw",
    "depthwise_conv",
    "im2col",
    "u8_normalize",
    "global_avg_pool",
    "add_inplace",
];

/// The kernels of [`KERNELS`] that `ptx` has no `.entry` directive for. The kernels are
/// `extern "C"`, so their PTX names are not mangled.
pub fn missing_entry_points(ptx: &str) -> Vec<&'static str> {
    let entries: std::collections::HashSet<&str> = ptx
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace().skip_while(|w| *w != ".entry");
            words.next()?;
            Some(words.next()?.trim_end_matches('('))
        })
        .collect();
    KERNELS
        .iter()
        .copied()
        .filter(|k| !entries.contains(k))
        .collect()
}

/// All kernels of the CUDA engine, one compilation unit.
pub const SOURCE: &str = include_str!("kernels.cu");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_points_are_matched_by_exact_name() {
        let all: String = KERNELS
            .iter()
            .map(|k| format!(".visible .entry {k}(\n\t.param .u64 x\n)\n"))
            .collect();
        assert!(missing_entry_points(&all).is_empty());
        // A prefix of a name, or a name only called, is not an entry point.
        let partial = ".visible .entry layer(\ncall.uni bias_gelu, (\n.visible .entry add_inplace(";
        let missing = missing_entry_points(partial);
        assert!(missing.contains(&"layer_norm") && missing.contains(&"bias_gelu"));
        assert!(!missing.contains(&"add_inplace"));
        assert_eq!(missing.len(), KERNELS.len() - 1);
    }

    #[test]
    fn every_listed_kernel_is_defined_once_as_extern_c_global() {
        for k in KERNELS {
            let decl = format!("extern \"C\" __global__ void {k}(");
            assert_eq!(SOURCE.matches(&decl).count(), 1, "kernel {k}");
        }
        assert_eq!(SOURCE.matches("__global__").count(), KERNELS.len());
    }

    #[test]
    fn braces_and_parentheses_balance() {
        let count = |c| SOURCE.chars().filter(|x| *x == c).count();
        assert_eq!(count('{'), count('}'));
        assert_eq!(count('('), count(')'));
    }
}
