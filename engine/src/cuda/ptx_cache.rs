//! On-disk cache of NVRTC-compiled PTX, keyed by a hash of the kernel
//! source, the compile options and the device architecture, so a restart
//! (or a second pod on the same node volume) does not recompile.

use std::path::{Path, PathBuf};

use crate::source::sha256_hex;

/// The cache key of one compilation.
pub fn key(source: &str, arch: (i32, i32), options: &[&str]) -> String {
    let mut material = format!("sm_{}{}\n", arch.0, arch.1);
    for o in options {
        material.push_str(o);
        material.push('\n');
    }
    material.push_str(source);
    sha256_hex(material.as_bytes())
}

/// Path of the cached PTX for `key` under `dir`.
pub fn path(dir: &Path, module: &str, key: &str) -> PathBuf {
    dir.join(format!("{module}-{}.ptx", &key[..16.min(key.len())]))
}

/// Cached PTX text, if present and readable.
pub fn load(dir: &Path, module: &str, key: &str) -> Option<String> {
    std::fs::read_to_string(path(dir, module, key))
        .ok()
        .filter(|s| s.contains(".entry"))
}

/// Stores PTX atomically (temporary file + rename); errors are returned, and
/// callers treat them as "not cached".
pub fn store(dir: &Path, module: &str, key: &str, ptx: &str) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let dest = path(dir, module, key);
    let tmp = dest.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, ptx)?;
    std::fs::rename(&tmp, &dest)?;
    Ok(dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_changes_with_source_options_and_architecture() {
        let k = key("src", (9, 0), &["--use_fast_math"]);
        assert_ne!(k, key("src2", (9, 0), &["--use_fast_math"]));
        assert_ne!(k, key("src", (8, 0), &["--use_fast_math"]));
        assert_ne!(k, key("src", (9, 0), &[]));
        assert_eq!(k, key("src", (9, 0), &["--use_fast_math"]));
    }

    #[test]
    fn stored_ptx_is_found_again_under_the_same_key_only() {
        let d = tempfile::tempdir().unwrap();
        let k = key("src", (9, 0), &[]);
        assert_eq!(load(d.path(), "m", &k), None);
        store(d.path(), "m", &k, ".version 8.0\n.entry foo()").unwrap();
        assert!(load(d.path(), "m", &k).is_some());
        assert_eq!(load(d.path(), "m", &key("other", (9, 0), &[])), None);
    }
}
