//! The text pipeline: UTF-8 sentences → `input_ids`, `attention_mask`,
//! `token_type_ids` (INT64 `[N, L]`), with `tokenizers` (pure Rust).
//!
//! The tokenizer's own padding setting is removed on load (MiniLM's
//! `tokenizer.json` pads every sequence to 128, which would waste compute and,
//! without the mask, change results); truncation is set to `maxLength`. Each
//! batch is padded only to its longest sequence (dynamic padding), pad id from
//! the tokenizer's padding config when it had one, else 0, mask 0 on padding.
//!
//! Truncation keeps the first `maxLength` tokens, so for BERT-style tokenizers only a prefix
//! of each text is tokenized (see [`PrefixRules`]): an item costs what truncation keeps, not
//! what the client sent.

use std::path::Path;

use tokenizers::{
    AddedToken, Encoding, ModelWrapper, NormalizerWrapper, PaddingParams, PreTokenizerWrapper,
    Tokenizer, TruncationParams,
};

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
    /// `None`: this tokenizer is given whole texts.
    prefix_rules: Option<PrefixRules>,
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
        let prefix_rules = PrefixRules::for_tokenizer(&tokenizer);
        Ok(Self {
            tokenizer,
            pad_id,
            pad_type_id,
            max_length,
            prefix_rules,
        })
    }

    /// Configured truncation length.
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// Encodes `text` with the ids, type ids and special-token mask that
    /// `self.tokenizer.encode(text, true)` gives (offsets aside), tokenizing only about as much
    /// of it as truncation keeps; also returns how many bytes the tokenizer was given.
    ///
    /// A text within the first byte budget is encoded as it is. A longer one is compacted
    /// ([`Compactor`]) up to the budget and cut at its last cut point; when that prefix gives
    /// more tokens than truncation keeps (its encoding overflows), its kept tokens are the whole
    /// text's. Otherwise the budget doubles, ending with the whole (compacted) text, so at most
    /// about twice the work that suffices is done.
    fn encode_bounded(&self, text: &str) -> tokenizers::Result<(Encoding, usize)> {
        let mut budget = self
            .max_length
            .max(1)
            .saturating_mul(PREFIX_BYTES_PER_TOKEN);
        let Some(rules) = self.prefix_rules.as_ref().filter(|_| text.len() > budget) else {
            return Ok((self.tokenizer.encode(text, true)?, text.len()));
        };
        let mut compact = Compactor {
            text,
            rules,
            read: 0,
            out: String::new(),
            last_cut: 0,
        };
        let mut tried = 0;
        loop {
            if compact.fill(budget) {
                let enc = self.tokenizer.encode(compact.out.as_str(), true)?;
                return Ok((enc, compact.out.len()));
            }
            let cut = compact.last_cut;
            if cut > tried {
                let enc = self.tokenizer.encode(&compact.out[..cut], true)?;
                if !enc.get_overflowing().is_empty() {
                    return Ok((enc, cut));
                }
                tried = cut;
            }
            budget = budget.saturating_mul(2);
        }
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
            let (enc, _) = self
                .encode_bounded(text)
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

/// First prefix tried, in bytes per token that truncation keeps: English text runs 4–6
/// bytes a token, so the first try is nearly always enough.
const PREFIX_BYTES_PER_TOKEN: usize = 16;

/// Where a text may be cut, and which runs in it may be shortened, without changing the tokens
/// that truncation keeps. Only for BERT-style tokenizers (`BertNormalizer`, `BertPreTokenizer`),
/// which this reasoning is about; others are given whole texts.
///
/// Why a prefix gives the same tokens: `BertNormalizer` works char by char (control chars
/// dropped, whitespace to `' '`, spaces around CJK ideographs, NFD with non-spacing marks
/// dropped, lowercase; NFD reorders only runs of combining marks, never across another char),
/// `BertPreTokenizer` splits at whitespace and isolates punctuation, and the model then sees
/// each word alone. So where the char at `p` always becomes a split (whitespace that is not a
/// control char, ASCII punctuation, a CJK ideograph with `handle_chinese_chars`), the words of
/// `text[..p]` are the first words of `text`, and its tokens the first tokens of `text`.
/// Added tokens (`[CLS]`, `[MASK]`, …) are matched before all that, in the raw text (or, for
/// `normalized` ones, the lowercased text); a cut char that occurs in no added token cannot be
/// inside a match, so the matches before `p` are unchanged. A `single_word` added token looks
/// at the char after it, so with one, cut chars that are word chars (`_`, CJK) are not used.
///
/// Why shortening runs is exact: a run of whitespace is dropped by the pre-tokenizer whatever
/// its length, and a run of control chars is deleted by `clean_text`; each keeps its first
/// char, so that no added token (none holds either) can match across where it was. A WordPiece
/// word longer than `max_input_chars_per_word` chars is one unknown token whatever its length,
/// and ASCII letters and digits stay one char each and never split; so a run of them keeps its
/// first and last `keep` chars, `keep` being that limit plus the longest added token plus one:
/// added tokens matched at both ends still leave a word past the limit, and none matches inside
/// the run (none is only letters and digits, else runs are kept whole).
///
/// What this does not bound: a long stretch with no cut point and none of those runs (say
/// megabytes of `é`) is tokenized whole, as before. And a word past the kept tokens that the
/// model cannot tokenize (a vocabulary without its unknown token) no longer fails the item.
#[derive(Debug, Clone)]
struct PrefixRules {
    /// Every char of every added token, sorted: never a cut point.
    in_added_tokens: Vec<char>,
    /// Cut before CJK ideographs (`handle_chinese_chars`, and no `single_word` added token).
    cjk: bool,
    /// Cut before `_` (no `single_word` added token).
    underscore: bool,
    /// Keep only the first of a run of control chars (`clean_text`).
    collapse_controls: bool,
    /// Keep only this many chars at each end of a longer run of ASCII letters and digits.
    alnum_keep: Option<usize>,
}

impl PrefixRules {
    fn for_tokenizer(tokenizer: &Tokenizer) -> Option<Self> {
        let Some(NormalizerWrapper::BertNormalizer(normalizer)) = tokenizer.get_normalizer() else {
            return None;
        };
        let Some(PreTokenizerWrapper::BertPreTokenizer(_)) = tokenizer.get_pre_tokenizer() else {
            return None;
        };
        let added: Vec<AddedToken> = tokenizer.get_added_tokens_decoder().into_values().collect();
        // A normalized ASCII added token is matched as its lowercase, listed below too.
        if added.iter().any(|t| {
            t.content.chars().any(char::is_whitespace) || (t.normalized && !t.content.is_ascii())
        }) {
            return None;
        }
        let mut in_added_tokens: Vec<char> = added
            .iter()
            .flat_map(|t| t.content.chars())
            .flat_map(|c| [c, c.to_ascii_lowercase()])
            .collect();
        in_added_tokens.sort_unstable();
        in_added_tokens.dedup();
        let longest_added = added
            .iter()
            .map(|t| t.content.chars().count())
            .max()
            .unwrap_or(0);
        let alnum_added = added
            .iter()
            .any(|t| t.content.bytes().all(|b| b.is_ascii_alphanumeric()));
        let alnum_keep = match tokenizer.get_model() {
            ModelWrapper::WordPiece(model) if !alnum_added => {
                Some(model.max_input_chars_per_word + longest_added + 1)
            }
            _ => None,
        };
        let single_word = added.iter().any(|t| t.single_word);
        let collapse_controls =
            normalizer.clean_text && !in_added_tokens.iter().any(|&c| is_removed_control(c));
        Some(Self {
            in_added_tokens,
            cjk: normalizer.handle_chinese_chars && !single_word,
            underscore: !single_word,
            collapse_controls,
            alnum_keep,
        })
    }

    /// Whether a text may be cut just before `c`.
    fn is_cut(&self, c: char) -> bool {
        let splits = is_separator(c)
            || (c.is_ascii_punctuation() && (c != '_' || self.underscore))
            || (self.cjk && is_cjk_ideograph(c));
        splits && self.in_added_tokens.binary_search(&c).is_err()
    }
}

/// Whitespace that `BertNormalizer` keeps (as `' '`): not a control char, save tab and newlines.
fn is_separator(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r') || (c.is_whitespace() && !c.is_control())
}

/// Chars `BertNormalizer`'s `clean_text` deletes (some of them: the Cc ones and U+FFFD).
fn is_removed_control(c: char) -> bool {
    c == '\u{fffd}' || (c.is_control() && !matches!(c, '\t' | '\n' | '\r'))
}

/// The main CJK blocks, a subset of the ideographs `BertNormalizer` puts spaces around.
fn is_cjk_ideograph(c: char) -> bool {
    matches!(c, '\u{3400}'..='\u{4DBF}' | '\u{4E00}'..='\u{9FFF}')
}

/// A text with its runs shortened as [`PrefixRules`] allows, produced as far as asked.
struct Compactor<'a> {
    text: &'a str,
    rules: &'a PrefixRules,
    /// Bytes of `text` consumed.
    read: usize,
    out: String,
    /// The last cut point found in `out`.
    last_cut: usize,
}

