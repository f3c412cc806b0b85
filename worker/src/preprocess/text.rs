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
        let load_error = |reason: String| TokenizerLoadError::Load {
            path: location.to_owned(),
            reason,
        };
        let json = std::fs::read(Path::new(path)).map_err(|e| load_error(e.to_string()))?;
        let tokenizer = parse_tokenizer(&json).map_err(load_error)?;
        Self::from_tokenizer(tokenizer, max_length).map_err(load_error)
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
        let tokenizer = parse_tokenizer(&json).map_err(load_error)?;
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

/// Builds a tokenizer from `tokenizer.json` bytes.
///
/// WordPiece tokenizers (BERT, MiniLM) take a direct path: the `tokenizers` crate decodes the
/// `model` object into a generic JSON tree before typing it (to find its `type`), which for a
/// 30k-entry vocabulary is most of a 20–60 ms load and of the worker's cold start. Here the
/// vocabulary is decoded straight into the map WordPiece keeps, the other parts
/// (normalizer, pre-tokenizer, post-processor, decoder) by the crate's own types, and the added
/// tokens are added afterwards exactly as the crate's loader does. If the added tokens do not
/// keep the ids the file gives them, or the model is not WordPiece, the crate's loader runs
/// instead.
pub fn parse_tokenizer(json: &[u8]) -> Result<Tokenizer, String> {
    match wordpiece_direct(json) {
        Some(t) => Ok(t),
        None => Tokenizer::from_bytes(json).map_err(|e| e.to_string()),
    }
}

/// The top level of `tokenizer.json`, each part left as raw JSON.
#[derive(serde::Deserialize)]
struct RawParts<'a> {
    #[serde(borrow)]
    model: &'a serde_json::value::RawValue,
    #[serde(borrow, default)]
    normalizer: Option<&'a serde_json::value::RawValue>,
    #[serde(borrow, default)]
    pre_tokenizer: Option<&'a serde_json::value::RawValue>,
    #[serde(borrow, default)]
    post_processor: Option<&'a serde_json::value::RawValue>,
    #[serde(borrow, default)]
    decoder: Option<&'a serde_json::value::RawValue>,
    #[serde(default)]
    added_tokens: Vec<RawAddedToken>,
    #[serde(default)]
    version: Option<String>,
    #[serde(default)]
    truncation: Option<TruncationParams>,
    #[serde(default)]
    padding: Option<PaddingParams>,
}

#[derive(serde::Deserialize)]
struct RawAddedToken {
    id: u32,
    #[serde(flatten)]
    token: tokenizers::AddedToken,
}

/// A WordPiece `model` object.
#[derive(serde::Deserialize)]
struct RawWordPiece {
    #[serde(rename = "type")]
    type_: String,
    unk_token: String,
    continuing_subword_prefix: String,
    max_input_chars_per_word: usize,
    vocab: ahash::AHashMap<String, u32>,
}

