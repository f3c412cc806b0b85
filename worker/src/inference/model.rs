//! Getting the model ready: resolve the URI to local files (downloading
//! http(s) sources into the cache), load it through the engine, and run a
//! warm-up batch. Errors name the problem for the operator.

use std::path::{Path, PathBuf};

use tandem_engine::load::{LoadError, LoadOptions, Loaded, load_engine};
use tandem_engine::source::{
    self, CONFIG_FILE, ModelSource, POOLING_FILE, SourceError, WEIGHTS_FILE,
};
use tandem_engine::spec::InputKind;
use tandem_engine::{Engine, EngineError, Tensor};

/// Why the model could not be made ready.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The URI is malformed or a file is missing/unreadable/wrong digest.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// A download failed.
    #[error("download of {url} failed: {reason}")]
    Download {
        /// The URL.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// The cache directory could not be written.
    #[error("cannot write model cache {path}: {source}")]
    Cache {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Loading failed (config, weights, device).
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The warm-up inference failed.
    #[error("warm-up inference failed: {0}")]
    Warmup(#[from] EngineError),
}

/// Local paths of a resolved model.
#[derive(Debug, Clone)]
pub struct LocalModel {
    /// Directory with config.json (and 1_Pooling/config.json).
    pub dir: PathBuf,
    /// The weights file.
    pub weights: PathBuf,
}

/// Resolves `uri` to local files, downloading http(s) models into `cache_dir`.
pub async fn resolve(
    uri: &str,
    sha256: Option<&str>,
    cache_dir: &Path,
) -> Result<LocalModel, ModelError> {
    if let Some(d) = sha256 {
        source::normalize_digest(d)?;
    }
    match ModelSource::parse(uri)? {
        ModelSource::Local { dir, weights } => Ok(LocalModel { dir, weights }),
        ModelSource::Remote {
            weights_url,
            config_url,
            pooling_url,
        } => {
            let key = sha256
                .map(str::to_ascii_lowercase)
                .unwrap_or_else(|| source::sha256_hex(weights_url.as_bytes()));
            let dir = cache_dir.join(key);
            let weights = dir.join(WEIGHTS_FILE);
            let cached = weights.is_file()
                && source::verify_sha256(&weights, sha256).is_ok()
                && sha256.is_some();
            let client = reqwest::Client::new();
            if !cached {
                download(&client, &weights_url, &weights, true).await?;
            }
            download(&client, &config_url, &dir.join(CONFIG_FILE), true).await?;
            download(&client, &pooling_url, &dir.join(POOLING_FILE), false).await?;
            Ok(LocalModel { dir, weights })
        }
    }
}

/// Downloads `url` to `dest` (via a temporary file). A 404 on an optional file is fine.
async fn download(
    client: &reqwest::Client,
    url: &str,
    dest: &Path,
    required: bool,
) -> Result<(), ModelError> {
    let fail = |reason: String| ModelError::Download {
        url: url.to_owned(),
        reason,
    };
    let mut resp = client
        .get(url)
        .send()
        .await
        .map_err(|e| fail(e.to_string()))?;
    if resp.status() == reqwest::StatusCode::NOT_FOUND && !required {
        return Ok(());
    }
    if !resp.status().is_success() {
        return Err(fail(format!("HTTP {}", resp.status())));
    }
    let parent = dest.parent().unwrap_or(Path::new("."));
    let cache_err = |source| ModelError::Cache {
        path: dest.to_path_buf(),
        source,
    };
    tokio::fs::create_dir_all(parent).await.map_err(cache_err)?;
    let tmp = dest.with_extension("part");
    let mut file = tokio::fs::File::create(&tmp).await.map_err(cache_err)?;
    use tokio::io::AsyncWriteExt;
    while let Some(chunk) = resp.chunk().await.map_err(|e| fail(e.to_string()))? {
        file.write_all(&chunk).await.map_err(cache_err)?;
    }
    file.flush().await.map_err(cache_err)?;
    drop(file);
    tokio::fs::rename(&tmp, dest).await.map_err(cache_err)?;
    Ok(())
}

/// Loads the model (blocking: run it off the async threads) and warms it up.
pub fn load_and_warm_up(local: &LocalModel, opts: &LoadOptions) -> Result<Loaded, ModelError> {
    let mut loaded = load_engine(&local.dir, &local.weights, opts)?;
    warm_up(loaded.engine.as_mut())?;
    Ok(loaded)
}

/// Runs one small batch so the first real request pays no first-use costs.
pub fn warm_up(engine: &mut dyn Engine) -> Result<(), ModelError> {
    let spec = engine.spec().clone();
    let inputs: Vec<Tensor> = match spec.kind {
        InputKind::Sequence => {
            // Token id 0 exists in every vocabulary.
            let ids = vec![0; 4];
            vec![
                Tensor::i64(vec![1, 4], ids),
                Tensor::i64(vec![1, 4], vec![1; 4]),
                Tensor::i64(vec![1, 4], vec![0; 4]),
            ]
        }
        InputKind::Fixed => spec
            .inputs
            .iter()
            .map(|s| {
                let shape: Vec<usize> = s
                    .dims
                    .iter()
                    .map(|d| if *d < 0 { 1 } else { *d as usize })
                    .collect();
                Tensor::f32(shape.clone(), vec![0.0; shape.iter().product()])
            })
            .collect(),
    };
    engine.forward(&inputs)?;
    Ok(())
}
