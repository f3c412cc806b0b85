//! Benchmark helper (not a test): times the image pipeline on one thread.
//! `bench_image <jpeg> <iterations> <out-prefix> [policies]` prints one line per JPEG
//! decode policy (`off`, `quality`, `fast`: see `JpegDraft`; all three unless a
//! comma-separated subset is given, e.g. `fast` for a profile) with ms/image for
//! 3×224×224 FP32 NCHW CenterCrop Bilinear, and writes each policy's UINT8
//! NHWC result to `<out-prefix>.<policy>.u8` for the quality comparison in
//! `bench/preprocess/bench_image.py`.

use std::time::Instant;

use tandem_worker::config::{
    ImageConfig, ImageDtype, Layout, Normalize, Resize, ResizeFilter, ResizeMode,
};
use tandem_worker::preprocess::image::{ImagePipeline, JpegDraft};

fn pipeline(dtype: ImageDtype, layout: Layout, draft: JpegDraft) -> ImagePipeline {
    ImagePipeline::new(
        ImageConfig {
            resize: Resize {
                width: 224,
                height: 224,
                mode: ResizeMode::CenterCrop,
                filter: ResizeFilter::Bilinear,
            },
            normalize: Normalize::default(),
            layout,
            dtype,
            jpeg_draft: draft,
        },
        100_000_000,
    )
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (path, iters, out, only) = match args.as_slice() {
        [_, path, iters, out] => (path, iters, out, None),
        [_, path, iters, out, only] => (path, iters, out, Some(only)),
        _ => anyhow::bail!("usage: bench_image <jpeg> <iterations> <out-prefix> [policies]"),
    };
    let data = std::fs::read(path)?;
    let iters: usize = iters.parse()?;
    for (name, draft) in [
        ("off", JpegDraft::Off),
        ("quality", JpegDraft::Quality),
        ("fast", JpegDraft::Fast),
    ] {
        if only.is_some_and(|only| !only.split(',').any(|p| p == name)) {
            continue;
        }
        let fp32 = pipeline(ImageDtype::Fp32, Layout::Nchw, draft);
        let mut buf = vec![0u8; fp32.item_bytes()];
        fp32.process_into(&data, &mut buf)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let t = Instant::now();
        for _ in 0..iters {
            fp32.process_into(&data, &mut buf)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        // 0 iterations (bench_image.py --cpu-time's baseline run) prints 0.
        let ms = t.elapsed().as_secs_f64() * 1e3 / iters.max(1) as f64;
        let u8p = pipeline(ImageDtype::Uint8, Layout::Nhwc, draft);
        let mut u8buf = vec![0u8; u8p.item_bytes()];
        u8p.process_into(&data, &mut u8buf)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        std::fs::write(format!("{out}.{name}.u8"), &u8buf)?;
        println!("{name} {ms:.3}");
    }
    Ok(())
}
