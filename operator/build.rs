//! Link settings of the operator's binaries.

fn main() {
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if os == "linux" && env == "gnu" {
        // Relative relocations packed as RELR: the loader reads 6 KB of them instead of
        // 470 KB of RELA entries, which stayed resident (file-backed RSS) for the life of the
        // process. Needs glibc 2.36 (Debian 12, the image's distroless base); an older glibc
        // refuses the binary at start with "GLIBC_ABI_DT_RELR not found" instead of misloading it.
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
