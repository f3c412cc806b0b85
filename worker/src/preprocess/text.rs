//! The text pipeline: UTF-8 sentences → `input_ids`, `attention_mask`,
//! `token_type_ids` (INT64 `[N, L]`), with `tokenizers` (pure Rust).
//!
//! The tokenizer's own padding setting is removed on load (MiniLM's
//! `tokenizer.json` pads every sequence to 128, which would waste compute and,
//! without the mask, change results); truncation is set to `maxLength`. Each
//! batch is padded only to its longest sequence (dynamic padding), pad id from
//! the tokenizer's padding config when it had one, else 0, mask 0 on padding.

use std::path::Path;

use tokenizers::{PaddingParams, Tokenizer, TruncationParams};

/// Errors loading the tokenizer.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerLoadError {
    /// The file could not be read or parsed.
    #[error("load tokenizer {path}: {reason}")]
    Load {
        /// Location tried.
        path: String,
        /// Cause as text (the crate's error is a boxed trait object).
        reason: String,
    },
    /// The location is a scheme this worker cannot fetch.
    #[error(
        "tokenizer location {0:?}: only file paths and file://, http:// and https:// URLs are supported"
    )]
    UnsupportedScheme(String),
    /// Downloading the tokenizer over http(s) failed.
    #[error("download tokenizer {url}: {reason}")]
    Fetch {
        /// URL tried.
        url: String,
        /// What went wrong.
        reason: String,
    },
}

/// Why one text item could not be tokenized; shown to clients.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TextError {
    /// The bytes are not UTF-8.
    #[error("text is not valid UTF-8 (invalid byte at offset {offset})")]
    InvalidUtf8 {
        /// Offset of the first invalid byte.
        offset: usize,
    },
    /// The tokenizer failed.
    #[error("tokenization failed: {0}")]
    Tokenize(String),
}

/// The three INT64 `[N, L]` tensors, as little-endian bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextTensors {
    /// Batch size.
    pub n: usize,
    /// Padded sequence length (longest in the batch).
    pub len: usize,
    /// `input_ids`.
    pub input_ids: Vec<u8>,
    /// `attention_mask`.
    pub attention_mask: Vec<u8>,
    /// `token_type_ids`.
    pub token_type_ids: Vec<u8>,
}

/// A configured tokenizer; shareable between threads.
#[derive(Debug, Clone)]
pub struct TextPipeline {
    tokenizer: Tokenizer,
    pad_id: i64,
    pad_type_id: i64,
    max_length: usize,
}

impl TextPipeline {
    /// Loads `tokenizer.json` from a path or `file://` URL.
    pub fn load(location: &str, max_length: usize) -> Result<Self, TokenizerLoadError> {
        let path = match location.strip_prefix("file://") {
            Some(p) => p,
            None if location.contains("://") => {
                return Err(TokenizerLoadError::UnsupportedScheme(location.to_owned()));
            }
            None => location,
        };
        let tokenizer =
            Tokenizer::from_file(Path::new(path)).map_err(|e| TokenizerLoadError::Load {
                path: location.to_owned(),
                reason: e.to_string(),
            })?;
        Self::from_tokenizer(tokenizer, max_length).map_err(|reason| TokenizerLoadError::Load {
            path: location.to_owned(),
            reason,
        })
    }

    /// Loads `tokenizer.json` from wherever `location` points: a path, a
    /// `file://` URL, or an `http(s)://` URL that is downloaded first.
    pub async fn load_any(location: &str, max_length: usize) -> Result<Self, TokenizerLoadError> {
        if !is_http(location) {
            return Self::load(location, max_length);
        }
        let json = fetch(location).await?;
        let load_error = |reason: String| TokenizerLoadError::Load {
            path: location.to_owned(),
            reason,
        };
        let tokenizer = Tokenizer::from_bytes(&json).map_err(|e| load_error(e.to_string()))?;
        Self::from_tokenizer(tokenizer, max_length).map_err(load_error)
    }

