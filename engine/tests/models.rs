//! Parity of the CPU engine with the committed PyTorch references
//! (tests/python/inference/reference_*.py), with real weights, plus the
//! ResNet-50 shape check and the bad-model-source errors.

mod common;

use std::path::Path;

use tandem_engine::load::{LoadError, LoadOptions, load_engine};
use tandem_engine::{DataType, Tensor, TensorData};

fn opts() -> LoadOptions {
    LoadOptions {
        cpu_threads: 2,
        ..LoadOptions::default()
    }
}

fn load(dir: &Path) -> tandem_engine::load::Loaded {
    load_engine(dir, &dir.join("model.safetensors"), &opts())
        .unwrap_or_else(|e| panic!("load {}: {e}", dir.display()))
}

fn f32s(t: &Tensor) -> &[f32] {
    match &t.data {
        TensorData::F32(v) => v,
        other => panic!("expected FP32, got {:?}", other.dtype()),
    }
}

#[test]
fn minilm_embeddings_match_the_sentence_transformers_reference_to_cosine_0_9999() {
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::fixture("minilm_embeddings.json")).unwrap(),
    )
    .unwrap();
    let sentences = fixture["sentences"].as_array().unwrap();
    let mut loaded = load(&common::model("minilm"));
    let spec = loaded.engine.spec().clone();
    assert_eq!(spec.outputs[0].name, "embedding");
    assert_eq!(spec.outputs[0].dims, vec![-1, 384]);

    // One padded batch of all sentences: the mask must make padding irrelevant.
    let ids = fixture_ids(sentences);
    let n = ids.len();
    let l = ids.iter().map(Vec::len).max().unwrap();
    let inputs = padded(&ids, l, 0, 0);
    let out = loaded.engine.forward(&inputs).unwrap();
    assert_eq!(out[0].shape, vec![n, 384]);
    let got = f32s(&out[0]);
    for (i, s) in sentences.iter().enumerate() {
        let want: Vec<f32> = s["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let row = &got[i * 384..(i + 1) * 384];
        let dot: f32 = row.iter().zip(&want).map(|(a, b)| a * b).sum();
        let na: f32 = row.iter().map(|a| a * a).sum::<f32>().sqrt();
        let nb: f32 = want.iter().map(|a| a * a).sum::<f32>().sqrt();
        let cos = dot / (na * nb);
        assert!(cos >= 0.9999, "sentence {i} {:?}: cosine {cos}", s["text"]);
        assert!(
            (na - 1.0).abs() < 1e-4,
            "embedding {i} not normalized: {na}"
        );
    }
}

/// The fixture sentences' token ids.
fn fixture_ids(sentences: &[serde_json::Value]) -> Vec<Vec<i64>> {
    sentences
        .iter()
        .map(|s| {
            s["input_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_i64().unwrap())
                .collect()
        })
        .collect()
}

/// `[n, l]` BERT inputs: each row's ids with mask 1 and type 0, then `l - len` tokens of id
/// `pad_id` and type `pad_type` with mask 0.
fn padded(ids: &[Vec<i64>], l: usize, pad_id: i64, pad_type: i64) -> [Tensor; 3] {
    let n = ids.len();
    let (mut flat, mut mask, mut types) = (Vec::new(), Vec::new(), Vec::new());
    for row in ids {
        let pad = l - row.len();
        flat.extend(row.iter().copied().chain(std::iter::repeat_n(pad_id, pad)));
        mask.extend(std::iter::repeat_n(1, row.len()).chain(std::iter::repeat_n(0, pad)));
        types.extend(std::iter::repeat_n(0, row.len()).chain(std::iter::repeat_n(pad_type, pad)));
    }
    [
        Tensor::i64(vec![n, l], flat),
        Tensor::i64(vec![n, l], mask),
        Tensor::i64(vec![n, l], types),
    ]
}

#[test]
fn minilm_embeddings_do_not_depend_on_padding_length_or_on_what_the_mask_hides() {
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::fixture("minilm_embeddings.json")).unwrap(),
    )
    .unwrap();
    let ids = fixture_ids(fixture["sentences"].as_array().unwrap());
    let l = ids.iter().map(Vec::len).max().unwrap();
    let mut loaded = load(&common::model("minilm"));
    let tight = loaded.engine.forward(&padded(&ids, l, 0, 0)).unwrap();
    // 40 more positions of real word ids and the other token type, all under mask 0: were
    // any of them computed as a key or pooled, every embedding would move.
    let loose = loaded
        .engine
        .forward(&padded(&ids, l + 40, 2023, 1))
        .unwrap();
    // Each sentence alone, unpadded.
    let alone: Vec<f32> = ids
        .iter()
        .flat_map(|row| {
            let out = loaded
                .engine
                .forward(&padded(std::slice::from_ref(row), row.len(), 0, 0))
                .unwrap();
            f32s(&out[0]).to_vec()
        })
        .collect();
    let max_diff = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max)
    };
    let (tight, loose) = (f32s(&tight[0]), f32s(&loose[0]));
    assert_eq!(tight.len(), ids.len() * 384);
    assert!(max_diff(tight, loose) < 1e-5, "{}", max_diff(tight, loose));
    assert!(
        max_diff(tight, &alone) < 1e-5,
        "{}",
        max_diff(tight, &alone)
    );
}

