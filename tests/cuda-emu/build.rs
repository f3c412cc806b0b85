//! Compiles engine/src/cuda/kernels.cu as C++ with the CPU stand-in for CUDA (emu/).

use std::path::PathBuf;

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let source = manifest.join("../../engine/src/cuda/kernels.cu");
    println!("cargo:rerun-if-changed={}", source.display());
    println!("cargo:rerun-if-changed=emu/emu.h");
    println!("cargo:rerun-if-changed=emu/emu.cpp");
    let text = std::fs::read_to_string(&source).expect("read kernels.cu");
    // `extern __shared__ float red[];` -> `float* red = (float*)emu_shared();`
    let rewritten: String = text
        .lines()
        .map(
            |line| match line.trim().strip_prefix("extern __shared__ ") {
                Some(decl) => {
                    let decl = decl.trim_end_matches(';').trim_end_matches("[]");
                    let (ty, name) = decl
                        .rsplit_once(' ')
                        .expect("`extern __shared__ T name[];`");
                    format!("  {ty}* {name} = ({ty}*)emu_shared();\n")
                }
                None => format!("{line}\n"),
            },
        )
        .collect();
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("set by cargo"));
    std::fs::write(out.join("kernels_emu.cu"), rewritten).expect("write kernels_emu.cu");
    cc::Build::new()
        .cpp(true)
        .std("c++20")
        .include("emu")
        .include(&out)
        .flag("-pthread")
        .warnings(false)
        .file("emu/emu.cpp")
        .compile("tandem_cuda_emu");
}