    /// Wraps an already built tokenizer.
    pub fn from_tokenizer(mut tokenizer: Tokenizer, max_length: usize) -> Result<Self, String> {
        let (pad_id, pad_type_id) = tokenizer
            .get_padding()
            .map(|p: &PaddingParams| (i64::from(p.pad_id), i64::from(p.pad_type_id)))
            .unwrap_or((0, 0));
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length,
                ..Default::default()
            }))
            .map_err(|e| e.to_string())?;
        Ok(Self {
            tokenizer,
            pad_id,
            pad_type_id,
            max_length,
        })
    }

    /// Configured truncation length.
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// Tokenizes a batch. Errors carry the index of the first failing item.
    pub fn process_batch<T: AsRef<[u8]>>(
        &self,
        items: &[T],
    ) -> Result<TextTensors, (usize, TextError)> {
        let mut encodings = Vec::with_capacity(items.len());
        for (i, raw) in items.iter().enumerate() {
            let text = std::str::from_utf8(raw.as_ref()).map_err(|e| {
                (
                    i,
                    TextError::InvalidUtf8 {
                        offset: e.valid_up_to(),
                    },
                )
            })?;
            let enc = self
                .tokenizer
                .encode(text, true)
                .map_err(|e| (i, TextError::Tokenize(e.to_string())))?;
            encodings.push(enc);
        }
        let n = encodings.len();
        let len = encodings
            .iter()
            .map(|e| e.get_ids().len())
            .max()
            .unwrap_or(0);
        let mut ids = Vec::with_capacity(n * len * 8);
        let mut mask = Vec::with_capacity(n * len * 8);
        let mut types = Vec::with_capacity(n * len * 8);
        for enc in &encodings {
            let l = enc.get_ids().len();
            for (&id, &ty) in enc.get_ids().iter().zip(enc.get_type_ids()) {
                ids.extend_from_slice(&i64::from(id).to_le_bytes());
                types.extend_from_slice(&i64::from(ty).to_le_bytes());
                mask.extend_from_slice(&1i64.to_le_bytes());
            }
            for _ in l..len {
                ids.extend_from_slice(&self.pad_id.to_le_bytes());
                types.extend_from_slice(&self.pad_type_id.to_le_bytes());
                mask.extend_from_slice(&0i64.to_le_bytes());
            }
        }
        Ok(TextTensors {
            n,
            len,
            input_ids: ids,
            attention_mask: mask,
            token_type_ids: types,
        })
    }
}

/// Largest tokenizer.json accepted over http(s) (MiniLM's is 0.7 MB).
const MAX_TOKENIZER_BYTES: usize = 64 << 20;
/// Limit for the whole download.
const FETCH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

fn is_http(location: &str) -> bool {
    location.starts_with("http://") || location.starts_with("https://")
}

/// Downloads a tokenizer file, refusing non-2xx answers and oversized bodies.
async fn fetch(url: &str) -> Result<Vec<u8>, TokenizerLoadError> {
    let fail = |reason: String| TokenizerLoadError::Fetch {
        url: url.to_owned(),
        reason,
    };
    let client = reqwest::Client::builder()
        .timeout(FETCH_TIMEOUT)
        .build()
        .map_err(|e| fail(e.to_string()))?;
    let mut response = client
        .get(url)
        .send()
        .await
        .map_err(|e| fail(e.to_string()))?;
    let status = response.status();
    if !status.is_success() {
        return Err(fail(format!("server answered {status}")));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| fail(e.to_string()))? {
        if body.len() + chunk.len() > MAX_TOKENIZER_BYTES {
            return Err(fail(format!("larger than {MAX_TOKENIZER_BYTES} bytes")));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny but complete tokenizer.json (word-level, whitespace split).
    const TINY_TOKENIZER: &str = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],
        "normalizer":null,"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,
        "model":{"type":"WordLevel","vocab":{"[UNK]":0,"hello":1,"world":2},"unk_token":"[UNK]"}}"#;

    async fn serve(status: axum::http::StatusCode, body: &'static str) -> std::net::SocketAddr {
        let app = axum::Router::new().route(
            "/tokenizer.json",
            axum::routing::get(move || async move { (status, body) }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    }

    #[tokio::test]
    async fn a_tokenizer_served_over_http_is_downloaded_and_tokenizes() {
        let addr = serve(axum::http::StatusCode::OK, TINY_TOKENIZER).await;
        let url = format!("http://{addr}/tokenizer.json");
        let pipeline = TextPipeline::load_any(&url, 8)
            .await
            .expect("load over http");
        let enc = pipeline
            .tokenizer
            .encode("hello world", false)
            .expect("encode");
        assert_eq!(enc.get_ids(), [1, 2]);
    }

    #[tokio::test]
    async fn a_missing_tokenizer_url_is_a_clear_error_naming_the_url_and_status() {
        let addr = serve(axum::http::StatusCode::NOT_FOUND, "no").await;
        let url = format!("http://{addr}/tokenizer.json");
        let err = TextPipeline::load_any(&url, 8)
            .await
            .expect_err("404 must fail");
        let text = err.to_string();
        assert!(text.contains(&url) && text.contains("404"), "{text}");
    }

    #[tokio::test]
    async fn other_schemes_are_refused_with_the_supported_list() {
        let err = TextPipeline::load_any("s3://bucket/tokenizer.json", 8)
            .await
            .expect_err("s3");
        assert!(err.to_string().contains("http://"), "{err}");
    }
}