#[test]
fn the_cpu_engine_refuses_ids_outside_the_vocabulary_and_over_long_sequences() {
    let mut loaded = load(&common::model("minilm"));
    let mut err = |ids: Vec<i64>| match loaded.engine.forward(&padded(
        std::slice::from_ref(&ids),
        ids.len(),
        0,
        0,
    )) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("accepted"),
    };
    assert_eq!(
        err(vec![101, 30522, 102]),
        "invalid input: input_ids value 30522 at [0, 1] is outside the vocabulary (0..30522)"
    );
    assert_eq!(
        err(vec![101; 513]),
        "invalid input: sequence length 513 exceeds the model's maximum of 512"
    );
}

#[test]
fn efficientnet_lite0_classifies_chelsea_like_the_pytorch_reference() {
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::fixture("efficientnet_chelsea.json")).unwrap(),
    )
    .unwrap();
    let image = std::fs::read(common::fixture("chelsea_224_u8.nchw")).unwrap();
    assert_eq!(image.len(), 3 * 224 * 224);
    let mut loaded = load(&common::model("efficientnet-lite0"));
    assert!(loaded.engine.spec().accepts_dtype("input", DataType::Uint8));
    // Two rows: UINT8 (normalized by the engine) must equal the same image as FP32.
    let out = loaded
        .engine
        .forward(&[Tensor::u8(vec![1, 3, 224, 224], image.clone())])
        .unwrap();
    assert_eq!(out[0].shape, vec![1, 1000]);
    let logits = f32s(&out[0]);

    let want_logits: Vec<f32> = fixture["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    let max_diff = logits
        .iter()
        .zip(&want_logits)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(max_diff < 2e-3, "max |logit - reference| = {max_diff}");

    let mut order: Vec<usize> = (0..1000).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    let want_top5: Vec<usize> = fixture["top5"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    assert_eq!(&order[..5], want_top5.as_slice(), "top-5 classes differ");
}

#[test]
fn resnet50_with_random_weights_produces_finite_logits_of_the_right_shape() {
    let mut loaded = load(&common::model("resnet50"));
    let x: Vec<f32> = (0..2 * 3 * 224 * 224)
        .map(|i| ((i % 251) as f32 / 251.0) - 0.5)
        .collect();
    let out = loaded
        .engine
        .forward(&[Tensor::f32(vec![2, 3, 224, 224], x)])
        .unwrap();
    assert_eq!(out[0].shape, vec![2, 1000]);
    assert!(f32s(&out[0]).iter().all(|v| v.is_finite()));
    assert_eq!(loaded.engine.spec().outputs[0].name, "logits");
}

// ---- bad model sources: every one is a clear error naming the problem ----

fn tiny_bert_dir(dir: &Path, drop: Option<&str>, reshape: Option<&str>) {
    // A 1-layer BERT small enough to write in a test.
    let (h, i, v, p) = (4usize, 8usize, 10usize, 16usize);
    let mut tensors: Vec<(String, Vec<usize>)> = vec![
        ("embeddings.word_embeddings.weight".into(), vec![v, h]),
        ("embeddings.position_embeddings.weight".into(), vec![p, h]),
        ("embeddings.token_type_embeddings.weight".into(), vec![2, h]),
        ("embeddings.LayerNorm.weight".into(), vec![h]),
        ("embeddings.LayerNorm.bias".into(), vec![h]),
    ];
    for part in ["query", "key", "value"] {
        tensors.push((
            format!("encoder.layer.0.attention.self.{part}.weight"),
            vec![h, h],
        ));
        tensors.push((
            format!("encoder.layer.0.attention.self.{part}.bias"),
            vec![h],
        ));
    }
    for (n, s) in [
        ("attention.output.dense.weight", vec![h, h]),
        ("attention.output.dense.bias", vec![h]),
        ("attention.output.LayerNorm.weight", vec![h]),
        ("attention.output.LayerNorm.bias", vec![h]),
        ("intermediate.dense.weight", vec![i, h]),
        ("intermediate.dense.bias", vec![i]),
        ("output.dense.weight", vec![h, i]),
        ("output.dense.bias", vec![h]),
        ("output.LayerNorm.weight", vec![h]),
        ("output.LayerNorm.bias", vec![h]),
    ] {
        tensors.push((format!("encoder.layer.0.{n}"), s));
    }
    let mut header = serde_json::Map::new();
    let mut offset = 0;
    let mut body = Vec::new();
    for (name, mut shape) in tensors {
        if Some(name.as_str()) == drop {
            continue;
        }
        if Some(name.as_str()) == reshape {
            shape.push(1);
            shape[0] += 1;
        }
        let n: usize = shape.iter().product::<usize>() * 4;
        header.insert(name, serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + n]}));
        offset += n;
        body.extend(std::iter::repeat_n(0u8, n));
    }
    let mut h = serde_json::to_vec(&header).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
    bytes.extend(h);
    bytes.extend(body);
    std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
    std::fs::write(
        dir.join("config.json"),
        r#"{"model_type":"bert","hidden_size":4,"num_hidden_layers":1,"num_attention_heads":2,
            "intermediate_size":8,"vocab_size":10,"max_position_embeddings":16,"type_vocab_size":2}"#,
    )
    .unwrap();
}

