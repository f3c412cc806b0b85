//! CPU engine throughput: MiniLM sentences/s and image classifier images/s.
//!
//! `cargo run --release -p tandem-engine --example bench_cpu -- MODELS_DIR THREADS`
//! (MODELS_DIR from scripts/fetch-models.sh). Prints one JSON line per model.

use std::path::Path;
use std::time::Instant;

use tandem_engine::load::{LoadOptions, load_engine};
use tandem_engine::{Engine, Tensor};

fn time_it(engine: &mut dyn Engine, inputs: &[Tensor], iters: usize) -> f64 {
    engine.forward(inputs).expect("warm-up");
    let t0 = Instant::now();
    for _ in 0..iters {
        engine.forward(inputs).expect("forward");
    }
    t0.elapsed().as_secs_f64() / iters as f64
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let models = Path::new(args.get(1).ok_or("usage: bench_cpu MODELS_DIR [THREADS]")?);
    let threads: usize = args.get(2).map_or(Ok(2), |t| t.parse())?;
    let opts = LoadOptions {
        cpu_threads: threads,
        ..LoadOptions::default()
    };
    let fixture: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/python/inference/fixtures/minilm_embeddings.json"),
    )?)?;

    // MiniLM: the 8 fixture sentences repeated to a batch of 32, padded to the longest.
    let dir = models.join("minilm");
    let mut m = load_engine(&dir, &dir.join("model.safetensors"), &opts)?;
    let sentences = fixture["sentences"].as_array().ok_or("fixture")?;
    let ids: Vec<Vec<i64>> = (0..32)
        .map(|i| {
            sentences[i % sentences.len()]["input_ids"]
                .as_array()
                .map(|a| a.iter().filter_map(|v| v.as_i64()).collect())
                .unwrap_or_default()
        })
        .collect();
    let l = ids.iter().map(Vec::len).max().unwrap_or(1);
    let (mut flat, mut mask) = (Vec::new(), Vec::new());
    for row in &ids {
        flat.extend(
            row.iter()
                .copied()
                .chain(std::iter::repeat_n(0, l - row.len())),
        );
        mask.extend(std::iter::repeat_n(1, row.len()).chain(std::iter::repeat_n(0, l - row.len())));
    }
    let n = ids.len();
    let inputs = [
        Tensor::i64(vec![n, l], flat),
        Tensor::i64(vec![n, l], mask),
        Tensor::i64(vec![n, l], vec![0; n * l]),
    ];
    let per_batch = time_it(m.engine.as_mut(), &inputs, 10);
    println!(
        "{{\"model\":\"minilm\",\"engine\":\"tandem-cpu\",\"threads\":{threads},\"batch\":{n},\"seq_len\":{l},\"items_per_s\":{:.1}}}",
        n as f64 / per_batch
    );

    for (name, batch, iters) in [("efficientnet-lite0", 8usize, 5usize), ("resnet50", 8, 2)] {
        let dir = models.join(name);
        let mut m = load_engine(&dir, &dir.join("model.safetensors"), &opts)?;
        let x: Vec<f32> = (0..batch * 3 * 224 * 224)
            .map(|i| ((i % 251) as f32 / 125.0) - 1.0)
            .collect();
        let per_batch = time_it(
            m.engine.as_mut(),
            &[Tensor::f32(vec![batch, 3, 224, 224], x)],
            iters,
        );
        println!(
            "{{\"model\":\"{name}\",\"engine\":\"tandem-cpu\",\"threads\":{threads},\"batch\":{batch},\"items_per_s\":{:.1}}}",
            batch as f64 / per_batch
        );
    }
    Ok(())
}
