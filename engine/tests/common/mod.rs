//! Shared helpers for the model tests: where the models and fixtures are.
#![allow(dead_code)]

use std::path::PathBuf;

/// `${TANDEM_MODELS_DIR}` or `${TANDEM_CACHE_DIR:-$HOME/.cache/tandem}/models`
/// (what `scripts/fetch-models.sh` prints).
pub fn models_dir() -> PathBuf {
    if let Ok(d) = std::env::var("TANDEM_MODELS_DIR") {
        return PathBuf::from(d);
    }
    let cache = std::env::var("TANDEM_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/tandem")
        });
    cache.join("models")
}

/// A model directory, or a panic saying how to create it.
pub fn model(name: &str) -> PathBuf {
    let dir = models_dir().join(name);
    assert!(
        dir.join("model.safetensors").is_file(),
        "{} missing: run scripts/fetch-models.sh first",
        dir.display()
    );
    dir
}

/// A committed fixture under tests/python/inference/fixtures.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/python/inference/fixtures")
        .join(name)
}