fn load_err(dir: &Path, sha: Option<&str>) -> String {
    let o = LoadOptions {
        sha256: sha.map(str::to_owned),
        ..opts()
    };
    match load_engine(dir, &dir.join("model.safetensors"), &o) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_tiny_valid_bert_loads_so_the_failures_below_are_caused_by_their_defect() {
    let d = tempfile::tempdir().unwrap();
    tiny_bert_dir(d.path(), None, None);
    assert!(load_engine(d.path(), &d.path().join("model.safetensors"), &opts()).is_ok());
}

#[test]
fn a_missing_weights_file_is_named_in_the_error() {
    let d = tempfile::tempdir().unwrap();
    let msg = load_err(d.path(), None);
    assert!(
        msg.contains("model file not found") && msg.contains("model.safetensors"),
        "{msg}"
    );
}

#[test]
fn a_missing_config_json_is_named_in_the_error() {
    let d = tempfile::tempdir().unwrap();
    tiny_bert_dir(d.path(), None, None);
    std::fs::remove_file(d.path().join("config.json")).unwrap();
    let msg = load_err(d.path(), None);
    assert!(msg.contains("config.json not found"), "{msg}");
}

#[test]
fn a_wrong_digest_names_the_expected_and_actual_sha256() {
    let d = tempfile::tempdir().unwrap();
    tiny_bert_dir(d.path(), None, None);
    let msg = load_err(d.path(), Some(&"ab".repeat(32)));
    assert!(
        msg.contains("sha256 mismatch") && msg.contains(&"ab".repeat(32)),
        "{msg}"
    );
}

#[test]
fn a_missing_tensor_is_named_in_the_error() {
    let d = tempfile::tempdir().unwrap();
    tiny_bert_dir(
        d.path(),
        Some("encoder.layer.0.intermediate.dense.bias"),
        None,
    );
    let msg = load_err(d.path(), None);
    assert!(
        msg.contains("missing tensor `encoder.layer.0.intermediate.dense.bias`"),
        "{msg}"
    );
}

#[test]
fn a_mis_shaped_tensor_reports_the_expected_and_found_shapes() {
    let d = tempfile::tempdir().unwrap();
    tiny_bert_dir(d.path(), None, Some("embeddings.word_embeddings.weight"));
    let msg = load_err(d.path(), None);
    assert!(
        msg.contains("embeddings.word_embeddings.weight")
            && msg.contains("[11, 4, 1]")
            && msg.contains("[10, 4]"),
        "{msg}"
    );
}

#[test]
fn an_unsupported_architecture_is_named_in_the_error() {
    let d = tempfile::tempdir().unwrap();
    tiny_bert_dir(d.path(), None, None);
    std::fs::write(
        d.path().join("config.json"),
        r#"{"model_type":"llama","architectures":["LlamaForCausalLM"]}"#,
    )
    .unwrap();
    let msg = load_err(d.path(), None);
    assert!(
        msg.contains("unsupported architecture") && msg.contains("llama"),
        "{msg}"
    );
}

#[test]
fn cuda_without_a_usable_gpu_is_a_clear_error_unless_cpu_fallback_is_allowed() {
    let d = tempfile::tempdir().unwrap();
    tiny_bert_dir(d.path(), None, None);
    let cuda = LoadOptions {
        device: tandem_engine::Device::Cuda,
        ..opts()
    };
    match load_engine(d.path(), &d.path().join("model.safetensors"), &cuda) {
        Err(LoadError::CudaUnavailable(reason)) => assert!(!reason.is_empty()),
        Err(e) => panic!("unexpected error {e}"),
        // A machine with a GPU and the CUDA engine may load it; that is fine too.
        Ok(l) => assert_eq!(l.engine.device(), tandem_engine::Device::Cuda),
    }
    let fallback = LoadOptions {
        allow_cpu_fallback: true,
        ..cuda
    };
    let l = load_engine(d.path(), &d.path().join("model.safetensors"), &fallback).unwrap();
    if l.engine.device() == tandem_engine::Device::Cpu {
        assert!(l.fallback_reason.is_some());
    }
}