/// The direct WordPiece path of [`parse_tokenizer`] alone: `None` when it does not apply.
pub fn wordpiece_direct(json: &[u8]) -> Option<Tokenizer> {
    use tokenizers::models::wordpiece::WordPiece;
    use tokenizers::{
        DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
    };

    fn part<T: serde::de::DeserializeOwned>(
        raw: Option<&serde_json::value::RawValue>,
    ) -> Option<Option<T>> {
        match raw {
            None => Some(None),
            Some(r) => serde_json::from_str(r.get()).ok().map(Some),
        }
    }

    let parts: RawParts<'_> = serde_json::from_slice(json).ok()?;
    if parts.version.as_deref().is_some_and(|v| v != "1.0") {
        return None;
    }
    let model: RawWordPiece = serde_json::from_str(parts.model.get()).ok()?;
    if model.type_ != "WordPiece" {
        return None;
    }
    let wordpiece = WordPiece::builder()
        .vocab(model.vocab)
        .unk_token(model.unk_token)
        .continuing_subword_prefix(model.continuing_subword_prefix)
        .max_input_chars_per_word(model.max_input_chars_per_word)
        .build()
        .ok()?;
    let mut tokenizer = Tokenizer::new(wordpiece);
    tokenizer
        .with_normalizer(part::<NormalizerWrapper>(parts.normalizer)?)
        .with_pre_tokenizer(part::<PreTokenizerWrapper>(parts.pre_tokenizer)?)
        .with_post_processor(part::<PostProcessorWrapper>(parts.post_processor)?)
        .with_decoder(part::<DecoderWrapper>(parts.decoder)?)
        .with_padding(parts.padding);
    tokenizer.with_truncation(parts.truncation).ok()?;
    let added: Vec<tokenizers::AddedToken> =
        parts.added_tokens.iter().map(|t| t.token.clone()).collect();
    tokenizer.add_tokens(&added);
    parts
        .added_tokens
        .iter()
        .all(|t| tokenizer.token_to_id(&t.token.content) == Some(t.id))
        .then_some(tokenizer)
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

    /// A small BERT-style tokenizer.json: BertNormalizer, BertPreTokenizer, WordPiece with
    /// `##` continuations, [CLS]/[SEP] template, special tokens with the vocabulary's ids.
    const BERT_STYLE: &str = r###"{"version":"1.0","truncation":null,"padding":null,
        "added_tokens":[
          {"id":0,"content":"[PAD]","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true},
          {"id":1,"content":"[UNK]","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true},
          {"id":2,"content":"[CLS]","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true},
          {"id":3,"content":"[SEP]","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true}],
        "normalizer":{"type":"BertNormalizer","clean_text":true,"handle_chinese_chars":true,"strip_accents":null,"lowercase":true},
        "pre_tokenizer":{"type":"BertPreTokenizer"},
        "post_processor":{"type":"TemplateProcessing",
          "single":[{"SpecialToken":{"id":"[CLS]","type_id":0}},{"Sequence":{"id":"A","type_id":0}},{"SpecialToken":{"id":"[SEP]","type_id":0}}],
          "pair":[{"SpecialToken":{"id":"[CLS]","type_id":0}},{"Sequence":{"id":"A","type_id":0}},{"SpecialToken":{"id":"[SEP]","type_id":0}},{"Sequence":{"id":"B","type_id":1}},{"SpecialToken":{"id":"[SEP]","type_id":1}}],
          "special_tokens":{"[CLS]":{"id":"[CLS]","ids":[2],"tokens":["[CLS]"]},"[SEP]":{"id":"[SEP]","ids":[3],"tokens":["[SEP]"]}}},
        "decoder":{"type":"WordPiece","prefix":"##","cleanup":true},
        "model":{"type":"WordPiece","unk_token":"[UNK]","continuing_subword_prefix":"##","max_input_chars_per_word":100,
          "vocab":{"[PAD]":0,"[UNK]":1,"[CLS]":2,"[SEP]":3,"the":4,"cat":5,"sat":6,"on":7,"mat":8,"token":9,"##izer":10,"##s":11,",":12,"é":13,"cafe":14}}}"###;

    #[test]
    fn the_direct_wordpiece_load_encodes_like_the_crates_own_loader() {
        let direct = wordpiece_direct(BERT_STYLE.as_bytes()).expect("direct path applies");
        let generic = Tokenizer::from_bytes(BERT_STYLE.as_bytes()).expect("crate loader");
        for text in [
            "The cat sat on the mat",
            "Tokenizers, tokenizer CAFÉ café",
            "  unknownword the\tcat ",
            "[CLS] the [SEP]",
            "",
        ] {
            let (a, b) = (
                direct.encode(text, true).expect("direct encodes"),
                generic.encode(text, true).expect("generic encodes"),
            );
            assert_eq!(a.get_ids(), b.get_ids(), "{text:?}");
            assert_eq!(a.get_tokens(), b.get_tokens(), "{text:?}");
            assert_eq!(a.get_offsets(), b.get_offsets(), "{text:?}");
            assert_eq!(a.get_type_ids(), b.get_type_ids(), "{text:?}");
            assert_eq!(
                a.get_special_tokens_mask(),
                b.get_special_tokens_mask(),
                "{text:?}"
            );
        }
        let ids = direct.encode("the tokenizers", true).expect("encodes");
        assert_eq!(ids.get_ids(), [2, 4, 9, 10, 11, 3]);
    }

    #[test]
    fn an_added_token_whose_id_would_move_sends_the_load_to_the_crates_loader() {
        // "[MASK]" is not in the vocabulary: the crate appends it after the vocabulary (id 15),
        // not at the 99 the file claims, so the direct path declines.
        let json = BERT_STYLE.replacen(
            r#""added_tokens":["#,
            r#""added_tokens":[{"id":99,"content":"[MASK]","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true},"#,
            1,
        );
        assert!(wordpiece_direct(json.as_bytes()).is_none());
        let loaded = parse_tokenizer(json.as_bytes()).expect("the crate's loader takes over");
        let generic = Tokenizer::from_bytes(json.as_bytes()).expect("crate loader");
        assert_eq!(loaded.token_to_id("[MASK]"), generic.token_to_id("[MASK]"));
    }

    #[test]
    fn other_models_and_broken_files_are_left_to_the_crates_loader() {
        assert!(wordpiece_direct(TINY_TOKENIZER.as_bytes()).is_none());
        assert!(parse_tokenizer(TINY_TOKENIZER.as_bytes()).is_ok());
        let err = parse_tokenizer(b"{\"model\": 3").expect_err("truncated JSON");
        assert!(!err.is_empty());
        assert!(wordpiece_direct(br#"{"version":"2.0","model":{}}"#).is_none());
    }

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
