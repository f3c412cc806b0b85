//! Compiles the CUDA engine's kernels with NVRTC for the GPU generations Tandem targets and
//! checks that the PTX defines every kernel the engine launches. Needs libnvrtc only (no
//! driver, no GPU): `scripts/test.sh` runs it with the NVRTC of the `nvidia-cuda-nvrtc` wheel
//! in the test environment, so a kernel that does not compile fails the tests on any machine.
//!
//! ```sh
//! LD_LIBRARY_PATH="$(scripts/python-env.sh)/lib/python3.11/site-packages/nvidia/cu13/lib" \
//!     cargo run -p tandem-engine --example nvrtc_check
//! ```

use std::process::ExitCode;

use tandem_engine::cuda::{compile_kernels, kernels};

/// Compute capabilities: A100 (8.0), A10/A40 (8.6), L4/L40 (8.9), H100/H200 (9.0).
const ARCHITECTURES: &[(i32, i32)] = &[(8, 0), (8, 6), (8, 9), (9, 0)];

fn main() -> ExitCode {
    let mut failed = false;
    for &(major, minor) in ARCHITECTURES {
        let ptx = match compile_kernels((major, minor)) {
            Ok(ptx) => ptx.to_src(),
            Err(e) => {
                eprintln!("compute_{major}{minor}: {e}");
                failed = true;
                continue;
            }
        };
        let missing = kernels::missing_entry_points(&ptx);
        if missing.is_empty() {
            println!(
                "compute_{major}{minor}: {} kernels compiled ({} bytes of PTX)",
                kernels::KERNELS.len(),
                ptx.len()
            );
        } else {
            eprintln!("compute_{major}{minor}: PTX lacks the entry points {missing:?}");
            failed = true;
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
