//! Benchmark helper (not a test): tokenization throughput of the text
//! pipeline on one thread. `bench_text <tokenizer.json> <sentences.txt>
//! <iterations>` prints `batch1 <sentences/s>` and `batch32 <sentences/s>`:
//! the full preprocess step (UTF-8 check, tokenize, truncate to 256, pad to
//! the batch's longest, INT64 little-endian tensors), as the worker runs it.
//! Compared with HF `tokenizers` (Python) by `bench/preprocess/bench_text.py`.

use std::time::Instant;

use tandem_worker::preprocess::text::TextPipeline;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, tokenizer, sentences, iters] = args.as_slice() else {
        anyhow::bail!("usage: bench_text <tokenizer.json> <sentences.txt> <iterations>");
    };
    let pipeline = TextPipeline::load(tokenizer, 256)?;
    let text = std::fs::read_to_string(sentences)?;
    let lines: Vec<&[u8]> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::as_bytes)
        .collect();
    anyhow::ensure!(!lines.is_empty(), "no sentences in {sentences}");
    let iters: usize = iters.parse()?;
    for batch in [1usize, 32] {
        let batches: Vec<Vec<&[u8]>> = (0..lines.len())
            .map(|i| (0..batch).map(|j| lines[(i + j) % lines.len()]).collect())
            .collect();
        let run = |k: usize| -> anyhow::Result<()> {
            pipeline
                .process_batch(&batches[k % batches.len()])
                .map(|_| ())
                .map_err(|(i, e)| anyhow::anyhow!("item {i}: {e}"))
        };
        run(0)?;
        let t = Instant::now();
        for k in 0..iters {
            run(k)?;
        }
        let per_s = (iters * batch) as f64 / t.elapsed().as_secs_f64();
        println!("batch{batch} {per_s:.0}");
    }
    Ok(())
}
