//! Launch configurations for the NVRTC kernels (pure, unit-tested).

/// Grid and block sizes plus dynamic shared memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Launch {
    /// Blocks per grid (x, y, z).
    pub grid: (u32, u32, u32),
    /// Threads per block (x, y, z).
    pub block: (u32, u32, u32),
    /// Dynamic shared memory bytes.
    pub shared_bytes: u32,
}

/// Threads per block for elementwise kernels.
pub const ELEMENTWISE_BLOCK: u32 = 256;
/// Most blocks along grid x (CUDA limit 2^31 - 1).
pub const MAX_GRID_X: u64 = (1 << 31) - 1;

/// One thread per element; `None` when `n` is 0 or too large for one launch.
pub fn elementwise(n: u64) -> Option<Launch> {
    if n == 0 {
        return None;
    }
    let blocks = n.div_ceil(u64::from(ELEMENTWISE_BLOCK));
    (blocks <= MAX_GRID_X).then_some(Launch {
        grid: (blocks as u32, 1, 1),
        block: (ELEMENTWISE_BLOCK, 1, 1),
        shared_bytes: 0,
    })
}

/// Threads for a block-per-row reduction over `width` values: the next power of
/// two ≥ width, clamped to [32, 1024] (the kernels' tree reduction needs a power of two).
pub fn reduction_threads(width: usize) -> u32 {
    (width.max(32).next_power_of_two()).min(1024) as u32
}

/// One block per row with a shared-memory tree reduction (layer_norm,
/// mean_pool_normalize, global_avg_pool).
pub fn per_row(rows: u32, width: usize) -> Launch {
    let threads = reduction_threads(width);
    Launch {
        grid: (rows, 1, 1),
        block: (threads, 1, 1),
        shared_bytes: threads * 4,
    }
}

/// embedding_gather: one block per token row, threads striding over `width`
/// (no reduction, so at most 256 threads and no shared memory).
pub fn row_gather(rows: u32, width: usize) -> Launch {
    Launch {
        grid: (rows, 1, 1),
        block: (reduction_threads(width).min(256), 1, 1),
        shared_bytes: 0,
    }
}

/// masked_softmax: one single-thread block per (sequence·head, query row).
pub fn softmax(batch_heads: u32, seq_len: u32) -> Launch {
    Launch {
        grid: (batch_heads, seq_len, 1),
        block: (1, 1, 1),
        shared_bytes: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elementwise_launches_cover_every_element_with_whole_blocks() {
        let l = elementwise(1000).unwrap();
        assert_eq!(l.grid.0 * l.block.0, 1024);
        assert_eq!(elementwise(256).unwrap().grid.0, 1);
        assert_eq!(elementwise(0), None);
        assert_eq!(elementwise(u64::MAX), None);
    }

    #[test]
    fn reductions_use_a_power_of_two_between_32_and_1024_threads() {
        assert_eq!(reduction_threads(1), 32);
        assert_eq!(reduction_threads(384), 512);
        assert_eq!(reduction_threads(1280), 1024);
        let l = per_row(7, 384);
        assert_eq!((l.grid.0, l.block.0, l.shared_bytes), (7, 512, 2048));
    }

    #[test]
    fn gathers_run_one_block_per_row_with_at_most_256_threads() {
        let l = row_gather(4096, 384);
        assert_eq!((l.grid.0, l.block.0, l.shared_bytes), (4096, 256, 0));
        assert_eq!(row_gather(2, 8).block.0, 32);
    }

    #[test]
    fn softmax_runs_one_block_per_query_row() {
        assert_eq!(softmax(24, 17).grid, (24, 17, 1));
    }
}
