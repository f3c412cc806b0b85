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
    #[error("tokenizer location {0:?}: only file paths and file:// URLs are supported")]
    UnsupportedScheme(String),
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
