//! Model URIs → the files that make up a model, and sha256 verification.
//!
//! A URI points at a model's `model.safetensors`; the same directory (or URL
//! prefix) holds `config.json` and, for sentence embeddings, an optional
//! `1_Pooling/config.json`. A `file://` URI may also name the directory itself.
//! The sha256 given with a model covers `model.safetensors`. Downloading is the
//! caller's I/O; this module is pure apart from reading local files to hash them.

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Name of the weights file inside a model directory.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// Name of the configuration file beside the weights.
pub const CONFIG_FILE: &str = "config.json";
/// The sentence-transformers pooling config, relative to the model directory.
pub const POOLING_FILE: &str = "1_Pooling/config.json";

/// Why a model source was refused.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The URI scheme is not file, http or https.
    #[error("unsupported model URI {0:?}: use file://, http:// or https://")]
    Scheme(String),
    /// An http(s) URI must name the weights file.
    #[error("model URI {0:?} must end with /model.safetensors (or another *.safetensors file)")]
    NotSafetensors(String),
    /// The expected digest is not 64 hex characters.
    #[error("model sha256 {0:?} is not 64 hexadecimal characters")]
    BadDigest(String),
    /// A required file does not exist.
    #[error("model file not found: {0}")]
    Missing(PathBuf),
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The digest of the weights differs from the expected one.
    #[error("sha256 mismatch for {path}: expected {expected}, got {actual}")]
    DigestMismatch {
        /// The file hashed.
        path: PathBuf,
        /// The digest configured.
        expected: String,
        /// The digest computed.
        actual: String,
    },
}

/// Where a model's files come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A local directory holding `model.safetensors` and `config.json`.
    Local {
        /// The model directory.
        dir: PathBuf,
        /// The weights file inside it (named by the URI, or `model.safetensors`).
        weights: PathBuf,
    },
    /// Files to download: the weights, the config, and the optional pooling config.
    Remote {
        /// URL of the weights file.
        weights_url: String,
        /// URL of `config.json` beside it.
        config_url: String,
        /// URL of `1_Pooling/config.json` beside it (absence is fine).
        pooling_url: String,
    },
}

impl ModelSource {
    /// Parses a model URI.
    pub fn parse(uri: &str) -> Result<Self, SourceError> {
        if let Some(path) = uri.strip_prefix("file://") {
            let path = PathBuf::from(path);
            if path.extension().is_some_and(|e| e == "safetensors") {
                let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
                return Ok(Self::Local { dir, weights: path });
            }
            return Ok(Self::Local {
                weights: path.join(WEIGHTS_FILE),
                dir: path,
            });
        }
        if uri.starts_with("http://") || uri.starts_with("https://") {
            let without_query = uri.split(['?', '#']).next().unwrap_or(uri);
            if !without_query.ends_with(".safetensors") {
                return Err(SourceError::NotSafetensors(uri.to_owned()));
            }
            let base = &without_query[..without_query.rfind('/').map_or(0, |i| i + 1)];
            return Ok(Self::Remote {
                weights_url: uri.to_owned(),
                config_url: format!("{base}{CONFIG_FILE}"),
                pooling_url: format!("{base}{POOLING_FILE}"),
            });
        }
        Err(SourceError::Scheme(uri.to_owned()))
    }
}

/// Checks a configured digest's shape and lower-cases it.
pub fn normalize_digest(hex: &str) -> Result<String, SourceError> {
    let h = hex.trim().to_ascii_lowercase();
    if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(h)
    } else {
        Err(SourceError::BadDigest(hex.to_owned()))
    }
}

/// Lower-case hex sha256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String, SourceError> {
    let read_err = |source| SourceError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            SourceError::Missing(path.to_path_buf())
        } else {
            read_err(e)
        }
    })?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(read_err)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

/// Lower-case hex sha256 of a byte string (cache keys).
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Lower-case hex encoding.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Verifies `path` hashes to `expected` (when one is configured).
pub fn verify_sha256(path: &Path, expected: Option<&str>) -> Result<(), SourceError> {
    let Some(expected) = expected else {
        if !path.is_file() {
            return Err(SourceError::Missing(path.to_path_buf()));
        }
        return Ok(());
    };
    let expected = normalize_digest(expected)?;
    let actual = sha256_file(path)?;
    if actual != expected {
        return Err(SourceError::DigestMismatch {
            path: path.to_path_buf(),
            expected,
            actual,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_uri_to_a_directory_uses_model_safetensors_inside_it() {
        let s = ModelSource::parse("file:///models/minilm").unwrap();
        assert_eq!(
            s,
            ModelSource::Local {
                dir: "/models/minilm".into(),
                weights: "/models/minilm/model.safetensors".into()
            }
        );
    }

    #[test]
    fn a_file_uri_to_the_weights_uses_its_directory_for_config() {
        let s = ModelSource::parse("file:///m/x/model.safetensors").unwrap();
        assert_eq!(
            s,
            ModelSource::Local {
                dir: "/m/x".into(),
                weights: "/m/x/model.safetensors".into()
            }
        );
    }

    #[test]
    fn an_http_uri_maps_to_sibling_config_and_pooling_files() {
        let s =
            ModelSource::parse("https://h.example/models/minilm/model.safetensors?sig=1").unwrap();
        assert_eq!(
            s,
            ModelSource::Remote {
                weights_url: "https://h.example/models/minilm/model.safetensors?sig=1".into(),
                config_url: "https://h.example/models/minilm/config.json".into(),
                pooling_url: "https://h.example/models/minilm/1_Pooling/config.json".into(),
            }
        );
    }

    #[test]
    fn unsupported_schemes_and_non_safetensors_urls_are_refused() {
        assert!(matches!(
            ModelSource::parse("s3://bucket/m"),
            Err(SourceError::Scheme(_))
        ));
        assert!(matches!(
            ModelSource::parse("https://h/m/"),
            Err(SourceError::NotSafetensors(_))
        ));
    }

    #[test]
    fn a_wrong_digest_is_reported_with_both_values() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w");
        std::fs::write(&p, b"abc").unwrap();
        let good = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        verify_sha256(&p, Some(good)).unwrap();
        let bad = "00".repeat(32);
        let err = verify_sha256(&p, Some(&bad)).unwrap_err().to_string();
        assert!(
            err.contains("sha256 mismatch") && err.contains(good) && err.contains(&bad),
            "{err}"
        );
    }

    #[test]
    fn a_malformed_digest_is_refused_before_hashing() {
        assert!(matches!(
            normalize_digest("xyz"),
            Err(SourceError::BadDigest(_))
        ));
    }
}
