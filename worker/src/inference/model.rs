//! Getting the model ready: resolve the URI to local files (downloading
//! http(s) sources into the cache), load it through the engine, and run a
//! warm-up batch. Errors name the problem for the operator.

use std::path::{Path, PathBuf};
use std::time::Duration;

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

/// Resolves `uri` to local files, downloading http(s) models into `cache_dir`. A download
/// that connects to nothing, gets no response or receives no data for `stall` fails with a
/// message saying so, rather than leaving the pod unready for ever.
pub async fn resolve(
    uri: &str,
    sha256: Option<&str>,
    cache_dir: &Path,
    stall: Duration,
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
            let client = reqwest::Client::builder()
                .connect_timeout(stall)
                .build()
                .map_err(|e| ModelError::Download {
                    url: weights_url.clone(),
                    reason: e.to_string(),
                })?;
            if !cached {
                download(&client, &weights_url, &weights, true, stall).await?;
            }
            download(&client, &config_url, &dir.join(CONFIG_FILE), true, stall).await?;
            download(&client, &pooling_url, &dir.join(POOLING_FILE), false, stall).await?;
            Ok(LocalModel { dir, weights })
        }
    }
}

/// Downloads `url` to `dest` (via a temporary file). A 404 on an optional file is fine.
/// Waiting longer than `stall` for the response or for the next bytes of the body fails.
async fn download(
    client: &reqwest::Client,
    url: &str,
    dest: &Path,
    required: bool,
    stall: Duration,
) -> Result<(), ModelError> {
    let fail = |reason: String| ModelError::Download {
        url: url.to_owned(),
        reason,
    };
    let stalled = |waiting_for: &str| {
        fail(format!(
            "no {waiting_for} for {}s (--download-stall-timeout)",
            stall.as_secs_f64()
        ))
    };
    let mut resp = tokio::time::timeout(stall, client.get(url).send())
        .await
        .map_err(|_| stalled("response"))?
        .map_err(|e| fail(error_chain(&e)))?;
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
    while let Some(chunk) = tokio::time::timeout(stall, resp.chunk())
        .await
        .map_err(|_| stalled("data"))?
        .map_err(|e| fail(error_chain(&e)))?
    {
        file.write_all(&chunk).await.map_err(cache_err)?;
    }
    file.flush().await.map_err(cache_err)?;
    drop(file);
    tokio::fs::rename(&tmp, dest).await.map_err(cache_err)?;
    Ok(())
}

/// An error with its causes: reqwest's own message alone ("error sending request") hides
/// whether DNS, the connection or TLS failed.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Serves one HTTP response that promises `length` bytes, sends `sent` of them and then
    /// holds the connection open without sending more.
    async fn stalling_server(length: usize, sent: &'static [u8]) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        tokio::spawn(async move {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf).await;
            let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {length}\r\n\r\n");
            let _ = conn.write_all(head.as_bytes()).await;
            let _ = conn.write_all(sent).await;
            tokio::time::sleep(Duration::from_secs(60)).await;
        });
        format!("http://{addr}/model.safetensors")
    }

    #[tokio::test]
    async fn a_download_that_stops_sending_fails_after_the_stall_timeout_naming_it() {
        let uri = stalling_server(1000, b"first bytes").await;
        let dir = tempfile::tempdir().expect("tempdir");
        let started = std::time::Instant::now();
        let err = resolve(&uri, None, dir.path(), Duration::from_millis(300))
            .await
            .expect_err("a stalled download must fail");
        let text = err.to_string();
        assert!(text.contains(&uri), "{text}");
        assert!(
            text.contains("no data for 0.3s (--download-stall-timeout)"),
            "{text}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "it waited for the server"
        );
        assert!(
            !dir.path()
                .read_dir()
                .expect("cache dir")
                .any(|e| e.ok().is_some_and(|e| e.path().join(WEIGHTS_FILE).exists())),
            "no weights file is left as if complete"
        );
    }

    #[tokio::test]
    async fn a_server_that_accepts_but_never_answers_fails_after_the_stall_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        // Accepts (so connecting succeeds) and reads, but never writes a response.
        let server = tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.expect("accept");
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf).await;
            tokio::time::sleep(Duration::from_secs(60)).await;
        });
        let dir = tempfile::tempdir().expect("tempdir");
        let uri = format!("http://{addr}/model.safetensors");
        let err = resolve(&uri, None, dir.path(), Duration::from_millis(300))
            .await
            .expect_err("an unanswered download must fail");
        assert!(err.to_string().contains("no response for 0.3s"), "{err}");
        server.abort();
    }

    #[tokio::test]
    async fn a_refused_connection_names_its_cause() {
        // Bind then drop: nothing listens on the port.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        let dir = tempfile::tempdir().expect("tempdir");
        let uri = format!("http://{addr}/model.safetensors");
        let err = resolve(&uri, None, dir.path(), Duration::from_secs(5))
            .await
            .expect_err("nothing listens");
        let text = err.to_string().to_lowercase();
        assert!(text.contains("connect"), "{text}");
        assert!(text.contains("refused"), "the OS's reason is kept: {text}");
    }
}