impl Compactor<'_> {
    /// Appends until `out` holds `budget` bytes or `text` is used up; true when it is.
    fn fill(&mut self, budget: usize) -> bool {
        while self.out.len() < budget {
            let rest = &self.text[self.read..];
            let Some(c) = rest.chars().next() else {
                return true;
            };
            if self.rules.is_cut(c) {
                self.last_cut = self.out.len();
            }
            let consumed = if is_separator(c) {
                self.out.push(c);
                run_len(rest, is_separator)
            } else if self.rules.collapse_controls && is_removed_control(c) {
                self.out.push(c);
                run_len(rest, is_removed_control)
            } else if let Some(keep) = self.rules.alnum_keep.filter(|_| c.is_ascii_alphanumeric()) {
                let run = rest.bytes().take_while(u8::is_ascii_alphanumeric).count();
                if run > 2 * keep {
                    self.out.push_str(&rest[..keep]);
                    self.out.push_str(&rest[run - keep..run]);
                } else {
                    self.out.push_str(&rest[..run]);
                }
                run
            } else {
                self.out.push(c);
                c.len_utf8()
            };
            self.read += consumed;
        }
        self.read == self.text.len()
    }
}

/// Length in bytes of the run of chars at the start of `s` that satisfy `f`.
fn run_len(s: &str, f: fn(char) -> bool) -> usize {
    s.char_indices()
        .find(|&(_, c)| !f(c))
        .map_or(s.len(), |(i, _)| i)
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

    /// A change to a `tokenizer.json`.
    type JsonEdit = fn(String) -> String;

    /// `BERT_STYLE` with `edit` applied to its JSON, as a pipeline truncating at `max_length`.
    fn bert_style(max_length: usize, edit: impl Fn(String) -> String) -> TextPipeline {
        let json = edit(BERT_STYLE.to_owned());
        let tokenizer = parse_tokenizer(json.as_bytes()).expect("tokenizer loads");
        TextPipeline::from_tokenizer(tokenizer, max_length).expect("pipeline")
    }

    /// Asserts that the bounded encoding of `text` is the whole text's, truncated; returns how
    /// many bytes the bounded one tokenized.
    fn assert_bounded_is_exact(pipeline: &TextPipeline, text: &str) -> usize {
        let whole = pipeline
            .tokenizer
            .encode(text, true)
            .expect("whole encodes");
        let (bounded, bytes) = pipeline.encode_bounded(text).expect("bounded encodes");
        let shown = || text.chars().take(200).collect::<String>();
        assert_eq!(bounded.get_ids(), whole.get_ids(), "ids of {:?}", shown());
        assert_eq!(
            bounded.get_type_ids(),
            whole.get_type_ids(),
            "{:?}",
            shown()
        );
        assert_eq!(
            bounded.get_attention_mask(),
            whole.get_attention_mask(),
            "{:?}",
            shown()
        );
        assert_eq!(
            bounded.get_special_tokens_mask(),
            whole.get_special_tokens_mask(),
            "{:?}",
            shown()
        );
        bytes
    }

    #[test]
    fn a_bounded_encoding_has_the_ids_of_the_whole_text_truncated_for_random_tricky_texts() {
        let long_alnum = "Z".repeat(300);
        let digits = "0123456789".repeat(5);
        let long_accented = "é".repeat(120);
        let mut pieces: Vec<&str> = concat!(
            "the|cat|sat|tokenizers|token|sssssssssssssssssssss|CAFÉ|café|e\u{301}|\u{301}|\u{327}|",
            " |   |\t|\n|\u{3000}|\u{a0}|\u{2000}|\u{0B}|\u{85}|\0|\u{fffd}|\u{200b}|",
            ",|.|_|[|]|«|Σ|[CLS]|[SEP]|[UNK]|<m>|<M>|中|文字|\u{F900}|ab|x.y",
        )
        .split('|')
        .collect();
        pieces.extend([long_alnum.as_str(), &digits, &long_accented]);
        // A: as loaded. B: words of at most 5 chars and a single-word, stripping, normalized
        // added token. C: no text cleaning or CJK spacing, and an added token holding '.' that
        // can overlap a run of letters at either end. D: an all-alphanumeric added token.
        let variants: [(&str, JsonEdit); 4] = [
            ("A", |j| j),
            ("B", |j| {
                with_added(
                    &short_words(j),
                    r#""content":"<m>","single_word":true,"lstrip":true,"rstrip":true,"normalized":true"#,
                )
            }),
            ("C", |j| {
                let j = j.replace(
                    r#""clean_text":true,"handle_chinese_chars":true"#,
                    r#""clean_text":false,"handle_chinese_chars":false"#,
                );
                with_added(
                    &j,
                    r#""content":"x.y","single_word":false,"lstrip":false,"rstrip":true,"normalized":false"#,
                )
            }),
            ("D", |j| {
                with_added(
                    &short_words(j),
                    r#""content":"ab","single_word":false,"lstrip":false,"rstrip":false,"normalized":false"#,
                )
            }),
        ];
        // A word WordPiece can split ("token", "##s", …) when not too long.
        let long_word = format!("token{}", "s".repeat(300));
        let fixed = [
            format!("x.y{long_word}x.y the cat"),
            format!("[CLS]{long_word}[SEP] the cat"),
            format!("<m>{long_word}<m> the cat"),
            format!("{}the cat", " ".repeat(500)),
            "ab".repeat(200),
        ];
        // xorshift64: deterministic, no dependency.
        let mut state = 0x9E37_79B9_7F4A_7C15_u64;
        let mut next = move |below: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % below as u64) as usize
        };
        for (name, edit) in variants {
            for max_length in [2, 3, 5, 8, 20] {
                let pipeline = bert_style(max_length, edit);
                assert!(
                    pipeline.prefix_rules.is_some(),
                    "variant {name} is BERT-style"
                );
                for text in &fixed {
                    assert_bounded_is_exact(&pipeline, text);
                }
                for _ in 0..150 {
                    let text: String = (0..next(300)).map(|_| pieces[next(pieces.len())]).collect();
                    assert_bounded_is_exact(&pipeline, &text);
                }
            }
        }
    }

    /// `json` with words of more than 5 chars unknown.
    fn short_words(json: String) -> String {
        json.replace(
            r#""max_input_chars_per_word":100"#,
            r#""max_input_chars_per_word":5"#,
        )
    }

    /// `json` with one more added token (id 15, not special), `fields` its other fields.
    fn with_added(json: &str, fields: &str) -> String {
        let token = format!(r#"{{"id":15,{fields},"special":false}},"#);
        json.replacen(
            r#""added_tokens":["#,
            &format!(r#""added_tokens":[{token}"#),
            1,
        )
    }

    #[test]
    fn only_a_prefix_of_a_long_text_is_tokenized() {
        let pipeline = bert_style(8, |j| j);
        // The first budget, or a doubling or two where a shortened run of 214 letters fills it.
        let bound = 4 * 8 * PREFIX_BYTES_PER_TOKEN;
        let sentences = "The cat sat on the mat, tokenizers. ".repeat(60_000);
        let texts = [
            sentences.clone(),
            " \t\n\u{3000}".repeat(500_000) + &sentences,
            "a".repeat(2_000_000) + " " + &sentences,
            "\0".repeat(2_000_000) + "cat " + &sentences,
            "中文".repeat(500_000),
            ".".repeat(2_000_000),
        ];
        for text in &texts {
            let bytes = assert_bounded_is_exact(&pipeline, text);
            assert!(
                bytes <= bound,
                "{bytes} bytes of {} tokenized for {:?}",
                text.len(),
                &text[..12]
            );
        }
    }

    #[test]
    fn a_tokenizer_that_is_not_bert_style_gets_the_whole_text() {
        let tiny = parse_tokenizer(TINY_TOKENIZER.as_bytes()).expect("tiny loads");
        let spaced = bert_style(8, |j| {
            with_added(
                &j,
                r#""content":"the cat","single_word":false,"lstrip":false,"rstrip":false,"normalized":false"#,
            )
        });
        for pipeline in [
            TextPipeline::from_tokenizer(tiny, 3).expect("pipeline"),
            spaced,
        ] {
            assert!(pipeline.prefix_rules.is_none());
            let text = "hello world the cat ".repeat(1000);
            assert_eq!(assert_bounded_is_exact(&pipeline, &text), text.len());
        }
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
