//! Robustness check (not a test): feeds mutated images to the image pipeline and reports any
//! input that makes it panic. `fuzz_image <seed-dir> <iterations> [rng-seed]` reads every file
//! in `<seed-dir>` (e.g. the output of `tests/python/preprocess/gen_fuzz_seeds.py`), and per
//! iteration takes one, applies 1–8 random mutations (bit flips, overwritten bytes, marker
//! bytes, cuts, repeated or deleted runs, most of them near the headers), and runs it through
//! one of three pipelines: 1/4-scale JPEG draft with a centre crop to FP32, 1/2 scale with
//! fit-and-pad to UINT8, and full decode stretched to FP32, under a 40-megapixel limit.
//!
//! Prints how many inputs were accepted, how many were refused and with which messages (digits
//! masked, the most common first), and how many panicked; each panicking input is written to
//! `<seed-dir>/panic-<iteration>.bin`. The sequence is fixed by `rng-seed`, so a run can be
//! repeated. An input that crashes the process outright (a fault in libjpeg-turbo, say) is the
//! one in `<seed-dir>/current.bin` when it stops.

use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

use anyhow::Context;
use tandem_worker::config::{
    ImageConfig, ImageDtype, Layout, Normalize, Resize, ResizeFilter, ResizeMode,
};
use tandem_worker::preprocess::image::{ImagePipeline, JpegDraft};

/// xorshift64: deterministic and enough for picking mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number below `n` (0 when `n` is 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn pipeline(mode: ResizeMode, draft: JpegDraft, dtype: ImageDtype) -> ImagePipeline {
    let cfg = ImageConfig {
        resize: Resize {
            width: 224,
            height: 224,
            mode,
            filter: ResizeFilter::Bilinear,
        },
        normalize: Normalize::default(),
        layout: Layout::Nchw,
        dtype,
        jpeg_draft: draft,
    };
    ImagePipeline::new(cfg, 40_000_000)
}

fn mutate(r: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut d = seed.to_vec();
    for _ in 0..1 + r.below(8) {
        if d.is_empty() {
            break;
        }
        let at = r.below(d.len());
        match r.below(8) {
            0 => d[at] ^= 1 << r.below(8),
            1 => d[at] = r.next() as u8,
            2 => d[at] = [0x00, 0xFF, 0x7F, 0x80][r.below(4)],
            3 => d.truncate(at.max(1)),
            // A marker: JPEG's are 0xFF followed by 0xC0..=0xFE.
            4 => {
                d.splice(at..at, [0xFF, 0xC0 + r.below(0x3F) as u8]);
            }
            // The first 2 KB: headers, tables, chunk lengths.
            5 => {
                let i = r.below(d.len().min(2048));
                d[i] = r.next() as u8;
                if let Some(b) = d.get_mut(i + 1) {
                    *b = (r.next() >> 8) as u8;
                }
            }
            6 => {
                let run = d[at..(at + r.below(64)).min(d.len())].to_vec();
                let to = r.below(d.len());
                d.splice(to..to, run);
            }
            _ => {
                let end = (at + r.below(256)).min(d.len());
                d.drain(at..end);
            }
        }
    }
    d
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (dir, iterations, rng_seed) = match args.as_slice() {
        [_, dir, n] => (dir, n, None),
        [_, dir, n, seed] => (dir, n, Some(seed)),
        _ => anyhow::bail!("usage: fuzz_image <seed-dir> <iterations> [rng-seed]"),
    };
    let dir = Path::new(dir);
    let iterations: usize = iterations.parse().context("iterations")?;
    let rng_seed: u64 = rng_seed.map_or(Ok(1), |s| s.parse()).context("rng-seed")?;
    let mut seeds = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if path.is_file() && !name.starts_with("panic-") && name != "current.bin" {
            seeds.push(std::fs::read(&path).with_context(|| format!("read {}", path.display()))?);
        }
    }
    anyhow::ensure!(!seeds.is_empty(), "no seed files in {}", dir.display());

    let pipelines = [
        pipeline(ResizeMode::CenterCrop, JpegDraft::Fast, ImageDtype::Fp32),
        pipeline(ResizeMode::FitPad, JpegDraft::Quality, ImageDtype::Uint8),
        pipeline(ResizeMode::Stretch, JpegDraft::Off, ImageDtype::Fp32),
    ];
    let mut outputs: Vec<Vec<u8>> = pipelines.iter().map(|p| vec![0; p.item_bytes()]).collect();
    let mut rng = Rng(rng_seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let (mut accepted, mut panics) = (0usize, 0usize);
    let mut refusals: BTreeMap<String, usize> = BTreeMap::new();
    // Panics are counted and their inputs kept; the default hook would print each one.
    std::panic::set_hook(Box::new(|_| {}));
    let current = dir.join("current.bin");
    for i in 0..iterations {
        let seed = &seeds[rng.below(seeds.len())];
        let input = mutate(&mut rng, seed);
        std::fs::write(&current, &input)?;
        let which = rng.below(pipelines.len());
        let run = || pipelines[which].process_into(&input, &mut outputs[which]);
        match catch_unwind(AssertUnwindSafe(run)) {
            Ok(Ok(())) => accepted += 1,
            Ok(Err(e)) => {
                let masked = e.to_string().replace(|c: char| c.is_ascii_digit(), "#");
                *refusals.entry(masked).or_default() += 1;
            }
            Err(_) => {
                panics += 1;
                std::fs::write(dir.join(format!("panic-{i}.bin")), &input)?;
            }
        }
    }
    std::fs::remove_file(&current)?;
    let refused: usize = refusals.values().sum();
    println!("{iterations} inputs: {accepted} accepted, {refused} refused, {panics} panicked");
    let mut by_count: Vec<_> = refusals.into_iter().collect();
    by_count.sort_by_key(|&(_, n)| std::cmp::Reverse(n));
    for (message, n) in by_count {
        println!("{n:8}  {message}");
    }
    anyhow::ensure!(
        panics == 0,
        "{panics} inputs panicked: see {}",
        dir.display()
    );
    Ok(())
}
